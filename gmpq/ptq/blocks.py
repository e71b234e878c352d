"""The blocks a post-training reconstruction fits one at a time, and their inputs and outputs on calibration images.

A *block* (BRECQ's unit) is found from the module tree: starting at the model, containers (the model itself,
``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are opened; any other module that holds a quantized layer
is a block, and so is a quantized layer met on the way (the stem convolution, the classifier). For a ResNet that is
the stem conv, each residual block and the classifier; for a MobileNetV2 the stem, each inverted residual, the head
conv and the classifier. Blocks are ordered by when they run (a probe forward pass).

Each block must take one tensor and be called once per forward pass. The probe also records which block's input is
the very tensor the previous block returned (unchanged since): for such a *chained* block the inputs are computed by
running the previous block on its own inputs, instead of a forward pass of the model up to the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gmpq.errors import ModelError
from gmpq.quant import QuantMixin, quantization_bypassed

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """One reconstruction block: its module path, its quantized layers (paths in the model), and whether its input
    is the previous block's output (``chained``)."""

    name: str
    layers: tuple[str, ...]
    chained: bool


def reconstruction_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The blocks of a quantized ``model`` in execution order (module docstring), probed on ``example`` inputs."""
    found: list[str] = []

    def visit(name: str, module: nn.Module, root: bool) -> None:
        if isinstance(module, QuantMixin):
            found.append(name)
        elif any(isinstance(m, QuantMixin) for m in module.modules()):
            if root or isinstance(module, _CONTAINERS):
                for child, sub in module.named_children():
                    visit(f"{name}.{child}" if name else child, sub, False)
            else:
                found.append(name)

    visit("", model, True)
    order: list[str] = []
    chained: dict[str, bool] = {}
    last: list[tuple[torch.Tensor, int] | None] = [None]

    def pre(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in chained:
                raise ModelError(f"block {name!r} runs more than once per forward pass; post-training reconstruction "
                                 "fits blocks that run once")
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                raise ModelError(f"block {name!r} is called with {len(args)} positional and {len(kwargs)} keyword "
                                 "arguments; post-training reconstruction fits blocks of one tensor input")
            prev = last[0]
            chained[name] = prev is not None and prev[0] is args[0] and prev[0]._version == prev[1]
            order.append(name)
        return hook

    def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        last[0] = (output, output._version) if isinstance(output, torch.Tensor) else None

    handles = []
    for name in found:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), quantization_bypassed():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in found if n not in chained]
    if missing:
        raise ModelError(f"block {missing[0]!r} holds quantized layers but does not run in the model's forward pass")
    layers = {n: tuple(f"{n}.{k}" if k else n for k, m in model.get_submodule(n).named_modules()
                       if isinstance(m, QuantMixin)) for n in order}
    return [Block(n, layers[n], chained[n] and i > 0) for i, n in enumerate(order)]


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def capture(model: nn.Module, block: str, images: torch.Tensor, batch_size: int, which: str) -> torch.Tensor:
    """The ``input`` or ``output`` of module ``block`` of ``model`` for every image, computed by forward passes of
    the model stopped right after the block is reached; on the images' device, float32."""
    module = model.get_submodule(block)
    chunks: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:
        chunks.append(t.detach().float().clone())
        raise _Stop

    if which == "input":
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    try:
        with _eval(model):
            for k in range(0, len(images), batch_size):
                try:
                    model(images[k: k + batch_size])
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(chunks)


@torch.no_grad()
def run_block(module: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``module(inputs)`` in eval mode, batch by batch, float32."""
    with _eval(module):
        return torch.cat([module(inputs[k: k + batch_size]).float() for k in range(0, len(inputs), batch_size)])
