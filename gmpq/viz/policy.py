"""Figures of mixed-precision policies: per-layer weight and activation bits, one panel per policy.

Like the appendix figures of the GMPQ paper (ResNet18 policies searched on six proxy datasets; MobileNetV2, ResNet18
and ResNet50 searched on CIFAR-10). The x axis is the layer index in module order (stem = 0), labelled with the
module path; each layer has a weight bar and an activation bar. Marked from the model's structure
(:func:`gmpq.models.structure.layer_roles`):

- kept layers (stem, classifier: not searched) in grey; a float (32-bit) kept layer reaches the top, labelled ``fp``;
- depthwise convolutions hatched;
- shortcut (downsample/projection) convolutions with a triangle and a red label;
- layers inside a block that adds a skip connection on a shaded background, with a thin line between blocks.

Panels of the same architecture share the x axis and only the bottom one carries the layer names.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gmpq.errors import GmpqError, PolicyError
from gmpq.models.structure import LayerRole
from gmpq.policy import Policy, as_policy
from gmpq.quant.functional import FLOAT_BITS
from gmpq.viz._render import (
    A_COLOR,
    KEPT_A_COLOR,
    KEPT_W_COLOR,
    W_COLOR,
    figure_format,
    new_figure,
    save_figure,
)

PolicyLike = Policy | str | os.PathLike | dict

STYLES = ("side", "mirror")
SHORTCUT_COLOR = "#c00000"
SKIP_SHADE = "#e9eef6"
PANEL_HEIGHT_IN = 2.1
SLOT_IN = 0.19       # inches of width per layer
MIN_WIDTH_IN = 7.5
MAX_WIDTH_IN = 30.0
MIN_LABEL_SLOT_IN = 0.11  # below this, only every k-th layer is named


@dataclass(frozen=True)
class PolicyLayer:
    """One layer of a plotted policy: its bits and structural role."""

    index: int
    role: LayerRole
    w_bits: int
    a_bits: int
    kept: bool


@lru_cache(maxsize=16)
def _model(arch: str):
    """The float model of ``arch`` (random weights), built once per process."""
    from gmpq.models import create_model

    return create_model(arch, pretrained=False)


@lru_cache(maxsize=16)
def _roles(arch: str) -> tuple[LayerRole, ...]:
    from gmpq.models.structure import layer_roles

    return tuple(layer_roles(_model(arch)))


@lru_cache(maxsize=16)
def _macs(arch: str, input_size: int) -> dict[str, int]:
    from gmpq.complexity import layer_macs

    return layer_macs(_model(arch), input_size)


def _roles_from_names(policy: Policy) -> list[LayerRole]:
    """Fallback for an architecture gmpq cannot build: roles guessed from module paths alone."""
    names = list(policy.layers)
    kept = list(policy.kept)
    order = kept[:1] + names + kept[1:]
    roles = []
    for name in order:
        parts = name.split(".")
        first_num = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        block = None
        if first_num is not None:
            end = first_num
            while end < len(parts) and parts[end].isdigit():
                end += 1
            block = ".".join(parts[:end])
        roles.append(LayerRole(name=name, kind="dwconv" if "dw" in parts[-1] else "conv", block=block, skip=False,
                               shortcut=any(p in ("downsample", "shortcut") for p in parts)))
    return roles


def policy_layers(policy: PolicyLike) -> list[PolicyLayer]:
    """The layers of ``policy`` in module order, with their bits and structural roles.

    Roles come from building ``policy.arch`` (float, random weights); a policy whose layers do not match its
    architecture raises :class:`~gmpq.errors.PolicyError`. For an architecture gmpq cannot build, roles are guessed
    from the module paths, with a warning.
    """
    policy = as_policy(policy)
    try:
        roles = _roles(policy.arch)
    except GmpqError as e:
        warnings.warn(f"cannot build {policy.arch!r} ({e}); marking layer roles from their names only", stacklevel=2)
        roles = tuple(_roles_from_names(policy))
    else:
        policy.validate_layers([r.name for r in roles])
    bits = policy.all_layers()
    return [PolicyLayer(i, r, bits[r.name].w_bits, bits[r.name].a_bits, r.name in policy.kept)
            for i, r in enumerate(roles)]


def searched_bops_g(policy: Policy) -> float | None:
    """The policy's searched-layer BOPs in G: its own ``bops_searched_g``, else sum_l MACs_l * w_l * a_l over the
    searched layers at ``policy.input_size`` (``None`` when gmpq cannot build the architecture)."""
    if policy.bops_searched_g is not None:
        return policy.bops_searched_g
    try:
        macs = _macs(policy.arch, policy.input_size)
    except GmpqError:
        return None
    return sum(macs[name] * b.w_bits * b.a_bits for name, b in policy.layers.items()) / 1e9


def policy_title(policy: Policy) -> str:
    """``arch · proxy · strategy · BOPs searched / total (budget) · mean bits`` from the policy and its provenance."""
    prov = policy.provenance
    parts = [policy.arch]
    proxy = prov.get("proxy_dataset") or prov.get("dataset")
    if proxy:
        parts.append(f"searched on {proxy}")
    if prov.get("strategy"):
        parts.append(str(prov["strategy"]))
    searched = searched_bops_g(policy)
    bops = f"BOPs searched {searched:.2f} G" if searched is not None else "BOPs searched ?"
    if policy.bops_total_g is not None:
        bops += f" / total {policy.bops_total_g:.2f} G"
    budget = prov.get("budget_g")
    if isinstance(budget, (int, float)):
        bops += f" (budget {budget:g} G)"
    parts.append(bops + f" @{policy.input_size}px")
    w, a = policy.mean_bits
    if not math.isnan(w):
        parts.append(f"mean W{w:.2f}/A{a:.2f}")
    return "  ·  ".join(parts)


def _draw_panel(ax, layers: list[PolicyLayer], top: int, style: str, names: bool, label_every: int) -> None:
    n = len(layers)
    # blocks: shade the ones that add a skip, separate consecutive blocks with a thin line
    for p in layers:
        if p.role.skip:
            ax.axvspan(p.index - 0.5, p.index + 0.5, color=SKIP_SHADE, lw=0, zorder=0)
    for prev, cur in zip(layers, layers[1:], strict=False):
        if prev.role.block != cur.role.block:
            ax.axvline(cur.index - 0.5, color="#b0b0b0", lw=0.6, zorder=0.5)

    sign_a = -1 if style == "mirror" else 1
    width = 0.8 if style == "mirror" else 0.42
    off_w, off_a = (0.0, 0.0) if style == "mirror" else (-0.21, 0.21)
    for p in layers:
        hatch = "////" if p.role.kind == "dwconv" else ("\\\\\\\\" if p.role.kind == "gconv" else None)
        for bits, off, sign, color, kept_color in ((p.w_bits, off_w, 1, W_COLOR, KEPT_W_COLOR),
                                                   (p.a_bits, off_a, sign_a, A_COLOR, KEPT_A_COLOR)):
            height = top + 0.45 if bits == FLOAT_BITS else bits
            ax.bar(p.index + off, sign * height, width=width, color=kept_color if p.kept else color,
                   edgecolor="#1a1a1a", linewidth=0.3, hatch=hatch, zorder=2)
            if bits == FLOAT_BITS:
                ax.text(p.index + off, sign * (top + 0.5), "fp", ha="center", va="bottom" if sign > 0 else "top",
                        fontsize=6, color="#404040", zorder=3)
        if p.role.shortcut:
            y = top + 0.65
            ax.plot([p.index], [y], marker="v", color=SHORTCUT_COLOR, markersize=5, zorder=3, clip_on=False)

    levels = sorted({b for p in layers for b in (p.w_bits, p.a_bits) if b != FLOAT_BITS})
    ticks = levels if style == "side" else [-b for b in reversed(levels)] + [0] + levels
    ax.set_yticks(ticks, [str(abs(t)) for t in ticks], fontsize=7)
    ax.set_ylim(-(top + 1.0) if style == "mirror" else 0, top + 1.0)
    ax.grid(axis="y", color="#d0d0d0", lw=0.5, ls=":", zorder=1)
    ax.set_axisbelow(True)
    if style == "mirror":
        ax.axhline(0, color="#1a1a1a", lw=0.6, zorder=2.5)
        ax.set_ylabel("A bits  |  W bits", fontsize=8)
    else:
        ax.set_ylabel("bits", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.tick_params(axis="x", length=2, pad=1)
    shown = [p for p in layers if p.index % label_every == 0 or p.role.shortcut]
    if names:
        ax.set_xticks([p.index for p in shown], [f"{p.role.name}  {p.index}" for p in shown], rotation=90,
                      fontsize=6.5, family="DejaVu Sans Mono")
        for label, p in zip(ax.get_xticklabels(), shown, strict=True):
            if p.role.shortcut:
                label.set_color(SHORTCUT_COLOR)
                label.set_fontweight("bold")
            elif p.kept:
                label.set_color("#606060")
    else:
        ax.set_xticks([p.index for p in shown], [str(p.index) for p in shown], fontsize=6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend_handles(all_layers: list[list[PolicyLayer]], style: str) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    flat = [p for layers in all_layers for p in layers]
    w_label, a_label = ("weight bits (up)", "activation bits (down)") if style == "mirror" else (
        "weight bits", "activation bits")
    handles = [Patch(facecolor=W_COLOR, edgecolor="#1a1a1a", lw=0.3, label=w_label),
               Patch(facecolor=A_COLOR, edgecolor="#1a1a1a", lw=0.3, label=a_label)]
    if any(p.kept for p in flat):
        handles.append(Patch(facecolor=KEPT_W_COLOR, edgecolor="#1a1a1a", lw=0.3,
                             label="kept layer W / A (not searched)"))
    if any(p.role.kind == "dwconv" for p in flat):
        handles.append(Patch(facecolor="white", edgecolor="#1a1a1a", lw=0.3, hatch="////", label="depthwise conv"))
    if any(p.role.kind == "gconv" for p in flat):
        handles.append(Patch(facecolor="white", edgecolor="#1a1a1a", lw=0.3, hatch="\\\\\\\\", label="grouped conv"))
    if any(p.role.shortcut for p in flat):
        handles.append(Line2D([], [], ls="", marker="v", color=SHORTCUT_COLOR, markersize=5,
                              label="shortcut (downsample) conv"))
    if any(p.role.skip for p in flat):
        handles.append(Patch(facecolor=SKIP_SHADE, edgecolor="none", label="block with skip connection"))
    return handles


def plot_policies(
    policies: PolicyLike | Sequence[PolicyLike], out: str | os.PathLike, labels: Sequence[str] | None = None,
    style: str = "side", title: str | None = None,
) -> Path:
    """Draw one panel of per-layer weight/activation bits per policy and write the figure to ``out``.

    Args:
        policies: one or more :class:`~gmpq.Policy` objects, policy dicts or policy JSON paths.
        out: image path (.png, .svg or .pdf); written atomically.
        labels: optional panel titles, one per policy (default: arch, proxy, strategy, BOPs, mean bits).
        style: ``"side"`` (weight and activation bars side by side) or ``"mirror"`` (weights up, activations down).
        title: optional figure title.

    Returns the written path. Panels of the same architecture share the x axis; the figure widens with the
    layer count (about 0.19 in per layer) so that 50+ layer names stay legible.
    """
    figure_format(out)
    if isinstance(policies, (Policy, str, os.PathLike, dict)):
        policies = [policies]
    policies = [as_policy(p) for p in policies]
    if not policies:
        raise PolicyError("no policies to plot; pass at least one policy")
    if style not in STYLES:
        raise PolicyError(f"unknown policy figure style {style!r}; choose one of {', '.join(STYLES)}")
    if labels is not None and len(labels) != len(policies):
        raise PolicyError(f"got {len(labels)} labels for {len(policies)} policies; give one label per policy")

    all_layers = [policy_layers(p) for p in policies]
    keys = [tuple(p.role.name for p in layers) for layers in all_layers]
    # a panel carries layer names unless the next panel shows the very same layers
    names_on = [i == len(keys) - 1 or keys[i + 1] != keys[i] for i in range(len(keys))]
    top = max([b for layers in all_layers for p in layers for b in (p.w_bits, p.a_bits) if b != FLOAT_BITS] or [8])

    n_max = max(len(layers) for layers in all_layers)
    width = min(MAX_WIDTH_IN, max(MIN_WIDTH_IN, 2.2 + SLOT_IN * n_max))
    label_every = max(1, math.ceil(MIN_LABEL_SLOT_IN / ((width - 2.2) / n_max)))
    longest = max(len(p.role.name) for layers in all_layers for p in layers) + 4
    name_height = longest * 6.5 * 0.62 / 72 + 0.15
    panel_h = PANEL_HEIGHT_IN * (1.6 if style == "mirror" else 1.0)
    height = sum(panel_h + (name_height if on else 0.25) for on in names_on) + 0.45 + (0.3 if title else 0)
    fig = new_figure(width, height)
    axes = fig.subplots(len(policies), 1, squeeze=False)[:, 0]
    for i, (ax, policy, layers) in enumerate(zip(axes, policies, all_layers, strict=True)):
        _draw_panel(ax, layers, top, style, names_on[i], label_every)
        ax.set_title(labels[i] if labels is not None else policy_title(policy), fontsize=8.5, loc="left")
    handles = _legend_handles(all_layers, style)
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), max(3, int(width / 1.9))),
               fontsize=7.5, frameon=False, title=title, title_fontsize=10)
    return save_figure(fig, out)
