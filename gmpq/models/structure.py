"""The structural role of every quantizable layer: depthwise or not, which block it sits in, residual shortcuts.

Figures of a policy mark these roles (the paper observes that shortcut and depthwise layers take different bits).
Read from timm's module layout, the convention its CNN blocks follow:

- a *block* is the nearest ancestor module with a ``has_skip`` attribute (EfficientNet-family blocks:
  MobileNetV2's ``InvertedResidual``, ``DepthwiseSeparableConv`` ...) or a ``downsample``/``shortcut`` attribute
  (ResNet-family ``BasicBlock``/``Bottleneck``, where the attribute is ``None`` for an identity skip);
- the block *has a skip* when its output adds its input back: ``has_skip`` is true, or it is ResNet-style;
- a layer is a *shortcut* layer when it sits on the skip path itself (``<block>.downsample...`` or
  ``<block>.shortcut...``): the projection conv that matches shapes where a residual changes resolution or width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gmpq.models.adapter import quantizable_layers

_SKIP_PATHS = ("downsample", "shortcut")


@dataclass(frozen=True)
class LayerRole:
    """Where one quantizable layer sits in the network.

    Attributes:
        name: module path.
        kind: ``conv``, ``dwconv`` (depthwise: groups == in == out channels), ``gconv`` (other grouped) or ``linear``.
        block: module path of the enclosing residual-style block, ``None`` outside any block (stem, head).
        skip: the enclosing block adds a shortcut (identity or projection) to its output.
        shortcut: the layer is on the shortcut path (a downsample/projection conv).
    """

    name: str
    kind: str
    block: str | None
    skip: bool
    shortcut: bool


def layer_kind(module: nn.Module) -> str:
    """``conv``, ``dwconv`` (depthwise: groups == in == out channels), ``gconv`` (other grouped) or ``linear``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    return "dwconv" if module.groups == module.in_channels == module.out_channels else "gconv"


def _block_of(name: str, modules: dict[str, nn.Module]) -> tuple[str | None, bool]:
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:depth])
        module = modules.get(path)
        if module is None:
            continue
        if hasattr(module, "has_skip"):
            return path, bool(module.has_skip)
        if any(hasattr(module, attr) for attr in _SKIP_PATHS):
            return path, True
    return None, False


def layer_roles(model: nn.Module) -> list[LayerRole]:
    """The :class:`LayerRole` of every quantizable layer of ``model``, in module order."""
    modules = dict(model.named_modules())
    roles = []
    for name, module in quantizable_layers(model).items():
        block, skip = _block_of(name, modules)
        rest = name[len(block) + 1:] if block else ""
        roles.append(LayerRole(name=name, kind=layer_kind(module), block=block, skip=skip,
                               shortcut=bool(block) and rest.split(".")[0] in _SKIP_PATHS))
    return roles
