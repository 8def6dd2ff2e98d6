"""MLKD (kd/methods/mlkd.py) and its batched strong view (kd/augment.py): each augmentation
against the PIL operation the reference calls, the loss against the reference's code in float64,
and the connector's strong views."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kd import augment
from kd.data import NUM_VIEWS, Split
from kd.methods import mlkd
from kd.models import build_student, build_teacher

# The reference's operations (Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py)
PIL_OPS = {
    "autocontrast": lambda im, v: ImageOps.autocontrast(im),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "identity": lambda im, v: im,
    "posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1,
                                                                      0)),
    "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1,
                                                                      v * im.size[1])),
}


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Noise, and smooth images (4 x 4 blocks) whose histograms have gaps and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[n // 2:] = x[n // 2:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3) // 2 + 40
    return x


def pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def test_the_operations_and_ranges_are_the_references():
    assert list(augment.OPS) == list(PIL_OPS)  # augment_list()'s 14, in its order
    ranges = {name: (low, high) for name, (_, low, high) in augment.OPS.items()}
    assert ranges["rotate"] == (-30, 30) and ranges["solarize"] == (0, 256)
    assert ranges["posterize"] == (4, 8) and ranges["translate_x"] == (-0.3, 0.3)
    assert augment.NUM_OPS == 2 and augment.CUTOUT_MAX == 0.5


@pytest.mark.parametrize("name", list(PIL_OPS))
def test_each_operation_is_pils(name):
    """Every image at its own magnitude: the pixel operations equal PIL's to the value; the
    geometric ones (nearest neighbour, black fill) at all but the rare pixel whose source
    coordinate PIL, accumulating it pixel by pixel, rounds to the other side of an edge."""
    x = images()
    fn, low, high = augment.OPS[name]
    v = low + (high - low) * torch.rand(len(x), generator=torch.Generator().manual_seed(1))
    ours = fn(x, v) if fn else augment.warp(x, augment._geometry(v, 32)[name])
    theirs = torch.stack([tensor(PIL_OPS[name](pil(image), float(m))) for image, m in zip(x, v)])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    if fn:
        assert torch.equal(ours, theirs)
    else:
        assert (ours != theirs).float().mean() < 1e-3
    if name != "identity":
        assert not torch.equal(ours, x)


def test_cutout_is_the_references_rectangle():
    """Side, corner and PIL's inclusive rectangle, from the same draws."""
    x = images(64)
    torch.manual_seed(3)
    ours = augment.cutout(x)
    torch.manual_seed(3)
    side, centre = torch.rand(64) * 0.5 * 32, 1 + 31 * torch.rand(2, 64)
    for i, image in enumerate(x):
        im = pil(image).copy()
        v = float(side[i])
        if v > 0:  # the reference's CutoutAbs
            x0 = int(max(0, float(centre[0, i]) - v / 2.0))
            y0 = int(max(0, float(centre[1, i]) - v / 2.0))
            ImageDraw.Draw(im).rectangle((x0, y0, min(32, x0 + v), min(32, y0 + v)),
                                         augment.CUTOUT_FILL)
        assert torch.equal(ours[i], tensor(im)), i


def test_strong_views_follow_the_rng_and_differ_per_image():
    x = images(32)
    torch.manual_seed(0)
    a = augment.strong_view(x)
    torch.manual_seed(0)
    b = augment.strong_view(x)
    torch.manual_seed(1)
    c = augment.strong_view(x)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a training step
        in_autocast = augment.strong_view(x)
    assert torch.equal(a, b) and torch.equal(a, in_autocast) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    copies = augment.strong_view(x[:1].expand(8, -1, -1, -1).contiguous())
    assert len({view.numpy().tobytes() for view in copies}) == 8  # each image draws its own


# The reference's KD_ours.forward_train losses, as written there (reduce=True)
def reference_kd(s, t, T):
    return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="none").sum(1).mean() \
        * T ** 2


def reference_cc(s, t, T):
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    return ((torch.mm(p_t.T, p_t) - torch.mm(p_s.T, p_s)) ** 2).sum() / t.shape[1]


def reference_bc(s, t, T):
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    return ((torch.mm(p_t, p_t.T) - torch.mm(p_s, p_s.T)) ** 2).sum() / t.shape[0]


def reference_mlkd(s_w, s_s, t_w, t_s, target, ce_w=0.1, kd_w=0.9, T=4.0):
    p = F.softmax(t_w, 1)
    confidence = p.max(1)[0]
    mask = confidence.le(float(np.percentile(confidence.numpy(), 50))).bool()
    class_confidence = p.sum(0)
    class_mask = class_confidence.le(float(np.percentile(class_confidence.numpy(), 50))).bool()
    loss_ce = ce_w * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target))
    taus = [T, 3.0, 5.0, 2.0, 6.0]
    kd_weak = sum(kd_w * (reference_kd(s_w, t_w, tau) * mask).mean() for tau in taus)
    kd_strong = sum(kd_w * reference_kd(s_s, t_s, tau) for tau in taus[:3]) + \
        sum(kd_w * reference_kd(s_w, t_w, tau) for tau in taus[3:])
    cc_weak = sum(kd_w * (reference_cc(s_w, t_w, tau) * class_mask).mean() for tau in taus)
    bc_weak = sum(kd_w * (reference_bc(s_w, t_w, tau) * mask).mean() for tau in taus)
    return loss_ce + kd_weak + kd_strong + cc_weak + bc_weak


@pytest.mark.parametrize("batch", [7, 16])  # odd: the median is an image's; even: interpolated
def test_loss_is_the_references_code(batch):
    g = torch.Generator().manual_seed(batch)
    logits = [torch.randn(batch, 100, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    target = torch.randint(0, 100, (batch,), generator=g)

    def value_and_grads(fn):
        s_w, s_s = (z.clone().requires_grad_() for z in logits[:2])
        value = fn(s_w, s_s)
        return value, torch.autograd.grad(value, (s_w, s_s))
    ours, our_grads = value_and_grads(lambda s_w, s_s: mlkd.mlkd_objective(
        s_w, logits[2], target, (s_s, logits[3]), T=4.0, ce_weight=0.1, kd_weight=0.9)[0])
    theirs, their_grads = value_and_grads(
        lambda s_w, s_s: reference_mlkd(s_w, s_s, logits[2], logits[3], target))
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, rtol=1e-12), (ours.item(), theirs.item())
    for a, b in zip(our_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_terms_are_named_and_float32_from_bf16():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(8, 100, generator=g).bfloat16() for _ in range(4)]
    loss, terms = mlkd.mlkd_objective(z[0], z[1], torch.arange(8), (z[2], z[3]), 4.0, 0.1, 0.9)
    assert list(terms) == ["ce", "instance", "class", "batch"]
    assert loss.dtype == torch.float32 and all(t > 0 for t in terms.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the correlations' products stay float32
        _, in_autocast = mlkd.mlkd_objective(z[0], z[1], torch.arange(8), (z[2], z[3]), 4.0,
                                             0.1, 0.9)
    assert all(torch.equal(in_autocast[k], terms[k]) for k in terms)


def test_the_connector_runs_both_models_on_strong_views_and_holds_no_state():
    torch.manual_seed(0)
    student, teacher = build_student(), build_teacher(32).eval().requires_grad_(False)
    x = images(20)
    train = Split(x, torch.arange(20) % 100, torch.arange(20) // 5, [str(i) for i in range(100)])
    connect = mlkd.connector(None, student, teacher, train)
    assert connect.state_dict() == {} and not list(connect.parameters())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    keys = torch.tensor([0, 5, 19, 19]) * NUM_VIEWS + torch.tensor([0, 3, 161, 7])
    student_logits, teacher_logits = connect(keys, None)
    assert student_logits.shape == teacher_logits.shape == (4, 100)
    assert student_logits.requires_grad and not teacher_logits.requires_grad
    student_logits.sum().backward()
    assert student.classifier[-1].weight.grad is not None
    assert set(student.state_dict()) == set(before)  # a plain student; BN statistics moved
    assert not torch.equal(student.state_dict()["features.0.1.running_mean"],
                           before["features.0.1.running_mean"])
