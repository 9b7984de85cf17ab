"""`--recipe paper` and `--recipe official` (rdr_fast.recipes): the learning rate of every
epoch and the epoch where RDR's weights switch on equal hand-written lists at 200 and at
10 epochs; flags and a resumed run's config.json override the recipe; an official run
trains end to end and resumes exactly. (The long-tail profiles: test_data.py.)"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from rdr_fast import RDRLoss, recipes, train

LR = 0.1

# The learning-rate multiplier of each 0-based epoch, written out by hand. official, 200
# epochs: kaidic/LDAM-DRW's adjust_learning_rate (5 warm-up epochs at 1/5 .. 5/5, x0.01
# from epoch 160, x0.0001 from 180). 10 epochs: milestones 8 and 9; the warm-up,
# 10·5/200 = 0.25 epochs, is over within epoch 0.
OFFICIAL_MULTIPLIERS = {
    200: [0.2, 0.4, 0.6, 0.8, 1.0] + [1.0] * 155 + [0.01] * 20 + [1e-4] * 20,
    10: [1.0] * 8 + [0.01, 1e-4],
}
# The first training step with RDR weights, at 3 steps per epoch: paper 5/200 of the
# epochs (200: 5 epochs = 15 steps; 10: 0.25 epochs, rounded up to 1 step), official
# 160/200 (200: 160 epochs = 480 steps; 10: 8 epochs = 24 steps).
STEPS_PER_EPOCH = 3
FIRST_WEIGHTED_STEP = {("paper", 200): 15, ("paper", 10): 1, ("official", 200): 480, ("official", 10): 24}


def configured(tmp_path, *flags) -> train.Config:
    return train.configure(["--out", str(tmp_path / "run"), "--device", "cpu", *flags])


def epoch_lrs(cfg: train.Config) -> list[float]:
    """The optimizer's lr during each epoch, from train.build's own optimizer and scheduler."""
    ds = SimpleNamespace(class_counts=[20, 10, 5], num_classes=3, in_channels=1)
    _, _, _, optimizer, scheduler = train.build(cfg, ds)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()          # no gradients: nothing moves; keeps the scheduler's order check quiet
        scheduler.step()
    return lrs


@pytest.mark.parametrize("epochs", [200, 10])
def test_official_lr_schedule_is_ldam_drw_s(tmp_path, epochs):
    cfg = configured(tmp_path, "--recipe", "official", "--epochs", str(epochs))
    assert epoch_lrs(cfg) == [LR * m for m in OFFICIAL_MULTIPLIERS[epochs]]


@pytest.mark.parametrize("epochs", [200, 10])
def test_paper_lr_schedule_is_the_cosine_of_earlier_versions(tmp_path, epochs):
    cfg = configured(tmp_path, "--epochs", str(epochs))
    lrs = epoch_lrs(cfg)
    hand = [LR * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert lrs == pytest.approx(hand, rel=1e-12, abs=1e-15)
    # Float for float the schedule runs had before recipes existed.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    before = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    earlier = []
    for _ in range(epochs):
        earlier.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        before.step()
    assert lrs == earlier


def test_lr_at_warm_up_and_milestones_by_hand():
    step = dict(epochs=20, schedule="step", milestones=(10, 15))
    assert [recipes.lr_at(e, warmup_epochs=4, **step) for e in (0, 1, 2, 3, 9, 10, 14, 15, 19)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0, 0.01, 0.01, 1e-4, 1e-4]
    assert [recipes.lr_at(e, warmup_epochs=2.5, **step) for e in (0, 1, 2)] == [0.4, 0.8, 1.0]
    assert recipes.lr_at(3, epochs=20, schedule="step", milestones=(3, 3)) == 1e-4   # both drops at once
    # Under cosine the ramp multiplies the cosine of the same epoch.
    assert recipes.lr_at(1, epochs=4, warmup_epochs=4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) / 2)
    assert recipes.lr_at(0, epochs=4, warmup_epochs=4) == 0.25
    with pytest.raises(ValueError, match="schedule"):
        recipes.lr_at(0, epochs=4, schedule="linear")


def test_step_milestones_scale_with_the_epochs():
    assert recipes.step_milestones(200) == (160, 180)
    assert recipes.step_milestones(10) == (8, 9)
    assert recipes.step_milestones(3) == (2, 3)       # 2.4 and 2.7, to the nearest epoch
    assert recipes.step_milestones(5) == (4, 5)       # 4 and 4.5: a half rounds up
    assert recipes.step_milestones(1) == (1, 1)
    assert recipes.step_milestones(400) == (320, 360)


@pytest.mark.parametrize("recipe, epochs", sorted(FIRST_WEIGHTED_STEP))
def test_rdr_weights_switch_on_at_the_recipes_epoch(tmp_path, recipe, epochs):
    cfg = configured(tmp_path, "--recipe", recipe, "--epochs", str(epochs))
    criterion = RDRLoss([30, 20, 10], feat_dim=4, warmup_steps=train.rdr_warmup_steps(cfg, STEPS_PER_EPOCH))
    first = FIRST_WEIGHTED_STEP[recipe, epochs]
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for step in range(first + 2):
        features = torch.rand(6, 4, generator=generator, dtype=torch.float64) + 0.1
        criterion(features, torch.zeros(6, 3, dtype=torch.float64), labels)
        if step == 0:   # the prototypes update during the warm-up: the first batch's class means
            assert criterion.seen.all()
            means = torch.stack([features[labels == c].mean(0) for c in range(3)])
            torch.testing.assert_close(criterion.prototypes, means.float())
        uniform = bool((criterion.last_weights == 1).all())
        assert uniform == (step < first), (step, criterion.last_weights)


def test_paper_recipe_resolves_to_the_earlier_defaults(tmp_path):
    for epochs in (200, 7):
        cfg = configured(tmp_path, "--epochs", str(epochs))
        assert (cfg.recipe, cfg.lr_schedule, cfg.lr_warmup_epochs, cfg.lr_milestones) == ("paper", "cosine", 0, None)
        assert (cfg.weight_decay, cfg.warmup_epochs, cfg.augment) == (2e-4, epochs * 5 / 200, "basic")
    official = configured(tmp_path, "--recipe", "official")
    assert (official.lr_schedule, official.lr_warmup_epochs, official.lr_milestones) == ("step", 5, (160, 180))
    assert (official.weight_decay, official.warmup_epochs, official.augment) == (1e-4, 160, "basic")  # digits_lt
    assert configured(tmp_path, "--recipe", "official", "--dataset", "fmnist_lt").augment == "autoaug_cutout"
    assert (official.lr, official.momentum, official.batch_size, official.epochs) == (0.1, 0.9, 128, 200)


def test_flags_override_the_recipe(tmp_path):
    cfg = configured(tmp_path, "--recipe", "official", "--weight-decay", "3e-4", "--warmup-epochs", "7",
                     "--lr-warmup-epochs", "2", "--lr-milestones", "100", "150", "--augment", "basic")
    assert (cfg.weight_decay, cfg.warmup_epochs, cfg.lr_warmup_epochs) == (3e-4, 7, 2)
    assert (cfg.lr_milestones, cfg.augment, cfg.lr_schedule) == ((100, 150), "basic", "step")
    cosine = configured(tmp_path, "--recipe", "official", "--lr-schedule", "cosine")
    assert (cosine.lr_schedule, cosine.lr_milestones, cosine.lr_warmup_epochs, cosine.weight_decay) == \
        ("cosine", None, 5, 1e-4)
    step = configured(tmp_path, "--lr-schedule", "step", "--epochs", "10")
    assert (step.lr_milestones, step.lr_warmup_epochs, step.weight_decay) == ((8, 9), 0, 2e-4)


def test_a_saved_config_beats_the_recipe_and_flags_beat_both(tmp_path):
    run = tmp_path / "saved"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "digits_lt", "epochs": 10, "recipe": "official",
                                                 "weight_decay": 5e-4, "lr_milestones": [6, 9]}))
    cfg = train.configure(["--resume", str(run), "--device", "cpu"])
    assert (cfg.weight_decay, cfg.lr_milestones, cfg.lr_schedule, cfg.warmup_epochs) == (5e-4, (6, 9), "step", 8)
    flagged = train.configure(["--resume", str(run), "--device", "cpu", "--weight-decay", "0"])
    assert flagged.weight_decay == 0


def run_official(tmp_path, name, *flags):
    out = str(tmp_path / name)
    return train.main(["--recipe", "official", "--batch-size", "64", "--augment", "basic", "--quiet",
                       "--device", "cpu", "--out", out, *flags]), out


def test_official_run_end_to_end_and_resumed(tmp_path):
    """4 epochs: milestones round(3.2) = 3 and round(3.6) = 4, lr warm-up 0.1 epochs (over
    within epoch 0), RDR weights from step ceil(3.2 · 5) = 16 of 20 (5 steps per epoch)."""
    straight, out_a = run_official(tmp_path, "straight", "--epochs", "4")
    assert straight["finished"]
    saved = json.load(open(os.path.join(out_a, "config.json")))
    assert {k: saved[k] for k in ("recipe", "lr_schedule", "lr_warmup_epochs", "lr_milestones", "weight_decay",
                                  "warmup_epochs", "augment", "imb_type")} == {
        "recipe": "official", "lr_schedule": "step", "lr_warmup_epochs": 0.1, "lr_milestones": [3, 4],
        "weight_decay": 1e-4, "warmup_epochs": 3.2, "augment": "basic", "imb_type": "exp"}
    history = straight["history"]
    assert [row["lr"] for row in history] == [LR, LR, LR, LR * 0.01]
    splits = ("weight_many", "weight_medium", "weight_few")
    assert all(row[s] == 1.0 for row in history[:3] for s in splits), "w ≡ 1 for the first 3 epochs"
    assert history[3]["weight_few"] > 2 * history[3]["weight_many"], "then RDR up-weights the tail"

    first, out_b = run_official(tmp_path, "resumed", "--epochs", "4", "--stop-after", "2")
    assert not first["finished"]
    resumed = train.main(["--resume", out_b, "--quiet"])
    drop = {"epoch_seconds"}
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed["history"]] == \
        [{k: v for k, v in row.items() if k not in drop} for row in history]
    a = torch.load(os.path.join(out_a, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(out_b, "checkpoint.pt"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"]
    with pytest.raises(SystemExit) as exc:     # another schedule cannot take over a run
        train.main(["--resume", out_b, "--quiet", "--lr-warmup-epochs", "1"])
    assert "belongs to another experiment" in str(exc.value) and "lr_warmup_epochs" in str(exc.value)


def test_a_checkpoint_from_before_the_recipes_resumes_and_refuses_another_schedule(tmp_path):
    """A checkpoint whose identity predates the recipe keys held one recipe implicitly
    (train.IMPLIED_IDENTITY): it resumes as it was, and another schedule is refused with
    one line instead of failing on the scheduler's saved state."""
    out = str(tmp_path / "old")
    train.main(["--epochs", "2", "--stop-after", "1", "--batch-size", "64", "--quiet", "--device", "cpu",
                "--out", out])
    path = os.path.join(out, "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    for key in train.IMPLIED_IDENTITY:
        state["identity"].pop(key)
    torch.save(state, path)
    config = json.load(open(os.path.join(out, "config.json")))
    for key in ("recipe", "lr_schedule", "lr_warmup_epochs", "lr_milestones", "imb_type"):
        config.pop(key)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    for flags, wrong in ((["--recipe", "official"], "recipe"), (["--lr-schedule", "step"], "lr_schedule")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--resume", out, "--quiet", *flags])
        assert "belongs to another experiment" in str(exc.value) and wrong in str(exc.value)
    assert train.main(["--resume", out, "--quiet"])["finished"]
