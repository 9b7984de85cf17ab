"""Run files: checkpoints read with weights_only=True (so they never run code), exact RNG
round trips through them, atomic replacement, and the weights-only export."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from rdr_fast import RDRLoss, run_io
from rdr_fast.sam import VARIANTS, make_optimizer
from rdr_fast.training import train_step

COUNTS = [40, 20, 10, 5]


class Tiny(nn.Module):
    """(features, logits), as rdr_fast's models return."""

    def __init__(self):
        super().__init__()
        self.body, self.fc, self.feat_dim = nn.Linear(6, 8), nn.Linear(8, len(COUNTS)), 8

    def forward(self, x):
        feats = torch.relu(self.body(x))
        return feats, self.fc(feats)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)              # leaves a cached Gaussian in each generator's state
    np.random.standard_normal()
    run_io.save_checkpoint(str(tmp_path), {"identity": {"seed": 3}, "rng": [run_io.rng_state()]})

    def draw():
        return random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()
    expected = draw()
    draw()                          # move every generator on
    state = run_io.load_checkpoint(str(tmp_path), {"seed": 3})
    run_io.set_rng_state(state["rng"][0])
    assert draw() == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_optimizers_checkpoint_loads_weights_only(tmp_path, variant):
    torch.manual_seed(0)
    model = Tiny()
    criterion = RDRLoss(COUNTS, 8)
    optimizer = make_optimizer(variant, model, COUNTS, lr=0.1, k=2)
    x, y = torch.randn(12, 6), torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    for _ in range(3):
        train_step(optimizer, model, criterion, x, y)
    saved = {"identity": {}, "optimizer": optimizer.state_dict(), "criterion": criterion.state_dict(),
             "history": [{"epoch": 1, "acc_all": 50.0}], "rng": [run_io.rng_state()]}
    run_io.save_checkpoint(str(tmp_path), saved)
    loaded = run_io.load_checkpoint(str(tmp_path))
    fresh = make_optimizer(variant, Tiny(), COUNTS, lr=0.1, k=2)
    fresh.load_state_dict(loaded["optimizer"])
    assert loaded["history"] == saved["history"]


class WritesMarker:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"identity": {}, "epoch": 1, "payload": WritesMarker(str(marker))}, tmp_path / run_io.CHECKPOINT)
    with pytest.raises(run_io.CheckpointError, match="pickled Python object .*exec") as exc:
        run_io.load_checkpoint(str(tmp_path))
    assert str(tmp_path / run_io.CHECKPOINT) in str(exc.value)
    assert not marker.exists()
    torch.load(tmp_path / run_io.CHECKPOINT, weights_only=False)   # what the refusal prevents
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoint_is_called_corrupt(tmp_path, content):
    (tmp_path / run_io.CHECKPOINT).write_bytes(content)
    with pytest.raises(run_io.CheckpointError, match="is corrupt"):
        run_io.load_checkpoint(str(tmp_path))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    run_io.save_checkpoint(str(tmp_path), {"identity": {}, "epoch": 1})

    class Unsavable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        run_io.save_checkpoint(str(tmp_path), {"identity": {}, "epoch": 2, "bad": Unsavable()})
    assert run_io.load_checkpoint(str(tmp_path))["epoch"] == 1
    assert os.listdir(tmp_path) == [run_io.CHECKPOINT], "the temporary file is removed"


@pytest.mark.parametrize("as_module", [True, False])
def test_export_weights_is_readable_without_code(tmp_path, as_module):
    model = Tiny()
    path = str(tmp_path / "model.bin")
    kind = run_io.export_weights(model if as_module else model.state_dict(), path)
    assert kind == ("safetensors" if run_io.safetensors_available() else "torch")
    if kind == "safetensors":
        from safetensors.torch import load_file
        loaded = load_file(path)
    else:
        loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    Tiny().load_state_dict(run_io.load_weights(path))


def test_kill_9_inside_a_write_keeps_the_previous_file(tmp_path):
    """A process killed (SIGKILL: no cleanup runs) halfway through atomic_write leaves
    the previous checkpoint whole and only a temporary file beside it, which
    remove_temporaries (called on --resume) deletes."""
    run_io.save_checkpoint(str(tmp_path), {"identity": {}, "epoch": 1})
    pid = os.fork()
    if pid == 0:       # the child writes plain bytes only: nothing torch-threaded after fork
        def half_then_killed(handle):
            handle.write(b"PK\x03\x04 half of the next checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            run_io.atomic_write(str(tmp_path / run_io.CHECKPOINT), half_then_killed)
        finally:
            os._exit(0)  # not reached
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
    assert run_io.load_checkpoint(str(tmp_path))["epoch"] == 1
    left = [name for name in os.listdir(tmp_path) if name != run_io.CHECKPOINT]
    assert len(left) == 1 and left[0].startswith(run_io.TEMPORARY_PREFIX)
    assert run_io.remove_temporaries(str(tmp_path)) == left
    assert os.listdir(tmp_path) == [run_io.CHECKPOINT]
