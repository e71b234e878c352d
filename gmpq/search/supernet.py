"""The supernet: a float model whose searched layers become mixed-precision layers, and its search space.

:func:`build_supernet` swaps every searched Conv2d/Linear (all but the stem and classifier, see
:func:`gmpq.models.searchable_layer_names`) for a :class:`~gmpq.quant.MixedConv2d` / :class:`~gmpq.quant.MixedLinear`
with the float weights, and every kept layer for a fixed-bit layer at ``kept_bits``. The :class:`SearchSpace`
records what a decoded policy needs: the searched and kept layers, the candidate weight bits and activation bits (two
lists: e.g. weights over {2, 3, 4, 6}, activations over {3, 4, 6, 8}) and each layer's MACs *at the
deployment resolution of the deployment architecture* (e.g. ``mobilenetv2_050`` at 224 for a search of
``mobilenetv2_050_cifar`` at 32), which is where the BOPs budget is stated, and the BOPs convention the budget is
stated in (:data:`gmpq.complexity.BOPS_PRESETS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmpq.complexity import GIGA, KEPT8_BITS, BopsPreset, check_bops_preset, layer_macs
from gmpq.errors import ModelError
from gmpq.models import (
    base_arch,
    create_model,
    quantizable_layers,
    replace_layers,
    searchable_layer_names,
)
from gmpq.policy import LayerBits, Policy
from gmpq.quant import (
    FLOAT_BITS,
    MixedConv2d,
    MixedLinear,
    MixedMixin,
    QuantMixin,
    check_bits,
    conversion_for,
    mixed_layers,
    to_mixed,
    to_quantized,
)
from gmpq.quant.mixed import check_candidates


@dataclass(frozen=True)
class SearchSpace:
    """What is searched and what it costs at deployment.

    Attributes:
        arch: the searched model's architecture (e.g. ``resnet18_cifar``).
        deploy_arch / deploy_input_size: where BOPs are counted (e.g. ``resnet18`` at 224).
        layers: searched layer paths, in model order; ``macs[i]`` is layer ``layers[i]``'s MACs at deployment.
        kept: kept layer paths and ``kept_macs`` their MACs at deployment; they run at ``kept_bits``.
        w_bits / a_bits: candidate weight and activation bit widths (sorted; equal when the search shares one list).
        kept_bits: bits of the kept layers.
        bops_preset: the BOPs convention of budgets in this space: the budgeted BOPs of a policy are its searched
            BOPs plus :attr:`fixed_bops` (nothing, the kept layers at 8/8 bits, or at ``kept_bits``).
    """

    arch: str
    deploy_arch: str
    deploy_input_size: int
    layers: tuple[str, ...]
    macs: tuple[int, ...]
    kept: tuple[str, ...]
    kept_macs: tuple[int, ...]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    kept_bits: int
    bops_preset: BopsPreset = "searched"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kept_bops_g(self) -> float:
        """BOPs (G) of the kept layers at ``kept_bits``."""
        return sum(self.kept_macs) * self.kept_bits * self.kept_bits / GIGA

    @property
    def fixed_bops(self) -> int:
        """BOPs that ``bops_preset`` adds to the searched layers' (the same for every policy of the space)."""
        bits = {"searched": 0, "kept8": KEPT8_BITS, "all": self.kept_bits}[self.bops_preset]
        return sum(self.kept_macs) * bits * bits

    def budgeted_bops_g(self, choices: Mapping[str, tuple[int, int]]) -> float:
        """BOPs (G) of ``choices`` under the space's ``bops_preset``: what a budget is compared with."""
        return self.searched_bops_g(choices) + self.fixed_bops / GIGA

    def macs_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.macs, dtype=torch.float64, device=device)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every candidate (w_bits, a_bits) pair, weight-major: pair ``i * len(a_bits) + j`` is
        ``(w_bits[i], a_bits[j])``, the order of a cost table's flattened last two axes."""
        return [(w, a) for w in self.w_bits for a in self.a_bits]

    def searched_bops_g(self, choices: Mapping[str, tuple[int, int]]) -> float:
        """Exact searched-layer BOPs (G) of ``choices`` = {layer: (w_bits, a_bits)}."""
        return sum(m * choices[n][0] * choices[n][1] for n, m in zip(self.layers, self.macs, strict=True)) / GIGA

    def policy(self, choices: Mapping[str, tuple[int, int]], provenance: Mapping[str, Any] | None = None) -> Policy:
        """The :class:`~gmpq.policy.Policy` of ``choices`` with its searched and total BOPs at deployment."""
        missing = [n for n in self.layers if n not in choices]
        if missing:
            raise ModelError(f"no bits chosen for searched layer {missing[0]!r}")
        searched = self.searched_bops_g(choices)
        return Policy(
            arch=self.deploy_arch, input_size=self.deploy_input_size, candidate_w_bits=self.w_bits,
            candidate_a_bits=self.a_bits,
            layers={n: LayerBits(*choices[n]) for n in self.layers},
            kept={n: LayerBits(self.kept_bits, self.kept_bits) for n in self.kept},
            bops_searched_g=searched, bops_total_g=searched + self.kept_bops_g,
            provenance={"bops_preset": self.bops_preset, **(provenance or {})},
        )


def deployment_macs(deploy_arch: str, input_size: int, num_classes: int) -> dict[str, int]:
    """MACs of every quantizable layer of ``deploy_arch`` at ``input_size`` (a float model built for counting)."""
    return layer_macs(create_model(deploy_arch, num_classes=num_classes), input_size)


def search_space(model: nn.Module, w_bits: Sequence[int], a_bits: Sequence[int], kept_bits: int,
                 deploy_macs: Mapping[str, int], deploy_arch: str, deploy_input_size: int,
                 layers: Iterable[str] | None = None, bops_preset: BopsPreset = "searched") -> SearchSpace:
    """The :class:`SearchSpace` of float ``model``: searched ``layers`` (default: all but stem and classifier) over
    candidate weight bits ``w_bits`` and activation bits ``a_bits``, budgets counted under ``bops_preset``.

    ``deploy_macs`` (from :func:`deployment_macs`) must name exactly the model's quantizable layers.
    """
    searched = list(layers) if layers is not None else searchable_layer_names(model)
    all_layers = list(quantizable_layers(model))
    unknown = [n for n in searched if n not in all_layers]
    if unknown:
        raise ModelError(f"searched layer {unknown[0]!r} is not a quantizable layer of the model")
    kept = [n for n in all_layers if n not in set(searched)]
    if not searched:
        raise ModelError("the model has no searchable layer (every Conv2d/Linear is kept)")
    if set(all_layers) != set(deploy_macs):
        odd = sorted(set(all_layers) ^ set(deploy_macs))
        raise ModelError(f"deploy arch {deploy_arch!r} does not have the quantizable layers of the searched model "
                         f"(differing: {odd[:3]}); set model.deploy_arch to an architecture with the same module "
                         f"paths (e.g. {base_arch(getattr(model, 'gmpq_arch', deploy_arch))!r})")
    check_bits(kept_bits)
    return SearchSpace(
        arch=getattr(model, "gmpq_arch", type(model).__name__), deploy_arch=deploy_arch,
        deploy_input_size=deploy_input_size, layers=tuple(searched), macs=tuple(int(deploy_macs[n]) for n in searched),
        kept=tuple(kept), kept_macs=tuple(int(deploy_macs[n]) for n in kept), w_bits=check_candidates(w_bits),
        a_bits=check_candidates(a_bits), kept_bits=kept_bits, bops_preset=check_bops_preset(bops_preset),
    )


def build_supernet(model: nn.Module, space: SearchSpace) -> nn.Module:
    """Make ``model`` (float) the supernet of ``space``, in place: searched layers mixed, kept ones fixed-bit, each
    on its float layer's device and dtype and computing what that layer computed (:mod:`gmpq.quant.conversion`)."""
    layers = quantizable_layers(model)
    for name in (*space.layers, *space.kept):
        module = layers.get(name)
        if module is None or isinstance(module, (QuantMixin, MixedMixin)):
            raise ModelError(f"layer {name!r} is not a float Conv2d/Linear of the model; build the supernet from a "
                             f"float model")
        conversion_for(module, name)  # a layer type without a conversion is refused before anything is replaced
    replace_layers(model, lambda n, m: to_mixed(m, space.w_bits, space.a_bits, n), list(space.layers))
    if space.kept_bits != FLOAT_BITS:
        replace_layers(model, lambda n, m: to_quantized(m, space.kept_bits, space.kept_bits, n), list(space.kept))
    model.gmpq_search_space = space
    return model


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture logits of every mixed layer (``alpha_w``, ``alpha_a``), in layer order."""
    return [p for m in mixed_layers(model).values() for p in (m.alpha_w, m.alpha_a)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not an architecture logit (weights, BN, quantizer steps/clips)."""
    alphas = {id(p) for p in alpha_parameters(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def weight_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of the weights (no alphas): decay on conv/linear weights only, none on biases, norms,
    quantizer steps and clips."""
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = weight_parameters(model)
    decay = [p for p in params if id(p) in weights]
    rest = [p for p in params if id(p) not in weights]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def layer_probabilities(model: nn.Module, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, K_w]`` weight and ``[L, K_a]`` activation bit probabilities of the searched layers (differentiable)."""
    layers = mixed_layers(model)
    probs = [layers[n].probs() for n in space.layers]
    return torch.stack([p[0] for p in probs]), torch.stack([p[1] for p in probs])


def layer_log_probabilities(model: nn.Module, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, K_w]`` ``log_softmax(alpha_w)`` and ``[L, K_a]`` ``log_softmax(alpha_a)`` of the searched layers (finite
    for any finite alphas, unlike the log of underflowed probabilities)."""
    layers = mixed_layers(model)
    return (torch.stack([torch.log_softmax(layers[n].alpha_w, 0) for n in space.layers]),
            torch.stack([torch.log_softmax(layers[n].alpha_a, 0) for n in space.layers]))


def alpha_entropy(w_probs: torch.Tensor, a_probs: torch.Tensor) -> float:
    """Mean over searched layers of (H(p_w) + H(p_a)) / 2, in nats ((log K_w + log K_a) / 2 for uniform
    probabilities, 0 one-hot)."""

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(1)

    return float(0.5 * (entropy(w_probs) + entropy(a_probs)).mean())


def alpha_table(model: nn.Module, space: SearchSpace) -> dict[str, dict[str, list[float]]]:
    """``{layer: {"alpha_w", "alpha_a", "w", "a"}}``: logits and probabilities of every searched layer (``w`` over
    ``space.w_bits``, ``a`` over ``space.a_bits``)."""
    out = {}
    layers = mixed_layers(model)
    for name in space.layers:
        m = layers[name]
        p_w, p_a = m.probs()
        out[name] = {"alpha_w": m.alpha_w.detach().cpu().tolist(), "alpha_a": m.alpha_a.detach().cpu().tolist(),
                     "w": p_w.detach().cpu().tolist(), "a": p_a.detach().cpu().tolist()}
    return out


def fix_supernet(model: nn.Module, choices: Mapping[str, tuple[int, int]]) -> nn.Module:
    """Replace every mixed layer of ``model`` by the fixed-bit layer of its choice (steps and clips kept), in place."""

    def make(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, (MixedConv2d, MixedLinear)):
            raise ModelError(f"layer {name!r} is not a mixed layer")
        if name not in choices:
            raise ModelError(f"no bits chosen for mixed layer {name!r}")
        return module.to_fixed(*choices[name])

    return replace_layers(model, make, list(mixed_layers(model)))
