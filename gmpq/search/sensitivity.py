"""Hessian-aware sensitivity of each searched layer to quantization (HAWQ-V2 / HAWQ-V3).

For a layer ``l`` with weights ``W_l`` (``n_W`` elements) and input activations ``x_l`` (``n_x`` elements per batch),
a second-order expansion of the loss around the float model, with the Hessian block replaced by its average
eigenvalue ``tr(H) / n``, gives the loss increase of quantizing them (HAWQ-V2, Dong et al. 2020, eq. 5; HAWQ-V3,
Yao et al. 2021, eq. 11)::

    Omega_W(l, b) = tr(H_W,l) / n_W * ||Q_b(W_l) - W_l||^2  =  tr(H_W,l) * mean((Q_b(W_l) - W_l)^2)
    Omega_x(l, b) = tr(H_x,l) / n_x * ||Q_b(x_l) - x_l||^2  =  tr(H_x,l) * mean((Q_b(x_l) - x_l)^2)

``H_W,l`` is the Hessian of the proxy loss (cross-entropy of the float model in eval mode on labelled proxy
batches) with respect to ``W_l``; ``H_x,l`` the Hessian with respect to layer ``l``'s own copy of its input (the
activation term, which HAWQ-V3 leaves out by keeping activations at fixed bits; here activations are searched too,
so it is estimated the same way). ``Q_b`` is the quantizer that fine-tuning uses: symmetric per-channel weights with
the MSE-optimal step (:func:`gmpq.quant.functional.mse_optimal_scale`), activations on the MSE-optimal clip
(:func:`gmpq.quant.quantizers.optimal_clip`, signed when the input has negative values).

The traces come from Hutchinson's estimator per block, as HAWQ-V2's Algorithm 1: ``tr(H_bb) = E[v^T H_bb v]`` for
a Rademacher vector ``v`` (independent +-1 entries) on block ``b`` alone, ``H_bb v`` being one Hessian-vector product
(the gradient of ``g_b . v`` w.r.t. the block, ``g_b`` the block's gradient kept with its graph). One probe has
variance ``2 (||H_bb||_F^2 - sum_i H_bb[i, i]^2)``, small against ``tr(H_bb)^2`` for a block of high effective rank;
the mean over ``samples`` probes on each of the ``batches`` reports its standard error. (A single probe over all
blocks at once would cost one product instead of ``2 L`` but add ``||H_b,rest||_F^2`` to every block's variance: the
strong coupling between neighbouring layers made that noise exceed the traces themselves on MobileNetV2.) A negative
estimated trace (noise on a nearly flat block: for ReLU networks every diagonal block is positive semi-definite)
counts as 0.

During the Hessian-vector products every depthwise convolution runs as a sum of ``k_h * k_w`` shifted, per-channel
scaled views of its padded input (:func:`depthwise_by_shifts`): the same function, whose double backward is a few
element-wise operations, where PyTorch's double backward of a grouped convolution loops over the groups (3686
convolution calls in one product on ``mobilenetv2_050_cifar``; 3-4x slower on a CPU at 4 images a batch).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmpq.quant import WeightQuantizer
from gmpq.quant import functional as QF
from gmpq.quant.quantizers import optimal_clip

#: Input activation values kept per batch and in total to estimate a layer's activation quantization error.
SAMPLES_PER_BATCH = 32768
MAX_SAMPLES = 262144

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HessianTraces:
    """Hutchinson estimates, per searched layer, of the mean Hessian eigenvalue of the loss w.r.t. its weights
    (``weight[l] = tr(H_W,l) / n_W``) and its input activations (``activation[l] = tr(H_x,l) / n_x``), with the
    standard errors of those means over ``samples x batches`` probes."""

    layers: tuple[str, ...]
    weight: np.ndarray
    activation: np.ndarray
    weight_stderr: np.ndarray
    activation_stderr: np.ndarray
    samples: int
    batches: int


def hutchinson_traces(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str], samples: int,
                      generator: torch.Generator) -> HessianTraces:
    """Estimate the per-layer Hessian traces of the cross-entropy of ``model`` (eval mode) on ``batches``.

    Args:
        model: a float network holding the Conv2d/Linear modules named in ``layers``.
        batches: ``(images, labels)`` pairs on the model's device.
        layers: module paths of the searched layers.
        samples: Rademacher probes per block and batch (one Hessian-vector product each: ``2 L`` per probe round).
        generator: CPU generator of the probes (seed it for reproducible estimates).
    """
    if samples < 1 or not batches:
        raise ValueError(f"Hutchinson needs at least one probe and one batch, got {samples} probes and "
                         f"{len(batches)} batches")
    modules = _modules(model, layers)
    inputs: dict[str, torch.Tensor] = {}

    def own_input(name: str):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            x = x.clone() if x.requires_grad else x.detach().requires_grad_(True)  # this layer's own copy
            inputs[name] = x
            return (x, *args[1:])
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [modules[n].register_forward_pre_hook(own_input(n)) for n in layers]
    estimates = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [modules[n].weight for n in layers]
        for w in weights:
            w.requires_grad_(True)
        model.eval()
        with depthwise_by_shifts(model):
            for images, labels in batches:
                inputs.clear()
                loss = F.cross_entropy(model(images), labels)
                missing = [n for n in layers if n not in inputs]
                if missing:
                    raise ValueError(f"layer {missing[0]!r} was not called in the forward pass")
                targets = weights + [inputs[n] for n in layers]
                grads = torch.autograd.grad(loss, targets, create_graph=True)
                for _ in range(samples):
                    estimates.append([_probe(target, grad, generator) for target, grad in zip(targets, grads,
                                                                                              strict=True)])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    table = np.asarray(estimates, dtype=np.float64)  # [batches * samples, 2L]
    mean = table.mean(0)
    stderr = table.std(0, ddof=1) / np.sqrt(len(table)) if len(table) > 1 else np.full_like(mean, np.nan)
    n = len(layers)
    return HessianTraces(tuple(layers), mean[:n], mean[n:], stderr[:n], stderr[n:], samples, len(batches))


@torch.no_grad()
def weight_quantization_mse(weight: torch.Tensor, bits: int) -> float:
    """mean((Q_b(W) - W)^2) for the per-output-channel symmetric quantizer with MSE-optimal steps."""
    quantizer = WeightQuantizer(bits, weight.shape[0]).to(weight.device)
    quantizer.init_scale(weight)
    return float((quantizer(weight.float()) - weight.float()).pow(2).mean())


@torch.no_grad()
def activation_quantization_mse(values: torch.Tensor, bits: int, signed: bool) -> float:
    """mean((Q_b(x) - x)^2) over sample ``values`` for the activation quantizer on its MSE-optimal clip."""
    clip = torch.tensor(optimal_clip(values, bits, signed))
    return float((QF.quantize_activation(values, clip, bits, signed) - values).pow(2).mean())


@torch.no_grad()
def input_samples(model: nn.Module, images: Sequence[torch.Tensor], layers: Sequence[str],
                  generator: torch.Generator) -> dict[str, tuple[torch.Tensor, bool]]:
    """Per layer: a random sample of its input values over ``images`` (eval mode; at most
    :data:`SAMPLES_PER_BATCH` per batch and :data:`MAX_SAMPLES` in all, on the CPU) and whether any input was
    negative (the activation quantizer's sign mode)."""
    modules = _modules(model, layers)
    values: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    negative = dict.fromkeys(layers, False)

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            flat = args[0].detach().reshape(-1).float()
            negative[name] |= bool(flat.min() < 0)
            if sum(v.numel() for v in values[name]) < MAX_SAMPLES:
                if flat.numel() > SAMPLES_PER_BATCH:
                    flat = flat[torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=generator).to(flat.device)]
                values[name].append(flat.cpu())
        return hook

    was_training = model.training
    handles = [modules[n].register_forward_pre_hook(record(n)) for n in layers]
    try:
        model.eval()
        for x in images:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (torch.cat(values[n]), negative[n]) for n in layers}


def hawq_costs(model: nn.Module, batches: Sequence[Batch], layers: Sequence[str], w_bits: Sequence[int],
               a_bits: Sequence[int], samples: int, generator: torch.Generator,
               ) -> tuple[np.ndarray, HessianTraces, np.ndarray, np.ndarray]:
    """The HAWQ cost table ``[L, K_w, K_a]``: ``Omega_W(l, w_bits[i]) + Omega_x(l, a_bits[j])`` (module docstring).

    Returns the table, the traces, and the quantization errors ``mse_w[l, i]`` (over ``w_bits``) and ``mse_x[l, j]``
    (over ``a_bits``) it was built from.
    """
    traces = hutchinson_traces(model, batches, layers, samples, generator)
    modules = _modules(model, layers)
    acts = input_samples(model, [images for images, _ in batches], layers, generator)
    mse_w = np.array([[weight_quantization_mse(modules[n].weight.detach(), b) for b in w_bits] for n in layers])
    mse_x = np.array([[activation_quantization_mse(acts[n][0], b, acts[n][1]) for b in a_bits] for n in layers])
    omega_w = np.clip(traces.weight, 0.0, None)[:, None] * mse_w
    omega_x = np.clip(traces.activation, 0.0, None)[:, None] * mse_x
    return omega_w[:, :, None] + omega_x[:, None, :], traces, mse_w, mse_x


def _modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    unknown = [n for n in layers if not isinstance(named.get(n), (nn.Conv2d, nn.Linear))]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} is not a Conv2d/Linear of the model")
    return {n: named[n] for n in layers}


def _probe(target: torch.Tensor, grad: torch.Tensor, generator: torch.Generator) -> float:
    """``v^T H v / n`` for one Rademacher ``v`` on ``target`` (``grad``: the loss's gradient w.r.t. it, with graph)."""
    probe = _rademacher(target, generator)
    if not grad.requires_grad:  # the gradient does not depend on the block: a zero Hessian block
        return 0.0
    (hv,) = torch.autograd.grad(grad, target, grad_outputs=probe, retain_graph=True)
    return float((probe * hv).sum()) / probe.numel()


@contextmanager
def depthwise_by_shifts(model: nn.Module) -> Iterator[None]:
    """Within this context every depthwise ``nn.Conv2d`` of ``model`` (``groups == in_channels``, zero padding)
    computes ``y = b + sum_{i,j} W[:, 0, i, j] * shift_{i,j}(pad(x))`` (the same convolution; see the module
    docstring for why)."""
    swapped = [m for m in model.modules()
               if type(m) is nn.Conv2d and m.groups == m.in_channels > 1 and m.padding_mode == "zeros"
               and isinstance(m.padding, tuple)]
    for m in swapped:
        m.forward = types.MethodType(_depthwise_forward, m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def _depthwise_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if conv.out_channels != conv.in_channels:  # channel multiplier: output o reads input channel o // multiplier
        x = x.repeat_interleave(conv.out_channels // conv.in_channels, dim=1)
    padded = F.pad(x, (pw, pw, ph, ph))
    oh = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            view = padded[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            term = view * conv.weight[:, 0, i, j].view(1, -1, 1, 1)
            y = term if y is None else y + term
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Independent +-1 entries shaped like ``like`` (drawn on the CPU generator, moved to ``like``'s device)."""
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.device, like.dtype) * 2 - 1)
