"""Layer 7 — the mixed-precision search core: supernet, attribution, losses, budget decoding, strategies.

* :mod:`gmpq.search.supernet` — ``build_supernet`` (mixed searched layers, fixed-bit kept ones), ``SearchSpace``
  (layers, candidate weight and activation bits, MACs at the deployment resolution), alpha/weight parameter split,
  bit probabilities.
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

The core trains nothing itself and imports neither the training loop nor the data: the search *stage*
(:mod:`gmpq.stages.searching`) trains the supernet with :func:`gmpq.train.fit`. ``gmpq.search`` is also callable:
``gmpq.search(recipe)`` runs that stage (the package :mod:`gmpq` makes it so).
"""

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
    alpha_entropy,
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
    "ScoreStrategy", "Scores", "SearchObjective", "SearchSpace", "Strategy", "alpha_entropy", "alpha_parameters",
    "alpha_table", "attribution_loss", "bops_range", "build_supernet", "cam_from_weights", "capacity_p",
    "check_budget", "class_weights", "decode", "decode_costs", "decode_uniform", "deployment_macs", "expected_bits",
    "expected_bops_g", "fix_supernet", "get_strategy", "layer_log_probabilities", "layer_probabilities",
    "linear_head", "sample_in_window", "search_space", "weight_param_groups", "weight_parameters",
]
