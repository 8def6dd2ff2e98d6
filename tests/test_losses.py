import functools

import pytest
import torch
import torch.nn.functional as F

from kd.losses import ce_loss, standardize
from kd.methods.dist import dist_loss, dist_objective
from kd.methods.dkd import dkd_loss, dkd_objective
from kd.methods.kd import kd_loss


def hand_kd_loss(s, t, y, alpha, T):
    """The formula written out: alpha*CE + (1-alpha)*T^2 * mean_i sum_c p_t log(p_t / p_s)."""
    p_t = torch.softmax(t / T, dim=1)
    p_s = torch.softmax(s / T, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -torch.log_softmax(s, dim=1)[torch.arange(len(y)), y].mean()
    return alpha * ce + (1 - alpha) * T * T * kl


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_matches_hand_formula(alpha, T):
    g = torch.Generator().manual_seed(int(alpha * 10 + T))
    s, t = torch.randn(16, 100, generator=g) * 3, torch.randn(16, 100, generator=g) * 3
    y = torch.randint(0, 100, (16,), generator=g)
    total, terms = kd_loss(s, t, y, alpha, T)
    expected = hand_kd_loss(s.double(), t.double(), y, alpha, T)
    assert torch.allclose(total.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(total, alpha * terms["ce"] + (1 - alpha) * terms["kd"])


def test_alpha_one_is_cross_entropy():
    s, t, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
    assert torch.allclose(kd_loss(s, t, y, 1.0, 4.0)[0], F.cross_entropy(s, y))
    assert torch.equal(ce_loss(s, y)[0], F.cross_entropy(s, y)) and ce_loss(s, y)[1] == {}


def test_equal_logits_give_zero_kl():
    s, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
    _, terms = kd_loss(s, s.clone(), y, 0.5, 4.0)
    assert abs(terms["kd"].item()) < 1e-6


def test_kd_term_is_T_squared_times_batchmean_kl():
    s, t, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
    T = 3.0
    _, terms = kd_loss(s, t, y, 0.5, T)
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="sum") / 8
    assert torch.allclose(terms["kd"], T * T * kl, rtol=1e-5)


def test_gradient_is_T_times_prob_difference():
    """d/dz_s of T^2*KL(p_t||p_s) averaged over B is T*(p_s - p_t)/B: the scale the T^2 factor
    keeps."""
    B, T = 4, 4.0
    s = torch.randn(B, 100, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(B, 100, dtype=torch.float64), torch.randint(0, 100, (B,))
    kd_loss(s, t, y, alpha=0.0, T=T)[0].backward()
    expected = T * (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)) / B
    assert torch.allclose(s.grad, expected.detach(), atol=1e-10)


def test_low_precision_inputs_give_float32_loss():
    s, t = torch.randn(8, 100).bfloat16(), torch.randn(8, 100).bfloat16()
    y = torch.randint(0, 100, (8,))
    loss, terms = kd_loss(s, t, y, 0.5, 4.0)
    assert loss.dtype == terms["ce"].dtype == terms["kd"].dtype == torch.float32
    assert torch.allclose(loss, kd_loss(s.float(), t.float(), y, 0.5, 4.0)[0])
    assert ce_loss(s, y)[0].dtype == torch.float32


# DKD, DIST and logit standardization against loops over images and classes (float64)

def reference_dkd(s, t, y, alpha, beta, T):
    """TCKD and NCKD image by image, as the DKD paper writes them, batch means times T^2."""
    tckd = nckd = 0.0
    for zs, zt, target in zip(s, t, y.tolist()):
        ps, pt = torch.softmax(zs / T, 0), torch.softmax(zt / T, 0)
        bs, bt = [ps[target], 1 - ps[target]], [pt[target], 1 - pt[target]]
        tckd = tckd + sum(q * (q.log() - r.log()) for q, r in zip(bt, bs))
        others = [c for c in range(len(zs)) if c != target]
        qs, qt = torch.softmax(zs[others] / T, 0), torch.softmax(zt[others] / T, 0)
        nckd = nckd + (qt * (qt.log() - qs.log())).sum()
    tckd, nckd = T * T * tckd / len(y), T * T * nckd / len(y)
    return alpha * tckd + beta * nckd, tckd, nckd


def reference_dist(s, t, beta, gamma, T):
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm())
    inter = 1 - sum(corr(ps[i], pt[i]) for i in range(len(ps))) / len(ps)
    intra = 1 - sum(corr(ps[:, c], pt[:, c]) for c in range(ps.shape[1])) / ps.shape[1]
    return beta * T * T * inter + gamma * T * T * intra, T * T * inter, T * T * intra


def logits(seed, n=6, classes=20):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, classes, generator=g) * 3, torch.randn(n, classes, generator=g) * 3
    return s.double(), t.double(), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("seed,T", [(0, 1.0), (1, 4.0), (2, 2.5)])
def test_dkd_matches_the_loops_with_gradients(seed, T):
    s, t, y = logits(seed)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    total, terms = dkd_loss(s1, t, y, 1.0, 8.0, T)
    expected, tckd, nckd = reference_dkd(s2, t, y, 1.0, 8.0, T)
    assert torch.allclose(total, expected) and torch.allclose(terms["tckd"], tckd)
    assert torch.allclose(terms["nckd"], nckd)
    total.backward(), expected.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-9)


def test_dkd_decouples_kd_image_by_image():
    """Per image, T^2 KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD: KD is DKD with
    beta = 1 - p_t[y]."""
    s, t, y = logits(3)
    T = 3.0
    for i in range(len(y)):
        _, terms = dkd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], 1.0, 1.0, T)
        _, kd = kd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], 0.0, T)
        p_target = torch.softmax(t[i] / T, 0)[y[i]]
        assert torch.allclose(kd["kd"], terms["tckd"] + (1 - p_target) * terms["nckd"])


@pytest.mark.parametrize("seed,T", [(0, 1.0), (1, 4.0)])
def test_dist_matches_the_loops_with_gradients(seed, T):
    s, t, _ = logits(seed)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    total, terms = dist_loss(s1, t, 2.0, 3.0, T)
    expected, inter, intra = reference_dist(s2, t, 2.0, 3.0, T)
    close = functools.partial(torch.allclose, rtol=1e-4, atol=1e-4)  # DIST's eps = 1e-8
    assert close(total, expected) and close(terms["inter"], inter) and close(terms["intra"], intra)
    total.backward(), expected.backward()
    assert close(s1.grad, s2.grad)


def test_identical_logits_distill_nothing():
    s, _, y = logits(4)
    assert dkd_loss(s, s.clone(), y, 1.0, 8.0, 4.0)[0].abs() < 1e-12
    assert dist_loss(s, s.clone(), 2.0, 2.0, 4.0)[0].abs() < 1e-3  # 1 - x / (x + eps)
    assert kd_loss(s, s.clone(), y, 0.0, 4.0, logit_std=True)[0].abs() < 1e-12


def test_logit_std_is_kd_on_z_scored_logits_with_ce_on_raw_ones():
    s, t, y = logits(5)
    z = lambda x: (x - x.mean(1, keepdim=True)) / (1e-7 + x.std(1, keepdim=True))
    total, terms = kd_loss(s, t, y, 0.1, 2.0, logit_std=True)
    assert torch.allclose(terms["kd"], kd_loss(z(s), z(t), y, 0.1, 2.0)[1]["kd"])
    assert torch.allclose(terms["ce"], F.cross_entropy(s, y))
    dkd_std = dkd_loss(s, t, y, 1.0, 8.0, 4.0, logit_std=True)[0]
    assert torch.allclose(dkd_std, dkd_loss(z(s), z(t), y, 1.0, 8.0, 4.0)[0])
    assert torch.allclose(standardize(s).std(1), torch.ones(len(s), dtype=s.dtype), atol=1e-6)


def test_training_objectives_add_the_weighted_ce():
    s, t, y = logits(6)
    ce = F.cross_entropy(s, y)
    total, terms = dkd_objective(s, t, y, 1.0, 8.0, 4.0, ce_weight=0.5,
                                 distill_weight=torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(total, 0.5 * ce + 0.25 * dkd_loss(s, t, y, 1.0, 8.0, 4.0)[0])
    assert list(terms) == ["ce", "tckd", "nckd"]
    total, terms = dist_objective(s, t, y, 2.0, 2.0, 4.0, ce_weight=1.0)
    assert torch.allclose(total, ce + dist_loss(s, t, 2.0, 2.0, 4.0)[0])
    assert list(terms) == ["ce", "inter", "intra"]
    low = dkd_objective(s.bfloat16(), t.bfloat16(), y, 1.0, 8.0, 4.0, 1.0, 1.0)[0]
    assert low.dtype == torch.float32


def test_dkd_stays_finite_for_certain_models():
    """Softened target probabilities that round to exactly 0 or 1: no log(0)."""
    s, t, y = logits(7)
    t = t.float() * 1000
    s = (s.float() * 1000).requires_grad_()
    total, _ = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


def dists_own_loss(s, t, beta, gamma, T):
    """DIST's code (Huang et al.; torchdistill's and mmrazor's DISTLoss are the same)."""
    cosine = lambda a, b, eps=1e-8: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    pearson = lambda a, b: cosine(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))
    y_s, y_t = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    inter = T ** 2 * (1 - pearson(y_s, y_t).mean())
    intra = T ** 2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


@pytest.mark.parametrize("student_scale", [3.0, 1e-3])  # 1e-3: near-uniform predictions
def test_dist_loss_is_dists_own_formula(student_scale):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(32, 100, generator=g, dtype=torch.float64) * student_scale).requires_grad_()
    t = torch.randn(32, 100, generator=g, dtype=torch.float64) * 3
    ours = dist_loss(s, t, beta=2.0, gamma=2.0, T=4.0)[0]
    (ours_grad,) = torch.autograd.grad(ours, s)
    theirs = dists_own_loss(s, t, 2.0, 2.0, 4.0)
    (their_grad,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, rtol=1e-10)
    assert torch.allclose(ours_grad, their_grad, rtol=1e-8, atol=1e-12)
