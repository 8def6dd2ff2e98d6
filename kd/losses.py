"""What training minimises. Each loss is a pure function of logits and targets that returns
(total, named terms); kd.train.train_step calls exactly these functions, and the log records
the mean of every named term per epoch as train_<name>.

Losses are computed in float32 (or wider) whatever the autocast dtype of the logits.
"""
import torch
import torch.nn.functional as F

LossTerms = dict[str, torch.Tensor]


def ce_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, LossTerms]:
    """L = CE(y, p_s), the mean cross-entropy of the hard labels. No named terms."""
    return F.cross_entropy(student_logits.float(), targets), {}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, T: float) -> tuple[torch.Tensor, LossTerms]:
    """Hinton et al. (2015):

        L = alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    alpha weighs the hard labels: alpha=1 is plain cross-entropy, alpha=0 pure distillation. The
    KL is summed over classes and averaged over the batch ('batchmean'; the default 'mean' would
    also average over the 100 classes); T^2 keeps the soft-target gradients at the scale of the
    hard-label ones when T changes. Terms: 'ce' = CE(y, p_s), 'kd' = T^2 * KL.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    ce = F.cross_entropy(s, targets)
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                  reduction="batchmean", log_target=True)
    kd = kl * T * T
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}
