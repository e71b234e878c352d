"""Decoding a policy under a BOPs budget: the exact minimum-cost decoder, the uniform pair, a uniform random draw.

Every strategy ends here. A strategy states a *cost table* ``C[l, i, j]`` (shape ``[L, K_w, K_a]``): what putting
searched layer ``l`` at ``w_bits[i]`` weight bits and ``a_bits[j]`` activation bits costs it (``-log p`` of a
trained supernet, a Hessian sensitivity, a negated importance; ``+inf`` forbids the pair). The two candidate lists may
differ (e.g. weights over {2, 3, 4, 6}, activations over {3, 4, 6, 8}). :func:`decode_costs` solves the integer
programme (a multiple-choice knapsack with a lower and an upper capacity)::

    minimise    sum_l C[l, w_l, a_l]
    subject to  f * B <= F + sum_l MACs_l * w_l * a_l <= B,     w_l in w_bits, a_l in a_bits

with ``B`` the budget in BOPs (deployment resolution), ``F`` the BOPs the space's preset adds to the searched layers
(:attr:`SearchSpace.fixed_bops`: 0 for ``searched``) and ``f = 0.97``, solved exactly with HiGHS
(:func:`scipy.optimize.milp`) over binary variables x[l, i, j] (one (w, a) pair per layer) and verified in integer
arithmetic. The window keeps the policy from wasting the budget: the decoded BOPs always lie in [97%, 100%] of it.
:func:`decode` is the same for the log-probabilities of a supernet (cost = -log p_w - log p_a).

Two decoders pick among policies that a strategy scores all alike: :func:`decode_uniform` (the best single (w, a)
pair for every layer) and :func:`sample_in_window` (a policy drawn uniformly at random from all those inside the
window).

A budget below the all-minimum-bits policy (every layer at min(w_bits) / min(a_bits)), above the all-maximum one
(max(w_bits) / max(a_bits): nothing would be searched) or — in rare tiny spaces — with no policy inside the window
raises :class:`~gmpq.errors.BudgetError` with the nearest feasible budget,
before any training (:func:`check_budget`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, brentq, milp

from gmpq.complexity import BOPS_PRESETS, GIGA
from gmpq.errors import BudgetError
from gmpq.policy import describe_candidates
from gmpq.search.supernet import SearchSpace

#: Decoded BOPs are at least this fraction of the budget.
LOWER_FRACTION = 0.97
#: :func:`sample_in_window` gives up after this many proposals (each one a whole policy).
MAX_RANDOM_DRAWS = 20_000_000


@dataclass(frozen=True)
class Decoded:
    """A decoded policy: ``{layer: (w_bits, a_bits)}``, its searched BOPs (G) and its summed cost (0 for the
    uniform and random decoders; ``-log p`` of the policy for a supernet's alphas)."""

    choices: dict[str, tuple[int, int]]
    bops_g: float
    cost: float


def bops_range(space: SearchSpace) -> tuple[float, float]:
    """BOPs (G, under the space's ``bops_preset``) of the all-minimum-bits policy (``sum MACs * min(w_bits) *
    min(a_bits)``) and the all-maximum-bits one (``max(w_bits) * max(a_bits)``)."""
    total = sum(space.macs)
    return ((total * min(space.w_bits) * min(space.a_bits) + space.fixed_bops) / GIGA,
            (total * max(space.w_bits) * max(space.a_bits) + space.fixed_bops) / GIGA)


def check_budget(space: SearchSpace, budget_g: float, lower_fraction: float = LOWER_FRACTION) -> None:
    """Raise :class:`BudgetError` unless some policy has BOPs in [lower_fraction * B, B]."""
    if not (isinstance(budget_g, (int, float)) and np.isfinite(budget_g) and budget_g > 0):
        raise BudgetError(f"the BOPs budget must be a positive number of GBOPs, got {budget_g!r}")
    lo, hi = bops_range(space)
    where = f"{space.deploy_arch} at {space.deploy_input_size}x{space.deploy_input_size}{_preset_note(space)}"
    candidates = describe_candidates(space.w_bits, space.a_bits)
    if budget_g < lo:
        raise BudgetError(
            f"BOPs budget {budget_g:g} G is infeasible: with {candidates} the smallest policy (every searched layer "
            f"at {min(space.w_bits)}/{min(space.a_bits)} bits) costs {lo:.4f} GBOPs on {where}; the smallest "
            f"feasible budget is search.budget_g={_round_up(lo)}")
    if hi < lower_fraction * budget_g:
        raise BudgetError(
            f"BOPs budget {budget_g:g} G is above what the {candidates} can use: the largest policy (every searched "
            f"layer at {max(space.w_bits)}/{max(space.a_bits)} bits) costs {hi:.4f} GBOPs on {where}, so there is "
            f"nothing to search; use search.budget_g={_round_up(hi)} (that policy) or add larger candidate bits "
            f"(search.bits, search.w_bits, search.a_bits)")
    zeros = np.zeros((len(space.layers), len(space.w_bits), len(space.a_bits)))
    if _solve(space, zeros, budget_g, lower_fraction) is None:
        raise BudgetError(
            f"no policy over {candidates} has BOPs within [{lower_fraction:.0%}, 100%] of the budget {budget_g:g} G "
            f"on {where}; {_nearest(space, zeros, budget_g)}")


def decode_costs(space: SearchSpace, costs: torch.Tensor | np.ndarray, budget_g: float,
                 lower_fraction: float = LOWER_FRACTION) -> Decoded:
    """The minimum-cost policy with BOPs in [lower_fraction * B, B] (see the module docstring).

    ``costs`` is ``[L, K_w, K_a]``: ``costs[l, i, j]`` of searched layer ``space.layers[l]`` at ``space.w_bits[i]``
    weight and ``space.a_bits[j]`` activation bits; ``+inf`` forbids a pair. The programme is solved on costs shifted
    to 0 per layer and scaled to [0, 1] (the same optimum, solver tolerances that do not depend on the costs' units);
    the returned ``cost`` is in the table's own units.
    """
    table = _as_array(costs)
    shape = (len(space.layers), len(space.w_bits), len(space.a_bits))
    if table.shape != shape:
        raise ValueError(f"the cost table must have shape {shape} (layers, weight bits, activation bits), "
                         f"got {table.shape}")
    if np.isnan(table).any() or np.isneginf(table).any():
        raise ValueError("the cost table holds NaN or -inf (a diverged score or architecture parameters?); "
                         "lower search.lr_alpha or check the float model")
    if np.isinf(table).all(axis=(1, 2)).any():
        layer = space.layers[int(np.isinf(table).all(axis=(1, 2)).argmax())]
        raise ValueError(f"the cost table forbids every (w, a) pair of layer {layer!r}")
    choices = _solve(space, _normalised(table), budget_g, lower_fraction)
    if choices is None:
        check_budget(space, budget_g, lower_fraction)  # raises the explanatory error when the budget itself is bad
        raise BudgetError(
            f"no policy with the (w, a) pairs this strategy allows has BOPs within [{lower_fraction:.0%}, 100%] of "
            f"the budget {budget_g:g} G{_preset_note(space)}; {_nearest(space, table, budget_g)}")
    w_index = {b: i for i, b in enumerate(space.w_bits)}
    a_index = {b: j for j, b in enumerate(space.a_bits)}
    cost = sum(float(table[layer, w_index[choices[n][0]], a_index[choices[n][1]]])
               for layer, n in enumerate(space.layers))
    return Decoded(choices, space.searched_bops_g(choices), cost)


def decode(space: SearchSpace, log_w: torch.Tensor | np.ndarray, log_a: torch.Tensor | np.ndarray, budget_g: float,
           lower_fraction: float = LOWER_FRACTION) -> Decoded:
    """The most probable policy with BOPs in [lower_fraction * B, B]: :func:`decode_costs` of the cost table
    ``-log p_w,l(i) - log p_a,l(j)``; the returned ``cost`` is minus the policy's log-probability.

    ``log_w`` and ``log_a`` are ``[L, K_w]`` and ``[L, K_a]`` log-probabilities (rows of ``log_softmax(alpha)``) of
    the searched layers in ``space.layers`` order.
    """
    lw, la = _as_array(log_w), _as_array(log_a)
    shapes = (len(space.layers), len(space.w_bits)), (len(space.layers), len(space.a_bits))
    if (lw.shape, la.shape) != shapes:
        raise ValueError(f"log-probabilities must have shapes {shapes[0]} (weights) and {shapes[1]} (activations), "
                         f"got {lw.shape} and {la.shape}")
    if not (np.isfinite(lw).all() and np.isfinite(la).all()):
        raise ValueError("the log-probabilities to decode are not all finite (diverged architecture parameters?); "
                         "lower search.lr_alpha")
    return decode_costs(space, -(lw[:, :, None] + la[:, None, :]), budget_g, lower_fraction)


def decode_uniform(space: SearchSpace, budget_g: float, side: str = "below") -> Decoded:
    """The single (w, a) pair (``w`` in ``space.w_bits``, ``a`` in ``space.a_bits``) for every searched layer nearest
    the budget from ``side``.

    ``below``: the pair with the most BOPs that fits the budget; ``above``: the pair with the fewest BOPs that
    exceeds it. Ties: the more balanced pair, then more activation bits. Uniform policies are coarse, so the policy
    below need not reach 97 % of the budget: a comparison with mixed policies must report both uniform neighbours
    with their BOPs. Raises :class:`BudgetError` when no uniform policy lies on that side.
    """
    if side not in ("below", "above"):
        raise ValueError(f"side must be 'below' or 'above', got {side!r}")
    total = sum(space.macs)

    def balance(pair: tuple[int, int]) -> tuple[int, int]:
        return min(pair), pair[1]

    pairs = space.pairs
    if side == "below":
        fits = [p for p in pairs if total * p[0] * p[1] + space.fixed_bops <= budget_g * GIGA]
        if not fits:
            check_budget(space, budget_g)
        w, a = max(fits, key=lambda p: (p[0] * p[1], *balance(p)))
    else:
        over = [p for p in pairs if total * p[0] * p[1] + space.fixed_bops > budget_g * GIGA]
        if not over:
            raise BudgetError(f"no uniform policy over {describe_candidates(space.w_bits, space.a_bits)} costs more "
                              f"than the budget {budget_g:g} G on {space.deploy_arch}: the largest costs "
                              f"{bops_range(space)[1]:.4f} GBOPs; use search.uniform_side=below")
        w, a = min(over, key=lambda p: (p[0] * p[1], -min(p), -p[1]))
    choices = {n: (w, a) for n in space.layers}
    return Decoded(choices, space.searched_bops_g(choices), 0.0)


def sample_in_window(space: SearchSpace, budget_g: float, rng: np.random.Generator, count: int = 1,
                     lower_fraction: float = LOWER_FRACTION, chunk: int = 4096) -> list[Decoded]:
    """``count`` policies drawn independently and uniformly at random from every policy (any candidate (w, a) pair
    of ``space.pairs`` per searched layer) whose BOPs lie in [lower_fraction * B, B].

    Exact rejection sampling from an exponentially tilted proposal: each layer independently takes pair ``p`` with
    probability proportional to ``exp(lam * bops_l(p) / B)``, so a whole policy is proposed with probability
    ``exp(lam * S / B) / Z`` (``S`` its searched BOPs), and a proposal inside the window is kept with probability
    ``exp(-lam * (S - S_ref) / B)`` (``S_ref`` the window end nearest to where the tilt pushes, so that this is at
    most 1). Every policy of the window is then kept with the same probability: the draws are uniform over the
    window. ``lam`` is the tilt whose expected BOPs are the window's centre, which makes proposals land in it often.
    Deterministic for a given ``rng`` state. Raises :class:`BudgetError` when the window is empty, or when
    :data:`MAX_RANDOM_DRAWS` proposals gave too few policies (a window reached by very few policies).
    """
    check_budget(space, budget_g, lower_fraction)
    pairs = space.pairs
    pair_bits = np.array([w * a for w, a in pairs], dtype=np.int64)
    bops = np.asarray(space.macs, dtype=np.int64)[:, None] * pair_bits[None, :]  # [L, P] exact integers
    lo = lower_fraction * budget_g * GIGA - space.fixed_bops
    hi = budget_g * GIGA - space.fixed_bops
    scaled = bops / (budget_g * GIGA)
    lam = _tilt(scaled, 0.5 * (lo + hi) / (budget_g * GIGA))
    ref = (lo if lam >= 0 else hi) / (budget_g * GIGA)
    logits = lam * scaled
    cdf = np.cumsum(np.exp(logits - logits.max(1, keepdims=True)), axis=1)
    cdf /= cdf[:, -1:]
    found: list[Decoded] = []
    for _ in range(0, MAX_RANDOM_DRAWS, chunk):
        u = rng.random((chunk, len(space.layers)))
        picks = np.minimum((u[:, :, None] > cdf[None, :, :]).sum(2), len(pairs) - 1)  # inverse CDF per layer
        total = np.take_along_axis(bops[None, :, :], picks[:, :, None], axis=2)[:, :, 0].sum(1)
        keep = rng.random(chunk) < np.exp(np.minimum(-lam * (total / (budget_g * GIGA) - ref), 0.0))
        for row in picks[(total >= lo) & (total <= hi) & keep]:
            choices = {name: pairs[p] for name, p in zip(space.layers, row, strict=True)}
            found.append(Decoded(choices, space.searched_bops_g(choices), 0.0))
            if len(found) == count:
                return found
    raise BudgetError(f"only {len(found)} of {count} random policies inside [{lower_fraction:.0%}, 100%] of the "
                      f"budget {budget_g:g} G in {MAX_RANDOM_DRAWS} draws: so few policies reach this budget that "
                      f"uniform draws are impractical; move search.budget_g away from the smallest and largest "
                      f"feasible budgets")


# ------------------------------------------------------------------------------------------------ helpers
def _tilt(scaled: np.ndarray, target: float) -> float:
    """The tilt ``lam`` whose proposal (each layer's pair ~ exp(lam * scaled[l])) has expected sum ``target``
    (``target`` moved just inside the range of sums the proposal can have; ``|lam|`` at most 1e6)."""
    smallest, largest = float(scaled.min(1).sum()), float(scaled.max(1).sum())
    margin = 1e-6 * (largest - smallest)
    target = min(max(target, smallest + margin), largest - margin)

    def excess(lam: float) -> float:
        logits = lam * scaled
        weights = np.exp(logits - logits.max(1, keepdims=True))
        return float(((weights * scaled).sum(1) / weights.sum(1)).sum()) - target

    bound = 1.0
    while excess(bound) < 0 or excess(-bound) > 0:
        if bound >= 1e6:
            return bound if excess(bound) < 0 else -bound
        bound *= 2
    return float(brentq(excess, -bound, bound, xtol=1e-9))


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _normalised(table: np.ndarray) -> np.ndarray:
    """``table`` shifted to a minimum of 0 in every layer and scaled to a maximum finite value of 1 (+inf kept)."""
    finite = np.where(np.isfinite(table), table, np.nan)
    shifted = table - np.nanmin(finite, axis=(1, 2), keepdims=True)
    top = np.nanmax(np.where(np.isfinite(shifted), shifted, np.nan))
    return shifted / top if top > 0 else shifted


def _solve(space: SearchSpace, costs: np.ndarray, budget_g: float, lower_fraction: float,
           maximise_bops: bool = False) -> dict[str, tuple[int, int]] | None:
    """Solve the ILP over the ``[L, K_w, K_a]`` cost table (``+inf`` = forbidden pair); ``None`` when infeasible.
    Bounds are tightened until the exact integer check passes."""
    n_layers, pairs = costs.shape[0], space.pairs
    pair_bits = np.asarray([w * a for w, a in pairs], dtype=np.float64)  # (i, j) -> w_i * a_j, weight-major
    macs = np.asarray(space.macs, dtype=np.float64)
    bops = (macs[:, None] * pair_bits[None, :]).reshape(-1) / GIGA  # G BOPs of x[l, i, j]
    flat = costs.reshape(-1)
    allowed = np.isfinite(flat)
    objective = -bops if maximise_bops else np.where(allowed, flat, 0.0)
    one_per_layer = np.kron(np.eye(n_layers), np.ones((1, len(pairs))))
    fixed = space.fixed_bops
    upper_bops, lower_bops = budget_g * GIGA - fixed, lower_fraction * budget_g * GIGA - fixed
    hi, lo = upper_bops / GIGA, lower_bops / GIGA
    for _ in range(6):
        constraints = [LinearConstraint(one_per_layer, 1, 1), LinearConstraint(bops[None, :], lo, hi)]
        result = milp(objective, constraints=constraints, integrality=np.ones_like(bops),
                      bounds=Bounds(0, allowed.astype(np.float64)),
                      options={"mip_rel_gap": 0.0, "time_limit": 120.0})
        if result.x is None:
            return None
        picks = np.asarray(result.x).reshape(n_layers, len(pairs)).argmax(1)
        choices = {name: pairs[p] for name, p in zip(space.layers, picks, strict=True)}
        exact = sum(m * w * a for m, (w, a) in zip(space.macs, (choices[n] for n in space.layers), strict=True))
        if lower_bops <= exact <= upper_bops:
            return choices
        step = max(abs(exact - upper_bops), abs(lower_bops - exact), 1.0) / GIGA
        if exact > upper_bops:
            hi -= 2 * step
        else:
            lo += 2 * step
        if lo > hi:
            return None
    return None


def _round_up(value: float, digits: int = 5) -> str:
    """``value`` rounded *up* to ``digits`` significant digits, as text: a budget that a policy costing ``value``
    fits (``value <= B``, and within 0.1 % of ``B``, so inside [97 %, 100 %] of it)."""
    exponent = math.floor(math.log10(value)) - digits + 1
    rounded = math.ceil(value / 10.0**exponent) * 10.0**exponent
    text = f"{rounded:.{max(0, -exponent)}f}"
    while float(text) < value:  # the decimal text of a binary float may print a hair below it
        rounded += 10.0**exponent
        text = f"{rounded:.{max(0, -exponent)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text  # 0.044, not 0.044000


def _nearest(space: SearchSpace, costs: np.ndarray, budget_g: float) -> str:
    """Advice naming the largest budget below ``budget_g`` that a policy allowed by ``costs`` reaches."""
    below = _solve(space, costs, budget_g, 0.0, maximise_bops=True)
    if below is None:
        return f"the smallest feasible budget is above it: raise search.budget_g (now {budget_g:g})"
    near = space.budgeted_bops_g(below)
    return f"the nearest policy below it costs {near:.6g} GBOPs: use search.budget_g={_round_up(near)}"


def _preset_note(space: SearchSpace) -> str:
    return "" if space.bops_preset == "searched" else f" (BOPs preset {space.bops_preset!r}: " \
                                                      f"{BOPS_PRESETS[space.bops_preset]})"

