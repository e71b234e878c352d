"""Network orthogonality of a float model and OMPQ's layer importances (Ma et al., OMPQ, AAAI 2023).

On ``N`` images, layer ``i``'s output features form ``X_i`` (``N x d_i``, one flattened feature map per row) and its
Gram matrix ``K_i = X_i X_i^T`` (``N x N``, whatever ``d_i``). The orthogonality metric of two layers is the
normalised Hilbert-Schmidt inner product of their centred Gram matrices (linear CKA; the paper's ORM, eq. 4, with
the centring of the authors' code)::

    ORM(i, j) = <H K_i H, H K_j H>_F / (||H K_i H||_F ||H K_j H||_F),     H = I - 11^T / N,     ORM in [0, 1]

(0 for orthogonal features, 1 for features equal up to rotation and scale). A layer whose features are nearly
orthogonal to all the others carries information the network has nowhere else; OMPQ makes its importance

    gamma_i = sum_{j != i} ORM(i, j),        theta_i = exp(-beta * gamma_i)

and, because a layer's bit width also shapes the features of every layer after it, maximises the linear programme

    max  sum_i b_i * c_i,    c_i = (1 / (L - i + 1)) * sum_{j >= i} theta_j    (layers in forward order, i = 1..L)

under the complexity budget (the paper's eq. 9 and the ``func`` of its ``feature_extract.py``).

Simplifications, all stated again in the README's strategy table:

* Features are the outputs of the searched Conv2d/Linear modules themselves (before their BatchNorm and
  activation), for any timm CNN; the authors' code takes the output of each conv-BN-ReLU unit of their own ResNet
  and MobileNetV2 and, for a residual block's last conv, the block's output after the addition. Linear CKA does not
  see rotations or a global scale, but it does see BN's per-channel scales.
* OMPQ assigns one bit width per layer to the weights (activations at one fixed width for the whole network) and
  solves the relaxed programme with SLSQP before rounding. Here a layer's weights and activations take the same
  width (``w_l = a_l = b_l``: the cost table forbids ``w != a``, and with separate candidate lists ``b_l`` ranges
  over the widths both hold), and the exact decoder solves the integer programme under the BOPs budget, inside the
  usual [97 %, 100 %] window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def layer_grams(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Gram matrices ``X_i X_i^T`` of the outputs of ``layers`` on ``images`` (eval mode, float64).

    Returns the layers in the order the forward pass calls them and their Gram matrices ``[L, N, N]`` in that order.
    """
    if images.shape[0] < 3:
        raise ValueError(f"orthogonality needs at least 3 images (centred N x N Gram matrices), got {images.shape[0]}")
    named = dict(model.named_modules())
    unknown = [n for n in layers if not isinstance(named.get(n), (nn.Conv2d, nn.Linear))]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} is not a Conv2d/Linear of the model")
    grams: dict[str, torch.Tensor] = {}

    def gram(name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if name in grams:
                raise ValueError(f"layer {name!r} is called more than once in a forward pass; its features are "
                                 f"ambiguous")
            x = output.reshape(output.shape[0], -1).float()
            grams[name] = (x @ x.T).double().cpu()
        return hook

    was_training = model.training
    handles = [named[n].register_forward_hook(gram(n)) for n in layers]
    try:
        model.eval()
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in grams]
    if missing:
        raise ValueError(f"layer {missing[0]!r} was not called in the forward pass")
    order = list(grams)
    return order, torch.stack([grams[n] for n in order])


def orthogonality_matrix(grams: torch.Tensor) -> torch.Tensor:
    """``ORM[i, j]`` (module docstring) of ``[L, N, N]`` Gram matrices; a layer with constant features (a centred
    Gram matrix that is zero up to rounding, 1e-9 of the uncentred one) is orthogonal to every other (ORM 0) and has
    ORM(i, i) = 0."""
    n = grams.shape[-1]
    centre = torch.eye(n, dtype=grams.dtype) - 1.0 / n
    centred = (centre @ grams @ centre).reshape(grams.shape[0], -1)
    norms = centred.norm(dim=1, keepdim=True)
    constant = norms <= 1e-9 * grams.reshape(grams.shape[0], -1).norm(dim=1, keepdim=True)
    unit = torch.where(constant, torch.zeros_like(centred), centred / norms.clamp_min(1e-300))
    return (unit @ unit.T).clamp(0.0, 1.0)


def ompq_importance(orm: torch.Tensor, beta: float) -> np.ndarray:
    """``theta_i = exp(-beta * sum_{j != i} ORM(i, j))`` (layers in forward order)."""
    gamma = (orm.sum(1) - orm.diagonal()).numpy()
    return np.exp(-beta * gamma)


def ompq_bit_coefficients(theta: np.ndarray) -> np.ndarray:
    """``c_i = mean_{j >= i} theta_j``: the weight of layer ``i``'s bit width in OMPQ's objective (forward order)."""
    suffix = np.cumsum(theta[::-1])[::-1]
    return suffix / np.arange(len(theta), 0, -1)


def ompq_costs(model: nn.Module, images: torch.Tensor, layers: Sequence[str], w_bits: Sequence[int],
               a_bits: Sequence[int], beta: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The OMPQ cost table ``[L, K_w, K_a]`` in ``layers`` order: ``-c_l * b`` where ``w_bits[i] = a_bits[j] = b``,
    ``+inf`` (forbidden) elsewhere, so that minimising the summed cost maximises OMPQ's objective (every pair is
    forbidden when the two lists share no width).

    Returns the table and, per layer in ``layers`` order, ``gamma`` (summed ORM with the other layers), ``theta``
    and ``coefficient`` (``c_l``), plus ``order`` (each layer's position in the forward pass).
    """
    order, grams = layer_grams(model, images, layers)
    orm = orthogonality_matrix(grams)
    theta = ompq_importance(orm, beta)
    coefficient = ompq_bit_coefficients(theta)
    position = {name: i for i, name in enumerate(order)}
    rows = [position[n] for n in layers]
    costs = np.full((len(layers), len(w_bits), len(a_bits)), np.inf)
    for i, w in enumerate(w_bits):
        for j, a in enumerate(a_bits):
            if w == a:
                costs[:, i, j] = -coefficient[rows] * float(w)
    gamma = (orm.sum(1) - orm.diagonal()).numpy()
    return costs, {"gamma": gamma[rows], "theta": theta[rows], "coefficient": coefficient[rows],
                   "order": np.asarray(rows)}
