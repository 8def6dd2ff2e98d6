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


def fitnet_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., ICLR 2015), the hint loss:

        L = mean over all elements of (r(F_s) - F_t)^2

    r(F_s): the student's map at the hint stage through its trainable regressor
    (kd.features.HintRegressor), F_t: the teacher's map at the same stage and size.
    """
    s, t = wide(student_feature, teacher_feature)
    return F.mse_loss(s, t)


def contrast_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss of one side (RepDistiller's ContrastLoss): scores [B, 1 + K], the
    positive first, each P = exp(<m, v> / tau) / Z; noise mass m * Pn with Pn = 1 / num_data:

        L = -(1 / B) * sum_i [log(P_i0 / (P_i0 + K Pn + eps))
                               + sum_k log(K Pn / (P_ik + K Pn + eps))]
    """
    s = wide(scores)[0]
    noise = (s.shape[1] - 1) / num_data
    positive = torch.log(s[:, 0] / (s[:, 0] + noise + eps))
    negative = torch.log(noise / (s[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / s.shape[0]


def crd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, num_data: int
             ) -> torch.Tensor:
    """Contrastive Representation Distillation (Tian et al., ICLR 2020):

        L = contrast_loss(student scores) + contrast_loss(teacher scores)

    the scores of each model's embedding against the other model's memory bank
    (kd.features.ContrastMemory), num_data training images in the noise distribution.
    """
    return contrast_loss(student_scores, num_data) + contrast_loss(teacher_scores, num_data)


def hcl_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
             ) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al., CVPR 2021), summed over the levels:

        L = sum over levels of [MSE(F_s, F_t) + sum_{l in 4, 2, 1; l < h} w_l MSE(P_l F_s, P_l F_t)]
            / (1 + sum w_l),   w_l = 1/2, 1/4, 1/8 for the pooled sizes taken in turn

    P_l: adaptive average pooling to l x l; h: the level's map size. Maps of equal shapes.
    """
    total = 0.0
    for s, t in zip(wide(*student_features), wide(*teacher_features)):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size < s.shape[-1]:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size),
                                                  F.adaptive_avg_pool2d(t, size))
                weights += weight
        total = total + loss / weights
    return total


def fitnet_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     targets: torch.Tensor, features: tuple, ce_weight: float, hint_weight: float
                     ) -> tuple[torch.Tensor, LossTerms]:
    """What FitNet training minimises: ce_weight * CE(y, p_s) + hint_weight * fitnet_loss, on
    the connector's (regressed student map, teacher map). Terms: 'ce', 'hint'."""
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    hint = fitnet_loss(*features)
    return ce_weight * ce + hint_weight * hint, {"ce": ce, "hint": hint}


def crd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, crd_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """What CRD training minimises: ce_weight * CE(y, p_s) + crd_weight * crd_loss, on the
    connector's (student scores, teacher scores, num_data). Terms: 'ce', 'crd'."""
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    crd = crd_loss(*features)
    return ce_weight * ce + crd_weight * crd, {"ce": ce, "crd": crd}


def reviewkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       targets: torch.Tensor, features: tuple, ce_weight: float,
                       review_weight: torch.Tensor | float) -> tuple[torch.Tensor, LossTerms]:
    """What ReviewKD training minimises: ce_weight * CE(y, p_s) + review_weight * hcl_loss, on
    the connector's (student maps, teacher maps); review_weight includes the warm-up (a tensor,
    as DKD's). Terms: 'ce', 'review'."""
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    review = hcl_loss(*features)
    return ce_weight * ce + review_weight * review, {"ce": ce, "review": review}
