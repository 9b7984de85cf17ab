"""Any backbone, settings file and tracker for the training CLI: --model torchvision:NAME /
timm:NAME (rdr_fast.models.external), --config FILE (rdr_fast.config_file) and --logger
(rdr_fast.loggers, through fakes of tensorboard and wandb). The bad command lines are in
test_cli.py's table."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torchvision

from rdr_fast import evaluate, loggers, train
from rdr_fast.cli_checks import UsageError
from rdr_fast.data import load_dataset
from rdr_fast.data.datasets import IMAGE_SIZES
from rdr_fast.models import WithFeatures, build_model, input_channels, model_problem

QUIET = ["--quiet", "--device", "cpu"]


def cifar_args(cifar_root, *extra):
    """One epoch on the CIFAR-10 fixture files (3-channel 32x32 images, 49 to train on at IF 100)."""
    return ["--dataset", "cifar10_lt", "--data-root", str(cifar_root[0]), "--epochs", "1",
            "--batch-size", "32", *QUIET, *extra]


# ----------------------------------------------------------------------------- models by name

@pytest.mark.parametrize("name,feat_dim,head", [("resnet18", 512, "fc"), ("mobilenet_v3_small", 1024, "classifier.3")])
def test_a_torchvision_model_by_name_returns_features_and_its_own_logits(name, feat_dim, head):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", 7).eval()
    assert isinstance(model, WithFeatures) and (model.feat_dim, model.num_classes, model.head_name) == (feat_dim, 7, head)
    assert isinstance(model.model, type(torchvision.models.get_model(name)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = model(x)
        assert torch.equal(logits, model.model(x))
    assert features.shape == (2, feat_dim)
    torch.testing.assert_close(model.fc(features), logits)


def test_models_with_auxiliary_heads_train_on_the_main_one():
    for name in ("googlenet", "inception_v3"):
        with torch.device("meta"):
            model = build_model(f"torchvision:{name}", 5).train()
            features, logits = model(torch.empty(2, 3, 299, 299))
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5) and features.shape == (2, model.feat_dim)


@pytest.mark.parametrize("name,message", [
    ("torchvision:resnet181", "no classification model 'resnet181'; close matches: resnet18"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not a classification model"),
    ("torchvision:raft_large", "not a classification model"),
    ("vgg16", "unknown model 'vgg16' (torchvision has it: torchvision:vgg16)"),
    ("resnet", "choose one of resnet10, resnet32, resnet50, resnext50, resnet152, small_cnn, torchvision:NAME"),
    ("keras:resnet18", "unknown model"),
])
def test_names_that_build_nothing_are_explained(name, message):
    assert message in model_problem(name)
    with pytest.raises(ValueError, match="model"):
        build_model(name, 3)


def test_a_model_whose_head_is_no_linear_layer_is_refused():
    with pytest.raises(ValueError, match="torchvision:squeezenet1_0 has no final nn.Linear classifier"):
        build_model("torchvision:squeezenet1_0", 3)


def test_channels_torchvision_models_take_three_and_timm_models_any():
    assert input_channels("torchvision:resnet18") == 3 and input_channels("timm:resnet18") is None
    assert input_channels("resnext50") == 3 and input_channels("small_cnn") is None
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("torchvision:resnet18", 3, in_channels=1)


def test_timm_missing_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)       # import timm raises ImportError
    assert model_problem("timm:resnet18") == 'timm is not installed: pip install "rdr_fast[timm]"'
    with pytest.raises(ImportError, match=r'pip install "rdr_fast\[timm\]"'):
        build_model("timm:resnet18", 3)
    with pytest.raises(UsageError, match=r'--model timm:resnet18: timm is not installed: pip install "rdr_fast\[timm\]"'):
        train.configure(["--model", "timm:resnet18"])


def test_a_timm_model_by_name_takes_any_channel_count():
    timm = pytest.importorskip("timm")
    model = build_model("timm:resnet18", 5, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features, logits = model(x)
        assert torch.equal(logits, model.model(x))
    assert features.shape == (2, model.feat_dim) and model.feat_dim == model.model.get_classifier().in_features
    assert isinstance(model.model, timm.models.ResNet) and "close matches: resnet18" in model_problem("timm:resnet181")


def test_pretrained_torchvision_weights_load_and_another_head_is_skipped(tmp_path):
    source = torchvision.models.mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)               # the library's own checkpoint, as it is
    model = build_model("torchvision:mobilenet_v3_small", 6, pretrained=path)
    assert torch.equal(model.model.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(model.model.classifier[0].weight, source.classifier[0].weight)   # below the head: loaded
    assert sorted(model.pretrained_report["skipped"]) == ["classifier.3.bias", "classifier.3.weight"]
    assert model.fc.weight.shape == (6, 1024)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not match MobileNetV3"):
        build_model("torchvision:mobilenet_v3_small", 6, pretrained=tmp_path / "r18.pth")


def test_image_sizes_are_the_datasets_own(cifar_root):
    assert load_dataset("digits_lt").image_size == IMAGE_SIZES["digits_lt"]
    assert load_dataset("cifar10_lt", data_root=str(cifar_root[0])).image_size == IMAGE_SIZES["cifar10_lt"]


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def torchvision_run(cifar_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchvision") / "run"
    result = train.main(cifar_args(cifar_root, "--model", "torchvision:resnet18", "--out", str(folder)))
    return folder, result


def test_a_torchvision_model_trains_through_the_cli(torchvision_run):
    folder, result = torchvision_run
    assert result["finished"] and len(result["history"]) == 1
    assert json.loads((folder / "config.json").read_text())["model"] == "torchvision:resnet18"
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["model"]["fc.weight"].shape == (10, 512)          # the head, with the run's class count


def test_evaluate_rebuilds_a_torchvision_run_from_its_config(torchvision_run):
    folder, _ = torchvision_run
    summary = json.loads((folder / "summary.json").read_text())
    result = evaluate.main([str(folder), "--which", "last", "--quiet"])
    assert result["acc_all"] == summary["final"]["acc_all"] and result["per_class"] == summary["final"]["per_class"]


def test_mobilenet_trains_through_the_cli(cifar_root, tmp_path):
    result = train.main(cifar_args(cifar_root, "--model", "torchvision:mobilenet_v3_small", "--out", str(tmp_path / "r")))
    assert result["finished"] and 0 <= result["history"][0]["acc_all"] <= 100


def test_pretrained_with_a_torchvision_model_through_the_cli(cifar_root, tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    cfg = train.configure(cifar_args(cifar_root, "--model", "torchvision:resnet18", "--pretrained", str(path),
                                     "--out", str(tmp_path / "run")))
    ds = load_dataset(cfg.dataset, data_root=cfg.data_root, imb_factor=cfg.imb_factor)
    model = train.build(cfg, ds)[0]
    assert torch.equal(model.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.pretrained_report["skipped"] == ["fc.weight", "fc.bias"] and model.fc.out_features == 10


def test_new_resnets_are_cli_choices(cifar_root, tmp_path):
    for name in ("resnet10", "resnext50"):
        assert train.configure(cifar_args(cifar_root, "--model", name, "--out", str(tmp_path / name))).model == name


# ----------------------------------------------------------------------------- --config

def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_json_and_yaml_give_values_and_flags_override_them(tmp_path):
    settings = {"epochs": 3, "batch-size": 16, "lr": 0.05, "weight_decay": 5e-4, "reweight": "cb", "amp": False}
    as_json = write(tmp_path / "run.json", json.dumps(settings))
    as_yaml = write(tmp_path / "run.yaml", "epochs: 3\nbatch-size: 16\nlr: 0.05\nweight_decay: 5e-4\n"
                                           "reweight: cb\namp: false\n")   # 5e-4: a float, as in YAML 1.2
    for path in (as_json, as_yaml):
        cfg = train.configure(["--config", path, "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.reweight, cfg.amp) == (3, 16, 0.05, 5e-4,
                                                                                                  "cb", False)
        flagged = train.parse_args(["--config", path, "--lr", "0.2", "--amp"])
        assert (flagged.lr, flagged.amp, flagged.epochs) == (0.2, True, 3)
    assert train.parse_args(["--config", write(tmp_path / "empty.yml", "")]) == train.parse_args([])


def test_config_values_override_a_resumed_runs_and_flags_override_both(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 4, "lr": 0.1, "quiet": False}))
    path = write(tmp_path / "more.json", json.dumps({"lr": 0.3, "eval-every": 2}))
    cfg = train.parse_args(["--resume", str(run), "--config", path])
    assert (cfg.epochs, cfg.lr, cfg.eval_every) == (4, 0.3, 2)
    assert train.parse_args(["--resume", str(run), "--config", path, "--lr", "0.05"]).lr == 0.05
    resumed_by_file = train.parse_args(["--config", write(tmp_path / "r.json", json.dumps({"resume": str(run)}))])
    assert resumed_by_file.epochs == 4


@pytest.mark.parametrize("name,text,message", [
    ("a.json", '{"epochs": 2, "batchsize": 8}', "unknown key 'batchsize' (did you mean batch-size?)"),
    ("a.json", '{"config": "other.json"}', "unknown key 'config'"),
    ("a.json", '{"epochs": "2"}', "--epochs must be int, got '2'"),
    ("a.yaml", "epochs: 2.5\n", "--epochs must be int, got 2.5"),
    ("a.yaml", "lr: -1\n", "--lr must be in (0, 10], got -1"),
    ("a.yaml", "loss: hinge\n", "--loss must be one of ce, focal, la, got 'hinge'"),
    ("a.json", '{"model": "torchvision:resnet181"}', "--model torchvision:resnet181: torchvision has no"),
    ("a.json", '{"batch_size": 8, "batch-size": 16}', "the key 'batch-size' is given twice"),
    ("a.json", "[1, 2]", "does not hold a configuration"),
    ("a.yaml", "- 1\n- 2\n", "does not hold settings"),
    ("a.json", '{"epochs": 2', "cannot read"),
    ("a.yaml", "epochs: [2\n", "cannot read"),
    ("a.toml", "epochs = 2\n", "give a .json, .yaml, .yml file"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_the_key(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(UsageError) as refused:
        train.configure(["--config", path])
    assert str(refused.value).startswith(f"--config {path}: ") and message in str(refused.value)


def test_a_missing_config_file_and_yaml_without_pyyaml(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--config .*nowhere.json: cannot read"):
        train.parse_args(["--config", str(tmp_path / "nowhere.json")])
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(UsageError, match=r'reading YAML needs PyYAML, which is not installed: pip install "rdr_fast\[yaml\]"'):
        train.parse_args(["--config", write(tmp_path / "a.yaml", "epochs: 2\n")])
    assert train.parse_args(["--config", write(tmp_path / "a.json", '{"epochs": 2}')]).epochs == 2


# ----------------------------------------------------------------------------- --logger

class Recorder:
    """Records every method call made on it: (name, args, kwargs)."""

    def __init__(self, calls, *args, **kwargs):
        self.calls = calls
        calls.append(("__init__", args, kwargs))

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def fake_module(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def digits_run(tmp_path, *extra):
    return train.main(["--epochs", "2", "--batch-size", "64", "--out", str(tmp_path / "run"), *QUIET, *extra])


def test_tensorboard_gets_every_evaluated_epoch_and_the_config(tmp_path, monkeypatch):
    calls = []
    fake_module(monkeypatch, "torch.utils.tensorboard", SummaryWriter=lambda **kw: Recorder(calls, **kw))
    result = digits_run(tmp_path, "--logger", "tensorboard")
    assert calls[0] == ("__init__", (), {"log_dir": str(tmp_path / "run" / "tensorboard"), "purge_step": 1})
    scalars = [(args[0], kwargs["global_step"]) for name, args, kwargs in calls if name == "add_scalar"]
    for row in result["history"]:
        assert ("acc_all", row["epoch"]) in scalars and ("acc_index_few", row["epoch"]) in scalars
    assert {step for _, step in scalars} == {1, 2}
    logged = {(args[0], kwargs["global_step"]): args[1] for name, args, kwargs in calls if name == "add_scalar"}
    assert logged[("train_loss", 2)] == result["history"][1]["train_loss"]
    (hparams, metrics), options = [(args, kwargs) for name, args, kwargs in calls if name == "add_hparams"][0]
    assert hparams["lr"] == 0.1 and hparams["logger"] == "tensorboard" and hparams["batch_size"] == 64
    assert metrics["hparam/acc_all"] == result["history"][-1]["acc_all"] and options["global_step"] == 2
    assert [name for name, _, _ in calls].count("close") == 1 and calls[-1][0] == "close"
    assert "config" in [args[0] for name, args, _ in calls if name == "add_text"]
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "accuracy.png").is_file()


def test_wandb_gets_every_evaluated_epoch_offline_without_a_key(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda row, step: calls.append(("log", step, row)),
                                summary=types.SimpleNamespace(update=lambda d: calls.append(("summary", d))),
                                finish=lambda: calls.append(("finish",)))
    inits = []
    fake_module(monkeypatch, "wandb", init=lambda **kw: inits.append(kw) or run)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = digits_run(tmp_path, "--logger", "wandb")
    (init,) = inits
    assert init["mode"] == "offline" and init["name"] == "run" and init["dir"] == str(tmp_path / "run")
    assert init["config"]["epochs"] == 2 and init["config"]["logger"] == "wandb"
    logs = [c for c in calls if c[0] == "log"]
    assert [step for _, step, _ in logs] == [1, 2] and logs[1][2]["acc_all"] == result["history"][1]["acc_all"]
    assert calls[-2][0] == "summary" and calls[-1] == ("finish",)
    monkeypatch.setenv("WANDB_API_KEY", "a key")
    loggers.open_logger("wandb", str(tmp_path), {})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers.open_logger("wandb", str(tmp_path), {})
    assert [init["mode"] for init in inits[1:]] == ["online", "disabled"]    # $WANDB_MODE wins


def test_a_missing_tracker_is_refused_before_work_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    for kind in ("tensorboard", "wandb"):
        with pytest.raises(UsageError, match=rf'--logger {kind} needs the {kind} package.*pip install "rdr_fast\[{kind}\]"'):
            train.configure(["--logger", kind, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
