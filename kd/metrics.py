"""Metrics computed from a whole split's logits at once, on whatever device the logits are on.

Beyond top-1/top-5 they measure what KD is claimed to improve: calibration (NLL, ECE), how
sensible the mistakes are (superclass accuracy), and, for a student, agreement with its teacher.
"""
import math

import torch
import torch.nn.functional as F

BLOWN_UP_FACTOR = 10  # times the NLL of a uniform prediction, ln(classes)


def blown_up(nll: float, num_classes: int = 100) -> bool:
    """Whether an evaluation's predictions have blown up: a non-finite NLL, or one over 10x a
    uniform prediction's (ln 100 = 4.6 nats). A model that learns stays far below; a diverged
    one does not (test NLLs of 1e13 were seen at too large a learning rate)."""
    return not math.isfinite(nll) or nll > BLOWN_UP_FACTOR * math.log(num_classes)


def at_chance(top1_percent: float, num_images: int, num_classes: int = 100) -> bool:
    """Whether a top-1 accuracy is within 3 standard errors of guessing (1 / num_classes) on
    num_images images."""
    p = 1 / num_classes
    return top1_percent <= 100 * (p + 3 * math.sqrt(p * (1 - p) / num_images))


def fine_to_coarse(labels: torch.Tensor, coarse_labels: torch.Tensor, num_classes: int = 100
                   ) -> torch.Tensor:
    """[num_classes] map from fine class to its superclass, read off labelled data."""
    mapping = torch.full((num_classes,), -1, dtype=torch.int64, device=labels.device)
    return mapping.scatter(0, labels, coarse_labels)


def superclass_map(*splits) -> torch.Tensor:
    """fine_to_coarse over every image of the splits (kd.data.Split): training and kd.evaluate
    pass a dataset's whole training and test splits, so the map holds every class, whichever
    images a run holds out for validation and whichever classes a small test split lacks."""
    return fine_to_coarse(torch.cat([s.labels for s in splits]),
                          torch.cat([s.coarse_labels for s in splits]))


ECE_BINS = 15


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS
                     ) -> dict[str, torch.Tensor]:
    """Per equal-width bin (k/n, (k+1)/n] of top-1 confidence (Guo et al., 2017): the number of
    images 'count', and the sums of their confidences 'confidence' and of their hits 'correct'.

    A row with non-finite logits lands in bin 0 with a NaN confidence, so the ECE becomes NaN.
    """
    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
    bins = (confidence * n_bins).ceil().nan_to_num(1).clamp(1, n_bins).long() - 1
    sums = lambda values: torch.zeros(n_bins, device=logits.device).index_add_(0, bins, values)
    return {"count": sums(torch.ones_like(confidence)), "confidence": sums(confidence),
            "correct": sums((predicted == labels).float())}


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = ECE_BINS) -> torch.Tensor:
    """ECE in [0, 1]: the sum over bins of (bin share) * |accuracy - mean confidence|."""
    bins = calibration_bins(logits, labels, n_bins)
    return (bins["confidence"] - bins["correct"]).abs().sum() / len(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, coarse_labels: torch.Tensor,
                           class_to_coarse: torch.Tensor) -> dict[str, torch.Tensor]:
    """top-1, top-5, superclass accuracy and in-superclass error share (%), NLL, ECE (%)."""
    logits = logits.float()
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top5[:, 0] == labels
    same_superclass = class_to_coarse[top5[:, 0]] == coarse_labels
    errors = (~correct).sum()
    return {
        "top1": 100 * correct.float().mean(),
        "top5": 100 * (top5 == labels[:, None]).any(dim=1).float().mean(),
        "nll": F.cross_entropy(logits, labels),
        "ece": 100 * expected_calibration_error(logits, labels),
        "super_top1": 100 * same_superclass.float().mean(),
        "err_in_super": 100 * (same_superclass & ~correct).sum() / errors.clamp(min=1),
    }


def agreement_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Top-1 agreement (%) and mean KL(teacher || student) at T = 1."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(s.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)
    return {"agree": 100 * (s.argmax(1) == t.argmax(1)).float().mean(), "kl_t_s": kl}


def split_metrics(logits: torch.Tensor, labels: torch.Tensor, coarse_labels: torch.Tensor,
                  class_to_coarse: torch.Tensor, teacher_logits: torch.Tensor | None = None
                  ) -> dict[str, float]:
    """All metrics of one split as Python floats (a single device-to-host read).

    'loss' is the NLL (mean cross-entropy); with teacher_logits, also 'agree' and 'kl_t_s'.
    """
    metrics = classification_metrics(logits, labels, coarse_labels, class_to_coarse)
    metrics = {"loss": metrics.pop("nll"), **metrics}
    if teacher_logits is not None:
        metrics.update(agreement_metrics(logits, teacher_logits))
    values = torch.stack(list(metrics.values())).tolist()
    return dict(zip(metrics, values))
