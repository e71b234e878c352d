"""Search strategies behind one interface, so that they compare on equal terms (same data, budget, decoding).

Two families, both ending in :mod:`gmpq.search.budget`'s decoders under the same budget and window:

* Supernet strategies train the architecture logits and decode their log-probabilities exactly:

  - ``gmpq`` — the supernet trained on CE + lambda_attr * attribution loss + budget steering.
  - ``edmips`` — the same with ``lambda_attr = 0`` (EdMIPS with a budget instead of a hand-tuned complexity decay).

* Score strategies (*score + decode*, :class:`ScoreStrategy`) need no training: ``score`` turns the float model and
  a few proxy batches into a per-layer, per-candidate cost table ``costs[l, i, j]`` (layer ``l`` at ``w_bits[i]``
  weight and ``a_bits[j]`` activation bits) and ``decode`` picks the policy, by default the exact minimum-cost policy
  inside [97 %, 100 %] of the budget (:func:`~gmpq.search.budget.decode_costs`). A new sensitivity method is one
  small subclass:

  - ``hawq`` — HAWQ-V2/V3: Hutchinson Hessian traces x quantization perturbation
    (:mod:`gmpq.search.sensitivity`), weights and activations.
  - ``ompq`` — OMPQ: network orthogonality of the float model's features (:mod:`gmpq.search.orthogonality`),
    one bit width per layer (among the widths both candidate lists hold).
  - ``uniform`` — no preference (a zero table), decoded as the single (w, a) pair for every layer nearest the budget,
    at or below it (``search.uniform_side=below``, the default; need not reach 97 % of the budget) or above it
    (:func:`~gmpq.search.budget.decode_uniform`).
  - ``random`` — no preference either; decoded as a policy drawn uniformly at random from *every* policy inside the
    window (:func:`~gmpq.search.budget.sample_in_window`), seeded by the recipe's seed: the control of a study.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from gmpq.errors import RecipeError
from gmpq.search.budget import Decoded, decode, decode_costs, decode_uniform, sample_in_window
from gmpq.search.orthogonality import ompq_costs
from gmpq.search.sensitivity import Batch, hawq_costs
from gmpq.search.supernet import SearchSpace, layer_log_probabilities


@dataclass(frozen=True)
class ScoreSettings:
    """What the score strategies read from a recipe (``seed``, ``search.hutchinson_samples``, ``search.ompq_beta``,
    ``search.uniform_side``)."""

    seed: int
    hutchinson_samples: int
    ompq_beta: float
    uniform_side: Literal["below", "above"]


@dataclass(frozen=True)
class Scores:
    """A score strategy's output: the ``[L, K_w, K_a]`` cost table the decoder minimises (``+inf`` forbids a pair), what
    it was computed from per layer (``{layer: {name: value}}``, written to ``scores.json``) and strategy-level facts
    (recorded in the policy's provenance and the stage's metrics)."""

    costs: np.ndarray
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self, strategy: str, space: SearchSpace) -> dict[str, Any]:
        """``scores.json``: ``strategy, w_bits, a_bits, facts`` and per layer its ``costs`` (``[i][j]`` for
        ``w_bits[i]`` weight and ``a_bits[j]`` activation bits, ``null`` where forbidden) with what they were computed
        from."""
        return {"strategy": strategy, "w_bits": list(space.w_bits), "a_bits": list(space.a_bits),
                "facts": self.facts, "layers": {
            name: {"costs": [[c if math.isfinite(c) else None for c in row] for row in self.costs[i].tolist()],
                   **self.layers.get(name, {})}
            for i, name in enumerate(space.layers)}}


class Strategy(ABC):
    """A search strategy: its name and what it needs."""

    name: ClassVar[str]
    trains_supernet: ClassVar[bool] = False
    uses_attribution: ClassVar[bool] = False
    #: Whether it reads the float model's weights (else the policy follows from the budget alone).
    needs_float_model: ClassVar[bool] = False

    def lambda_attr(self, requested: float) -> float:
        """The attribution weight this strategy uses given the recipe's ``lambda_attr``."""
        return float(requested) if self.uses_attribution else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SupernetStrategy(Strategy):
    """Trains the supernet's alphas; the policy is the exact decoding of their log-probabilities."""

    trains_supernet = True
    needs_float_model = True

    def decode(self, space: SearchSpace, budget_g: float, model: nn.Module) -> Decoded:
        """The most probable policy of ``model``'s alphas inside the budget window."""
        with torch.no_grad():
            log_w, log_a = layer_log_probabilities(model, space)
            return decode(space, log_w, log_a, budget_g)


class GMPQ(SupernetStrategy):
    """CE + lambda_attr * attribution-rank loss + budget penalty, over the supernet's alphas."""

    name = "gmpq"
    uses_attribution = True


class EdMIPS(SupernetStrategy):
    """CE + budget penalty, over the supernet's alphas."""

    name = "edmips"


class ScoreStrategy(Strategy):
    """Score + decode: a per-layer, per-candidate cost table, then the exact budget decoder (overridable)."""

    #: Whether ``score`` reads labelled proxy batches (``search.score_batches`` of them).
    reads_batches: ClassVar[bool] = False

    @abstractmethod
    def score(self, model: nn.Module | None, batches: Sequence[Batch], space: SearchSpace,
              settings: ScoreSettings) -> Scores:
        """The cost table of ``space`` (``model``: the float network, ``None`` unless :attr:`needs_float_model`;
        ``batches``: ``(images, labels)`` on the model's device, empty unless :attr:`reads_batches`)."""

    def decode(self, space: SearchSpace, scores: Scores, budget_g: float, settings: ScoreSettings) -> Decoded:
        """The minimum-cost policy inside the budget window (:func:`~gmpq.search.budget.decode_costs`)."""
        return decode_costs(space, scores.costs, budget_g)


def _zero_table(space: SearchSpace) -> np.ndarray:
    return np.zeros((len(space.layers), len(space.w_bits), len(space.a_bits)))


class Uniform(ScoreStrategy):
    """No preference; the one (w, a) pair for every layer nearest the budget from ``settings.uniform_side``: the
    most BOPs that fit (``below``), or the fewest above it (``above``, a study's second uniform neighbour)."""

    name = "uniform"

    def score(self, model: nn.Module | None, batches: Sequence[Batch], space: SearchSpace,
              settings: ScoreSettings) -> Scores:
        return Scores(_zero_table(space))

    def decode(self, space: SearchSpace, scores: Scores, budget_g: float, settings: ScoreSettings) -> Decoded:
        return decode_uniform(space, budget_g, settings.uniform_side)


class Random(ScoreStrategy):
    """No preference; a policy drawn uniformly from all policies inside the budget window, seeded by ``seed``."""

    name = "random"

    def score(self, model: nn.Module | None, batches: Sequence[Batch], space: SearchSpace,
              settings: ScoreSettings) -> Scores:
        return Scores(_zero_table(space), facts={"distribution": "uniform over all policies in the window",
                                                 "random_seed": settings.seed})

    def decode(self, space: SearchSpace, scores: Scores, budget_g: float, settings: ScoreSettings) -> Decoded:
        return sample_in_window(space, budget_g, np.random.default_rng(settings.seed))[0]


class HAWQ(ScoreStrategy):
    """``sum_l tr(H_W,l)/n * ||Q(W_l) - W_l||^2 + tr(H_x,l)/n * ||Q(x_l) - x_l||^2`` (:mod:`~gmpq.search.sensitivity`)."""

    name = "hawq"
    needs_float_model = True
    reads_batches = True

    def score(self, model: nn.Module | None, batches: Sequence[Batch], space: SearchSpace,
              settings: ScoreSettings) -> Scores:
        generator = torch.Generator().manual_seed(settings.seed)
        costs, traces, mse_w, mse_x = hawq_costs(_require(model, self), batches, space.layers, space.w_bits,
                                                 space.a_bits, settings.hutchinson_samples, generator)
        layers = {n: {"trace_w": float(traces.weight[i]), "trace_w_stderr": _number(traces.weight_stderr[i]),
                      "trace_x": float(traces.activation[i]), "trace_x_stderr": _number(traces.activation_stderr[i]),
                      "mse_w": mse_w[i].tolist(), "mse_x": mse_x[i].tolist()}
                  for i, n in enumerate(space.layers)}
        images = sum(int(x.shape[0]) for x, _ in batches)
        return Scores(costs, layers, {"hutchinson_samples": traces.samples, "score_batches": traces.batches,
                                      "score_images": images, "random_seed": settings.seed})


class OMPQ(ScoreStrategy):
    """Maximise ``sum_l c_l * b_l`` with ``w_l = a_l = b_l`` (a width both candidate lists hold), ``c_l`` from the
    orthogonality of the float model's features (:mod:`~gmpq.search.orthogonality`)."""

    name = "ompq"
    needs_float_model = True
    reads_batches = True

    def score(self, model: nn.Module | None, batches: Sequence[Batch], space: SearchSpace,
              settings: ScoreSettings) -> Scores:
        if not set(space.w_bits) & set(space.a_bits):
            raise RecipeError(f"ompq gives a layer's weights and activations one bit width, but the candidate weight "
                              f"bits {list(space.w_bits)} and activation bits {list(space.a_bits)} share none; let "
                              f"search.w_bits and search.a_bits overlap")
        images = torch.cat([x for x, _ in batches])
        costs, facts = ompq_costs(_require(model, self), images, space.layers, space.w_bits, space.a_bits,
                                  settings.ompq_beta)
        layers = {n: {key: values[i].item() for key, values in facts.items()} for i, n in enumerate(space.layers)}
        return Scores(costs, layers, {"ompq_beta": settings.ompq_beta, "score_images": int(images.shape[0])})


def _number(value: float) -> float | None:
    """``value``, or ``None`` where it is not finite (a standard error from a single probe): JSON has no NaN."""
    return float(value) if np.isfinite(value) else None


def _require(model: nn.Module | None, strategy: Strategy) -> nn.Module:
    if model is None:
        raise ValueError(f"strategy {strategy.name!r} scores a float model; pass it")
    return model


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (GMPQ(), EdMIPS(), HAWQ(), OMPQ(), Uniform(), Random())}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name raises :class:`~gmpq.errors.RecipeError`."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise RecipeError(f"unknown search.strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
