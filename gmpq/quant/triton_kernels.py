"""Triton kernels of the fused quantizers: one kernel per (layer, direction) with every candidate inside.

The math is that of the eager kernels in :mod:`gmpq.quant.fused` (the module docstring there gives the gradients),
written in the same order of floating-point operations, so that on a GPU they agree with the eager kernels to the
last bit or two (``enable_fp_fusion=False``: no multiply-add contraction; ``div_rn``: IEEE division; ``rint``:
round half to even, as ``torch.round``):

* :func:`act_forward` — ``x_mix = sum_i p_i Q_a(x; c_i, b_i)``: one pass over ``x``;
* :func:`act_backward` — ``dL/dx``, and per-block partial sums of ``dL/dp_i`` and ``dL/dc_i`` (summed on the device
  afterwards: deterministic, no atomics): one pass over ``x`` and the incoming gradient;
* :func:`weight_forward` — ``W_mix = sum_j p_j Q_w(W; s_j, b_j)`` for ``W`` seen as ``[C_out, M]``, one program per
  chunk of a row (so every program reads its channel's steps once);
* :func:`weight_backward` — ``dL/dW``, and per-(channel, chunk) partial sums of the step gradients (LSQ's gradient
  scale applied) and of ``dL/dp_j``.

Per-candidate scalars (probabilities, clips, steps, levels) are read from device tensors inside the kernels, so a
call never moves data between host and device. Any float input dtype is read and computed in float32; outputs are
written in the dtype the caller asks for (bf16 under autocast). A fixed-bit quantizer is the case K = 1, p = 1.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors through Triton's
interpreter (tests); rounding then uses the exact ``(z + 1.5 * 2^23) - 1.5 * 2^23`` form, since the interpreter has
no ``libdevice``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover — older Triton
    from triton.language.extra.cuda import libdevice

#: Elements per program of the activation kernels (power of two).
ACT_BLOCK = 2048
#: Columns per chunk of the weight kernels: the smallest of these that holds a row, else the largest (few compiled
#: variants: 3x3 depthwise rows of 9 and 1x1 rows of 1280 use the same kernels as everything between).
WEIGHT_BLOCKS = (64, 256, 1024)


def interpreted() -> bool:
    """Whether the kernels of this module were built for Triton's CPU interpreter."""
    return _INTERPRETED


@triton.jit
def _round(z, RINT: tl.constexpr):
    """Round half to even (``torch.round``)."""
    if RINT:
        r = libdevice.rint(z)
    else:
        # |z| <= 255 here: adding 1.5 * 2^23 leaves no fraction bit, so the addition itself rounds (ties to even)
        r = (z + 12582912.0) - 12582912.0
    return r


@triton.jit
def _act_candidate(x, probs_ptr, clip_ptr, levels_ptr, i, SIGNED: tl.constexpr, RINT: tl.constexpr):
    """Candidate ``i``: ``(p_i, c_i, n_i, lower_i, z = clamp(x, lower_i, c_i) * (n_i / c_i), round(z))``."""
    p = tl.load(probs_ptr + i).to(tl.float32)
    c = tl.load(clip_ptr + i).to(tl.float32)
    n = tl.load(levels_ptr + i)
    if SIGNED:
        lower = -c
    else:
        lower = c * 0.0
    y = tl.minimum(tl.maximum(x, lower, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)
    z = y * tl.math.div_rn(n, c)
    return p, c, n, lower, z, _round(z, RINT)


# Sizes are not specialised on (divisibility by 16, equality to 1): one compiled kernel serves every layer.
@triton.jit(do_not_specialize=["n_elements"])
def _act_fwd_kernel(x_ptr, out_ptr, probs_ptr, clip_ptr, levels_ptr, n_elements,
                    K: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr, RINT: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(K):
        p, c, n, lower, z, r = _act_candidate(x, probs_ptr, clip_ptr, levels_ptr, i, SIGNED, RINT)
        acc = acc + p * (r * tl.math.div_rn(c, n))
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_elements"])
def _act_bwd_kernel(x_ptr, g_ptr, gx_ptr, part_ptr, probs_ptr, clip_ptr, levels_ptr, n_elements,
                    K: tl.constexpr, SIGNED: tl.constexpr, NEED_GX: tl.constexpr, NEED_PROBS: tl.constexpr,
                    BLOCK: tl.constexpr, RINT: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    through = tl.zeros([BLOCK], dtype=tl.float32)
    part = part_ptr + pid.to(tl.int64) * (2 * K)
    for i in tl.static_range(K):
        p, c, n, lower, z, r = _act_candidate(x, probs_ptr, clip_ptr, levels_ptr, i, SIGNED, RINT)
        if NEED_PROBS:
            tl.store(part + i, tl.sum(g * (r * tl.math.div_rn(c, n)), axis=0))
        above = (x > c).to(tl.float32) + 0.5 * (x == c).to(tl.float32)
        below = (x < lower).to(tl.float32) + 0.5 * (x == lower).to(tl.float32)
        through = through + p * (1.0 - above - below)
        d_clip = (r - z) * tl.math.div_rn(1.0, n) + above
        if SIGNED:
            d_clip = d_clip - below
        tl.store(part + K + i, p * tl.sum(g * d_clip, axis=0))
    if NEED_GX:
        tl.store(gx_ptr + offs, (g * through).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_candidate(w, probs_ptr, scales_ptr, qmax_ptr, gammas_ptr, j, row, C, RINT: tl.constexpr):
    """Candidate ``j`` of channel ``row``: ``(p_j, s, Q_p, z = w / s, round(clamp(z, -Q_p, Q_p)))`` with ``s`` the
    forward value of LSQ's gradient-scaled step, ``(s - s g) + s g`` (:func:`gmpq.quant.functional.scale_grad`)."""
    p = tl.load(probs_ptr + j).to(tl.float32)
    s = tl.load(scales_ptr + j * C + row).to(tl.float32)
    sg = s * tl.load(gammas_ptr + j)
    s = (s - sg) + sg
    q = tl.load(qmax_ptr + j)
    z = tl.math.div_rn(w, s)
    r = _round(tl.minimum(tl.maximum(z, -q, propagate_nan=tl.PropagateNan.ALL), q, propagate_nan=tl.PropagateNan.ALL),
               RINT)
    return p, s, q, z, r


@triton.jit(do_not_specialize=["C", "M"])
def _weight_fwd_kernel(w_ptr, out_ptr, probs_ptr, scales_ptr, qmax_ptr, gammas_ptr, C, M,
                       K: tl.constexpr, BLOCK: tl.constexpr, RINT: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    offs = row.to(tl.int64) * M + cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        p, s, q, z, r = _weight_candidate(w, probs_ptr, scales_ptr, qmax_ptr, gammas_ptr, j, row, C, RINT)
        acc = acc + p * (r * s)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "M"])
def _weight_bwd_kernel(w_ptr, g_ptr, gw_ptr, part_scales_ptr, part_probs_ptr, probs_ptr, scales_ptr, qmax_ptr,
                       gammas_ptr, C, M, K: tl.constexpr, NEED_PROBS: tl.constexpr, BLOCK: tl.constexpr,
                       RINT: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    offs = row.to(tl.int64) * M + cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    through = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        p, s, q, z, r = _weight_candidate(w, probs_ptr, scales_ptr, qmax_ptr, gammas_ptr, j, row, C, RINT)
        inside = (z > -q) & (z < q)  # torch.clamp passes no gradient at its bounds
        part = (j * C + row).to(tl.int64) * chunks + chunk  # partial sums laid out [K, C, chunks]
        if NEED_PROBS:
            tl.store(part_probs_ptr + part, tl.sum(g * (r * s), axis=0))
        through = through + p * inside.to(tl.float32)
        tl.store(part_scales_ptr + part, p * tl.sum(g * tl.where(inside, r - z, r), axis=0) * tl.load(gammas_ptr + j))
    tl.store(gw_ptr + offs, (g * through).to(gw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

_INTERPRETED = type(_act_fwd_kernel).__name__ == "InterpretedFunction"
#: No multiply-add contraction (the eager kernels' rounding); 8 warps per program.
_OPTIONS = {} if _INTERPRETED else {"num_warps": 8, "enable_fp_fusion": False}


def _options(num_warps: int | None) -> dict:
    return _OPTIONS if num_warps is None or _INTERPRETED else {**_OPTIONS, "num_warps": num_warps}


def act_forward(x: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor, signed: bool,
                out_dtype: torch.dtype, block: int = ACT_BLOCK, num_warps: int | None = None) -> torch.Tensor:
    """``x_mix`` (same shape and layout as the dense ``x``, dtype ``out_dtype``); ``probs``, ``clip``, ``levels``: [K].
    ``block`` (elements per program) and ``num_warps`` are tuning knobs (tools/bench_kernels.py)."""
    n = x.numel()
    out = torch.empty_like(x, dtype=out_dtype)  # the layout of x: the kernel indexes both flat
    _act_fwd_kernel[(triton.cdiv(n, block),)](x, out, probs, clip, levels, n, K=levels.numel(), SIGNED=signed,
                                              BLOCK=block, RINT=not _INTERPRETED, **_options(num_warps))
    return out


def act_backward(x: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor,
                 signed: bool, need_x: bool, need_probs: bool, block: int = ACT_BLOCK, num_warps: int | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(dL/dx or None, dL/dprobs [K] or None, dL/dclip [K])`` for dense ``x`` and ``grad`` of one layout."""
    n, k = x.numel(), levels.numel()
    blocks = triton.cdiv(n, block)
    gx = torch.empty_like(x) if need_x else x  # x is a placeholder pointer the kernel never writes
    partials = torch.empty((blocks, 2 * k), dtype=torch.float32, device=x.device)
    _act_bwd_kernel[(blocks,)](x, grad, gx, partials, probs, clip, levels, n, K=k, SIGNED=signed, NEED_GX=need_x,
                               NEED_PROBS=need_probs, BLOCK=block, RINT=not _INTERPRETED, **_options(num_warps))
    sums = partials.sum(0) if need_probs else partials[:, k:].sum(0)
    return ((gx if need_x else None), (sums[:k].to(probs.dtype) if need_probs else None),
            sums[-k:].to(clip.dtype))


def _weight_block(m: int) -> int:
    return next((b for b in WEIGHT_BLOCKS if m <= b), WEIGHT_BLOCKS[-1])


def weight_forward(w: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, qmax: torch.Tensor,
                   gammas: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``W_mix`` for a contiguous ``w`` of shape [C, M]; ``scales`` [K, C], ``qmax`` and ``gammas`` [K] float32."""
    c, m = w.shape
    out = torch.empty((c, m), dtype=out_dtype, device=w.device)
    block = _weight_block(m)
    _weight_fwd_kernel[(c, triton.cdiv(m, block))](w, out, probs, scales, qmax, gammas, c, m, K=qmax.numel(),
                                                   BLOCK=block, RINT=not _INTERPRETED, **_OPTIONS)
    return out


def weight_backward(w: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor,
                    qmax: torch.Tensor, gammas: torch.Tensor, need_probs: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(dL/dW [C, M], dL/dprobs [K] or None, dL/dscales [K, C])``, the last with LSQ's gradient scale applied."""
    c, m = w.shape
    k = qmax.numel()
    block = _weight_block(m)
    chunks = triton.cdiv(m, block)
    gw = torch.empty((c, m), dtype=w.dtype, device=w.device)
    part_scales = torch.empty((k, c, chunks), dtype=torch.float32, device=w.device)
    part_probs = torch.empty((k, c * chunks), dtype=torch.float32, device=w.device) if need_probs else part_scales
    _weight_bwd_kernel[(c, chunks)](w, grad, gw, part_scales, part_probs, probs, scales, qmax, gammas, c, m, K=k,
                                    NEED_PROBS=need_probs, BLOCK=block, RINT=not _INTERPRETED, **_OPTIONS)
    grad_scales = part_scales.squeeze(2) if chunks == 1 else part_scales.sum(2)
    grad_probs = part_probs.sum(1).to(probs.dtype) if need_probs else None
    return gw, grad_probs, grad_scales.to(scales.dtype)
