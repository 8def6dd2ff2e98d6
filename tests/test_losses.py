import pytest
import torch
import torch.nn.functional as F

from kd.losses import ce_loss, kd_loss


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
    """d/dz_s of T^2*KL(p_t||p_s) averaged over B is T*(p_s - p_t)/B: the scale the T^2 factor keeps."""
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
