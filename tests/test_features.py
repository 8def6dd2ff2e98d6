"""Feature distillation (kd/features.py, kd/methods/{fitnet,crd,reviewkd}.py): each loss against
its formula written out as the reference code computes it (mdistiller's FitNet.py, CRD.py and
ReviewKD.py, RepDistiller's and torchdistill's CRD and HCL losses), gradients included; the
connectors against loops; taps that leave the models plain."""
import math

import pytest
import torch
import torch.nn.functional as F

import kd.methods.crd
from kd import features
from kd.errors import UserError
from kd.methods.crd import ContrastMemory, contrast_loss, crd_loss
from kd.methods.fitnet import HintRegressor, fitnet_loss
from kd.methods.reviewkd import ReviewFusion, hcl_loss
from kd.models import build_student, build_teacher

G = lambda seed: torch.Generator().manual_seed(seed)


class FixedTaps:
    """Stand-in taps with given features."""

    def __init__(self, values: list[torch.Tensor]):
        self.values, self.shapes = values, [v.shape[1:] if v is not None else None
                                            for v in values]

    def read(self, which: list[int] | None = None) -> list[torch.Tensor]:
        return [self.values[i] for i in (which or range(len(self.values)))]


def grads(loss_fn, *tensors):
    """The loss and its gradient with respect to each tensor, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    return loss, torch.autograd.grad(loss, leaves)


def test_fitnet_loss_is_the_mean_squared_difference():
    s, t = torch.randn(4, 32, 8, 8, generator=G(0)), torch.randn(4, 32, 8, 8, generator=G(1))
    ours, (grad_s, _) = grads(fitnet_loss, s, t)
    n = s.numel()
    reference, (ref_grad_s, _) = grads(lambda a, b: sum(((x - y) ** 2).sum() for x, y in
                                                        zip(a, b)) / n, s, t)
    assert torch.allclose(ours, reference) and torch.allclose(grad_s, ref_grad_s)


def reference_contrast_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss, image by image and negative by negative."""
    eps, k = 1e-7, scores.shape[1] - 1
    noise = k / num_data
    total = 0.0
    for row in scores:
        total = total + torch.log(row[0] / (row[0] + noise + eps))
        for p in row[1:]:
            total = total + torch.log(noise / (p + noise + eps))
    return -total / len(scores)


def test_crd_loss_matches_the_reference_with_gradients():
    s = torch.rand(6, 9, generator=G(2)) * 3e-4 + 1e-5  # scores near 1 / num_data
    t = torch.rand(6, 9, generator=G(3)) * 3e-4 + 1e-5
    ours, our_grads = grads(lambda a, b: crd_loss(a, b, 5000), s, t)
    ref, ref_grads = grads(lambda a, b: reference_contrast_loss(a, 5000)
                           + reference_contrast_loss(b, 5000), s, t)
    assert torch.allclose(ours, ref)
    assert all(torch.allclose(a, b) for a, b in zip(our_grads, ref_grads))
    assert torch.allclose(contrast_loss(s, 5000), reference_contrast_loss(s, 5000).float())


def reference_hcl(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss as their code writes it."""
    loss_all = 0.0
    for fs, ft in zip(student, teacher):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in [4, 2, 1]:
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size),
                                     F.adaptive_avg_pool2d(ft, size)) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def test_hcl_loss_matches_the_reference_with_gradients():
    shapes = [(2, 8, 16, 16), (2, 12, 4, 4), (2, 16, 2, 2), (2, 20, 1, 1)]
    s = [torch.randn(shape, generator=G(i)) for i, shape in enumerate(shapes)]
    t = [torch.randn(shape, generator=G(10 + i)) for i, shape in enumerate(shapes)]
    n = len(shapes)
    ours, our_grads = grads(lambda *x: hcl_loss(list(x[:n]), list(x[n:])), *s, *t)
    ref, ref_grads = grads(lambda *x: reference_hcl(list(x[:n]), list(x[n:])), *s, *t)
    assert torch.allclose(ours, ref)
    assert all(torch.allclose(a, b) for a, b in zip(our_grads, ref_grads))


def test_taps_record_the_stages_and_leave_the_models_plain():
    student, teacher = build_student("cifar"), build_teacher(64)
    keys = (set(student.state_dict()), set(teacher.state_dict()))
    s_taps = features.student_taps(student)
    t_taps = features.teacher_taps(teacher, s_taps)
    assert s_taps.names == ["features.1", "features.3", "features.8", "features.12", "avgpool"]
    assert [tuple(s) for s in s_taps.shapes] == [(16, 32, 32), (24, 16, 16), (48, 8, 8),
                                                 (576, 4, 4), (576, 1, 1)]
    assert [tuple(s) for s in t_taps.shapes] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                 (2048, 2, 2), (2048, 1, 1)]
    assert (set(student.state_dict()), set(teacher.state_dict())) == keys
    assert student.training and teacher.training  # the probe left the modes alone
    imagenet = features.student_taps(build_student("imagenet"))
    assert imagenet.names == s_taps.names  # the same blocks, at a quarter of the sizes
    assert [s[-1] for s in imagenet.shapes] == [8, 4, 2, 1, 1]

    x = torch.randn(2, 3, 32, 32)
    student.eval(), teacher.eval()
    with torch.inference_mode():  # evaluation passes keep nothing
        student(x), teacher(x)
    assert s_taps.outputs == {} and t_taps.outputs == {}
    teacher(x)  # a teacher forward not following a student's training forward: nothing
    assert t_taps.outputs == {}
    student(x)  # a training step: the student with gradients, then the teacher
    with torch.inference_mode():
        teacher(x)
    expected = student.features[:2](x)
    assert torch.equal(s_taps.read()[0], expected) and s_taps.outputs == {}  # read empties it
    maps = t_taps.read([3])
    assert len(maps) == 1 and maps[0].shape == (2, 2048, 2, 2) and not maps[0].is_inference()


@pytest.mark.parametrize("teacher_sizes", [[56, 28, 14, 7], [8, 4, 2, 1]])
def test_connectors_match_sizes_in_both_directions(teacher_sizes):
    """A teacher at 224 px has larger maps than the student (32/16/8/4), one at 32 px smaller:
    each pair is compared at the smaller size, the teacher's channels."""
    student = FixedTaps([torch.randn(2, c, h, h, generator=G(h)) for c, h in
                         [(16, 32), (24, 16), (48, 8), (576, 4), (576, 1)]])
    teacher = FixedTaps([torch.randn(2, c, h, h, generator=G(c)) for c, h in
                         zip([256, 512, 1024, 2048, 2048], [*teacher_sizes, 1])])
    smaller = [min(a, b) for a, b in zip([32, 16, 8, 4, 1], [*teacher_sizes, 1])]
    for stage in range(1, 5):
        hint, target = HintRegressor(student, teacher, stage)(None, None)
        assert hint.shape == target.shape == (2, teacher.shapes[stage - 1][0], smaller[stage - 1],
                                              smaller[stage - 1])
    reviewed, targets = ReviewFusion(student, teacher)(None, None)
    assert [r.shape for r in reviewed] == [t.shape for t in targets]
    assert [t.shape[-1] for t in targets] == smaller
    big = teacher.values[0]
    pooled = targets[0] if teacher_sizes[0] > 32 else big
    if teacher_sizes[0] > 32:  # 56 -> 32: adaptive average pooling
        assert torch.allclose(pooled, F.adaptive_avg_pool2d(big, 32))
    else:
        assert torch.equal(targets[0], big)


def memory(num_images: int = 60, held_out: tuple = (3, 7), nce_k: int = 10):
    labels = torch.arange(num_images) % 6
    labels[list(held_out)] = -1
    student = FixedTaps([None] * 4 + [torch.randn(8, 20, 1, 1, generator=G(5))])
    teacher = FixedTaps([None] * 4 + [torch.randn(8, 30, 1, 1, generator=G(6))])
    torch.manual_seed(0)
    return ContrastMemory(student, teacher, labels, 16, (nce_k, 0.07, 0.5), seed=0), labels


def test_crd_negatives_are_training_images_of_other_classes():
    crd, labels = memory()
    batch = torch.tensor([0, 1, 2, 5, 0, 4])
    negatives = crd.negatives(labels[batch])
    assert negatives.shape == (6, 10)
    assert (labels[negatives] >= 0).all()  # never a held-out image
    assert (labels[negatives] != labels[batch][:, None]).all()
    many = crd.negatives(torch.zeros(4000, dtype=torch.long)).flatten()
    counts = torch.bincount(many, minlength=60)
    others = [i for i in range(60) if labels[i] > 0]
    assert counts[others].min() > 0 and counts[labels <= 0].sum() == 0  # all of them, only them
    with pytest.raises(UserError, match="--nce_k 60: more negatives than the 48"):
        memory(nce_k=60)


def test_crd_negatives_are_the_ranks_rows_of_the_global_batchs_draw(monkeypatch):
    """Drawn from --seed and the step alone (not torch's RNG, seeded per rank): under torchrun
    rank 1 of 2 gets the second half of what one process draws for the whole global batch."""
    crd, labels = memory()
    batch = torch.tensor([0, 1, 2, 5, 4, 6])
    torch.manual_seed(9)  # a rank's own stream: no effect
    whole = crd.negatives(labels[batch])
    monkeypatch.setattr(kd.methods.crd, "rank_and_size", lambda: (1, 2))
    assert torch.equal(crd.negatives(labels[batch[3:]]), whole[3:])
    crd.steps += 1
    assert not torch.equal(crd.negatives(labels[batch[3:]]), whole[3:])  # a new step's draw


def test_crd_scores_and_memory_update_match_a_loop():
    crd, labels = memory()
    memory_s, memory_t = crd.memory_s.clone(), crd.memory_t.clone()
    index = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9])
    negatives = crd.negatives(labels[index])  # the first step's: drawn from the seed and step
    s_scores, t_scores, n = crd(index * 162 + 7, labels[index])
    assert n == 58
    v_s = F.normalize(crd.embed_s.linear(crd.taps[0].values[-1].flatten(1)), dim=1)
    v_t = F.normalize(crd.embed_t.linear(crd.taps[1].values[-1].flatten(1)), dim=1)
    rows = torch.cat([index[:, None], negatives], 1)
    raw_s = torch.stack([torch.stack([torch.exp(memory_t[r] @ v_s[i] / 0.07) for r in rows[i]])
                         for i in range(8)])
    raw_t = torch.stack([torch.stack([torch.exp(memory_s[r] @ v_t[i] / 0.07) for r in rows[i]])
                         for i in range(8)])
    z = (raw_s.mean() * 58, raw_t.mean() * 58)  # Z: fixed at the first step
    assert torch.allclose(s_scores, raw_s / z[0], rtol=1e-5)
    assert torch.allclose(t_scores, raw_t / z[1], rtol=1e-5)
    for i, row in enumerate(index):  # memory rows of the batch: momentum 0.5, renormalised
        moved = 0.5 * memory_s[row] + 0.5 * v_s[i].detach()
        assert torch.allclose(crd.memory_s[row], moved / moved.norm(), atol=1e-6)
    untouched = [i for i in range(60) if i not in index.tolist()]
    assert torch.equal(crd.memory_t[untouched], memory_t[untouched])
    assert torch.allclose(crd.z, torch.stack(z))
    crd(index * 162, labels[index])
    assert torch.allclose(crd.z, torch.stack(z))  # Z stays
    assert {"memory_s", "memory_t", "z"} <= set(crd.state_dict())  # saved in last.pt
    assert math.isfinite(crd_loss(s_scores, t_scores, n).item())
