"""Fused kernels of the quantized layers: one pass over a tensor for all K candidates of a mixed layer, and the
same kernels with K = 1 for a fixed-bit quantizer.

A searched layer computes ``op(x_mix, W_mix)`` with (see :mod:`gmpq.quant.mixed`)::

    x_mix = sum_i p_a,i * Q_a(x; c_i, b_i)          W_mix = sum_j p_w,j * Q_w(W; s_j, b_j)

Written with autograd, each candidate keeps its clamp/round/scale intermediates for the backward pass: about 6K
extra tensors of the size of the input, and 7K elementwise passes over it. The custom autograd functions here store
only ``x`` and ``W`` (which the float layer stores anyway) and *recompute* ``x_mix`` and ``W_mix`` in the backward
pass, where one kernel per tensor gives all gradients at once (the probabilities' gradients only where they are
needed: not for a fixed-bit quantizer's constant ``p = [1]``). The gradients are those autograd gives for the
straight-through estimator of :mod:`gmpq.quant.functional` (ties at the clipping boundaries split the gradient in
half, as ``torch.minimum``/``torch.maximum`` do)::

    d x_mix / d x   = sum_i p_i * m_i(x),     m_i = 1 inside (lower_i, c_i), 1/2 on its ends, 0 outside
    d L / d p_i     = sum(g * Q_a(x; c_i))
    d L / d c_i     = p_i * sum(g * ((round(z_i) - z_i) / n_i + [x > c_i] - signed * [x < -c_i])),  z_i = y_i n_i / c_i
    d W_mix / d W   = sum_j p_j * [|W / s_j| < Q_p,j]       (torch.clamp passes no gradient at its bounds)
    d L / d s_j[o]  = p_j * gamma_j * sum_(row o) g * (round(z) - z inside, +-Q_p,j on or outside the bounds)
    (z = W / s_j, gamma_j = 1 / sqrt(numel(W[o]) * Q_p,j): LSQ's gradient scale)

A fixed-bit quantizer is the case K = 1, p = 1 (:func:`fake_quant_activation`, :func:`fake_quant_weight`): one
kernel forward, one backward, instead of autograd's chain of clamp/round/scale passes with their saved tensors.
QDrop's activation quantizer (:func:`qdrop_activation`, post-training reconstruction) draws its keep-mask inside the
same kernel from a counter-based hash and one seed, so no random tensor is stored, read or selected with. The kernels
read a channels_last tensor as it is stored and return their results in its layout.

Backends (:func:`set_backend`, or the ``GMPQ_FUSED_BACKEND`` environment variable):

* ``triton`` — :mod:`gmpq.quant.triton_kernels`: one Triton kernel per (layer, direction), all candidates inside;
  CUDA tensors (CPU tensors only under Triton's interpreter, for tests).
* ``compile`` — the elementwise kernels below handed to ``torch.compile`` (a C++/OpenMP loop on CPUs).
* ``eager`` — the same kernels op by op (slow on large tensors, but dependency-free and bit-identical in value).
* ``auto`` (default) — ``triton`` for CUDA tensors, ``compile`` for the others; each falls back (to ``compile``,
  then ``eager``) with one warning if it fails to build. Under ``eager``, fixed-bit quantizers keep the autograd form
  of :mod:`gmpq.quant.functional` (the reference the fused kernels are tested against).

Every entry point first checks that its tensors (input, weight, probabilities, clips, steps) share one device and
raises :class:`~gmpq.errors.ModelError` naming them otherwise: a model partly on another device is a bug to fix,
not a kernel failure to fall back from.

No call moves data between host and device: per-candidate constants (levels, LSQ gradient scales) are cached device
tensors, and every scalar stays on the device. Under autocast the mixtures are written directly in the autocast
dtype (bf16), which the convolution then reads; all quantizer arithmetic is float32.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as _FX_CONFIG

from gmpq.errors import ModelError
from gmpq.quant import functional as QF

BACKENDS = ("auto", "triton", "compile", "eager")

# ---------------------------------------------------------------------------------------------- the kernels (math)


def act_mix_forward(x: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor, signed: bool,
                    k: int) -> torch.Tensor:
    """``sum_i probs[i] * round(clamp(x, lower_i, clip[i]) * (n_i / clip[i])) * (clip[i] / n_i)`` over ``k``
    candidates (``levels`` holds the n_i), computed in the dtype of ``clip`` or wider: bit-identical, candidate by
    candidate, to :func:`gmpq.quant.functional.quantize_activation`."""
    x = x.to(torch.promote_types(x.dtype, clip.dtype))
    lower = -clip if signed else torch.zeros_like(clip)
    inv_step, step = levels / clip, clip / levels
    acc = torch.zeros_like(x)
    for i in range(k):
        y = torch.minimum(torch.maximum(x, lower[i]), clip[i])
        acc = acc + probs[i] * (torch.round(y * inv_step[i]) * step[i])
    return acc


def act_mix_backward(x: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor,
                     levels: torch.Tensor, signed: bool, k: int, need_probs: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``act_mix_forward`` w.r.t. ``x``, ``probs`` (``None`` unless ``need_probs``: a fixed-bit
    quantizer's constant ``[1.]`` needs none, which saves one reduction per candidate) and the clips (see the module
    docstring)."""
    dtype = torch.promote_types(x.dtype, clip.dtype)
    x, grad = x.to(dtype), grad.to(dtype)
    lower = -clip if signed else torch.zeros_like(clip)
    inv_step, step, inv_levels = levels / clip, clip / levels, 1.0 / levels
    pass_through = torch.zeros_like(x)
    grad_probs = []
    grad_clip = []
    for i in range(k):
        y = torch.minimum(torch.maximum(x, lower[i]), clip[i])
        z = y * inv_step[i]
        r = torch.round(z)
        if need_probs:
            grad_probs.append((grad * r).sum() * step[i])  # the constant step outside the sum: one product less
        above = torch.where(x > clip[i], 1.0, torch.where(x == clip[i], 0.5, 0.0))  # selects: cheaper than casts
        below = torch.where(x < lower[i], 1.0, torch.where(x == lower[i], 0.5, 0.0))
        pass_through = pass_through + probs[i] * (1.0 - above - below)
        d_clip = (r - z) * inv_levels[i] + above
        if signed:  # the lower bound -clip moves with the clip; an unsigned one (0) does not
            d_clip = d_clip - below
        grad_clip.append(probs[i] * (grad * d_clip).sum())
    return grad * pass_through, (torch.stack(grad_probs) if need_probs else None), torch.stack(grad_clip)


def weight_mix_forward(w: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, gammas: torch.Tensor,
                       qmax: tuple[int, ...]) -> torch.Tensor:
    """``sum_j probs[j] * round(clamp(w / s_j, -Q_j, Q_j)) * s_j`` for ``w`` of shape [C, M], ``scales`` [K, C], with
    ``s_j`` the forward value of LSQ's gradient-scaled step (``gammas`` [K]: see :func:`effective_scales`)."""
    w = w.to(torch.promote_types(w.dtype, scales.dtype))
    eff = effective_scales(scales, gammas)
    acc = torch.zeros_like(w)
    for j, q in enumerate(qmax):
        s = eff[j].unsqueeze(1)
        acc = acc + probs[j] * (torch.round(torch.clamp(w / s, -q, q)) * s)
    return acc


def weight_mix_backward(
    w: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, gammas: torch.Tensor,
    qmax: tuple[int, ...], need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``weight_mix_forward`` w.r.t. ``w`` [C, M], ``probs`` [K] (``None`` unless ``need_probs``) and
    ``scales`` [K, C] (LSQ's gradient scale applied)."""
    dtype = torch.promote_types(w.dtype, scales.dtype)
    w, grad = w.to(dtype), grad.to(dtype)
    eff = effective_scales(scales, gammas)
    pass_through = torch.zeros_like(w)
    grad_probs = []
    grad_scales = []
    for j, q in enumerate(qmax):
        s = eff[j].unsqueeze(1)
        z = w / s
        r = torch.round(torch.clamp(z, -q, q))
        if need_probs:  # summed per row first: every reduction is then per row, and all share one pass over w
            grad_probs.append(((grad * r).sum(dim=1) * eff[j]).sum())
        inside = ((z > -q) & (z < q)).to(w.dtype)  # torch.clamp passes no gradient at its bounds
        pass_through = pass_through + probs[j] * inside
        grad_scales.append(probs[j] * (grad * torch.where(inside > 0, r - z, r)).sum(dim=1))
    return (grad * pass_through, (torch.stack(grad_probs) if need_probs else None),
            torch.stack(grad_scales) * gammas[:, None])


#: MurmurHash3's 32-bit finaliser constants and the golden-ratio increment of :func:`dropout_keep`'s counter.
_GOLDEN, _FMIX1, _FMIX2, _MASK32 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF


def dropout_keep(n: int, seed: torch.Tensor, threshold: int, device: torch.device) -> torch.Tensor:
    """QDrop's mask over ``n`` elements without a stored tensor or a generator: element ``i`` is kept (passes
    unquantized) where ``fmix32(i * 0x9E3779B9 + seed) < threshold`` — MurmurHash3's finaliser as a counter-based
    generator, so ``threshold = p * 2^32`` keeps each element with probability ``p``, the kernel draws the mask in the
    same pass as the quantizer, and the backward pass recomputes it from ``seed`` (an int64 scalar tensor)."""
    h = (torch.arange(n, device=device, dtype=torch.int64) * _GOLDEN + seed) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _FMIX1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _FMIX2) & _MASK32
    return (h ^ (h >> 16)) < threshold


def act_drop_forward(x: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor, signed: bool, seed: torch.Tensor,
                     threshold: int) -> torch.Tensor:
    """QDrop around a fixed-bit activation quantizer (``x`` flat, ``clip`` and ``levels`` of one candidate): ``x``
    where :func:`dropout_keep` keeps it, else ``Q_a(x)``."""
    q = act_mix_forward(x, torch.ones_like(clip), clip, levels, signed, 1)
    return torch.where(dropout_keep(x.numel(), seed, threshold, x.device), x.to(q.dtype), q)


def act_drop_backward(x: torch.Tensor, grad: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor, signed: bool,
                      seed: torch.Tensor, threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`act_drop_forward` w.r.t. ``x`` (``g`` where kept, ``g * dQ_a/dx`` elsewhere) and the clip
    (the quantized elements' share of :func:`act_mix_backward`'s)."""
    keep = dropout_keep(x.numel(), seed, threshold, x.device)
    grad = grad.to(torch.promote_types(x.dtype, clip.dtype))
    quantized = torch.where(keep, torch.zeros_like(grad), grad)
    gx, _, gc = act_mix_backward(x, quantized, torch.ones_like(clip), clip, levels, signed, 1, need_probs=False)
    return gx + torch.where(keep, grad, torch.zeros_like(grad)), gc


def effective_scales(scales: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """The forward value of :func:`gmpq.quant.functional.scale_grad` (may differ from ``scales`` by an ulp)."""
    scaled = scales * gammas[:, None]
    return (scales - scaled) + scaled


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
    "drop_fwd": act_drop_forward, "drop_bwd": act_drop_backward,
}
_backend = os.environ.get("GMPQ_FUSED_BACKEND", "auto")
_compiled: dict[str, Callable[..., Any]] = {}
_compile_failed = False
_triton_failed = False


def set_backend(name: str) -> None:
    """Select how the fused kernels run: ``auto``, ``triton``, ``compile`` or ``eager`` (module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fused-kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


@contextmanager
def using_backend(name: str) -> Iterator[None]:
    """Select backend ``name`` (:func:`set_backend`) within the context, and the previous selection after it."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def get_backend(device: torch.device | str | None = None) -> str:
    """The backend kernels on ``device`` run on now (``triton``, ``compile`` or ``eager``; no device: a CPU)."""
    device_type = "cpu" if device is None else device.type if isinstance(device, torch.device) else \
        torch.device(device).type
    if _backend == "triton" or (_backend == "auto" and device_type == "cuda" and not _triton_failed):
        return "triton"
    if _backend == "eager" or (_backend == "auto" and _compile_failed):
        return "eager"
    return "compile"


@functools.cache
def _triton_module() -> Any:
    from gmpq.quant import triton_kernels

    return triton_kernels


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_kernels(*tensors: torch.Tensor) -> Any | None:
    """The Triton kernel module if the ``triton`` backend serves ``tensors``, else ``None`` (use the torch kernels).

    Under ``auto``, a Triton that cannot be imported switches CUDA tensors to ``compile`` with one warning; under an
    explicit ``triton`` any failure raises."""
    if get_backend(tensors[0].device) != "triton":
        return None
    if any(t.dtype not in _TRITON_DTYPES for t in tensors):
        return None  # float64 and others: the torch kernels compute them in their own precision
    try:
        module = _triton_module()
    except Exception as e:  # noqa: BLE001 — missing or broken Triton
        _give_up_triton(e)
        return None
    if tensors[0].device.type != "cuda" and not module.interpreted():
        raise RuntimeError("gmpq: the 'triton' fused-kernel backend needs CUDA tensors (or TRITON_INTERPRET=1 set "
                           "before gmpq.quant.triton_kernels is imported); use the 'compile' or 'eager' backend")
    return module


def _triton_run(launch: Callable[..., Any], *args: Any) -> Any | None:
    """``launch(*args)``; under ``auto`` a Triton failure (compilation, launch) switches CUDA tensors to the
    ``compile`` backend for the rest of the process, with one warning, and returns ``None``."""
    try:
        return launch(*args)
    except Exception as e:  # noqa: BLE001 — any Triton compiler or launch failure
        _give_up_triton(e)
        return None


def _give_up_triton(error: Exception) -> None:
    """Re-raise ``error`` unless the backend is ``auto``; then use the torch kernels on CUDA from now on."""
    global _triton_failed
    if _backend != "auto":
        raise error
    _triton_failed = True
    first_line = str(error).splitlines()[0] if str(error) else ""
    warnings.warn(f"gmpq: the Triton quantization kernels failed ({type(error).__name__}: {first_line}); using "
                  "torch.compile'd kernels instead (slower)", RuntimeWarning, stacklevel=5)


def _kernel(name: str) -> Callable[..., Any]:
    if get_backend() == "eager":
        return _KERNELS[name]
    if name not in _compiled:
        _compiled[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _run(name: str, *args: Any) -> Any:
    """Run torch kernel ``name``; under ``auto`` a compilation failure switches to eager for the rest of the process."""
    global _compile_failed
    kernel = _kernel(name)
    if kernel is _KERNELS[name]:
        return kernel(*args)
    # No "duck sizing" (equal sizes sharing one symbol): one graph per kernel then serves every layer shape, instead
    # of a recompilation for each pattern of coinciding sizes (and eager mode past the recompile limit). Set and
    # restored by hand: the config's patch() context builds a class on every call, a third of a small kernel's cost.
    duck_shape = _FX_CONFIG.use_duck_shape
    _FX_CONFIG.use_duck_shape = False
    try:
        return kernel(*args)
    except Exception as e:  # noqa: BLE001 — any compiler/toolchain failure
        if _backend != "auto":
            raise
        _compile_failed = True
        warnings.warn(f"gmpq: torch.compile of the fused quantization kernels failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); falling back to eager kernels (slower). "
                      "Set GMPQ_FUSED_BACKEND=eager to silence this.", RuntimeWarning, stacklevel=3)
        return _KERNELS[name](*args)
    finally:
        _FX_CONFIG.use_duck_shape = duck_shape


# ---------------------------------------------------------------------------------------------- cached constants


# Cached constants are made outside inference mode (an inference tensor cannot be saved for backward later).


@functools.cache
def act_levels(bits: tuple[int, ...], signed: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[K]`` level counts n_i of the activation candidates (:func:`gmpq.quant.functional.act_levels`), cached per
    device so that no call copies them from the host."""
    with torch.inference_mode(False):
        return torch.tensor([QF.act_levels(b, signed) for b in bits], dtype=dtype, device=device)


@functools.cache
def weight_constants(bits: tuple[int, ...], per_row: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """``(Q_p per candidate, the same as a [K] tensor, LSQ's gradient scales 1 / sqrt(per_row * Q_p) [K])`` for a
    weight with ``per_row`` elements per output channel, cached per device."""
    qmax = tuple(QF.weight_qmax(b) for b in bits)
    gammas = [1.0 / (per_row * q) ** 0.5 for q in qmax]
    with torch.inference_mode(False):
        return (qmax, torch.tensor(qmax, dtype=torch.float32, device=device),
                torch.tensor(gammas, dtype=dtype, device=device))


@functools.cache
def _one(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The probability vector ``[1.]`` of a fixed-bit quantizer (one candidate), cached per device."""
    with torch.inference_mode(False):
        return torch.ones(1, dtype=dtype, device=device)


def operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a convolution / matrix product will read ``t`` in: autocast's dtype where autocast is on."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


# ---------------------------------------------------------------------------------------------- kernel dispatch


def _flat(t: torch.Tensor, *shape: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` made dense in the layout of ``like`` (default: its own; contiguous, or channels_last where it is stored
    so) as a ``shape`` tensor sharing its memory that is neither a view nor a parameter.

    A compiled kernel then sees one plain 1-D/2-D tensor: one graph serves every layer (a view would add guards on
    its base's sizes, a parameter gets static sizes, and 4-D sizes of 1 are specialised — each a recompilation). The
    kernels are elementwise, or per row of a weight ``[C, M]`` whose output channel's elements lie together in both
    layouts, so a channels_last tensor is used as it is stored (no copy to the contiguous layout and back);
    :func:`_shaped` gives the result the input's shape and strides.
    """
    t = _dense(t.detach(), _memory_format(t if like is None else like))
    strides = (shape[1], 1) if len(shape) == 2 else (1,)
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, strides)


def _shaped(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's flat result seen with the shape of ``like`` in the dense layout :func:`_flat` gave ``like``."""
    if like.dim() != 4 or _memory_format(like) is torch.contiguous_format:
        return flat.view(like.shape)
    _, c, h, w = like.shape
    return flat.as_strided(like.shape, (h * w * c, 1, w * c, c))  # channels_last: N, then H, W, C innermost


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored that way, else the contiguous format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` in layout ``fmt`` (itself when it already is): the Triton kernels index its storage flat (they run
    inside autograd functions, where nothing is recorded)."""
    return t.contiguous(memory_format=fmt)


def _act_forward(x: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, bits: tuple[int, ...], signed: bool,
                 out_dtype: torch.dtype) -> torch.Tensor:
    levels = act_levels(bits, signed, clip.device, clip.dtype)
    tk = _triton_kernels(x, clip)
    if tk is not None:
        out = _triton_run(tk.act_forward, _dense(x, _memory_format(x)), probs, clip, levels.float(), signed,
                          out_dtype)
        if out is not None:
            return out
    out = _run("act_fwd", _flat(x, x.numel()), probs.detach(), clip.detach(), levels, signed, len(bits))
    return _shaped(out, x).to(out_dtype)


def _act_backward(x: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor,
                  bits: tuple[int, ...], signed: bool, need_x: bool = True, need_probs: bool = True):
    """``(dL/dx or None, dL/dprobs or None, dL/dclip)``."""
    levels = act_levels(bits, signed, clip.device, clip.dtype)
    tk = _triton_kernels(x, grad, clip)
    if tk is not None:
        fmt = _memory_format(x)
        grads = _triton_run(tk.act_backward, _dense(x, fmt), _dense(grad, fmt), probs, clip, levels.float(), signed,
                            need_x, need_probs)
        if grads is not None:
            return grads
    gx, gp, gc = _run("act_bwd", _flat(x, x.numel()), _flat(grad, grad.numel(), like=x), probs.detach(), clip.detach(),
                      levels, signed, len(bits), need_probs)
    return (_shaped(gx, x).to(x.dtype) if need_x else None), gp, gc


def _weight_forward(weight: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, bits: tuple[int, ...],
                    out_dtype: torch.dtype) -> torch.Tensor:
    rows, cols = weight.shape[0], weight[0].numel()
    qmax, qmax_t, gammas = weight_constants(bits, cols, scales.device, scales.dtype)
    tk = _triton_kernels(weight, scales)
    if tk is not None:
        w = _dense(weight, _memory_format(weight))
        out = _triton_run(tk.weight_forward, _rows(w), probs, scales, qmax_t, gammas.float(), out_dtype)
        if out is not None:
            return _as_layout(out, w)
    out = _run("w_fwd", _flat(weight, rows, cols), probs.detach(), scales.detach(), gammas, qmax)
    return _shaped(out, weight).to(out_dtype)


def _weight_backward(weight: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                     bits: tuple[int, ...], need_probs: bool = True):
    """``(dL/dW, dL/dprobs or None, dL/dscales)``."""
    rows, cols = weight.shape[0], weight[0].numel()
    qmax, qmax_t, gammas = weight_constants(bits, cols, scales.device, scales.dtype)
    tk = _triton_kernels(weight, grad, scales)
    if tk is not None:
        fmt = _memory_format(weight)
        w, g = _dense(weight, fmt), _dense(grad, fmt)
        grads = _triton_run(tk.weight_backward, _rows(w), _rows(g), probs, scales, qmax_t, gammas.float(),
                            need_probs)
        if grads is not None:
            return _as_layout(grads[0], w), grads[1], grads[2]
    gw, gp, gs = _run("w_bwd", _flat(weight, rows, cols), _flat(grad, rows, cols, like=weight), probs.detach(),
                      scales.detach(), gammas, qmax, need_probs)
    return _shaped(gw, weight).to(weight.dtype), gp, gs


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor whose output-channel rows are contiguous (contiguous or channels_last) as its [C, M] storage."""
    rows = t.shape[0]
    if t.is_contiguous():
        return t.view(rows, -1)
    return t.as_strided((rows, t.numel() // rows), (t.numel() // rows, 1))


def _as_layout(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The [C, M] storage ``flat`` seen with the shape and strides of ``like``."""
    return flat.as_strided(like.shape, like.stride())


# ---------------------------------------------------------------------------------------------- autograd functions


def _check_device(names: tuple[str, ...], *tensors: torch.Tensor | None) -> None:
    """Raise :class:`~gmpq.errors.ModelError` unless every tensor given (``None``: absent) is on the device of the
    first; ``names`` names them in order."""
    device = tensors[0].device
    if all(t is None or t.device == device for t in tensors):
        return
    where = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors, strict=True) if t is not None)
    raise ModelError(f"a quantized layer's tensors are on different devices ({where}); move the whole model and its "
                     "inputs to one device (model.to(device)) before running it")


_ACT = ("the input", "the activation probabilities", "the clips")
_WEIGHT = ("the weight", "the weight probabilities", "the weight steps")
_LAYER = ("the input", "the weight", "the bias", "the activation probabilities", "the clips",
          "the weight probabilities", "the weight steps")


def mixed_activation(x: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, bits: tuple[int, ...],
                     signed: bool) -> torch.Tensor:
    """``x_mix`` with the fused kernels and no stored intermediates (a standalone autograd function)."""
    _check_device(_ACT, x, probs, clip)
    return _MixedActivation.apply(x, probs, clip, bits, signed, x.dtype)


def mixed_weight(weight: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                 bits: tuple[int, ...]) -> torch.Tensor:
    """``W_mix`` with the fused kernels (a standalone autograd function)."""
    _check_device(_WEIGHT, weight, probs, scales)
    return _MixedWeight.apply(weight, probs, scales, bits, weight.dtype)


def fake_quant_activation(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """:func:`gmpq.quant.functional.quantize_activation` (same values and gradients): one fused kernel each way
    (``triton`` and ``compile`` backends), written in autocast's dtype where autocast is on; the autograd form under
    ``eager`` (the reference)."""
    _check_device(_ACT[::2], x, clip)
    if get_backend(x.device) == "eager":
        return QF.quantize_activation(x, clip, bits, signed)
    return _MixedActivation.apply(x, _one(clip.device, clip.dtype), clip.reshape(1), (bits,), signed,
                                  operand_dtype(x))


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`gmpq.quant.functional.quantize_weight` (same values and gradients): one fused kernel each way
    (``triton`` and ``compile`` backends), written in autocast's dtype where autocast is on; the autograd form under
    ``eager`` (the reference)."""
    _check_device(_WEIGHT[::2], weight, scale)
    if get_backend(weight.device) == "eager":
        return QF.quantize_weight(weight, scale, bits)
    return _MixedWeight.apply(weight, _one(scale.device, scale.dtype), scale.reshape(1, -1), (bits,),
                              operand_dtype(weight))


def qdrop_activation(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool, p: float,
                     seed: torch.Tensor) -> torch.Tensor:
    """QDrop (Wei et al. 2022) around :func:`fake_quant_activation`: each element of ``x`` passes unquantized with
    probability ``p``, drawn by :func:`dropout_keep` from ``seed`` (an int64 scalar tensor: one draw per call). One
    fused kernel each way that stores nothing but ``x`` (``compile`` backend, also on CUDA); the same mask and values
    op by op under ``eager``."""
    _check_device(_ACT[::2], x, clip)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"QDrop probability must be in [0, 1], got {p}")
    threshold = min(int(p * 2**32), 2**32)
    if get_backend(x.device) == "eager":
        keep = dropout_keep(x.numel(), seed, threshold, x.device).view(x.shape)
        return torch.where(keep, x, QF.quantize_activation(x, clip, bits, signed))
    return _DroppedActivation.apply(x, clip.reshape(1), bits, signed, seed, threshold)


class _DroppedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip, bits, signed, seed, threshold):
        ctx.save_for_backward(x, clip, seed)
        ctx.bits, ctx.signed, ctx.threshold = bits, signed, threshold
        levels = act_levels((bits,), signed, clip.device, clip.dtype)
        out = _run("drop_fwd", _flat(x, x.numel()), clip.detach(), levels, signed, seed, threshold)
        return _shaped(out, x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, clip, seed = ctx.saved_tensors
        levels = act_levels((ctx.bits,), ctx.signed, clip.device, clip.dtype)
        gx, gc = _run("drop_bwd", _flat(x, x.numel()), _flat(grad, grad.numel(), like=x), clip.detach(), levels,
                      ctx.signed, seed, ctx.threshold)
        return _shaped(gx, x).to(x.dtype), gc, None, None, None, None


class _MixedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, clip, bits, signed, out_dtype):
        ctx.save_for_backward(x, probs, clip)
        ctx.bits, ctx.signed = bits, signed
        return _act_forward(x, probs, clip, bits, signed, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, probs, clip = ctx.saved_tensors
        gx, gp, gc = _act_backward(x, grad, probs, clip, ctx.bits, ctx.signed, ctx.needs_input_grad[0],
                                   ctx.needs_input_grad[1])
        return gx, gp, gc, None, None, None


class _MixedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, probs, scales, bits, out_dtype):
        ctx.save_for_backward(weight, probs, scales)
        ctx.bits = bits
        return _weight_forward(weight, probs, scales, bits, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, probs, scales = ctx.saved_tensors
        gw, gp, gs = _weight_backward(weight, grad, probs, scales, ctx.bits, ctx.needs_input_grad[1])
        return gw, gp, gs, None, None


# ---------------------------------------------------------------------------------------------- fused layers


def mixed_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probs_a: torch.Tensor, clip: torch.Tensor,
    probs_w: torch.Tensor, scales: torch.Tensor, a_bits: tuple[int, ...], w_bits: tuple[int, ...], signed: bool,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
) -> torch.Tensor:
    """``conv2d(x_mix, W_mix) + bias`` storing only ``x`` and ``W``; both mixtures are recomputed in backward."""
    _check_device(_LAYER, x, weight, bias, probs_a, clip, probs_w, scales)
    return _MixedConv2d.apply(x, weight, bias, probs_a, clip, probs_w, scales,
                              (a_bits, w_bits, signed, tuple(stride), tuple(padding), tuple(dilation), groups),
                              operand_dtype(x))


def mixed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probs_a: torch.Tensor, clip: torch.Tensor,
    probs_w: torch.Tensor, scales: torch.Tensor, a_bits: tuple[int, ...], w_bits: tuple[int, ...], signed: bool,
) -> torch.Tensor:
    """``linear(x_mix, W_mix) + bias`` storing only ``x`` and ``W``."""
    _check_device(_LAYER, x, weight, bias, probs_a, clip, probs_w, scales)
    return _MixedLinear.apply(x, weight, bias, probs_a, clip, probs_w, scales, (a_bits, w_bits, signed),
                              operand_dtype(x))


def _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, dtype):
    return (_act_forward(x, probs_a, clip, a_bits, signed, dtype),
            _weight_forward(weight, probs_w, scales, w_bits, dtype))


def _quant_backward(ctx, x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, grad_x_mix, grad_w_mix):
    """Chain the gradients of ``x_mix`` and ``W_mix`` back to x, W, the probabilities, clips and steps."""
    gx, gpa, gc = _act_backward(x, grad_x_mix, probs_a, clip, a_bits, signed, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[3])
    gw, gpw, gs = _weight_backward(weight, grad_w_mix, probs_w, scales, w_bits, ctx.needs_input_grad[5])
    return gx, gw, gpa, gc, gpw, gs


class _MixedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probs_a, clip, probs_w, scales, cfg, dtype):
        a_bits, w_bits, signed, stride, padding, dilation, groups = cfg
        x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, dtype)
        ctx.save_for_backward(x, weight, bias, probs_a, clip, probs_w, scales)
        ctx.cfg = cfg
        return F.conv2d(x_mix, w_mix, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, probs_a, clip, probs_w, scales = ctx.saved_tensors
        a_bits, w_bits, signed, stride, padding, dilation, groups = ctx.cfg
        x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, grad.dtype)
        gxm, gwm, gb = torch.ops.aten.convolution_backward(
            grad, x_mix, w_mix, None if bias is None else list(bias.shape),
            list(stride), list(padding), list(dilation), False, [0, 0], groups, [True, True, bias is not None],
        )
        del x_mix, w_mix
        gx, gw, gpa, gc, gpw, gs = _quant_backward(ctx, x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits,
                                                   signed, gxm, gwm)
        return gx, gw, (gb.to(bias.dtype) if bias is not None else None), gpa, gc, gpw, gs, None, None


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probs_a, clip, probs_w, scales, cfg, dtype):
        a_bits, w_bits, signed = cfg
        x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, dtype)
        ctx.save_for_backward(x, weight, bias, probs_a, clip, probs_w, scales)
        ctx.cfg = cfg
        return F.linear(x_mix, w_mix, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, probs_a, clip, probs_w, scales = ctx.saved_tensors
        a_bits, w_bits, signed = ctx.cfg
        x_mix, w_mix = _mixtures(x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits, signed, grad.dtype)
        g2 = grad.reshape(-1, grad.shape[-1])
        gxm = (g2 @ w_mix).view(*grad.shape[:-1], weight.shape[1])
        gwm = g2.t() @ x_mix.reshape(-1, x_mix.shape[-1])
        gb = g2.sum(0).to(bias.dtype) if bias is not None else None
        del x_mix, w_mix
        gx, gw, gpa, gc, gpw, gs = _quant_backward(ctx, x, weight, probs_a, clip, probs_w, scales, a_bits, w_bits,
                                                   signed, gxm, gwm)
        return gx, gw, gb, gpa, gc, gpw, gs, None, None
