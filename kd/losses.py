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


def wide(*logits: torch.Tensor) -> list[torch.Tensor]:
    """The logits in float32 (or wider), whatever the autocast dtype they come in."""
    return [z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits]


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): z' = (z - mean(z)) / (eps + std(z)), over
    each image's classes (std with Bessel's correction, as their code)."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, T: float, logit_std: bool = False) -> tuple[torch.Tensor, LossTerms]:
    """Hinton et al. (2015):

        L = alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    alpha weighs the hard labels: alpha=1 is plain cross-entropy, alpha=0 pure distillation. The
    KL is summed over classes and averaged over the batch ('batchmean'; the default 'mean' would
    also average over the 100 classes); T^2 keeps the soft-target gradients at the scale of the
    hard-label ones when T changes. logit_std: z_s and z_t in the KL are standardize()d first (CE
    stays on the raw logits). Terms: 'ce' = CE(y, p_s), 'kd' = T^2 * KL.
    """
    s, t = wide(student_logits, teacher_logits)
    ce = F.cross_entropy(s, targets)
    zs, zt = (standardize(s), standardize(t)) if logit_std else (s, t)
    kl = F.kl_div(F.log_softmax(zs / T, dim=1), F.log_softmax(zt / T, dim=1),
                  reduction="batchmean", log_target=True)
    kd = kl * T * T
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float, T: float, logit_std: bool = False
             ) -> tuple[torch.Tensor, LossTerms]:
    """Decoupled KD (Zhao et al., CVPR 2022), the distillation part:

        L = alpha * TCKD + beta * NCKD
        TCKD = T^2 * KL([p_t^y, 1 - p_t^y] || [p_s^y, 1 - p_s^y])    target class vs the rest
        NCKD = T^2 * KL(q_t || q_s)    q = softmax(z / T) over the classes other than y

    p = softmax(z / T); batch means. Per image KL(p_t || p_s) = TCKD + (1 - p_t^y) * NCKD: plain
    KD is alpha = 1, beta = 1 - p_t^y. As mdistiller, q drops the target by subtracting 1000
    from its logit / T. The binary distributions are kept as log-probabilities (log p^y and the
    logsumexp of the others), so a confident model gives no log(0). logit_std: the logits are
    standardize()d first.
    """
    s, t = wide(student_logits, teacher_logits)
    s, t = (standardize(s), standardize(t)) if logit_std else (s, t)
    target = F.one_hot(targets, s.shape[1]).bool()
    binary = lambda z: torch.stack([z.gather(1, targets[:, None]).squeeze(1),
                                    z.masked_fill(target, -torch.inf).logsumexp(dim=1)],
                                   dim=1)  # log [p^y, 1 - p^y] from log p
    log_p_s, log_p_t = F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1)
    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean",
                    log_target=True) * T * T
    others = lambda z: F.log_softmax(z / T - 1000.0 * target, dim=1)
    nckd = F.kl_div(others(s), others(t), reduction="batchmean", log_target=True) * T * T
    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of a and b (eps in the denominator, as DIST's code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
              gamma: float, T: float) -> tuple[torch.Tensor, LossTerms]:
    """DIST (Huang et al., NeurIPS 2022), the distillation part:

        L = beta * inter + gamma * intra,  with Y = softmax(Z / T) per image
        inter = T^2 * (1 - mean over images i of pearson(Y_s[i, :], Y_t[i, :]))
        intra = T^2 * (1 - mean over classes c of pearson(Y_s[:, c], Y_t[:, c]))
    """
    s, t = wide(student_logits, teacher_logits)
    y_s, y_t = (s / T).softmax(dim=1), (t / T).softmax(dim=1)
    inter = T * T * (1 - pearson(y_s, y_t).mean())
    intra = T * T * (1 - pearson(y_s.T, y_t.T).mean())
    return beta * inter + gamma * intra, {"inter": inter, "intra": intra}


def dkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, alpha: float, beta: float, T: float, ce_weight: float,
                  distill_weight: torch.Tensor | float, logit_std: bool = False
                  ) -> tuple[torch.Tensor, LossTerms]:
    """What DKD training minimises: ce_weight * CE(y, p_s) + distill_weight * dkd_loss.

    distill_weight is DKD's linear warm-up, min(epoch / warmup_epochs, 1), as a tensor so that a
    new value each epoch does not recompile a compiled loss. Terms: 'ce', 'tckd', 'nckd'.
    """
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    distill, terms = dkd_loss(student_logits, teacher_logits, targets, alpha, beta, T, logit_std)
    return ce_weight * ce + distill_weight * distill, {"ce": ce, **terms}


def dist_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, beta: float, gamma: float, T: float, ce_weight: float
                   ) -> tuple[torch.Tensor, LossTerms]:
    """What DIST training minimises: ce_weight * CE(y, p_s) + dist_loss. Terms: 'ce', 'inter',
    'intra'."""
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    distill, terms = dist_loss(student_logits, teacher_logits, beta, gamma, T)
    return ce_weight * ce + distill, {"ce": ce, **terms}
