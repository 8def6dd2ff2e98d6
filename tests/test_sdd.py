"""SDD (kd/methods/sdd.py): its region loss against the reference code's formula written out here
(shicaiwei123/SDD-CVPR2024's mdistiller/distillers/SDD_DKD.py multi_dkd and KD.py sdd_kd_loss,
as loops where it vectorises), values and gradients in float64 on random region logits; its
pooling against the reference's SPP (models/cifar/utils.py); then the connector on the real
student and teacher."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from kd import features
from kd.methods import dkd, sdd
from kd.models import build_student, build_teacher

G = lambda seed: torch.Generator().manual_seed(seed)
B, K = 5, 6  # few classes: many teacher regions right and many wrong


def region_inputs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher region logits [B, K, N] and targets; the reference's region 0 is the
    global one."""
    s = torch.randn(B, K, n, generator=G(seed), dtype=torch.float64) * 2
    t = torch.randn(B, K, n, generator=G(seed + 1), dtype=torch.float64) * 3
    y = torch.randint(K, (B,), generator=G(seed + 2))
    return s, t, y


def reference_weights(t: torch.Tensor, y: torch.Tensor, inconsistent: float) -> list[list[float]]:
    """multi_dkd's index: 1 for gt_lt and gw_lw, 2 (inconsistent) for gt_lw and gw_lt, the global
    prediction the teacher's region 0 (out_t_predict[0:len(target)]), whose rows are never
    inconsistent (mask[0:len(target)] = False)."""
    weights = []
    for i in range(B):
        global_right = int(t[i, :, 0].argmax()) == int(y[i])
        weights.append([inconsistent if n > 0 and (int(t[i, :, n].argmax()) == int(y[i]))
                        != global_right else 1.0 for n in range(t.shape[2])])
    return weights


def reference_dkd_row(s: torch.Tensor, t: torch.Tensor, y: int, alpha, beta, T) -> torch.Tensor:
    """SDD_DKD.py's dkd_loss of one row before its division by the rows: TCKD on [p^y, sum of
    the others' p] (cat_mask), NCKD on the softmax over the other classes (the -1000 mask)."""
    p_s, p_t = F.softmax(s / T, dim=0), F.softmax(t / T, dim=0)
    others = [j for j in range(len(s)) if j != y]
    b_s = torch.stack([p_s[y], p_s[others].sum()])
    b_t = torch.stack([p_t[y], p_t[others].sum()])
    tckd = sum(b_t[j] * (torch.log(b_t[j]) - torch.log(b_s[j])) for j in range(2)) * T ** 2
    q_s, q_t = F.softmax(s[others] / T, dim=0), F.softmax(t[others] / T, dim=0)
    nckd = sum(q_t[j] * (torch.log(q_t[j]) - torch.log(q_s[j])) for j in range(len(others)))
    return alpha * tckd + beta * nckd * T ** 2


def reference_kd_row(s: torch.Tensor, t: torch.Tensor, T) -> torch.Tensor:
    """KD.py's sdd_kd_loss of one row: kl_div(log_softmax(s / T), softmax(t / T)) * T^2, summed
    over the classes."""
    p_s, p_t = F.softmax(s / T, dim=0), F.softmax(t / T, dim=0)
    return sum(p_t[j] * (torch.log(p_t[j]) - torch.log(p_s[j])) for j in range(len(s))) * T ** 2


def reference_sdd(s, t, y, loss, alpha, beta, T, inconsistent):
    """sum(loss * index) over the N * B rows, each row's loss divided by N * B (dkd_loss's
    `/ target.shape[0]` of the repeated targets; sdd_kd_loss's `/ target_r.shape[0]`)."""
    weights, n = reference_weights(t, y, inconsistent), s.shape[2]
    total = 0.0
    for i in range(B):
        for r in range(n):
            row = reference_dkd_row(s[i, :, r], t[i, :, r], int(y[i]), alpha, beta, T) \
                if loss == "dkd" else reference_kd_row(s[i, :, r], t[i, :, r], T)
            total = total + weights[i][r] * row / (n * B)
    return total


def assert_same(ours_fn, reference_fn, s: torch.Tensor) -> None:
    """Equal values and gradients with respect to the student's region logits, in float64."""
    def value_and_grad(fn):
        leaf = s.detach().clone().requires_grad_()
        value = fn(leaf)
        return value, torch.autograd.grad(value, leaf)[0]
    (ours, our_grad), (reference, reference_grad) = map(value_and_grad, (ours_fn, reference_fn))
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-12), (ours, reference)
    assert torch.allclose(our_grad, reference_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss,alpha,beta,T,inconsistent", [
    ("dkd", 1.0, 8.0, 4.0, 2.0), ("dkd", 0.5, 2.0, 1.0, 3.0), ("kd", 1.0, 8.0, 4.0, 2.0),
    ("kd", 1.0, 8.0, 2.0, 0.5)])
def test_region_loss_is_the_references(loss, alpha, beta, T, inconsistent):
    s, t, y = region_inputs(0, 21)  # scales 1, 2, 4
    weights = reference_weights(t, y, inconsistent)
    share = sum(w != 1.0 for row in weights for w in row) / (21 * B)
    assert 0 < share < 1  # both kinds of region weighed
    ours = lambda s: sdd.sdd_loss(s, t, t[:, :, 0], y, loss, alpha, beta, T, inconsistent)[0]
    assert_same(ours, lambda s: reference_sdd(s, t, y, loss, alpha, beta, T, inconsistent), s)
    terms = sdd.sdd_loss(s, t, t[:, :, 0], y, loss, alpha, beta, T, inconsistent)[1]
    assert terms["inconsistent"].item() == pytest.approx(share)


def test_one_region_is_dkd_and_the_global_prediction_is_the_teachers_logits():
    s, t, y = region_inputs(3, 1)
    value, terms = sdd.sdd_loss(s, t, t[:, :, 0], y, "dkd", 1.0, 8.0, 4.0, 2.0)
    assert torch.allclose(value, dkd.dkd_loss(s[:, :, 0], t[:, :, 0], y, 1.0, 8.0, 4.0)[0],
                          rtol=1e-12)
    assert terms["inconsistent"] == 0
    # regions weighed against the global logits given: all wrong there, the right ones weigh 2
    s, t, y = region_inputs(4, 21)
    wrong = F.one_hot((y + 1) % K, K).double() * 100
    right = t.argmax(dim=1) == y[:, None]
    c = 1 + right.double()
    expected = (c * sdd.region_dkd(s.transpose(1, 2).reshape(-1, K),
                                   t.transpose(1, 2).reshape(-1, K), y.repeat_interleave(21),
                                   1.0, 8.0, 4.0).view(B, 21)).mean()
    value, terms = sdd.sdd_loss(s, t, wrong, y, "dkd", 1.0, 8.0, 4.0, 2.0)
    assert torch.allclose(value, expected, rtol=1e-12)
    assert terms["inconsistent"].item() == pytest.approx(right.double().mean().item())


def test_objective_weighs_ce_warm_up_and_region_loss():
    s, t, y = region_inputs(5, 5)
    logits = torch.randn(B, K, generator=G(9), dtype=torch.float64)
    total, terms = sdd.sdd_objective(logits, t[:, :, 0], y, (s, t), "dkd", 1.0, 8.0, 4.0, 2.0,
                                     ce_weight=0.3, sdd_weight=0.9,
                                     distill_weight=torch.tensor(0.25))
    assert set(terms) == {"ce", "sdd", "inconsistent"}
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, y))
    assert torch.allclose(total, 0.3 * terms["ce"] + 0.25 * 0.9 * terms["sdd"])


def reference_spp(x: torch.Tensor) -> torch.Tensor:
    """The reference's SPP for M = [1,2,4]: the map pooled to 4 x 4, the 2 x 2 and 1 x 1 cells
    pooled from that, [B, C, 1 + 4 + 16]."""
    x4 = F.adaptive_avg_pool2d(x, 4)
    return torch.cat([F.adaptive_avg_pool2d(x4, 1).flatten(2),
                      F.adaptive_avg_pool2d(x4, 2).flatten(2), x4.flatten(2)], dim=2)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_regions_are_the_references_spp_and_repeat_a_smaller_map(size):
    x = torch.randn(2, 3, size, size, generator=G(size), dtype=torch.float64)
    regions = sdd.pooled_regions(x, (1, 2, 4))
    assert regions.shape == (2, 3, 21)
    assert torch.allclose(regions, reference_spp(x), rtol=1e-12)
    assert torch.allclose(regions[:, :, 0], x.mean(dim=(2, 3)), rtol=1e-12)  # the global one
    if size == 1:  # every region a copy of the global feature
        assert torch.equal(regions, x.flatten(2).expand(-1, -1, 21))
    if size == 2:  # the 4 x 4 cells: each of the map's cells in a 2 x 2 block
        assert torch.equal(regions[:, :, 5:].view(2, 3, 4, 4),
                           x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_scales_flag():
    assert sdd.scale_list("4,1,2") == "1,2,4" and sdd.scales_of("1,2,4") == (1, 2, 4)
    for bad in ("0", "1,1", "a", "", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            sdd.scale_list(bad)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to b's scale (an untrained model's logits can be
    tiny)."""
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max()) and bool(b.abs().max() > 0)


def step_regions(student, teacher, x, scales=(1, 2, 4)):
    """A training step's forwards, as kd.train.train_step runs them, then the connector."""
    connect = sdd.ScaleRegions(*taps_of(student, teacher), sdd.heads(student, teacher), scales)
    logits = student(x)
    with torch.inference_mode():
        teacher_logits = teacher(x)
    return connect, logits, teacher_logits.clone(), connect(None, None)


def taps_of(student, teacher):
    taps = features.student_taps(student)
    return taps, features.teacher_taps(teacher, taps)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(32).eval()


def test_connector_on_the_real_models(teacher):
    torch.manual_seed(0)
    student = build_student()
    keys = set(student.state_dict())
    args = argparse.Namespace(sdd_scales="1,2,4")
    connect = sdd.connector(args, student, teacher, torch.zeros(10, dtype=torch.long))
    assert list(connect.parameters()) == [] and connect.state_dict() == {}
    assert set(student.state_dict()) == keys
    x, y = torch.randn(4, 3, 32, 32, generator=G(1)), torch.tensor([0, 1, 2, 3])
    logits = student(x)
    with torch.inference_mode():
        teacher_logits = teacher(x).clone()
    s, t = connect(None, y)
    assert s.shape == t.shape == (4, 100, 21)
    assert s.requires_grad and not t.requires_grad
    # the teacher's map is 1 x 1 at 32 px: all its regions are its logits
    assert close(t, teacher_logits[:, :, None].expand(-1, -1, 21))
    total, terms = sdd.loss_at(argparse.Namespace(
        sdd_loss="dkd", dkd_alpha=1.0, dkd_beta=8.0, T=4.0, sdd_inconsistent_weight=2.0,
        ce_weight=1.0, sdd_weight=1.0, dkd_warmup=20), 5)(logits, teacher_logits, y, (s, t))
    assert terms["sdd"] > 0 and terms["inconsistent"] == 0
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in student.classifier.parameters())
    assert student.features[0][0].weight.grad is not None  # through the map, too
    assert all(p.grad is None for p in teacher.parameters())


def test_regions_of_the_student_map(teacher):
    """The CIFAR stem's 4 x 4 map: region 0 through the head is the student's logits (eval: no
    dropout); the ImageNet stem's 1 x 1 map at 32 px: every region the same."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=G(2))
    student = build_student().eval()
    _, logits, _, (s, _) = step_regions(student, teacher, x)
    assert close(s[:, :, 0], logits)
    assert not close(s[:, :, 1], s[:, :, 2])  # the 2 x 2 cells differ
    student = build_student("imagenet").eval()
    _, logits, _, (s, _) = step_regions(student, teacher, x, scales=(1, 2))
    assert s.shape == (2, 100, 5)
    assert close(s, logits[:, :, None].expand(-1, -1, 5))
