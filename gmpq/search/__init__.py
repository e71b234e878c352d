"""Layer 4 — the mixed-precision search: supernet, attribution, losses, budget decoding, strategies; and the stage.

* :mod:`gmpq.search.supernet` — ``build_supernet`` (mixed searched layers, fixed-bit kept ones), ``SearchSpace``
  (layers, candidate bits, MACs at the deployment resolution), alpha/weight parameter split.
* :mod:`gmpq.search.attribution` — Grad-CAM of the predicted class: closed form for GAP + linear heads, autograd
  fallback (``AttributionModel``).
* :mod:`gmpq.search.losses` — attribution rank-preservation loss, capacity-aware p, expected BOPs and the
  budget-steering penalty (``SearchObjective``).
* :mod:`gmpq.search.budget` — decoding under the budget: the exact minimum-cost policy of a cost table (ILP), the
  best uniform pair, a uniform random draw from the window; feasibility checks (``BudgetError``).
* :mod:`gmpq.search.sensitivity` — HAWQ: Hutchinson Hessian traces per layer, quantization errors, the cost table.
* :mod:`gmpq.search.orthogonality` — OMPQ: feature Gram matrices, orthogonality (linear CKA), layer importances.
* :mod:`gmpq.search.strategies` — ``gmpq`` / ``edmips`` (supernet) and ``hawq`` / ``ompq`` / ``uniform`` / ``random``
  (score + decode).
* :mod:`gmpq.search.loop` — ``search(recipe)``, the stage behind ``gmpq search``. It trains the supernet with
  :mod:`gmpq.train`'s accelerate engine on :mod:`gmpq.data`'s loaders, so it sits above them (layer 6, beside the
  other stages) and is imported lazily: ``import gmpq.search`` and the modules above load neither train nor data.

The package itself is callable: ``gmpq.search(recipe)`` is ``gmpq.search.search(recipe)``, and its submodules stay
reachable as ``gmpq.search.budget`` etc.
"""

import sys
import types

from gmpq.search.attribution import AttributionModel, cam_from_weights, class_weights, linear_head
from gmpq.search.budget import (
    LOWER_FRACTION,
    Decoded,
    bops_range,
    check_budget,
    decode,
    decode_costs,
    decode_uniform,
    sample_in_window,
)
from gmpq.search.losses import (
    BudgetPenalty,
    LossTerms,
    SearchObjective,
    attribution_loss,
    capacity_p,
    expected_bits,
    expected_bops_g,
)
from gmpq.search.strategies import STRATEGIES, Scores, ScoreSettings, ScoreStrategy, Strategy, get_strategy
from gmpq.search.supernet import (
    SearchSpace,
    alpha_parameters,
    alpha_table,
    build_supernet,
    deployment_macs,
    fix_supernet,
    layer_log_probabilities,
    layer_probabilities,
    search_space,
    weight_param_groups,
    weight_parameters,
)

__all__ = [
    "LOWER_FRACTION", "STRATEGIES", "AttributionModel", "BudgetPenalty", "Decoded", "LossTerms", "ScoreSettings",
    "ScoreStrategy", "Scores", "SearchObjective", "SearchResult", "SearchSpace", "Strategy", "alpha_entropy",
    "alpha_parameters", "alpha_table", "attribution_loss", "bops_range", "build_supernet", "cam_from_weights",
    "capacity_p", "check_budget", "class_weights", "decode", "decode_costs", "decode_uniform", "deployment_macs",
    "expected_bits", "expected_bops_g", "fix_supernet", "get_strategy", "layer_log_probabilities",
    "layer_probabilities", "linear_head", "reestimate_batchnorm", "sample_in_window", "search", "search_space",
    "weight_param_groups", "weight_parameters",
]


_STAGE_NAMES = ("SearchResult", "alpha_entropy", "reestimate_batchnorm", "search")


def __getattr__(name: str):  # noqa: ANN202 — PEP 562: the stage's names load gmpq.search.loop on first use
    if name in _STAGE_NAMES:
        from gmpq.search import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """This package's module type: calling it runs :func:`gmpq.search.loop.search`."""

    def __call__(self, recipe, attribution="auto"):  # noqa: ANN001 — same signature as loop.search
        from gmpq.search.loop import search

        return search(recipe, attribution)


sys.modules[__name__].__class__ = _CallableModule
