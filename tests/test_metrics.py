"""rdr_fast.metrics against scikit-learn and direct implementations, on random predictions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss, top_k_accuracy_score

from rdr_fast.data import class_splits, long_tail_counts
from rdr_fast.metrics import Evaluation, count_splits

C = 12


def random_predictions(n=500, num_classes=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(n, num_classes, generator=g) * 2
    logits[torch.arange(n), labels] += 1.5  # better than chance, not perfect
    return logits, labels


def evaluate(logits, labels, batch=64, counts=None):
    num_classes = logits.shape[1]
    ev = Evaluation(num_classes)
    for start in range(0, len(labels), batch):
        ev.update(logits[start:start + batch], labels[start:start + batch])
    counts = counts or long_tail_counts(500, num_classes, 100)
    return ev, ev.compute(counts, class_splits("x", num_classes))


def test_top1_top5_balanced_accuracy_and_confusion_equal_scikit_learn():
    logits, labels = random_predictions()
    ev, got = evaluate(logits, labels)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert got["acc_all"] == pytest.approx(100 * (p == y).mean(), abs=1e-12)
    assert got["acc_top5"] == pytest.approx(100 * top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(C)),
                                            abs=1e-12)
    assert got["acc_balanced"] == pytest.approx(100 * balanced_accuracy_score(y, p), abs=1e-9)
    np.testing.assert_array_equal(ev.confusion.numpy(), confusion_matrix(y, p, labels=range(C)))
    per_class = np.diag(confusion_matrix(y, p, labels=range(C))) / np.bincount(y, minlength=C)
    assert got["acc_worst_class"] == pytest.approx(100 * per_class.min(), abs=1e-9)
    assert got["per_class"] == pytest.approx(list(100 * per_class), abs=1e-9)


def test_nll_equals_scikit_learn_log_loss():
    logits, labels = random_predictions()
    _, got = evaluate(logits, labels)
    probs = torch.softmax(logits.double(), 1).numpy()
    assert got["nll"] == pytest.approx(log_loss(labels.numpy(), probs, labels=range(C)), abs=1e-6)


def direct_ece(logits, labels, bins=15) -> float:
    """ECE written out sample by sample: bin (b-1)/bins < conf <= b/bins, weighted |acc - conf|."""
    probs = torch.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(1, bins + 1):
        members = [i for i in range(len(labels)) if (b - 1) / bins < conf[i] <= b / bins]
        if members:
            acc = sum(int(pred[i] == labels[i]) for i in members) / len(members)
            mean_conf = sum(float(conf[i]) for i in members) / len(members)
            total += len(members) / len(labels) * abs(acc - mean_conf)
    return 100 * total


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_equals_a_direct_implementation(seed):
    logits, labels = random_predictions(n=300, seed=seed)
    _, got = evaluate(logits, labels)
    assert got["ece"] == pytest.approx(direct_ece(logits, labels), abs=1e-9)
    assert got["ece"] > 0.5  # random logits are not calibrated: the check has something to compare


def test_a_perfectly_calibrated_bin_has_no_error():
    # Two classes, confidence exactly 0.75 everywhere, right 3 times out of 4.
    logits = torch.tensor([[math.log(3.0), 0.0]] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    ev = Evaluation(2)
    ev.update(logits, labels)
    assert ev.compute([10, 5], {"many": (0, 1), "medium": (1, 1), "few": (1, 2)})["ece"] == pytest.approx(0, abs=1e-9)


def test_count_splits_follow_the_thresholds_at_their_edges():
    counts = [500, 101, 100, 50, 20, 19, 1]
    assert count_splits(counts) == {"many": [0, 1], "medium": [2, 3, 4], "few": [5, 6]}


def test_count_splits_of_the_imagenet_lt_profile_size():
    # A generated exponential profile: every class lands in exactly one split, in count order.
    counts = long_tail_counts(1280, 1000, 256)
    splits = count_splits(counts)
    assert sorted(splits["many"] + splits["medium"] + splits["few"]) == list(range(1000))
    assert all(counts[c] > 100 for c in splits["many"]) and all(counts[c] < 20 for c in splits["few"])
    assert max(splits["many"]) < min(splits["medium"]) and max(splits["medium"]) < min(splits["few"])


def test_split_accuracies_by_index_and_by_count_differ_as_defined():
    logits, labels = random_predictions(n=600)
    counts = [300, 250, 200, 150, 120, 101, 100, 60, 30, 20, 19, 5]
    _, got = evaluate(logits, labels, counts=counts)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    per_class = np.array([(p[y == c] == c).mean() for c in range(C)])
    assert got["acc_count_many"] == pytest.approx(100 * per_class[:6].mean(), abs=1e-9)   # > 100
    assert got["acc_count_medium"] == pytest.approx(100 * per_class[6:10].mean(), abs=1e-9)
    assert got["acc_count_few"] == pytest.approx(100 * per_class[10:].mean(), abs=1e-9)   # < 20
    lo, hi = class_splits("x", C)["few"]
    mask = (y >= lo) & (y < hi)
    assert got["acc_index_few"] == pytest.approx(100 * (p[mask] == y[mask]).mean(), abs=1e-9)


def test_sums_do_not_depend_on_batching_or_order():
    logits, labels = random_predictions()
    _, whole = evaluate(logits, labels, batch=500)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))
    _, shuffled = evaluate(logits[order], labels[order], batch=7)
    assert shuffled == whole  # exactly, not approximately


def test_fewer_than_five_classes_count_every_sample_as_a_top5_hit():
    logits, labels = random_predictions(num_classes=3)
    _, got = evaluate(logits, labels, counts=[30, 20, 10])
    assert got["acc_top5"] == 100.0


def test_an_absent_class_is_left_out_of_the_class_means():
    logits, labels = random_predictions()
    keep = labels != 4
    _, got = evaluate(logits[keep], labels[keep])
    assert got["per_class"][4] is None
    present = [a for a in got["per_class"] if a is not None]
    assert got["acc_balanced"] == pytest.approx(sum(present) / len(present), abs=1e-9)


def test_nothing_evaluated_is_refused():
    with pytest.raises(ValueError, match="nothing was evaluated"):
        Evaluation(3).compute([3, 2, 1], class_splits("x", 3))


@pytest.mark.parametrize("num_classes", [12, 300])  # the matrix, and the non-zero cells past 200 classes
def test_confusion_csv_holds_the_counts_and_the_pictures_are_drawn(tmp_path, num_classes):
    import csv

    from rdr_fast import run_io

    logits, labels = random_predictions(n=900, num_classes=num_classes)
    ev, _ = evaluate(logits, labels)
    run_io.write_confusion(str(tmp_path), ev.confusion, class_splits("x", num_classes))
    run_io.plot_reliability(str(tmp_path), ev.calibration())
    rows = list(csv.reader((tmp_path / "confusion.csv").open()))
    read = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    if rows[0][0] == "true":
        for t, q, n in rows[1:]:
            read[int(t), int(q)] = int(n)
    else:
        read = torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])
    assert torch.equal(read, ev.confusion)
    for name in ("confusion.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _shard_worker(rank, init_file, out_dir):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    logits, labels = random_predictions(n=501)
    lo, hi = (0, 260) if rank == 0 else (260, 501)  # uneven halves
    ev = Evaluation(C)
    for start in range(lo, hi, 37):
        ev.update(logits[start:min(start + 37, hi)], labels[start:min(start + 37, hi)])
    torch.save(ev.all_reduce().compute(long_tail_counts(500, C, 100), class_splits("x", C)),
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_metrics_over_two_processes_are_identical_to_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_shard_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, labels = random_predictions(n=501)
    _, whole = evaluate(logits, labels)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == whole  # exactly: integer sums
