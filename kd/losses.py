"""Hinton et al. (2015) knowledge distillation loss.

L = alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

alpha weighs the hard labels: alpha=1 is plain cross-entropy, alpha=0 is pure distillation.
The KL is summed over classes and averaged over the batch; the T^2 factor keeps the soft-target
gradients at the same scale as the hard-label ones when T changes.
"""
import torch
import torch.nn.functional as F


def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the KD loss, in float32 or wider: CE(y, p_s) and T^2 * KL(p_t^T || p_s^T)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    ce = F.cross_entropy(s, targets)
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(t / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return ce, kl * T * T


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, T: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KL, a float32 scalar."""
    ce, kd = kd_loss_terms(student_logits, teacher_logits, targets, T)
    return alpha * ce + (1 - alpha) * kd
