"""Weight and activation quantizer modules with fixed bit widths.

* :class:`WeightQuantizer` — symmetric, per output channel, learnable LSQ step initialised to the MSE-optimal step
  of the current weights (see :func:`gmpq.quant.functional.quantize_weight`).
* :class:`ActQuantizer` — PACT-style learnable clip. Whether the input is signed is decided from real batches at
  calibration and stored as a buffer, so that a layer whose input can be negative (e.g. after MobileNetV2's linear
  bottleneck) is never silently rectified.

Both are created on a given device and dtype (their layer's), like torch's own modules, and are identities at 32
bits. Before their first calibration they calibrate themselves on the first batch they
see; :func:`gmpq.quant.calibrate` calibrates a whole model on several batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gmpq.quant import functional as QF
from gmpq.quant import fused

#: Values kept per calibration batch and in total to estimate an activation clip.
_SAMPLES_PER_BATCH = 32768
_MAX_SAMPLES = 262144


_BYPASS = False


def host_bool(flag: torch.Tensor) -> bool:
    """``bool(flag)`` for a one-element buffer, read from its device only when its value may have changed.

    The value is cached on the tensor with its storage address and in-place version counter (every ``fill_``,
    ``copy_`` or ``load_state_dict`` bumps the counter; a copy or a move to another device is another storage), so a
    forward pass on a GPU does not wait for the device to answer ``bool()`` of a flag that has not changed.
    """
    if flag.is_inference():  # no version counter to key a cache on
        return bool(flag)
    key = (flag.data_ptr(), flag._version)
    cached = getattr(flag, "_gmpq_host_bool", None)
    if cached is None or cached[0] != key:
        cached = (key, bool(flag))
        flag._gmpq_host_bool = cached
    return cached[1]


@contextmanager
def quantization_bypassed() -> Iterator[None]:
    """Within this context every quantizer is an identity and nothing calibrates (used to trace shapes/MACs)."""
    global _BYPASS
    previous, _BYPASS = _BYPASS, True
    try:
        yield
    finally:
        _BYPASS = previous


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor to ``bits`` bits with one learnable step per output channel."""

    def __init__(self, bits: int, out_channels: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bits = QF.check_bits(bits)
        self.scale = nn.Parameter(torch.ones(out_channels, device=device, dtype=dtype))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self._kept: tuple[tuple, torch.Tensor] | None = None

    @property
    def is_float(self) -> bool:
        return self.bits == QF.FLOAT_BITS

    @torch.no_grad()
    def init_scale(self, weight: torch.Tensor) -> None:
        """Set the step of each output channel to the MSE-optimal one for the current ``weight``."""
        if self.is_float:
            return
        flat = weight.detach().reshape(weight.shape[0], -1).float()
        step = QF.mse_optimal_scale(flat, flat.abs().amax(dim=1).clamp_min(1e-8), QF.weight_qmax(self.bits))
        self.scale.copy_(step.to(self.scale.dtype))
        self.initialized.fill_(True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``Q_w(weight)``. Without autograd (evaluation, inference) the result is kept and reused for as long as
        neither the weight nor the steps change (their storages and in-place version counters say so), so an
        evaluation quantizes every weight once, not once per batch."""
        if self.is_float or _BYPASS:
            return weight
        if not host_bool(self.initialized):
            self.init_scale(weight)
        if torch.is_grad_enabled() or weight.is_inference() or self.scale.is_inference():
            self._kept = None
            return fused.fake_quant_weight(weight, self.scale, self.bits)
        key = (weight.data_ptr(), weight._version, self.scale.data_ptr(), self.scale._version,
               fused.operand_dtype(weight))
        kept = getattr(self, "_kept", None)
        if kept is None or kept[0] != key:
            kept = self._kept = (key, fused.fake_quant_weight(weight, self.scale, self.bits))
        return kept[1]

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActQuantizer(nn.Module):
    """Fake-quantizes activations to ``bits`` bits with a learnable clip and a calibrated sign mode.

    While ``observing`` is set the module passes its input through unchanged and records statistics; call
    :meth:`finish_calibration` to set the sign mode and the MSE-optimal clip from them.
    """

    def __init__(self, bits: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bits = QF.check_bits(bits)
        self.clip = nn.Parameter(torch.tensor(1.0, device=device, dtype=dtype))
        self.register_buffer("signed", torch.tensor(False, device=device))
        self.register_buffer("calibrated", torch.tensor(False, device=device))
        self.observing = False
        self._samples: list[torch.Tensor] = []
        self._seen_negative = False

    @property
    def is_float(self) -> bool:
        return self.bits == QF.FLOAT_BITS

    def observe(self, x: torch.Tensor) -> None:
        """Record a batch of inputs: whether any is negative and a random subsample of values."""
        flat = x.detach().reshape(-1).float()
        self._seen_negative |= bool(flat.min() < 0)
        if sum(s.numel() for s in self._samples) < _MAX_SAMPLES:
            if flat.numel() > _SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (_SAMPLES_PER_BATCH,), device=flat.device)]
            self._samples.append(flat.cpu())

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix the sign mode and set the clip minimising the quantization MSE on the observed values."""
        if not self._samples:
            raise RuntimeError("ActQuantizer.finish_calibration() called before any batch was observed")
        values = torch.cat(self._samples)
        signed = self._seen_negative
        self.signed.fill_(signed)
        if not self.is_float:
            self.clip.fill_(optimal_clip(values, self.bits, signed))
        self.calibrated.fill_(True)
        self._samples, self._seen_negative, self.observing = [], False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _BYPASS:
            return x
        if self.observing:
            self.observe(x)
            return x
        if self.is_float:
            return x
        if not host_bool(self.calibrated):
            self.observe(x)
            self.finish_calibration()
        return fused.fake_quant_activation(x, self.clip, self.bits, host_bool(self.signed))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"


def optimal_clip(values: torch.Tensor, bits: int, signed: bool, grid: int = 64) -> float:
    """Clip c minimising E[(Q_a(x; c) - x)^2] over c = r * max|x|, r in (0, 1], on the sample ``values``."""
    n = QF.act_levels(bits, signed)
    magnitude = values.abs() if signed else values.clamp_min(0)
    top = float(magnitude.max())
    if top <= 0:
        return 1.0
    lower = -1.0 if signed else 0.0
    best_c, best_err = top, float("inf")
    for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        c = r * top
        q = torch.round(values.clamp(lower * c, c) * (n / c)) * (c / n)
        err = float((q - values).pow(2).mean())
        if err < best_err:
            best_c, best_err = c, err
    return best_c
