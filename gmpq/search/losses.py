"""The search objective: cross-entropy + lambda_attr * attribution loss + budget-steering complexity term.

**Attribution rank preservation** (GMPQ, eq. 6, as in the authors' code)::

    L_attr = mean_(b, h, w) (n(A_fp^p)_b - n(A_q)_b)^2,      n(v) = v / max(||v||_2, eps) per flattened map

i.e. the batch mean of the squared L2 distance of the normalised maps divided by H*W, so that lambda_attr = 40 keeps
the reference ResNet18/CIFAR-10 meaning. ``A_fp`` comes from the frozen float teacher (no gradient); the exponent
``p`` is a number, never differentiated.

**Capacity-aware p** (``p = "auto"``)::

    p = kappa * mean_l 1 / (E[b_w,l] * E[b_a,l]),     E[b_w,l] = sum_i softmax(alpha_w,l)_i * w_bits_i      (kappa = 24)

(``E[b_a,l]`` likewise over ``a_bits``, the activation candidates, which may differ from the weights'.)

**Complexity / budget steering.** With ``r = E[BOPs] / B`` the expected searched BOPs at the deployment resolution
(:func:`gmpq.complexity.expected_bops`) over the budget ``B``, the search minimises an augmented Lagrangian of the
equality constraint ``r = 1``::

    L_complexity = L * (mu * (r - 1) + (rho / 2) * (r - 1)^2),     after each step:  mu <- mu + eta * (r - 1)

``mu`` is the adaptive multiplier (dual ascent, unconstrained in sign: above the budget it pushes bits down, below it
lets them rise), so the user states a budget in GBOPs instead of hand-tuning a complexity decay. ``L`` is the number
of searched layers: d r / d alpha_l is proportional to layer l's share of the BOPs (about 1 / L), so the factor L
gives every architecture the same per-layer pull. Defaults rho = 4, eta = 0.02: with the reference alpha optimiser
(SGD, lr 0.01, momentum 0.9) and no other loss, E[BOPs] settles within 1 % of B in a few hundred steps from either
side (tests/test_search_core.py); the exact decoding then places the policy in [97%, 100%] of B.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.complexity import expected_bops
from gmpq.search.supernet import SearchSpace, layer_probabilities

#: Small constant keeping the normalisation of an all-zero attribution map finite.
NORM_EPS = 1e-12


def attribution_loss(cam_fp: torch.Tensor, cam_q: torch.Tensor, p: float) -> torch.Tensor:
    """``mean((n(A_fp^p) - n(A_q))^2)`` over batch and positions; maps of shape [B, H, W] (or [B, ...])."""
    if cam_fp.shape != cam_q.shape:
        raise ValueError(f"attribution maps differ in shape: teacher {tuple(cam_fp.shape)}, "
                         f"student {tuple(cam_q.shape)}")
    teacher = cam_fp.detach().float().flatten(1)
    # n(A^p) = n((A / max A)^p): dividing by the map's maximum first keeps A^p finite for large maps
    teacher = teacher / teacher.amax(1, keepdim=True).clamp_min(torch.finfo(teacher.dtype).tiny)
    target = F.normalize(teacher.pow(float(p)), dim=1, eps=NORM_EPS)
    student = F.normalize(cam_q.float().flatten(1), dim=1, eps=NORM_EPS)
    return (target - student).pow(2).mean()


@functools.cache
def _constant(values: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once (a host-to-device copy every step would synchronise)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def expected_bits(model: nn.Module, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L]`` expected weight and activation bits of the searched layers under the current alphas."""
    w_probs, a_probs = layer_probabilities(model, space)
    return ((w_probs * _constant(space.w_bits, w_probs.device, w_probs.dtype)).sum(-1),
            (a_probs * _constant(space.a_bits, a_probs.device, a_probs.dtype)).sum(-1))


def capacity_p(model: nn.Module, space: SearchSpace, kappa: float) -> float:
    """Capacity-aware exponent ``kappa * mean_l 1 / (E[b_w,l] E[b_a,l])`` (a number: not differentiated)."""
    with torch.no_grad():
        e_w, e_a = expected_bits(model, space)
        return float(kappa * (1.0 / (e_w * e_a)).mean())


def expected_bops_g(model: nn.Module, space: SearchSpace) -> torch.Tensor:
    """Differentiable expected searched-layer BOPs (G) at the deployment resolution: ``sum_l MACs_l * E[b_w,l] *
    E[b_a,l] / 1e9`` (:func:`gmpq.complexity.expected_bops`)."""
    w_probs, a_probs = layer_probabilities(model, space)
    device, dtype = w_probs.device, w_probs.dtype
    return expected_bops(_constant(space.macs, device, dtype), w_probs, a_probs, _constant(space.w_bits, device, dtype),
                         _constant(space.a_bits, device, dtype))


@dataclass
class BudgetPenalty:
    """Augmented-Lagrangian steering of the expected BOPs to ``budget_g`` (equation in the module docstring).

    Attributes:
        budget_g: the budget B (G BOPs, searched layers, deployment resolution).
        scale: L, the number of searched layers.
        rho: weight of the quadratic term.
        eta: dual step of the multiplier per optimisation step.
        mu: the current multiplier (saved in checkpoints).
    """

    budget_g: float
    scale: float = 1.0
    rho: float = 4.0
    eta: float = 0.02
    mu: float = 0.0

    def __call__(self, expected_g: torch.Tensor) -> torch.Tensor:
        excess = expected_g / self.budget_g - 1.0
        return self.scale * (self.mu * excess + 0.5 * self.rho * excess.pow(2))

    def update(self, expected_g: float) -> None:
        """Dual ascent on the multiplier after an optimisation step."""
        self.mu += self.eta * (float(expected_g) / self.budget_g - 1.0)

    def state_dict(self) -> dict[str, float]:
        return {"mu": self.mu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mu = float(state["mu"])


@dataclass
class LossTerms:
    """One evaluation of the search objective (tensors keep their graphs; ``p`` is a number)."""

    total: torch.Tensor
    ce: torch.Tensor
    attr: torch.Tensor
    complexity: torch.Tensor
    expected_bops_g: torch.Tensor
    p: float


class SearchObjective:
    """``L = CE + lambda_attr * L_attr + L_complexity`` for one batch (see the module docstring).

    Args:
        space: the search space (MACs at deployment, candidate bits).
        penalty: the budget steering term.
        lambda_attr: attribution weight (0 for EdMIPS: no teacher needed).
        p: fixed exponent, or ``"auto"`` for the capacity-aware one.
        kappa: kappa of the capacity-aware p.
    """

    def __init__(self, space: SearchSpace, penalty: BudgetPenalty, lambda_attr: float, p: float | str = 3.0,
                 kappa: float = 24.0) -> None:
        if not (p == "auto" or (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0)):
            raise ValueError(f"p must be a positive number or 'auto', got {p!r}")
        self.space = space
        self.penalty = penalty
        self.lambda_attr = float(lambda_attr)
        self.p = p
        self.kappa = float(kappa)

    @property
    def uses_attribution(self) -> bool:
        return self.lambda_attr > 0

    def exponent(self, model: nn.Module) -> float:
        """The ``p`` of this step."""
        return capacity_p(model, self.space, self.kappa) if self.p == "auto" else float(self.p)

    def __call__(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, cam_q: torch.Tensor | None,
                 cam_fp: torch.Tensor | None) -> LossTerms:
        """Loss terms of a batch; ``model`` is the (unwrapped) supernet whose alphas define the expected BOPs."""
        ce = F.cross_entropy(logits.float(), labels)
        p = self.exponent(model)
        if self.uses_attribution:
            if cam_q is None or cam_fp is None:
                raise ValueError("the attribution loss needs both the student's and the teacher's maps")
            attr = attribution_loss(cam_fp, cam_q, p)
        else:
            attr = ce.new_zeros(())
        bops = expected_bops_g(model, self.space)
        complexity = self.penalty(bops).to(ce.dtype)
        total = ce + self.lambda_attr * attr + complexity
        return LossTerms(total, ce, attr, complexity, bops, p)
