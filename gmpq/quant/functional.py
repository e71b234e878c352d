"""Differentiable uniform quantization functions (straight-through estimators).

Notation: ``b`` is the bit width, ``s`` a step size (scale), ``c`` a clipping value.

Weights, symmetric per output channel with ``2^b - 1`` levels including zero (LSQ, Esser et al. 2020)::

    Q_w(W) = s * clamp(round(W / s), -Q_p, Q_p),      Q_p = 2^(b-1) - 1

Activations, PACT-style learnable clip (Choi et al. 2018)::

    unsigned (x >= 0):  Q_a(x) = round(clamp(x, 0, c) * n / c) * c / n,     n = 2^b - 1   (2^b levels on [0, c])
    signed:             Q_a(x) = round(clamp(x, -c, c) * n / c) * c / n,    n = 2^(b-1) - 1 (2^b - 1 levels)

``round`` uses the straight-through estimator d round(z) / dz = 1, so inside the clipping range dQ/dx = 1 and
outside it dQ/dx = 0. The gradient of the step (or clip) is the LSQ one: (round(z) - z) inside the range and the
boundary value (+-Q_p, or +-1 for the clip) outside.

On the clipping bounds themselves the gradients are defined here, not left to torch's conventions, which changed
(``torch.clamp`` with number bounds passes the gradient 1 on its bounds in torch 2.11, 0 in torch 2.14):

* weights: LSQ's, W / s = +-Q_p counts as outside (dQ/dW = 0, dQ/ds = +-Q_p): "inside" is -Q_p < W / s < Q_p;
* activations: a tie x = c (or x = -c, signed; x = 0, unsigned) splits the gradient in half between x and the clip,
  as ``torch.minimum`` / ``torch.maximum`` do (dQ/dx = 1/2 there).

The fused kernels of :mod:`gmpq.quant.fused` compute the same gradients.
"""

from __future__ import annotations

import torch

FLOAT_BITS = 32
MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported bit width (2..8, or 32 for float), else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS or bits == FLOAT_BITS):
        raise ValueError(f"bit width must be an integer in {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS} (float), got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``factor`` in the backward pass (LSQ's g)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def weight_qmax(bits: int) -> int:
    """Largest integer code of a symmetric weight quantizer: Q_p = 2^(b-1) - 1."""
    return 2 ** (bits - 1) - 1


def act_levels(bits: int, signed: bool) -> int:
    """Number of steps n between 0 and the clip: 2^b - 1 unsigned, 2^(b-1) - 1 signed."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``weight`` with per-output-channel step ``scale`` (shape [C_out]) to ``bits`` bits (LSQ)."""
    qmax = weight_qmax(bits)
    grad_factor = 1.0 / (weight[0].numel() * qmax) ** 0.5
    s = scale_grad(scale, grad_factor).view(-1, *([1] * (weight.dim() - 1)))
    z = weight / s
    inside = (z > -qmax) & (z < qmax)
    # torch.clamp's own gradient on the bounds depends on the torch version: only values strictly inside pass one
    clamped = torch.where(inside, z, torch.clamp(z.detach(), -qmax, qmax))
    return round_ste(clamped) * s


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [-Q_p, Q_p] of ``weight`` (no gradient), as int8: the export format's payload."""
    qmax = weight_qmax(bits)
    s = scale.view(-1, *([1] * (weight.dim() - 1)))
    return torch.clamp(torch.round(weight / s), -qmax, qmax).to(torch.int8)


def quantize_activation(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` bits on [0, clip] (unsigned) or [-clip, clip] (signed), PACT/LSQ gradients."""
    n = act_levels(bits, signed)
    lower = -clip if signed else torch.zeros_like(clip)
    y = torch.minimum(torch.maximum(x, lower), clip)
    return round_ste(y * (n / clip)) * (clip / n)


def mse_optimal_scale(values: torch.Tensor, max_abs: torch.Tensor, qmax: int, grid: int = 16,
                      max_per_channel: int = 2048) -> torch.Tensor:
    """Step size s = r * max_abs / qmax minimising the squared rounding-plus-clipping error over r in (0, 1].

    ``values`` has shape [C, N] (one row per channel), ``max_abs`` shape [C]. Returns shape [C]. The ratio r is found
    by a coarse grid of ``grid`` points, then a fine grid of ``grid`` points around the best coarse one (resolution
    1 / grid^2). Channels with more than ``max_per_channel`` values are estimated on an evenly strided subset.
    """
    if values.shape[1] > max_per_channel:
        values = values[:, :: -(-values.shape[1] // max_per_channel)]
    max_abs = max_abs.clamp_min(1e-12)

    def best_ratio(ratios: torch.Tensor) -> torch.Tensor:  # ratios: [R] or [C, R] -> best per channel [C]
        r = ratios.expand(values.shape[0], -1) if ratios.dim() == 1 else ratios
        best_err = torch.full_like(max_abs, float("inf"))
        best = r[:, -1].clone()
        for k in range(r.shape[1]):
            s = (r[:, k] * max_abs / qmax)[:, None]
            err = (torch.clamp(torch.round(values / s), -qmax, qmax) * s - values).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, r[:, k], best)
        return best

    coarse = best_ratio(torch.linspace(1.0 / grid, 1.0, grid, device=values.device, dtype=values.dtype))
    offsets = torch.linspace(-1.0 / grid, 1.0 / grid, grid, device=values.device, dtype=values.dtype)
    fine = best_ratio((coarse[:, None] + offsets[None, :]).clamp(1.0 / grid**2, 1.0))
    return (fine * max_abs / qmax).clamp_min(1e-8)
