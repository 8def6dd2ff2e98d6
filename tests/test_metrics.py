import math
from types import SimpleNamespace

import pytest
import torch

from kd.data import Split, hold_out
from kd.errors import UserError
from kd.metrics import (agreement_metrics, at_chance, blown_up, classification_metrics,
                        expected_calibration_error, fine_to_coarse, split_metrics,
                        superclass_map)


def slow_ece(logits, labels, n_bins=15):
    """Per-sample loops: bin k holds confidences in (k/n, (k+1)/n]."""
    probs = torch.softmax(logits.double(), 1)
    bins = [[] for _ in range(n_bins)]
    for p, y in zip(probs, labels):
        conf, pred = p.max(0)
        k = min(n_bins - 1, max(0, math.ceil(conf.item() * n_bins) - 1))
        bins[k].append((conf.item(), float(pred.item() == y.item())))
    total = len(labels)
    return sum(len(b) / total * abs(sum(c for c, _ in b) / len(b) - sum(a for _, a in b) / len(b))
               for b in bins if b)


def slow_superclass(logits, labels, coarse, class_to_coarse):
    hits = in_super = errors = 0
    for row, y, c in zip(logits, labels, coarse):
        pred = int(row.argmax())
        same = int(class_to_coarse[pred]) == int(c)
        hits += same
        if pred != int(y):
            errors += 1
            in_super += same
    return 100 * hits / len(labels), 100 * in_super / max(errors, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_slow_references_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 100, generator=g) * (seed + 1)
    labels = torch.randint(0, 100, (500,), generator=g)
    logits[torch.arange(250), labels[:250]] += 4  # half of them mostly right
    class_to_coarse = torch.arange(100) // 5
    coarse = class_to_coarse[labels]
    m = classification_metrics(logits, labels, coarse, class_to_coarse)
    assert m["ece"].item() == pytest.approx(100 * slow_ece(logits, labels), abs=1e-4)
    nll = -sum(torch.log_softmax(sample_logits.double(), 0)[y]
               for sample_logits, y in zip(logits, labels)) / 500
    assert m["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    super_top1, err_in_super = slow_superclass(logits, labels, coarse, class_to_coarse)
    assert m["super_top1"].item() == pytest.approx(super_top1, abs=1e-4)
    assert m["err_in_super"].item() == pytest.approx(err_in_super, abs=1e-4)


def test_hand_made_calibration():
    # two samples at confidence ~1 and right: ECE 0; two at ~1 and wrong: ECE 100 %
    confident = torch.tensor([[20.0, 0, 0], [0, 20.0, 0]])
    assert (expected_calibration_error(confident, torch.tensor([0, 1])).item()
            == pytest.approx(0, abs=1e-6))
    assert (expected_calibration_error(confident, torch.tensor([1, 0])).item()
            == pytest.approx(1, abs=1e-6))
    # uniform over 4 classes: confidence 0.25, accuracy 1/2 -> |0.5 - 0.25| = 0.25
    uniform = torch.zeros(2, 4)
    assert expected_calibration_error(uniform, torch.tensor([0, 1])).item() == pytest.approx(0.25)


def test_hand_made_superclass_case():
    class_to_coarse = torch.tensor([0, 0, 1, 1])
    logits = torch.eye(4)[[0, 1, 2, 0]] * 5   # predictions 0, 1, 2, 0
    labels = torch.tensor([0, 0, 3, 3])       # right, wrong in super, wrong in super, wrong outside
    m = classification_metrics(logits, labels, class_to_coarse[labels], class_to_coarse)
    assert m["top1"].item() == pytest.approx(25)
    assert m["super_top1"].item() == pytest.approx(75)
    assert m["err_in_super"].item() == pytest.approx(100 * 2 / 3)


def test_agreement_and_kl():
    t = torch.randn(50, 100)
    same = agreement_metrics(t.clone(), t)
    assert same["agree"].item() == 100 and same["kl_t_s"].item() == pytest.approx(0, abs=1e-6)
    s = torch.randn(50, 100)
    kl = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1).mean()
    assert agreement_metrics(s, t)["kl_t_s"].item() == pytest.approx(kl.item(), rel=1e-5)


def test_split_metrics_returns_floats_with_loss_named_for_the_log():
    logits, labels = torch.randn(20, 100), torch.randint(0, 100, (20,))
    m = split_metrics(logits, labels, labels // 5, torch.arange(100) // 5, teacher_logits=logits)
    assert set(m) == {"loss", "top1", "top5", "ece", "super_top1", "err_in_super", "agree",
                      "kl_t_s"}
    assert all(isinstance(v, float) for v in m.values())


def test_fine_to_coarse_reads_the_mapping():
    labels = torch.tensor([3, 7, 3, 0])
    mapping = fine_to_coarse(labels, torch.tensor([1, 4, 1, 2]), num_classes=8)
    assert mapping[3] == 1 and mapping[7] == 4 and mapping[0] == 2 and mapping[5] == -1


def test_the_superclass_map_holds_classes_a_small_test_split_lacks():
    """Training and kd.evaluate map classes over the training and test splits: a prediction of a
    class no test image has still counts as in its superclass, in the log and recomputed."""
    train = SimpleNamespace(labels=torch.arange(100), coarse_labels=torch.arange(100) // 5)
    test = SimpleNamespace(labels=torch.tensor([0, 6]), coarse_labels=torch.tensor([0, 1]))
    mapping = superclass_map(train, test)
    assert torch.equal(mapping, torch.arange(100) // 5)
    logits = torch.zeros(2, 100)
    logits[0, 1] = logits[1, 7] = 1.0  # wrong classes, of the true superclasses: 1 and 7 unseen
    metrics = split_metrics(logits, test.labels, test.coarse_labels, mapping)
    assert metrics["super_top1"] == 100 and metrics["top1"] == 0


def test_hold_out_is_class_balanced_disjoint_and_seeded():
    labels = torch.arange(100).repeat(5)
    images = torch.arange(500).view(500, 1, 1, 1).expand(500, 3, 32, 32).to(torch.uint8)
    split = Split(images, labels, labels // 5, [str(i) for i in range(100)])
    train, val = hold_out(split, 200, seed=0)
    assert len(train) == 300 and len(val) == 200
    assert torch.bincount(val.labels, minlength=100).eq(2).all()
    assert torch.equal(hold_out(split, 200, seed=0)[1].labels, val.labels)
    assert not torch.equal(hold_out(split, 200, seed=1)[1].images, val.images)
    train_ids = set(map(tuple,
                        torch.stack([train.labels, train.images[:, 0, 0, 0].long()], 1).tolist()))
    val_ids = set(map(tuple, torch.stack([val.labels, val.images[:, 0, 0, 0].long()], 1).tolist()))
    assert not train_ids & val_ids
    with pytest.raises(UserError, match="multiple of 100"):
        hold_out(split, 150, seed=0)


def test_blown_up_and_at_chance_thresholds():
    assert not blown_up(4.6) and not blown_up(46.0) and blown_up(46.1)
    assert blown_up(float("nan")) and blown_up(float("inf")) and blown_up(3e13)
    assert at_chance(1.0, 10_000) and at_chance(1.29, 10_000) and not at_chance(1.31, 10_000)
    assert at_chance(3.98, 100) and not at_chance(4.0, 100)  # 1 % + 3 x 0.995 %
