"""Fused kernels of the mixed-precision (EdMIPS composite) layers: one pass over a tensor for all K candidates.

A searched layer computes ``op(x_mix, W_mix)`` with (see :mod:`gmpq.quant.mixed`)::

    x_mix = sum_i p_a,i * Q_a(x; c_i, b_i)          W_mix = sum_j p_w,j * Q_w(W; s_j, b_j)

Written with autograd, each candidate keeps its clamp/round/scale intermediates for the backward pass: about 6K
extra tensors of the size of the input, and 7K elementwise passes over it. The custom autograd functions here store
only ``x`` and ``W`` (which the float layer stores anyway) and *recompute* ``x_mix`` and ``W_mix`` in the backward
pass, where one kernel per tensor gives all gradients at once. The gradients are those autograd gives for the
straight-through estimator of :mod:`gmpq.quant.functional` (ties at the clipping boundaries split the gradient in
half, as ``torch.minimum``/``torch.maximum`` do)::

    d x_mix / d x   = sum_i p_i * m_i(x),     m_i = 1 inside (lower_i, c_i), 1/2 on its ends, 0 outside
    d L / d p_i     = sum(g * Q_a(x; c_i))
    d L / d c_i     = p_i * sum(g * ((round(z_i) - z_i) / n_i + [x > c_i] - signed * [x < -c_i])),  z_i = y_i n_i / c_i
    d W_mix / d W   = sum_j p_j * [|W / s_j| < Q_p,j]       (torch.clamp passes no gradient at its bounds)
    d L / d s_j[o]  = p_j * gamma_j * sum_(row o) g * (round(z) - z inside, +-Q_p,j on or outside the bounds)
    (z = W / s_j, gamma_j = 1 / sqrt(numel(W[o]) * Q_p,j): LSQ's gradient scale)

The elementwise kernels are plain PyTorch functions. The ``compile`` backend hands them to ``torch.compile``
(a C++/OpenMP loop on CPUs, Triton on GPUs) so that each becomes one pass over memory; the ``eager`` backend runs them
op by op (slow on large tensors, but dependency-free and bit-identical in value). Choose with :func:`set_backend` or
the ``GMPQ_FUSED_BACKEND`` environment variable (``auto`` | ``compile`` | ``eager``; ``auto`` compiles and falls
back to eager with a warning if compilation fails).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gmpq.quant import functional as QF

BACKENDS = ("auto", "compile", "eager")

# ---------------------------------------------------------------------------------------------- the kernels (math)


def act_mix_forward(
    x: torch.Tensor, probs: torch.Tensor, lower: torch.Tensor, clip: torch.Tensor, inv_step: torch.Tensor,
    step: torch.Tensor, k: int,
) -> torch.Tensor:
    """``sum_i probs[i] * round(clamp(x, lower[i], clip[i]) * inv_step[i]) * step[i]`` over ``k`` candidates.

    ``inv_step = n / c`` and ``step = c / n`` are passed precomputed so that every candidate is bit-identical to
    :func:`gmpq.quant.functional.quantize_activation`.
    """
    acc = torch.zeros_like(x)
    for i in range(k):
        y = torch.minimum(torch.maximum(x, lower[i]), clip[i])
        acc = acc + probs[i] * (torch.round(y * inv_step[i]) * step[i])
    return acc


def act_mix_backward(
    x: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, lower: torch.Tensor, clip: torch.Tensor,
    inv_step: torch.Tensor, step: torch.Tensor, inv_levels: torch.Tensor, signed: float, k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``act_mix_forward`` w.r.t. ``x``, ``probs`` and the clips (see the module docstring)."""
    pass_through = torch.zeros_like(x)
    grad_probs = []
    grad_clip = []
    for i in range(k):
        y = torch.minimum(torch.maximum(x, lower[i]), clip[i])
        z = y * inv_step[i]
        r = torch.round(z)
        grad_probs.append((grad * (r * step[i])).sum())
        above = (x > clip[i]).to(x.dtype) + 0.5 * (x == clip[i]).to(x.dtype)
        below = (x < lower[i]).to(x.dtype) + 0.5 * (x == lower[i]).to(x.dtype)
        pass_through = pass_through + probs[i] * (1.0 - above - below)
        d_clip = (r - z) * inv_levels[i] + above - signed * below
        grad_clip.append(probs[i] * (grad * d_clip).sum())
    return grad * pass_through, torch.stack(grad_probs), torch.stack(grad_clip)


def weight_mix_forward(w: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                       qmax: tuple[int, ...]) -> torch.Tensor:
    """``sum_j probs[j] * round(clamp(w / s_j, -Q_j, Q_j)) * s_j`` for ``w`` of shape [C, M], ``scales`` [K, C]."""
    acc = torch.zeros_like(w)
    for j, q in enumerate(qmax):
        s = scales[j].unsqueeze(1)
        acc = acc + probs[j] * (torch.round(torch.clamp(w / s, -q, q)) * s)
    return acc


def weight_mix_backward(
    w: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, qmax: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``weight_mix_forward`` w.r.t. ``w`` [C, M], ``probs`` [K] and ``scales`` [K, C] (before LSQ's
    gradient scale, which the caller applies)."""
    pass_through = torch.zeros_like(w)
    grad_probs = []
    grad_scales = []
    for j, q in enumerate(qmax):
        s = scales[j].unsqueeze(1)
        z = w / s
        r = torch.round(torch.clamp(z, -q, q))
        grad_probs.append((grad * (r * s)).sum())
        inside = ((z > -q) & (z < q)).to(w.dtype)  # torch.clamp passes no gradient at its bounds
        pass_through = pass_through + probs[j] * inside
        grad_scales.append(probs[j] * (grad * torch.where(inside > 0, r - z, r)).sum(dim=1))
    return grad * pass_through, torch.stack(grad_probs), torch.stack(grad_scales)


def activation_ste_mask(x: torch.Tensor, clip: torch.Tensor, signed: bool) -> torch.Tensor:
    """d Q_a(x) / d x of :func:`gmpq.quant.functional.quantize_activation`: 1 inside the clipping range, 1/2 on
    its ends, 0 outside (the straight-through estimator)."""
    lower = -clip if signed else torch.zeros_like(clip)
    edge = (x == clip).to(x.dtype) + (x == lower).to(x.dtype)
    inside = ((x > lower) & (x < clip)).to(x.dtype)
    return inside + 0.5 * edge


# ---------------------------------------------------------------------------------------------- backend selection

_KERNELS = {
    "act_fwd": act_mix_forward, "act_bwd": act_mix_backward, "w_fwd": weight_mix_forward, "w_bwd": weight_mix_backward,
}
_backend = os.environ.get("GMPQ_FUSED_BACKEND", "auto")
_compiled: dict[str, Callable[..., Any]] = {}
_compile_failed = False


def set_backend(name: str) -> None:
    """Select how the fused kernels run: ``auto`` (compile, fall back to eager), ``compile`` or ``eager``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fused-kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend that kernels run on now: ``compile`` or ``eager``."""
    if _backend == "eager" or (_backend == "auto" and _compile_failed):
        return "eager"
    return "compile"


def _kernel(name: str) -> Callable[..., Any]:
    if get_backend() == "eager":
        return _KERNELS[name]
    if name not in _compiled:
        _compiled[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _run(name: str, *args: Any) -> Any:
    """Run kernel ``name``; under ``auto`` a compilation failure switches to eager for the rest of the process."""
    global _compile_failed
    kernel = _kernel(name)
    if kernel is _KERNELS[name]:
        return kernel(*args)
    try:
        # No "duck sizing" (equal sizes sharing one symbol): one graph per kernel then serves every layer shape,
        # instead of a recompilation for each pattern of coinciding sizes (and eager mode past the recompile limit).
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return kernel(*args)
    except Exception as e:  # noqa: BLE001 — any compiler/toolchain failure
        if _backend != "auto":
            raise
        _compile_failed = True
        warnings.warn(f"gmpq: torch.compile of the fused quantization kernels failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); falling back to eager kernels (slower). "
                      "Set GMPQ_FUSED_BACKEND=eager to silence this.", RuntimeWarning, stacklevel=3)
        return _KERNELS[name](*args)


# ---------------------------------------------------------------------------------------------- quantizer specs


class ActSpec:
    """Per-candidate activation constants derived from the clips (no gradient): bounds and step sizes."""

    def __init__(self, clip: torch.Tensor, bits: tuple[int, ...], signed: bool) -> None:
        levels = torch.tensor([QF.act_levels(b, signed) for b in bits], dtype=clip.dtype, device=clip.device)
        self.clip = clip
        self.lower = -clip if signed else torch.zeros_like(clip)
        self.inv_step = levels / clip
        self.step = clip / levels
        self.inv_levels = 1.0 / levels
        self.signed = signed
        self.k = len(bits)


def _effective_scales(scales: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """The forward value of :func:`gmpq.quant.functional.scale_grad` (may differ from ``scales`` by an ulp)."""
    scaled = scales * gammas[:, None]
    return (scales - scaled) + scaled


def weight_gammas(weight: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
    """LSQ's gradient scale of each candidate: 1 / sqrt(numel(W[o]) * Q_p)."""
    per_row = weight[0].numel()
    return torch.tensor([1.0 / (per_row * QF.weight_qmax(b)) ** 0.5 for b in bits], dtype=weight.dtype,
                        device=weight.device)


def mixed_activation(x: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, bits: tuple[int, ...],
                     signed: bool) -> torch.Tensor:
    """``x_mix`` with the fused kernels and no stored intermediates (a standalone autograd function)."""
    return _MixedActivation.apply(x, probs, clip, bits, signed)


def mixed_weight(weight: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                 bits: tuple[int, ...]) -> torch.Tensor:
    """``W_mix`` with the fused kernels (a standalone autograd function)."""
    return _MixedWeight.apply(weight, probs, scales, bits)


def _flat(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``t`` (made contiguous) as a ``shape`` tensor sharing its memory that is neither a view nor a parameter.

    A compiled kernel then sees one plain 1-D/2-D tensor: one graph serves every layer (a view would add guards on
    its base's sizes, a parameter gets static sizes, and 4-D sizes of 1 are specialised — each a recompilation).
    """
    t = t.detach().contiguous()
    strides = (shape[1], 1) if len(shape) == 2 else (1,)
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, strides)


def _act_forward(x: torch.Tensor, probs: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    out = _run("act_fwd", _flat(x, x.numel()), probs, spec.lower, spec.clip, spec.inv_step, spec.step, spec.k)
    return out.view(x.shape)


def _act_backward(x: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, spec: ActSpec):
    gx, gp, gc = _run("act_bwd", _flat(x, x.numel()), _flat(grad, grad.numel()), probs, spec.lower, spec.clip,
                      spec.inv_step, spec.step, spec.inv_levels, 1.0 if spec.signed else 0.0, spec.k)
    return gx.view(x.shape), gp, gc


def _weight_forward(weight: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, bits: tuple[int, ...]):
    qmax = tuple(QF.weight_qmax(b) for b in bits)
    rows, cols = weight.shape[0], weight[0].numel()
    eff = _effective_scales(scales, weight_gammas(weight, bits))
    return _run("w_fwd", _flat(weight, rows, cols), probs, eff, qmax).view(weight.shape)


def _weight_backward(weight: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                     bits: tuple[int, ...]):
    qmax = tuple(QF.weight_qmax(b) for b in bits)
    rows, cols = weight.shape[0], weight[0].numel()
    gammas = weight_gammas(weight, bits)
    gw, gp, gs = _run("w_bwd", _flat(weight, rows, cols), _flat(grad, rows, cols), probs,
                      _effective_scales(scales, gammas), qmax)
    return gw.view(weight.shape), gp, gs * gammas[:, None]


class _MixedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, clip, bits, signed):
        spec = ActSpec(clip, bits, signed)
        ctx.save_for_backward(x, probs, clip)
        ctx.bits, ctx.signed = bits, signed
        return _act_forward(x, probs, spec)

    @staticmethod
    def backward(ctx, grad):
        x, probs, clip = ctx.saved_tensors
        gx, gp, gc = _act_backward(x, grad.contiguous(), probs, ActSpec(clip, ctx.bits, ctx.signed))
        return gx, gp, gc, None, None


class _MixedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, probs, scales, bits):
        ctx.save_for_backward(weight, probs, scales)
        ctx.bits = bits
        return _weight_forward(weight, probs, scales, bits)

    @staticmethod
    def backward(ctx, grad):
        weight, probs, scales = ctx.saved_tensors
        gw, gp, gs = _weight_backward(weight, grad.contiguous(), probs, scales, ctx.bits)
        return gw, gp, gs, None


# ---------------------------------------------------------------------------------------------- fused layers


def mixed_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probs_a: torch.Tensor, clip: torch.Tensor,
    probs_w: torch.Tensor, scales: torch.Tensor, a_bits: tuple[int, ...], w_bits: tuple[int, ...], signed: bool,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
) -> torch.Tensor:
    """``conv2d(x_mix, W_mix) + bias`` storing only ``x`` and ``W``; both mixtures are recomputed in backward."""
    return _MixedConv2d.apply(x, weight, bias, probs_a, clip, probs_w, scales,
                              (a_bits, w_bits, signed, tuple(stride), tuple(padding), tuple(dilation), groups))


def mixed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probs_a: torch.Tensor, clip: torch.Tensor,
    probs_w: torch.Tensor, scales: torch.Tensor, a_bits: tuple[int, ...], w_bits: tuple[int, ...], signed: bool,
) -> torch.Tensor:
    """``linear(x_mix, W_mix) + bias`` storing only ``x`` and ``W``."""
    return _MixedLinear.apply(x, weight, bias, probs_a, clip, probs_w, scales, (a_bits, w_bits, signed))


def _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed):
    spec = ActSpec(clip, a_bits, signed)
    return spec, _act_forward(x, probs_a, spec), _weight_forward(weight, probs_w, scales, w_bits)


def _quant_backward(needs_x_grad, x, weight, probs_a, probs_w, scales, spec, w_bits, grad_x_mix, grad_w_mix):
    """Chain the gradients of ``x_mix`` and ``W_mix`` back to x, W, the probabilities, clips and steps."""
    gx, gpa, gc = _act_backward(x, grad_x_mix.to(x.dtype), probs_a, spec)
    gw, gpw, gs = _weight_backward(weight, grad_w_mix.to(weight.dtype), probs_w, scales, w_bits)
    return (gx if needs_x_grad else None), gw, gpa, gc, gpw, gs


class _MixedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probs_a, clip, probs_w, scales, cfg):
        a_bits, w_bits, signed, stride, padding, dilation, groups = cfg
        _, x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed)
        ctx.save_for_backward(x, weight, bias, probs_a, clip, probs_w, scales)
        ctx.cfg = cfg
        return F.conv2d(x_mix, w_mix, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, probs_a, clip, probs_w, scales = ctx.saved_tensors
        a_bits, w_bits, signed, stride, padding, dilation, groups = ctx.cfg
        spec, x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed)
        grad = grad.contiguous()
        gxm, gwm, gb = torch.ops.aten.convolution_backward(
            grad, x_mix.to(grad.dtype), w_mix.to(grad.dtype), None if bias is None else list(bias.shape),
            list(stride), list(padding), list(dilation), False, [0, 0], groups, [True, True, bias is not None],
        )
        del x_mix, w_mix
        gx, gw, gpa, gc, gpw, gs = _quant_backward(ctx.needs_input_grad[0], x, weight, probs_a, probs_w, scales, spec,
                                                   w_bits, gxm, gwm)
        return gx, gw, (gb.to(bias.dtype) if bias is not None else None), gpa, gc, gpw, gs, None


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probs_a, clip, probs_w, scales, cfg):
        a_bits, w_bits, signed = cfg
        _, x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed)
        ctx.save_for_backward(x, weight, bias, probs_a, clip, probs_w, scales)
        ctx.cfg = cfg
        return F.linear(x_mix, w_mix, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, probs_a, clip, probs_w, scales = ctx.saved_tensors
        a_bits, w_bits, signed = ctx.cfg
        spec, x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed)
        g2 = grad.reshape(-1, grad.shape[-1])
        gxm = (g2 @ w_mix.to(grad.dtype)).view(*grad.shape[:-1], weight.shape[1])
        gwm = g2.t() @ x_mix.reshape(-1, x_mix.shape[-1]).to(grad.dtype)
        gb = g2.sum(0).to(bias.dtype) if bias is not None else None
        del x_mix, w_mix
        gx, gw, gpa, gc, gpw, gs = _quant_backward(ctx.needs_input_grad[0], x, weight, probs_a, probs_w, scales, spec,
                                                   w_bits, gxm, gwm)
        return gx, gw, gb, gpa, gc, gpw, gs, None
