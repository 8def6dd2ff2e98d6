"""WTTM and ITRD (kd/methods/wttm.py, itrd.py): each loss against its reference code's formula
written out here (zkxufo/TTM's distiller_zoo/wttm.py; roymiles/ITRD's distiller_zoo/IT.py, its
Embed applied as in ITLoss), values and gradients in float64 on random inputs at our pair's sizes
(100 classes, 576-d student and 2048-d teacher pooled features); then ITRD's connector on the
real models, the objectives at their defaults, and that neither reads anything back from the
device."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from kd.methods import METHODS, NAMES, flag_defaults, summary
from kd.methods import itrd, wttm
from kd.models import build_student, build_teacher
from test_baselines import FixedTaps, assert_same

G = lambda seed: torch.Generator().manual_seed(seed)
B, CLASSES, STUDENT_DIM, TEACHER_DIM = 8, 100, 576, 2048


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G(seed), dtype=torch.float64)


def reference_wttm(y_s, y_t, gamma):
    """TTM's distiller_zoo/wttm.py, WTTM.forward."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), gamma)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction='none'), dim=1)
    return torch.mean(norm * KL)


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0])
def test_wttm_is_the_authors_loss(gamma):
    student, teacher = randn(0, B, CLASSES), randn(1, B, CLASSES) * 4
    assert_same(lambda s, t: wttm.wttm_loss(s, t, gamma),
                lambda s, t: reference_wttm(s, t, gamma), [student], [teacher])
    if gamma == 1.0:  # U = 1: the KL at temperature 1
        kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="batchmean",
                      log_target=True)
        assert torch.allclose(wttm.wttm_loss(student, teacher, 1.0), kl, rtol=1e-12)


def test_wttm_weights_each_image_by_its_transformed_teachers_mass():
    """One image: U * KL(q_t || p_s) with U = sum p_t^gamma, written class by class; a one-hot-like
    teacher has U near 1, a uniform one C^(1 - gamma)."""
    gamma, s = 0.2, randn(2, 1, CLASSES)
    t = randn(3, 1, CLASSES)
    p_t = [math.exp(v) for v in F.log_softmax(t, 1)[0].tolist()]
    u = sum(p ** gamma for p in p_t)
    log_p_s = F.log_softmax(s, 1)[0].tolist()
    kl = sum(p ** gamma / u * (math.log(p ** gamma / u) - lp) for p, lp in zip(p_t, log_p_s))
    assert wttm.wttm_loss(s, t, gamma).item() == pytest.approx(u * kl, rel=1e-12)
    uniform = torch.zeros(1, CLASSES, dtype=torch.float64)
    assert wttm.wttm_loss(uniform, uniform, gamma).item() == pytest.approx(0, abs=1e-12)
    confident = torch.zeros(1, CLASSES, dtype=torch.float64)
    confident[0, 0] = 200.0  # p_t^gamma underflows for the other classes: no NaN, U ~ 1
    value = wttm.wttm_loss(uniform, confident, gamma)
    assert value.item() == pytest.approx(math.log(CLASSES), rel=1e-9)


def test_wttm_objective_and_defaults():
    args = argparse.Namespace(**flag_defaults())
    assert (args.wttm_gamma, args.wttm_beta, args.ce_weight) == (0.2, 4.0, 1.0)
    student, teacher = randn(4, B, CLASSES), randn(5, B, CLASSES) * 3
    labels = torch.arange(B)
    total, terms = METHODS["wttm"].loss_at(args, 1)(student, teacher, labels)
    assert set(terms) == {"ce", "wttm"}
    assert torch.allclose(terms["ce"], F.cross_entropy(student, labels))
    assert torch.allclose(terms["wttm"], reference_wttm(student, teacher, 0.2))
    assert torch.allclose(total, terms["ce"] + 4.0 * terms["wttm"])
    low = wttm.wttm_objective(student.bfloat16(), teacher.bfloat16(), labels, 0.2, 4.0, 1.0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in (low[0], *low[1].values()))


def reference_itrd(f_s, weight, bias, f_t, alpha_it, lambda_corr=1.0, lambda_mutual=1.0):
    """ITRD's distiller_zoo/IT.py: ITLoss.forward_correlation_it and forward_mutual_it (s_dim !=
    t_dim: both embed f_s with Embed(n=1), a Linear), weighted as helper/loops.py. Returns
    (correlation, mutual) after the weights."""
    embed = lambda x: F.linear(x.view(x.shape[0], -1), weight, bias)

    def forward_correlation_it(z_s, z_t):
        f_s = embed(z_s)
        f_t = z_t
        n, d = f_s.shape
        f_s_norm = (f_s - f_s.mean(0)) / f_s.std(0)
        f_t_norm = (f_t - f_t.mean(0)) / f_t.std(0)
        c_st = torch.einsum('bx,bx->x', f_s_norm, f_t_norm) / n
        c_diff = c_st - torch.ones_like(c_st)
        c_diff = torch.abs(c_diff)
        c_diff = c_diff.pow(2.0)
        c_diff = c_diff.pow(alpha_it)
        return torch.log2(c_diff.sum())

    def forward_mutual_it(z_s, z_t):
        f_s = embed(z_s)
        f_t = z_t
        f_s_norm = F.normalize(f_s)
        f_t_norm = F.normalize(f_t)
        G_s = torch.einsum('bx,dx->bd', f_s_norm, f_s_norm)
        G_t = torch.einsum('bx,dx->bd', f_t_norm, f_t_norm)
        G_st = G_s * G_t
        z_s = torch.trace(G_s)
        z_st = torch.trace(G_st)
        G_s = G_s / z_s
        G_st = G_st / z_st
        g_diff = G_s.pow(2) - G_st.pow(2)
        return g_diff.sum()

    return (lambda_corr * forward_correlation_it(f_s, f_t),
            lambda_mutual * forward_mutual_it(f_s, f_t))


@pytest.mark.parametrize("alpha", [1.5, 1.01])
def test_itrd_is_the_authors_losses_through_its_embedding(alpha):
    f_s, f_t = randn(0, B, STUDENT_DIM), randn(1, B, TEACHER_DIM).abs()  # >= 0 as post-ReLU
    weight, bias = randn(2, TEACHER_DIM, STUDENT_DIM) / STUDENT_DIM ** 0.5, randn(3, TEACHER_DIM)
    ours = lambda x, w, b, t: itrd.itrd_losses(F.linear(x, w, b), t, alpha)
    for i in range(2):  # each term, then both weighted as the README's command
        assert_same(lambda *m: ours(*m)[i], lambda *m: reference_itrd(*m, alpha)[i],
                    [f_s, weight, bias], [f_t])
    assert_same(lambda *m: 2.0 * ours(*m)[0] + ours(*m)[1],
                lambda *m: sum(reference_itrd(*m, alpha, 2.0, 1.0)), [f_s, weight, bias], [f_t])
    correlation, mutual = ours(f_s, weight, bias, f_t)
    assert correlation > 0 and mutual > 0  # at random embeddings; mutual >= 0 always


def test_itrd_a_dimension_constant_over_the_batch_adds_one_not_nan():
    """A teacher channel ReLU zeroes for the whole batch: the reference's 0 / 0 is NaN; ours
    standardises it to 0, adding |0 - 1|^(2 alpha) = 1 to the live dimensions' sum."""
    f_s, f_t = randn(0, B, STUDENT_DIM), randn(1, B, TEACHER_DIM).abs()
    weight, bias = randn(2, TEACHER_DIM, STUDENT_DIM) / STUDENT_DIM ** 0.5, randn(3, TEACHER_DIM)
    dead = torch.zeros(TEACHER_DIM, dtype=torch.bool)
    dead[[0, 7, 100]] = True
    f_t[:, dead] = 0.0
    assert torch.isnan(reference_itrd(f_s, weight, bias, f_t, 1.5)[0])
    live = ~dead
    live_sum = lambda x, w, b, t: 2 ** reference_itrd(x, w[live], b[live], t[:, live], 1.5)[0]
    assert_same(lambda *m: itrd.correlation_loss(F.linear(*m[:3]), m[3], 1.5),
                lambda *m: torch.log2(live_sum(*m) + dead.sum()), [f_s, weight, bias], [f_t])
    assert_same(lambda *m: itrd.mutual_loss(F.linear(*m[:3]), m[3]),  # normalize has its eps
                lambda *m: reference_itrd(*m, 1.5)[1], [f_s, weight, bias], [f_t])


def test_itrd_objective_and_defaults():
    args = argparse.Namespace(**flag_defaults())
    assert (args.itrd_corr, args.itrd_mutual, args.itrd_alpha) == (2.0, 1.0, 1.5)
    logits, teacher_logits = randn(4, B, CLASSES), randn(5, B, CLASSES)
    labels = torch.arange(B)
    z_s, f_t = randn(6, B, TEACHER_DIM), randn(7, B, TEACHER_DIM).abs()
    total, terms = METHODS["itrd"].loss_at(args, 1)(logits, teacher_logits, labels, (z_s, f_t))
    assert set(terms) == {"ce", "correlation", "mutual"}
    identity, zero = torch.eye(TEACHER_DIM, dtype=torch.float64), torch.zeros(TEACHER_DIM,
                                                                              dtype=torch.float64)
    correlation, mutual = reference_itrd(z_s, identity, zero, f_t, 1.5)
    assert torch.allclose(terms["correlation"], correlation, rtol=1e-12)
    assert torch.allclose(terms["mutual"], mutual, rtol=1e-12)
    assert torch.allclose(total, F.cross_entropy(logits, labels) + 2 * correlation + mutual)
    low = itrd.itrd_objective(logits.bfloat16(), teacher_logits.bfloat16(), labels,
                              (z_s.bfloat16(), f_t.bfloat16()), 1.0, 2.0, 1.0, 1.5)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in (low[0], *low[1].values()))


def test_itrd_embed_is_one_linear_map_of_the_pooled_features():
    stages = [randn(i, B, 4, 2, 2) for i in range(4)]
    student = FixedTaps([*stages, randn(8, B, STUDENT_DIM, 1, 1)])
    teacher = FixedTaps([*stages, randn(9, B, TEACHER_DIM, 1, 1).abs()])
    embed = itrd.ITREmbed(student, teacher).double()
    z_s, f_t = embed(None, None)
    assert z_s.shape == f_t.shape == (B, TEACHER_DIM)
    assert torch.allclose(z_s, student.values[4].flatten(1) @ embed.embed.weight.T
                          + embed.embed.bias)  # no BatchNorm, no ReLU (the reference's n=1)
    assert torch.equal(f_t, teacher.values[4].flatten(1))  # the teacher's is not embedded


def test_itrd_connector_on_our_pair_trains_in_float32_and_is_saved():
    torch.manual_seed(0)
    student, teacher = build_student(), build_teacher(32).eval().requires_grad_(False)
    connector = itrd.connector(None, student, teacher, None)
    assert sum(p.numel() for p in connector.parameters()) == STUDENT_DIM * TEACHER_DIM + \
        TEACHER_DIM
    assert set(connector.state_dict()) == {"embed.weight", "embed.bias"}
    assert set(student.state_dict()) == set(build_student().state_dict())  # taps are no state
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x)
        with torch.inference_mode():
            teacher(x)
        z_s, f_t = connector(None, None)
    assert z_s.shape == f_t.shape == (4, TEACHER_DIM)
    assert z_s.dtype == f_t.dtype == torch.float32  # the embedding ran outside autocast
    correlation, mutual = itrd.itrd_losses(z_s, f_t, 1.5)
    assert torch.isfinite(correlation) and torch.isfinite(mutual)
    assert (f_t.std(dim=0) == 0).any()  # channels ReLU zeroes for the whole batch: the std floor
    correlation.add(mutual).add(logits.float().sum() * 0).backward()
    assert connector.embed.weight.grad.abs().sum() > 0
    assert student.features[0][0].weight.grad.abs().sum() > 0


def test_both_are_registered_and_only_itrd_needs_the_live_teacher():
    assert {"wttm", "itrd"} <= set(NAMES)
    assert METHODS["wttm"].connector is None and not METHODS["wttm"].online  # the cache does
    assert METHODS["itrd"].online
    assert summary("wttm").startswith("WTTM: Zheng and Yang") and "ICLR 2024" in summary("wttm")
    assert summary("itrd").startswith("ITRD: Miles") and "BMVC 2022" in summary("itrd")
    assert set(METHODS["wttm"].flags) == {"ce_weight", "wttm_gamma", "wttm_beta"}
    assert set(METHODS["itrd"].flags) == {"ce_weight", "itrd_corr", "itrd_mutual", "itrd_alpha"}


def test_neither_reads_back_from_the_device(monkeypatch):
    args = argparse.Namespace(**flag_defaults())
    logits, teacher_logits = torch.randn(B, CLASSES, requires_grad=True), torch.randn(B, CLASSES)
    labels = torch.arange(B)
    student = FixedTaps([torch.randn(B, STUDENT_DIM, 1, 1)] * 5)
    teacher = FixedTaps([torch.randn(B, TEACHER_DIM, 1, 1).abs()] * 5)
    embed = itrd.ITREmbed(student, teacher)
    calls, original = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or original(t))
    with profile() as prof:  # on CPU every tensor-to-Python read is an aten::item
        for name, extra in (("wttm", []), ("itrd", [embed(None, None)])):
            total, terms = METHODS[name].loss_at(args, 1)(logits, teacher_logits, labels, *extra)
            total.backward()
    assert sum(e.count for e in prof.key_averages() if e.key in ("aten::item",
                                                                 "aten::_local_scalar_dense")) \
        == 0 and not calls
