"""Folding BatchNorm into the convolution before it, before the weights are quantized (``ptq.batchnorm=fold``).

A convolution followed by an eval-mode BatchNorm computes, per output channel ``o`` (``sigma = sqrt(var + eps)``)::

    y_o = g_o * (W_o * x + b_o - mu_o) / sigma_o + beta_o = (g_o / sigma_o) W_o * x + (g_o / sigma_o) b_o + t_o
    t_o = beta_o - g_o mu_o / sigma_o

Folding scales the convolution's weight (and bias) by ``g / sigma`` and turns the BatchNorm into the shift ``t``
alone (mean 0, variance ``1 - eps``, weight 1, bias ``t``), so that no tensor is added to the model and its state
dict keeps its keys: the folded model saves and loads like the unfolded one. Pairs are found by a probe forward
pass: a BatchNorm whose input is the very output tensor of a layer in ``layers``.

With per-output-channel symmetric weight steps the folded and the kept forms have the same grids (a channel's grid
scales with its weights), so the choice matters only through calibration and reconstruction; gmpq keeps BatchNorm
by default (``keep``), which leaves the model's structure and its 32-bit layers exactly as they were.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_batchnorm(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold every affine, running-statistics BatchNorm that directly follows one of ``layers`` (float Conv2d module
    paths of ``model``) into it, in place; return the ``(layer, batchnorm)`` pairs folded."""
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}
    pairs: dict[str, str] = {}
    handles = []
    for name in layers:
        def post(module: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            outputs[id(out)] = (name, out, out._version)
        handles.append(model.get_submodule(name).register_forward_hook(post))
    for bn_name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and bn.track_running_stats:
            def pre(module: nn.Module, args: tuple, bn_name: str = bn_name) -> None:
                seen = outputs.get(id(args[0]))
                if seen is not None and seen[1] is args[0] and seen[1]._version == seen[2]:
                    pairs.setdefault(seen[0], bn_name)
            handles.append(bn.register_forward_pre_hook(pre))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    used = [bn for bn in pairs.values()]
    done = []
    for layer_name, bn_name in pairs.items():
        if used.count(bn_name) > 1:
            continue
        conv, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * factor
        conv.weight.mul_(factor.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.mul_(factor.to(conv.bias.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(shift)
        done.append((layer_name, bn_name))
    return done
