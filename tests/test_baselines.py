"""The RepDistiller/mdistiller baselines (kd/methods/ at, pkt, rkd, sp, nst, cc, vid, ofd, kdsvd):
each loss against its reference code's formula written out here (RepDistiller's
distiller_zoo/<NAME>.py, mdistiller's distillers/OFD.py; as loops where the reference
vectorises), values and gradients in float64 on random inputs, at the shapes our pair gives
(the channels and sizes of the two models differ); then what each connector adds."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd import features
from kd.methods import at, cc, kdsvd, nst, ofd, pkt, rkd, sp, vid
from kd.models import build_student, build_teacher

G = lambda seed: torch.Generator().manual_seed(seed)
B = 6


class FixedTaps:
    """Stand-in taps with given features."""

    def __init__(self, values: list[torch.Tensor]):
        self.values, self.shapes = values, [v.shape[1:] for v in values]

    def read(self, which: list[int] | None = None) -> list[torch.Tensor]:
        return [self.values[i] for i in (which or range(len(self.values)))]


def maps(seed: int, shapes: list[tuple], relu: bool = False) -> list[torch.Tensor]:
    out = [torch.randn(B, *shape, generator=G(seed + i), dtype=torch.float64)
           for i, shape in enumerate(shapes)]
    return [m.relu() for m in out] if relu else out


STUDENT = [(16, 8, 8), (24, 4, 4), (48, 2, 2), (96, 2, 2)]  # channels and sizes differ
TEACHER = [(32, 4, 4), (64, 4, 4), (128, 2, 2), (256, 1, 1)]


def assert_same(ours_fn, reference_fn, student: list[torch.Tensor], teacher: list[torch.Tensor]
                ) -> None:
    """Equal values, and gradients with respect to every student input (the teacher's carry
    none in training), in float64."""
    def value_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in student]
        value = fn(*leaves, *teacher)
        return value, torch.autograd.grad(value, leaves)
    (ours, our_grads), (reference, reference_grads) = map(value_and_grads, (ours_fn, reference_fn))
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-12), (ours, reference)
    for a, b in zip(our_grads, reference_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def pooled_pair(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's size matching: the larger map adaptive-average-pooled to the smaller."""
    if s.shape[2] > t.shape[2]:
        s = F.adaptive_avg_pool2d(s, t.shape[2])
    elif s.shape[2] < t.shape[2]:
        t = F.adaptive_avg_pool2d(t, s.shape[2])
    return s, t


def reference_at(g_s, g_t, p=2):
    """AT.py: at(f) = normalize(f^p.mean(1).view(B, -1)); per pair (at_s - at_t)^2 .mean()."""
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = pooled_pair(f_s, f_t)
        a_s = f_s.pow(p).mean(1).view(B, -1)
        a_t = f_t.pow(p).mean(1).view(B, -1)
        a_s = a_s / a_s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        a_t = a_t / a_t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total = total + (a_s - a_t).pow(2).mean()
    return total


@pytest.mark.parametrize("p", [1, 2, 3])
def test_at_is_repdistillers_attention(p):
    s, t = maps(0, STUDENT), maps(10, TEACHER, relu=True)

    def ours(*m):
        pairs = [pooled_pair(a, b) for a, b in zip(m[:4], m[4:])]
        return at.at_loss([a for a, _ in pairs], [b for _, b in pairs], p)
    assert_same(ours, lambda *m: reference_at(m[:4], m[4:], p), s, t)


def reference_pkt(f_s, f_t, eps=1e-7):
    """PKT.py's cosine_similarity_loss, the kernel built entry by entry."""
    def probabilities(f):
        f = f / (torch.sqrt((f ** 2).sum(1, keepdim=True)) + eps)
        k = torch.stack([torch.stack([(f[i] * f[j]).sum() for j in range(B)]) for i in range(B)])
        k = (k + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)
    p, q = probabilities(f_s), probabilities(f_t)
    return torch.mean(q * torch.log((q + eps) / (p + eps)))


def test_pkt_is_the_authors_loss():
    f_s, f_t = maps(0, [(96,)])[0], maps(1, [(256,)])[0]
    assert_same(pkt.pkt_loss, reference_pkt, [f_s], [f_t])


def reference_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    """RKD.py: distances normalised by their mean over the pairs with d > 0, the angles at each
    third image, each through smooth L1 (beta 1); the teacher's side detached. Loops."""
    def distances(e):
        d = torch.zeros(B, B, dtype=e.dtype)
        for i in range(B):
            for j in range(B):
                if i != j:
                    d[i, j] = (e[i].pow(2).sum() + e[j].pow(2).sum()
                               - 2 * (e[i] * e[j]).sum()).clamp(min=1e-12).sqrt()
        return d / d[d > 0].mean()

    def angles(e):
        unit = lambda v: v / v.norm().clamp_min(1e-12)
        return torch.stack([(unit(e[j] - e[i]) * unit(e[k] - e[i])).sum()
                            for i in range(B) for j in range(B) for k in range(B)])

    smooth_l1 = lambda a, b: torch.where((a - b).abs() < 1, 0.5 * (a - b) ** 2,
                                         (a - b).abs() - 0.5).mean()
    t = f_t.detach()
    return w_d * smooth_l1(distances(f_s), distances(t)) + w_a * smooth_l1(angles(f_s),
                                                                            angles(t))


def test_rkd_is_repdistillers_distance_and_angle():
    f_s = maps(0, [(96,)])[0] * 3  # distances of order 1 and above: both branches of smooth L1
    f_t = maps(1, [(256,)])[0]
    ours = lambda s, t: (lambda d, a: 25 * d + 50 * a)(*rkd.rkd_losses(s, t))
    assert_same(ours, reference_rkd, [f_s], [f_t])


def reference_sp(f_s, f_t):
    """SP.py: G = normalize(F F^T) row by row, |G_t - G_s|^2 summed over B x B entries / B^2."""
    def gram(f):
        f = f.view(B, -1)
        rows = [torch.stack([(f[i] * f[j]).sum() for j in range(B)]) for i in range(B)]
        return torch.stack([r / r.norm().clamp_min(1e-12) for r in rows])
    return (gram(f_t) - gram(f_s)).pow(2).sum() / (B * B)


def test_sp_is_repdistillers_similarity():
    s, t = maps(0, [STUDENT[-1]])[0], maps(1, [TEACHER[-1]], relu=True)[0]  # sizes differ
    assert_same(sp.sp_loss, reference_sp, [s], [t])


def reference_nst(g_s, g_t):
    """NST.py: per pair, channels flattened and normalised, the polynomial kernel of every pair
    of channels, MMD^2 = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)."""
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = pooled_pair(f_s, f_t)
        f_s = F.normalize(f_s.view(B, f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(B, f_t.shape[1], -1), dim=2)
        kernel = lambda a, b: (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
        total = total + (kernel(f_t, f_t).mean().detach() + kernel(f_s, f_s).mean()
                         - 2 * kernel(f_s, f_t).mean())
    return total


def test_nst_is_repdistillers_mmd_through_either_product():
    """Stage 1 (few channels, 16 positions) goes through the channel pairs, the last (96 x 256
    channels, one position) through the Gram matrices: both are the reference's sum."""
    s, t = maps(0, STUDENT), maps(10, TEACHER, relu=True)

    def ours(*m):
        pairs = [pooled_pair(a, b) for a, b in zip(m[:4], m[4:])]
        return nst.nst_loss([a for a, _ in pairs], [b for _, b in pairs])
    assert_same(ours, lambda *m: reference_nst(m[:4], m[4:]), s, t)
    a, b = maps(3, [(16, 16), (256, 16)])
    for kernel_of in ((a, a), (a, b), (b, b)):  # both branches on the same inputs
        x, y = (F.normalize(v, dim=2) for v in kernel_of)
        direct = (x @ y.transpose(1, 2)).pow(2).mean()
        assert torch.allclose(nst.mean_poly_kernel(x, y), direct, rtol=1e-12)


def reference_cc(e_s, e_t):
    """CC.py: delta = |e_s - e_t|; mean over i of sum_d delta[i] * delta[i + 1]."""
    delta = (e_s - e_t).abs()
    return torch.stack([(delta[i] * delta[i + 1]).sum() for i in range(B - 1)]).mean()


def test_cc_is_repdistillers_correlation_on_its_linear_embeddings():
    e_s, e_t = maps(0, [(128,), (128,)])
    assert_same(cc.cc_loss, reference_cc, [e_s, e_t], [])  # both embeddings train
    student, teacher = FixedTaps(maps(2, [*STUDENT, (96, 1, 1)])), \
        FixedTaps(maps(7, [*TEACHER, (256, 1, 1)]))
    embed = cc.CorrelationEmbed(student, teacher, 16).double()
    s, t = embed(None, None)
    assert s.shape == t.shape == (B, 16)
    assert torch.allclose(t, teacher.values[4].flatten(1) @ embed.embed_t.weight.T
                          + embed.embed_t.bias)  # linear, no normalisation (LinearEmbed)


def reference_vid(inputs, targets, regressors, log_scales, eps=1e-5):
    """VID.py's VIDLoss per stage: pool, regress, var = log(1 + exp(log_scale)) + eps,
    mean(0.5 * ((mean - target)^2 / var + log var))."""
    total = 0.0
    for x, target, weights, log_scale in zip(inputs, targets, regressors, log_scales):
        x, target = pooled_pair(x, target)
        w1, w2, w3 = weights
        mean = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w1)), w2)), w3)
        var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
        total = total + torch.mean(0.5 * ((mean - target) ** 2 / var + torch.log(var)))
    return total


def test_vid_is_repdistillers_and_its_variances_train():
    s, t = maps(0, [*STUDENT, (96, 1, 1)]), maps(10, [*TEACHER, (256, 1, 1)], relu=True)
    torch.manual_seed(0)
    connector = vid.VariationalRegressors(FixedTaps(s), FixedTaps(t), init_var=5.0).double()
    start = math.log(math.expm1(5.0 - 1e-5))  # RepDistiller: log(exp(init_pred_var - eps) - 1)
    assert all(torch.allclose(scale, torch.full_like(scale, start))
               for scale in connector.log_scales)
    assert [len(scale) for scale in connector.log_scales] == [c for c, *_ in TEACHER]
    with torch.no_grad():  # away from the initial value, differently per channel
        for scale in connector.log_scales:
            scale.add_(torch.randn(len(scale), generator=G(4), dtype=torch.float64))
    params = list(connector.parameters())
    assert len(params) == 4 * 3 + 4  # three convs per stage, no biases, and the log-scales
    assert all(p.requires_grad for p in params)  # mdistiller leaves the log-scales untrained
    regressors = [[conv.weight for conv in r if isinstance(conv, torch.nn.Conv2d)]
                  for r in connector.regressors]
    ours = vid.vid_loss(*connector(None, None))
    reference = reference_vid(s[:4], t[:4], regressors, list(connector.log_scales))
    assert torch.allclose(ours, reference, rtol=1e-12)
    our_grads = torch.autograd.grad(ours, params)
    for a, b in zip(our_grads, torch.autograd.grad(reference, params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
    assert all(g.abs().sum() > 0 for g in our_grads[-4:])  # the log-scales' gradients


def test_paired_taps_match_sizes_only_when_asked():
    s, t = maps(0, [*STUDENT, (96, 1, 1)]), maps(10, [*TEACHER, (256, 1, 1)])
    paired = features.PairedTaps(FixedTaps(s), FixedTaps(t), [0, 1, 2, 3])
    student, teacher = paired(None, None)
    assert [m.shape[-1] for m in student] == [m.shape[-1] for m in teacher] == [4, 4, 2, 1]
    assert torch.equal(student[0], F.adaptive_avg_pool2d(s[0], 4)) and torch.equal(teacher[0],
                                                                                   t[0])
    (last_s,), (last_t,) = features.PairedTaps(FixedTaps(s), FixedTaps(t), [3], False)(None, None)
    assert torch.equal(last_s, s[3]) and torch.equal(last_t, t[3])


def test_the_losses_are_float32_from_low_precision_inputs():
    s = [m.bfloat16() for m in maps(0, STUDENT)]
    t = [m.bfloat16() for m in maps(10, TEACHER, relu=True)]
    pairs = [pooled_pair(a, b) for a, b in zip(s, t)]
    ps, pt = [a for a, _ in pairs], [b for _, b in pairs]
    f_s, f_t = maps(0, [(96,)])[0].bfloat16(), maps(1, [(256,)])[0].bfloat16()
    for loss in (at.at_loss(ps, pt, 2), nst.nst_loss(ps, pt), sp.sp_loss(s[3], t[3]),
                 pkt.pkt_loss(f_s, f_t), rkd.rkd_losses(f_s, f_t)[0], cc.cc_loss(f_s, f_s)):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def reference_margin(gamma: float, beta: float) -> float:
    """mdistiller's OFD margin of one channel (scipy's norm.cdf written with erf)."""
    s, m = abs(gamma), beta
    cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    if cdf > 0.001:
        return -s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3 * s


def reference_ofd(g_s, g_t, margins):
    """mdistiller's feat_loss per stage, weighted 1 / 2^(n - i - 1), element by element rules."""
    total, n = 0.0, len(g_s)
    for i, (s, t, m) in enumerate(zip(g_s, g_t, margins)):
        m = m.view(1, -1, 1, 1)
        loss = ((s - m) ** 2 * ((s > m) & (t <= m)).float()
                + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0)).float()
                + (s - t) ** 2 * (t > 0).float())
        total = total + torch.abs(loss).mean(dim=0).sum() / 2 ** (n - i - 1)
    return total


def test_ofd_is_mdistillers_partial_l2_with_its_margins():
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.1, 3.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 1.0, 2.0]))  # channel 3: P(x < 0) < 0.001
    expected = [reference_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
    assert expected[3] == pytest.approx(-0.3)
    assert ofd.margin(bn).tolist() == pytest.approx(expected, rel=1e-6)
    shapes = [(4, 4, 4), (6, 2, 2)]
    s, t = maps(0, shapes), maps(5, shapes)  # pre-activation: of both signs
    margins = [-maps(9, [(4,)])[0][0].abs(), -maps(10, [(6,)])[0][0].abs()]
    assert_same(lambda *m: ofd.ofd_loss(m[:2], m[2:], margins),
                lambda *m: reference_ofd(m[:2], m[2:], margins), s, t)


def test_ofd_taps_read_both_models_before_their_activations():
    """The teacher's tap is the residual sum its last ReLU reads (relu of it is the block's
    output), the student's last stage its BatchNorm's output before the Hardswish; the margins
    come from each stage's last bn3, and the teacher stays in eval mode."""
    torch.manual_seed(0)
    student, teacher = build_student(), build_teacher(32).eval().requires_grad_(False)
    connector = ofd.connector(None, student, teacher, None)
    x = torch.randn(2, 3, 32, 32)
    blocks, outputs = [student.features[12], teacher.net.layer1[-1], teacher.net.layer4[-1]], []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.clone())) for b in blocks]
    student(x)
    with torch.inference_mode():
        teacher(x)
    for hook in hooks:
        hook.remove()
    s_maps, t_maps = connector.taps[0].read(), connector.taps[1].read()
    assert torch.equal(torch.relu(t_maps[0]), outputs[1]) and torch.equal(torch.relu(t_maps[3]),
                                                                          outputs[2])
    assert (t_maps[0] < 0).any() and (s_maps[3] < 0).any()
    assert torch.allclose(F.hardswish(s_maps[3]), outputs[0])
    assert torch.equal(connector.margin3, ofd.margin(teacher.net.layer4[-1].bn3))
    assert not teacher.training
    # --sync_bn replaces the student's BatchNorms (and their hooks): the taps still read
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(student).eval()  # eval: no process group
    assert isinstance(student.features[12][1], torch.nn.SyncBatchNorm)
    outputs.clear()
    hook = student.features[12].register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    student(x)
    hook.remove()
    assert torch.allclose(F.hardswish(connector.taps[0].read()[3]), outputs[0])


def reference_kdsvd(g_s, g_t, k=1):
    """RepDistiller's KDSVD.forward with its svd() on each image's [C, HW] map (the reference
    reshapes to [HW, C]; see kd/methods/kdsvd.py), through torch.svd and its removenan."""
    def svd(feat, n):
        u, s, v = torch.svd(feat.view(B, feat.shape[1], -1))
        s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    def align_rsv(a, b):
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine),
                           torch.zeros_like(cosine))
        return torch.matmul(a, mask)

    losses, v_sb, v_tb = [], None, None
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        s_t, v_t = svd(f_t, k)
        _, v_s = svd(f_s, k + 3)
        v_s = align_rsv(v_s, v_t)
        v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            losses.append(torch.where(torch.isfinite(l2loss), l2loss, 0 * l2loss).sum() / B)
        v_tb, v_sb = v_t, v_s
    return sum(losses)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_is_repdistillers_on_the_maps_by_position(k):
    shapes_s, shapes_t = [(16, 4, 4), (24, 2, 2), (48, 2, 2)], [(32, 4, 4), (64, 2, 2),
                                                                (128, 2, 2)]
    s, t = maps(0, shapes_s), maps(10, shapes_t, relu=True)
    assert_same(lambda *m: kdsvd.kdsvd_loss(m[:3], m[3:], k),
                lambda *m: reference_kdsvd(m[:3], m[3:], k), s, t)
