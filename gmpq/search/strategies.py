"""Search strategies behind one interface, so that they compare on equal terms (same data, budget, decoding).

* ``gmpq`` — the supernet trained on CE + lambda_attr * attribution loss + budget steering, decoded exactly under the
  budget (:func:`gmpq.search.budget.decode`).
* ``edmips`` — the same with ``lambda_attr = 0`` (EdMIPS with a budget instead of a hand-tuned complexity decay);
  it needs no float teacher.
* ``uniform`` — no training: the single (w, a) pair for every searched layer nearest the budget, at or below it
  (``search.uniform_side=below``, the default) or above it (:func:`gmpq.search.budget.decode_uniform`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gmpq.errors import RecipeError
from gmpq.search.budget import Decoded, decode, decode_uniform
from gmpq.search.supernet import SearchSpace, layer_log_probabilities


@dataclass(frozen=True)
class Strategy:
    """A search strategy.

    Attributes:
        name: ``gmpq`` | ``edmips`` | ``uniform``.
        trains_supernet: whether it trains alphas (False: the policy follows from the budget alone).
        uses_attribution: whether it adds the attribution loss (and so needs a float teacher).
    """

    name: str
    trains_supernet: bool
    uses_attribution: bool

    def lambda_attr(self, requested: float) -> float:
        """The attribution weight this strategy uses given the recipe's ``lambda_attr``."""
        return float(requested) if self.uses_attribution else 0.0

    def decode(self, space: SearchSpace, budget_g: float, model: nn.Module | None = None,
               uniform_side: str = "below") -> Decoded:
        """The policy of this strategy: exact budget decoding of ``model``'s alphas, or the uniform pair nearest the
        budget from ``uniform_side`` (see :func:`~gmpq.search.budget.decode_uniform`)."""
        if not self.trains_supernet:
            return decode_uniform(space, budget_g, uniform_side)
        if model is None:
            raise ValueError(f"strategy {self.name!r} decodes the alphas of a supernet; pass the model")
        with torch.no_grad():
            log_w, log_a = layer_log_probabilities(model, space)
            return decode(space, log_w, log_a, budget_g)


STRATEGIES: dict[str, Strategy] = {
    "gmpq": Strategy("gmpq", trains_supernet=True, uses_attribution=True),
    "edmips": Strategy("edmips", trains_supernet=True, uses_attribution=False),
    "uniform": Strategy("uniform", trains_supernet=False, uses_attribution=False),
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name raises :class:`~gmpq.errors.RecipeError`."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise RecipeError(f"unknown search.strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
