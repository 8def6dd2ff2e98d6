"""MLKD's strong view, batched on the training device: a fresh crop and flip, RandAugment (two
operations per image, each at a random magnitude) then Cutout, as the Multi-Level-Logit-
Distillation repository's mdistiller/dataset/cifar100.py does it image by image with PIL
(RandAugment(2, 10): the 14 operations of its augment_list(), each drawn with replacement, its
magnitude uniform in the operation's range; then Cutout of a random size up to half the image).

Each image draws its own operations and magnitudes from torch's global RNG on the batch's device,
which kd.train.fit seeds from --seed, the epoch and the rank: a resumed run draws the same views.
Every operation is computed for the whole batch and each image keeps the one it drew
(torch.where): no per-image Python, no PIL, no host sync, fixed shapes. Each operation follows
PIL's arithmetic on uint8 (truncating blends, its grey level, nearest-neighbour sampling at pixel
centres, black fill), so a view is the one PIL would give for the same draws, up to float
rounding at a few pixels (tests/test_mlkd.py compares them).
"""
import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize

from kd.data import draw_views, view_pixels

NUM_OPS = 2  # RandAugment's n
CUTOUT_MAX = 0.5  # the largest Cutout side, as a fraction of the image
CUTOUT_FILL = (125, 123, 114)
Magnitudes = torch.Tensor  # [B], one per image: the magnitude of the operation it drew


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: Magnitudes) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) for factors in [0, 1]: truncated to uint8."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (image.float() - degenerate)).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16, [B, 1, H, W] int32."""
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16)[:, None]


def autocontrast(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    """Each channel's range stretched to 0..255 (ImageOps.autocontrast, cutoff 0)."""
    lo, hi = x.amin((2, 3), keepdim=True).double(), x.amax((2, 3), keepdim=True).double()
    # float64 and a true division (255.0 / tensor multiplies by a reciprocal), as PIL's table
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)
    stretched = (x.double() * scale - lo * scale).clamp(0, 255).to(torch.uint8)
    return torch.where(hi > lo, stretched, x)


def brightness(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    return _blend(torch.zeros((), device=x.device), x, v)


def color(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    return _blend(_grey(x).float(), x, v)


def contrast(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    """Blended with the image's mean grey level, rounded (ImageEnhance.Contrast)."""
    mean = (_grey(x).float().mean((1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean, x, v)


def equalize_(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    return equalize(x)


def identity(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    return x


def posterize(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    """Only the top int(v) bits of each value kept (ImageOps.posterize)."""
    shift = (8 - v.int().clamp(1, 8)).to(torch.uint8).view(-1, 1, 1, 1)
    return (x >> shift) << shift


def sharpness(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    """Blended with PIL's SMOOTH filter (3 x 3, centre 5 of 13, rounded; the border pixels kept)."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = (F.conv2d(x.float(), kernel, groups=3) / 13 + 0.5).floor()
    degenerate = x.float().clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, v)


def solarize(x: torch.Tensor, v: Magnitudes) -> torch.Tensor:
    """Every value at or above the threshold v inverted (ImageOps.solarize)."""
    return torch.where(x.float() >= v.view(-1, 1, 1, 1), 255 - x, x)


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    """PIL's AFFINE data as [B, 2, 3]: output pixel (x, y) samples input (a x + b y + c, d x +
    e y + f)."""
    return torch.stack([torch.stack([a, b, c], 1), torch.stack([d, e, f], 1)], 1)


def _rotation(v: Magnitudes, size: int) -> torch.Tensor:
    """Image.rotate(v): counter-clockwise by v degrees about the centre."""
    angle = -v.double() * (math.pi / 180)
    cos, sin, c = angle.cos().round(decimals=15), angle.sin().round(decimals=15), size / 2
    return _affine(cos, sin, cos * -c + sin * -c + c, -sin, cos, -sin * -c + cos * -c + c)


def _geometry(v: Magnitudes, size: int) -> dict[str, torch.Tensor]:
    """The geometric operations' AFFINE data for magnitudes v ([B, 2, 3] each)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return {"rotate": _rotation(v, size),
            "shear_x": _affine(one, v, zero, zero, one, zero),
            "shear_y": _affine(one, zero, zero, v, one, zero),
            "translate_x": _affine(one, zero, v * size, zero, one, zero),
            "translate_y": _affine(one, zero, zero, zero, one, v * size)}


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Image.transform(AFFINE, NEAREST) per image: each output pixel centre (x + 0.5, y + 0.5)
    mapped by its image's matrix [B, 2, 3], the input pixel it falls in taken, black outside."""
    n, c, h, w = x.shape
    ramp = lambda size: torch.arange(size, device=x.device, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(ramp(h), ramp(w), indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])
    # [B, 2, H * W] in float64 as PIL's doubles, floored as its (int) cast of a coordinate >= 0
    source = (matrix.double() @ centres).floor()
    col, row = source.unbind(1)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()[:, None].expand(n, c, h * w)
    taken = x.flatten(2).gather(2, index)
    return torch.where(inside[:, None], taken, 0).view(n, c, h, w)


# RandAugment's operations in the reference's augment_list() order: name -> (the pixel operation,
# None for a geometric one (one warp does them all), the magnitude's range)
OPS = {"autocontrast": (autocontrast, 0, 1), "brightness": (brightness, 0.05, 0.95),
       "color": (color, 0.05, 0.95), "contrast": (contrast, 0.05, 0.95),
       "equalize": (equalize_, 0, 1), "identity": (identity, 0, 1), "posterize": (posterize, 4, 8),
       "rotate": (None, -30, 30), "sharpness": (sharpness, 0.05, 0.95),
       "shear_x": (None, -0.3, 0.3), "shear_y": (None, -0.3, 0.3), "solarize": (solarize, 0, 256),
       "translate_x": (None, -0.3, 0.3), "translate_y": (None, -0.3, 0.3)}


@functools.cache
def _on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operations' magnitude bounds and Cutout's fill on the device, copied there once (a
    tensor made from Python numbers on CUDA is a host copy that waits for the device)."""
    low, high = torch.tensor([bounds for _, *bounds in OPS.values()]).to(device).unbind(1)
    return low, high, torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(1, 3, 1, 1).to(device)


def rand_augment_op(x: torch.Tensor) -> torch.Tensor:
    """One RandAugment operation per image of a uint8 batch [B, 3, H, W], each image's operation
    and magnitude drawn uniformly (low + (high - low) * U(0, 1), as the reference)."""
    n, device = len(x), x.device
    op = torch.randint(len(OPS), (n,), device=device)
    low, high, _ = _on(device)
    v = low[op] + (high[op] - low[op]) * torch.rand(n, device=device)
    drew = lambda i, dims: (op == i).view(-1, *[1] * dims)
    geometry, matrix = _geometry(v, x.shape[-1]), torch.eye(2, 3, device=device).expand(n, 2, 3)
    for i, (name, (fn, *_)) in enumerate(OPS.items()):
        if fn is None:
            matrix = torch.where(drew(i, 2), geometry[name], matrix)
    out = warp(x, matrix)  # the identity matrix leaves an image exactly as it was
    for i, (fn, *_) in enumerate(OPS.values()):
        if fn is not None:
            out = torch.where(drew(i, 3), fn(x, v), out)
    return out


def cutout(x: torch.Tensor) -> torch.Tensor:
    """The reference's Cutout: a square of side s = U(0, CUTOUT_MAX) * size, its corner at
    int(max(0, c - s / 2)) with c uniform in (1, size) (its np.random.uniform(w) is low=w,
    high=1), drawn as PIL's rectangle (corner to corner + s, both ends included, clipped) in
    CUTOUT_FILL."""
    n, _, h, w = x.shape
    side = torch.rand(n, device=x.device) * CUTOUT_MAX * w
    centre = 1 + (w - 1) * torch.rand(2, n, device=x.device)
    start = (centre - side / 2).clamp_min(0).floor()
    end = (start + side).clamp_max(w).floor()
    ramp = torch.arange(w, device=x.device)
    inside = lambda axis: (ramp >= start[axis, :, None]) & (ramp <= end[axis, :, None])
    box = (inside(1)[:, :, None] & inside(0)[:, None, :] & (side > 0)[:, None, None])[:, None]
    return torch.where(box, _on(x.device)[2], x)


def strong_view(images: torch.Tensor) -> torch.Tensor:
    """The strong view of uint8 images [B, 3, 32, 32]: a fresh random crop of the 4-pixel
    zero-padded image and flip (as the weak view's, drawn anew), NUM_OPS RandAugment operations,
    Cutout. uint8, on the images' device; outside autocast, whose bf16 convolution would round
    the sharpness filter's sums."""
    with torch.autocast(images.device.type, enabled=False):
        x = view_pixels(images, draw_views(len(images), None, images.device))
        for _ in range(NUM_OPS):
            x = rand_augment_op(x)
        return cutout(x)
