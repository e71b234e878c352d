"""Learned rounding of a quantized weight (AdaRound, Nagel et al. 2020), for post-training reconstruction.

Round-to-nearest picks each weight's code independently; AdaRound learns, per weight, whether to round down or up,
so that the layer's (or block's) *output* is reproduced. With the step ``s`` of the layer's weight quantizer fixed
(per output channel) and ``Q_p = 2^(b-1) - 1``::

    W_soft = s * clamp(floor(W / s) + h(V), -Q_p, Q_p),   h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

with one learnable ``V`` per weight (rectified sigmoid, ``gamma = -0.1``, ``zeta = 1.1``), initialised so that
``h(V)`` equals the fractional part of ``W / s`` (``W_soft = W`` inside the clipping range). The regulariser::

    R(V) = sum(1 - |2 h(V) - 1| ^ beta)

pushes every ``h(V)`` to 0 or 1 as ``beta`` is annealed from a large value (a flat penalty) to a small one. The hard
weight rounds up where ``h(V) >= 1/2`` (``V >= 0``): its code is ``floor(W / s)`` or ``floor(W / s) + 1`` (clamped to
``[-Q_p, Q_p]``), never further from ``W / s`` than one step.

:class:`LearnedRounding` stands in for a layer's :class:`~gmpq.quant.WeightQuantizer` while its block is
reconstructed (:mod:`gmpq.ptq`); :meth:`LearnedRounding.hard_weight` is then written back as the layer's weight, on
which the layer's own quantizer, with the same steps, computes exactly these codes.
"""

from __future__ import annotations

import torch
from torch import nn

from gmpq.quant import functional as QF

GAMMA, ZETA = -0.1, 1.1


class LearnedRounding(nn.Module):
    """Soft-rounded ``bits``-bit weight of a fixed ``weight`` with per-output-channel steps ``scale`` (see above).

    ``forward(weight)`` ignores its argument (the weight the rounding was made for is stored as ``floor(W / s)``)
    so that it can take a layer's ``wq`` place; while ``hard`` is set it returns :meth:`hard_weight`.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = QF.check_bits(bits)
        self.qmax = QF.weight_qmax(bits)
        step = scale.detach().float().view(-1, *([1] * (weight.dim() - 1)))
        z = weight.detach().float() / step
        floor = torch.floor(z)
        rest = (z - floor).clamp(0.0, 1.0 - 1e-6)
        self.register_buffer("step", step)
        self.register_buffer("floor", floor)
        # h(V) = rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
        self.hard = False
        self.out_dtype = weight.dtype

    def soft(self) -> torch.Tensor:
        """``h(V)`` in [0, 1], one per weight."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def codes(self) -> torch.Tensor:
        """The hard integer codes ``clamp(floor(W / s) + [V >= 0], -Q_p, Q_p)`` (no gradient)."""
        return torch.clamp(self.floor + (self.v.detach() >= 0).to(self.floor.dtype), -self.qmax, self.qmax)

    def hard_weight(self) -> torch.Tensor:
        """``s * codes``: the weight the layer keeps once the rounding is fixed."""
        return (self.codes() * self.step).to(self.out_dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """``R(V) = sum(1 - |2 h(V) - 1| ^ beta)``."""
        return (1.0 - (2.0 * self.soft() - 1.0).abs().pow(beta)).sum()

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.hard:
            return self.hard_weight()
        return (torch.clamp(self.floor + self.soft(), -self.qmax, self.qmax) * self.step).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, weights={self.v.numel()}"
