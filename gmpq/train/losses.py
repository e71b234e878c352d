"""Training losses beyond plain cross-entropy: knowledge distillation from the float teacher.

With student logits ``z_s``, teacher logits ``z_t``, labels ``y`` and KD weight ``d`` (temperature 1)::

    L = (1 - d) * CE(z_s, y) + d * KL(softmax(z_t) || softmax(z_s))

KL is averaged over the batch; the teacher runs without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.train.engine import LossFn


def distillation_loss(teacher: nn.Module, weight: float, label_smoothing: float = 0.0) -> LossFn:
    """The KD loss of the module docstring as a :data:`~gmpq.train.engine.LossFn`; ``teacher`` must be in eval mode."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        with torch.no_grad():
            target = F.log_softmax(teacher(images).float(), dim=1)
        kl = F.kl_div(F.log_softmax(logits.float(), dim=1), target, log_target=True, reduction="batchmean")
        return (1.0 - weight) * ce + weight * kl, logits

    return loss_fn
