"""Exact decoding of a searched policy under a BOPs budget.

Given per-layer log-probabilities ``log p_w,l(i)`` and ``log p_a,l(j)`` of the candidate bits, the decoded policy
solves the integer programme (a multiple-choice knapsack with a lower and an upper capacity)::

    maximise    sum_l log p_w,l(w_l) + log p_a,l(a_l)
    subject to  f * B <= sum_l MACs_l * w_l * a_l <= B,     w_l, a_l in the candidate bits

with ``B`` the budget in BOPs (searched layers, deployment resolution) and ``f = 0.97``, solved exactly with
HiGHS (:func:`scipy.optimize.milp`) over binary variables x[l, i, j] (one (w, a) pair per layer) and verified in
integer arithmetic. The window keeps the policy from wasting the budget: the decoded BOPs always lie in [97%, 100%]
of it.

A budget below the all-minimum-bits policy, above the all-maximum one (nothing would be searched) or — in rare tiny
spaces — with no policy inside the window raises :class:`~gmpq.errors.BudgetError` with the nearest feasible budget,
before any training (:func:`check_budget`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from gmpq.complexity import GIGA
from gmpq.errors import BudgetError
from gmpq.search.supernet import SearchSpace

#: Decoded BOPs are at least this fraction of the budget.
LOWER_FRACTION = 0.97


@dataclass(frozen=True)
class Decoded:
    """A decoded policy: ``{layer: (w_bits, a_bits)}``, its searched BOPs (G) and its log-probability."""

    choices: dict[str, tuple[int, int]]
    bops_g: float
    log_prob: float


def bops_range(space: SearchSpace) -> tuple[float, float]:
    """Searched BOPs (G) of the all-minimum-bits and the all-maximum-bits policies."""
    total = sum(space.macs)
    return total * min(space.bits) ** 2 / GIGA, total * max(space.bits) ** 2 / GIGA


def check_budget(space: SearchSpace, budget_g: float, lower_fraction: float = LOWER_FRACTION) -> None:
    """Raise :class:`BudgetError` unless some policy has searched BOPs in [lower_fraction * B, B]."""
    if not (isinstance(budget_g, (int, float)) and np.isfinite(budget_g) and budget_g > 0):
        raise BudgetError(f"the BOPs budget must be a positive number of GBOPs, got {budget_g!r}")
    lo, hi = bops_range(space)
    where = f"{space.deploy_arch} at {space.deploy_input_size}x{space.deploy_input_size}"
    if budget_g < lo:
        raise BudgetError(
            f"BOPs budget {budget_g:g} G is infeasible: with candidate bits {list(space.bits)} the smallest policy "
            f"(every searched layer at {min(space.bits)}/{min(space.bits)} bits) costs {lo:.4f} GBOPs on {where}; "
            f"the smallest feasible budget is search.budget_g={_round_up(lo)}")
    if hi < lower_fraction * budget_g:
        raise BudgetError(
            f"BOPs budget {budget_g:g} G is above what the candidate bits {list(space.bits)} can use: the largest "
            f"policy (every searched layer at {max(space.bits)}/{max(space.bits)} bits) costs {hi:.4f} GBOPs on "
            f"{where}, so there is nothing to search; use search.budget_g={_round_up(hi)} (that policy) or add "
            f"larger candidate bits (search.bits)")
    zeros = np.zeros((len(space.layers), len(space.bits)))
    if _solve(space, zeros, zeros, budget_g, lower_fraction) is None:
        below = _solve(space, zeros, zeros, budget_g, 0.0, maximise_bops=True)
        near = space.searched_bops_g(below) if below else lo
        raise BudgetError(
            f"no policy over candidate bits {list(space.bits)} has searched BOPs within [{lower_fraction:.0%}, 100%] "
            f"of the budget {budget_g:g} G on {where}; the nearest policy below it costs {near:.6g} GBOPs: use "
            f"search.budget_g={_round_up(near)}")


def decode(space: SearchSpace, log_w: torch.Tensor | np.ndarray, log_a: torch.Tensor | np.ndarray, budget_g: float,
           lower_fraction: float = LOWER_FRACTION) -> Decoded:
    """The most probable policy with searched BOPs in [lower_fraction * B, B] (see the module docstring).

    ``log_w`` and ``log_a`` are ``[L, K]`` log-probabilities (rows of ``log_softmax(alpha)``) of the searched layers
    in ``space.layers`` order.
    """
    lw, la = _as_array(log_w), _as_array(log_a)
    shape = (len(space.layers), len(space.bits))
    if lw.shape != shape or la.shape != shape:
        raise ValueError(f"log-probabilities must have shape {shape}, got {lw.shape} and {la.shape}")
    if not (np.isfinite(lw).all() and np.isfinite(la).all()):
        raise ValueError("the log-probabilities to decode are not all finite (diverged architecture parameters?); "
                         "lower search.lr_alpha")
    choices = _solve(space, lw, la, budget_g, lower_fraction)
    if choices is None:
        check_budget(space, budget_g, lower_fraction)  # raises the explanatory error
        raise BudgetError(f"the budget decoding of {budget_g:g} GBOPs failed")  # pragma: no cover — solver failure
    return Decoded(choices, space.searched_bops_g(choices), _log_prob(space, lw, la, choices))


def decode_uniform(space: SearchSpace, budget_g: float, side: str = "below") -> Decoded:
    """The single (w, a) pair for every searched layer nearest the budget from ``side``.

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

    pairs = [(w, a) for w in space.bits for a in space.bits]
    if side == "below":
        fits = [p for p in pairs if total * p[0] * p[1] <= budget_g * GIGA]
        if not fits:
            check_budget(space, budget_g)
        w, a = max(fits, key=lambda p: (p[0] * p[1], *balance(p)))
    else:
        over = [p for p in pairs if total * p[0] * p[1] > budget_g * GIGA]
        if not over:
            raise BudgetError(f"no uniform policy over candidate bits {list(space.bits)} costs more than the budget "
                              f"{budget_g:g} G on {space.deploy_arch}: the largest costs "
                              f"{bops_range(space)[1]:.4f} GBOPs; use search.uniform_side=below")
        w, a = min(over, key=lambda p: (p[0] * p[1], -min(p), -p[1]))
    choices = {n: (w, a) for n in space.layers}
    return Decoded(choices, space.searched_bops_g(choices), 0.0)


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _log_prob(space: SearchSpace, lw: np.ndarray, la: np.ndarray, choices: dict[str, tuple[int, int]]) -> float:
    idx = {b: i for i, b in enumerate(space.bits)}
    return float(sum(lw[layer, idx[choices[n][0]]] + la[layer, idx[choices[n][1]]]
                     for layer, n in enumerate(space.layers)))


def _solve(space: SearchSpace, lw: np.ndarray, la: np.ndarray, budget_g: float, lower_fraction: float,
           maximise_bops: bool = False) -> dict[str, tuple[int, int]] | None:
    """Solve the ILP; ``None`` when infeasible. Bounds are tightened until the exact integer check passes."""
    n_layers, k = lw.shape[0], len(space.bits)
    bits = np.asarray(space.bits, dtype=np.float64)
    pair_bits = np.outer(bits, bits).reshape(-1)  # (i, j) -> w_i * a_j
    macs = np.asarray(space.macs, dtype=np.float64)
    cost = (macs[:, None] * pair_bits[None, :]).reshape(-1) / GIGA  # G BOPs of x[l, i, j]
    if maximise_bops:
        objective = -cost
    else:
        objective = -(lw[:, :, None] + la[:, None, :]).reshape(-1)
    one_per_layer = np.kron(np.eye(n_layers), np.ones((1, k * k)))
    upper_bops, lower_bops = budget_g * GIGA, lower_fraction * budget_g * GIGA
    hi, lo = budget_g, lower_fraction * budget_g
    for _ in range(6):
        constraints = [LinearConstraint(one_per_layer, 1, 1), LinearConstraint(cost[None, :], lo, hi)]
        result = milp(objective, constraints=constraints, integrality=np.ones_like(cost), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0, "time_limit": 120.0})
        if result.x is None:
            return None
        picks = np.asarray(result.x).reshape(n_layers, k * k).argmax(1)
        choices = {name: (space.bits[p // k], space.bits[p % k]) for name, p in zip(space.layers, picks, strict=True)}
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
    return text
