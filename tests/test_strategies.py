"""Score + decode strategies: Hutchinson traces against exact Hessians, HAWQ and OMPQ cost tables, the uniform random
control, the cost-table decoder and the BOPs presets; policies on resnet18 / mobilenetv2_100 at the paper budgets."""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn
from torch.nn import functional as F

import gmpq
from gmpq.search import SearchSpace, bops_range, check_budget, decode_costs, deployment_macs, search_space
from gmpq.search.budget import sample_in_window
from gmpq.search.orthogonality import (
    layer_grams,
    ompq_bit_coefficients,
    ompq_costs,
    ompq_importance,
    orthogonality_matrix,
)
from gmpq.search.sensitivity import hawq_costs, hutchinson_traces
from gmpq.search.strategies import STRATEGIES, ScoreSettings, ScoreStrategy, get_strategy

BITS = (2, 3, 4, 6)
SETTINGS = ScoreSettings(seed=0, hutchinson_samples=1, ompq_beta=1.0, uniform_side="below")


def _tiny_space(macs=(3_000_000, 1_000_000, 7_000_000), preset="searched", w_bits=BITS, a_bits=BITS) -> SearchSpace:
    names = tuple(f"l{i}" for i in range(len(macs)))
    return SearchSpace("tiny", "tiny", 32, names, tuple(macs), ("stem",), (100_000,), w_bits, a_bits, 8, preset)


def _window(space: SearchSpace, budget: float) -> list[tuple[tuple[int, int], ...]]:
    """Every policy of ``space`` whose budgeted BOPs lie in [97 %, 100 %] of ``budget`` (enumerated)."""
    out = []
    pairs = list(itertools.product(space.w_bits, space.a_bits))
    for combo in itertools.product(pairs, repeat=len(space.layers)):
        bops = sum(m * w * a for m, (w, a) in zip(space.macs, combo, strict=True)) + space.fixed_bops
        if 0.97 * budget * 1e9 <= bops <= budget * 1e9:
            out.append(combo)
    return out


# ------------------------------------------------------------------------------------------------ Hutchinson
def _smooth() -> nn.Sequential:
    """A tiny CNN with smooth activations (a Hessian with full diagonal blocks and off-diagonal coupling)."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1, groups=3),
                         nn.Tanh(), nn.Conv2d(3, 4, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _exact_blocks(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, index: int):
    """Exact Hessians of the cross-entropy w.r.t. layer ``index``'s weight and w.r.t. its input."""
    layer = model[index]

    def of_weight(w: torch.Tensor) -> torch.Tensor:
        x = model[:index](images)
        out = torch.func.functional_call(layer, {"weight": w, "bias": layer.bias}, (x,))
        return F.cross_entropy(model[index + 1:](out), labels)

    def of_input(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model[index:](x), labels)

    h_w = torch.autograd.functional.hessian(of_weight, layer.weight.detach())
    with torch.no_grad():
        x0 = model[:index](images)
    h_x = torch.autograd.functional.hessian(of_input, x0)
    return h_w.reshape(layer.weight.numel(), -1), h_x.reshape(x0.numel(), -1)


def test_hutchinson_traces_match_exact_hessians_within_their_promised_error():
    torch.manual_seed(0)
    model = _smooth().double()
    images, labels = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 2, 1])
    layers = ["0", "2", "4", "8"]
    samples = 48
    traces = hutchinson_traces(model, [(images, labels)], layers, samples, torch.Generator().manual_seed(0))
    assert traces.samples == samples and traces.batches == 1
    for i, name in enumerate(layers):
        for estimate, reported, block in zip((traces.weight[i], traces.activation[i]),
                                             (traces.weight_stderr[i], traces.activation_stderr[i]),
                                             _exact_blocks(model, images, labels, int(name)), strict=True):
            n = block.shape[0]
            exact = float(torch.trace(block)) / n
            # variance of one Rademacher probe: 2 (||H||_F^2 - sum_i H_ii^2), here per element (/ n^2)
            sd = math.sqrt(2 * (float(block.pow(2).sum()) - float(torch.diagonal(block).pow(2).sum()))) / n
            promised = sd / math.sqrt(samples)
            assert promised > 1e-4 * abs(exact), name  # a block where the estimate has something to get wrong
            assert abs(estimate - exact) <= 4 * promised, (name, estimate, exact, promised)
            assert 0.5 * promised <= reported <= 2.0 * promised, (name, reported, promised)
    # the model is left as it was: training mode and gradient flags untouched, no hooks
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_hawq_costs_fall_with_bits_and_follow_the_traces():
    """Weight errors over the weight candidates, activation errors over the activation candidates (3 of them)."""
    torch.manual_seed(0)
    model = _smooth()
    batches = [(torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 0]))]
    costs, traces, mse_w, mse_x = hawq_costs(model, batches, ["0", "2", "4", "8"], BITS, (3, 4, 8), 4,
                                             torch.Generator().manual_seed(1))
    assert costs.shape == (4, 4, 3) and mse_w.shape == (4, 4) and mse_x.shape == (4, 3)
    assert np.isfinite(costs).all() and (costs >= 0).all()
    assert (np.diff(mse_w, axis=1) < 0).all() and (np.diff(mse_x, axis=1) <= 0).all()
    assert (np.diff(costs, axis=1) <= 0).all() and (np.diff(costs, axis=2) <= 0).all()
    expected = (np.clip(traces.weight, 0, None)[:, None, None] * mse_w[:, :, None]
                + np.clip(traces.activation, 0, None)[:, None, None] * mse_x[:, None, :])
    assert np.allclose(costs, expected)


# ------------------------------------------------------------------------------------------------ OMPQ
def test_orthogonality_is_linear_cka_of_the_layer_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))
    y = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    features = [x, 3.0 * x @ rotation, y, torch.ones(12, 4, dtype=torch.float64)]
    orm = orthogonality_matrix(torch.stack([f @ f.T for f in features]))
    assert torch.allclose(orm, orm.T) and orm.min() >= 0 and orm.max() <= 1
    assert orm[0, 1] == pytest.approx(1.0)  # rotation and scale of the features do not change ORM
    assert orm[3].abs().max() == 0  # constant features: orthogonal to everything

    def feature_space(a: torch.Tensor, b: torch.Tensor) -> float:  # ||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F)
        a, b = a - a.mean(0), b - b.mean(0)
        return float((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))

    assert orm[0, 2] == pytest.approx(feature_space(x, y), rel=1e-10)
    theta = ompq_importance(orm[:3, :3], beta=2.0)
    gamma = np.array([float(orm[0, 1] + orm[0, 2]), float(orm[1, 0] + orm[1, 2]), float(orm[2, 0] + orm[2, 1])])
    assert np.allclose(theta, np.exp(-2.0 * gamma))
    assert np.allclose(ompq_bit_coefficients(np.array([3.0, 1.0, 2.0])), [2.0, 1.5, 2.0])


def test_ompq_costs_give_one_width_per_layer_among_the_widths_both_lists_hold():
    model = _smooth()
    images = torch.randn(5, 2, 6, 6)
    shared, _ = ompq_costs(model, images, ["0", "4"], BITS, BITS, 1.0)
    costs, _ = ompq_costs(model, images, ["0", "4"], BITS, (3, 4, 8), 1.0)
    assert costs.shape == (2, 4, 3)
    assert np.isfinite(costs).sum() == 2 * 2  # (3, 3) and (4, 4) only
    assert np.array_equal(costs[:, 1, 0], shared[:, 1, 1]) and np.array_equal(costs[:, 2, 1], shared[:, 2, 2])
    space = _tiny_space(w_bits=(2, 3), a_bits=(4, 6))
    with pytest.raises(gmpq.RecipeError, match=r"weight bits \[2, 3\] and activation bits \[4, 6\] share none"):
        get_strategy("ompq").score(model, [(images, torch.zeros(5, dtype=torch.long))], space, SETTINGS)


def test_layer_grams_follow_the_forward_order():
    model = _smooth()
    order, grams = layer_grams(model, torch.randn(5, 2, 6, 6), ["8", "0", "4"])
    assert order == ["0", "4", "8"] and grams.shape == (3, 5, 5) and grams.dtype == torch.float64
    with pytest.raises(ValueError, match="at least 3 images"):
        layer_grams(model, torch.randn(2, 2, 6, 6), ["0"])


# ------------------------------------------------------------------------------------------------ decoders
def _check_exact_minimum(space, w_bits, a_bits, seed: int, unit: float) -> None:
    """Six random cost tables in ``unit`` (some pairs forbidden): decode_costs finds the cheapest policy of the
    window by enumeration, or says that no allowed policy lies in it."""
    rng = np.random.default_rng(seed)
    lo, hi = bops_range(space)
    shape = (3, len(w_bits), len(a_bits))
    for trial in range(6):
        costs = rng.normal(size=shape) * unit
        costs[rng.random(shape) < 0.3] = np.inf
        costs[:, 0, 0] = 0.0  # keep every layer feasible
        budget = lo + (hi - lo) * rng.uniform(0.1, 0.9)
        allowed = [sum(costs[i, w_bits.index(w), a_bits.index(a)] for i, (w, a) in enumerate(c))
                   for c in _window(space, budget)]
        allowed = [c for c in allowed if np.isfinite(c)]
        if not allowed:
            with pytest.raises(gmpq.BudgetError, match="pairs this strategy allows"):
                decode_costs(space, costs, budget)
            continue
        decoded = decode_costs(space, costs, budget)
        assert decoded.cost == pytest.approx(min(allowed), abs=1e-12 * unit), trial
        assert 0.97 * budget <= decoded.bops_g <= budget
        assert all(w in w_bits and a in a_bits for w, a in decoded.choices.values())


def test_decode_costs_is_the_exact_minimum_with_forbidden_pairs():
    space = _tiny_space()
    _check_exact_minimum(space, BITS, BITS, seed=0, unit=1e-7)  # tiny units: the decoder normalises before solving
    only_min = np.full((3, 4, 4), np.inf)
    only_min[:, 0, 0] = 0.0
    with pytest.raises(gmpq.BudgetError, match="pairs this strategy allows.*below it costs 0.044 GBOPs: use search.budget_g=0.044"):
        decode_costs(space, only_min, 0.2)
    with pytest.raises(ValueError, match="forbids every"):
        decode_costs(space, np.full((3, 4, 4), np.inf), 0.2)
    with pytest.raises(ValueError, match="shape"):
        decode_costs(space, np.zeros((3, 4)), 0.2)


def test_decode_costs_over_separate_candidates_is_the_exact_minimum():
    """A [L, K_w, K_a] table with K_w = 4 weight and K_a = 3 activation candidates: indices map to the right bits."""
    w_bits, a_bits = (2, 3, 4, 6), (3, 4, 8)
    space = _tiny_space(w_bits=w_bits, a_bits=a_bits)
    _check_exact_minimum(space, w_bits, a_bits, seed=1, unit=1.0)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 3\)"):
        decode_costs(space, np.zeros((3, 4, 4)), 0.2)


def _check_uniform_draws(space) -> float:
    """Draws from the window at 30 % of the space's BOPs range stay in it and are uniform over it (chi-square);
    returns that budget."""
    lo, hi = bops_range(space)
    budget = lo + 0.3 * (hi - lo)
    window = _window(space, budget)
    drawn = sample_in_window(space, budget, np.random.default_rng(0), count=20 * len(window))
    counts = collections.Counter(tuple(d.choices[n] for n in space.layers) for d in drawn)
    assert set(counts) <= set(window) and len(window) > 50
    assert chisquare([counts[c] for c in window]).pvalue > 0.01
    return budget


def test_random_policies_over_separate_candidates_are_uniform_over_their_window():
    _check_uniform_draws(_tiny_space(w_bits=(2, 3, 4, 6), a_bits=(3, 4, 6, 8)))


def test_random_policies_are_uniform_over_the_window_and_seeded():
    space = _tiny_space()
    budget = _check_uniform_draws(space)
    random = get_strategy("random")
    scores = random.score(None, [], space, SETTINGS)
    first = random.decode(space, scores, budget, SETTINGS)
    assert first == random.decode(space, scores, budget, SETTINGS)
    others = {tuple(random.decode(space, scores, budget, ScoreSettings(s, 1, 1.0, "below")).choices.values()) for s in range(5)}
    assert len(others) > 1


# ------------------------------------------------------------------------------------------------ BOPs presets
def test_bops_presets_count_what_they_name():
    model = gmpq.create_model("resnet18", num_classes=1000, policy=gmpq.uniform_policy(
        gmpq.create_model("resnet18", num_classes=1000), 4, 4))
    report = gmpq.count_bops(model, 224)
    kept_macs = sum(r.macs for r in report.layers if r.kept)
    assert report.bops_g("searched") == report.bops_searched_g
    assert report.bops_g("kept8") == pytest.approx(report.bops_searched_g + kept_macs * 64 / 1e9)
    assert report.bops_g("all") == report.bops_total_g
    assert set(report.to_dict()["bops_presets"]) == {"searched", "kept8", "all"}
    float_space = _tiny_space(preset="kept8")
    assert float_space.fixed_bops == 100_000 * 64
    with pytest.raises(gmpq.BudgetError, match="preset 'kept8'"):
        check_budget(float_space, 0.01)


# ------------------------------------------------------------------------------------------------ the paper budgets
def _paper_space(arch: str, preset: str = "searched") -> tuple[nn.Module, SearchSpace]:
    torch.manual_seed(0)
    model = gmpq.create_model(arch, num_classes=10)
    for module in model.modules():  # timm zero-initialises the last BN of residual branches: give them curvature
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return model, search_space(model, BITS, BITS, 8, deployment_macs(arch, 224, 10), arch, 224, bops_preset=preset)


@pytest.mark.parametrize(("arch", "budget"), [("resnet18", 15.3), ("mobilenetv2_100", 7.4)])
def test_every_score_strategy_decodes_inside_the_paper_budget(arch, budget):
    """Scores from 16x16 inputs (small and fast), BOPs at 224x224 on the same layers."""
    model, space = _paper_space(arch)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 3, 16, 16, generator=gen), torch.tensor([0, 3, 7]))]
    policies = {}
    for name, strategy in STRATEGIES.items():
        if not isinstance(strategy, ScoreStrategy):
            continue
        scores = strategy.score(model if strategy.needs_float_model else None,
                                batches if strategy.reads_batches else [], space, SETTINGS)
        decoded = strategy.decode(space, scores, budget, SETTINGS)
        policy = space.policy(decoded.choices, {"strategy": name})
        assert policy.bops_searched_g <= budget and policy.provenance["bops_preset"] == "searched"
        if name != "uniform":
            assert 0.97 * budget <= decoded.bops_g <= budget, name
        policies[name] = decoded.choices
    assert all(w == a for w, a in policies["ompq"].values())  # one bit width per layer
    assert len(set(policies["hawq"].values())) > 1 and len(set(policies["ompq"].values())) > 1
    assert len(set(policies["uniform"].values())) == 1


def test_the_kept8_preset_budgets_the_stem_and_classifier_at_8_bits():
    model, space = _paper_space("resnet18", preset="kept8")
    strategy = get_strategy("ompq")
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4]))]
    decoded = strategy.decode(space, strategy.score(model, batches, space, SETTINGS), 34.0, SETTINGS)
    budgeted = space.budgeted_bops_g(decoded.choices)
    assert 0.97 * 34.0 <= budgeted <= 34.0
    assert budgeted - decoded.bops_g == pytest.approx(sum(space.kept_macs) * 64 / 1e9)
    assert space.policy(decoded.choices).provenance["bops_preset"] == "kept8"


def test_depthwise_by_shifts_is_the_same_convolution():
    from gmpq.search.sensitivity import depthwise_by_shifts

    gen = torch.Generator().manual_seed(0)
    convs = [nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), nn.Conv2d(4, 8, 5, padding=4, dilation=2, groups=4,
                                                                          bias=False)]
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 9, 7, generator=gen)
        reference = conv(x)
        with depthwise_by_shifts(conv):
            assert "forward" in conv.__dict__
            assert torch.allclose(conv(x), reference, atol=1e-5)
        assert "forward" not in conv.__dict__
