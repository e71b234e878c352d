"""The search core: supernet, Grad-CAM attribution, losses, budget steering and exact budget decoding."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

import gmpq
from gmpq.quant import MixedConv2d, QConv2d, QLinear, WeightQuantizer, mixed_layers
from gmpq.quant import functional as QF
from gmpq.quant import fused
from gmpq.quant.mixed import MixedWeightQuantizer
from gmpq.search import (
    AttributionModel,
    BudgetPenalty,
    ScoreSettings,
    SearchObjective,
    SearchSpace,
    alpha_parameters,
    alpha_table,
    attribution_loss,
    bops_range,
    build_supernet,
    capacity_p,
    check_budget,
    decode,
    decode_uniform,
    deployment_macs,
    expected_bops_g,
    fix_supernet,
    get_strategy,
    layer_probabilities,
    linear_head,
    search_space,
)

BITS = (2, 3, 4, 6)


def _fast_steps(model: nn.Module) -> None:
    """Weight steps max|W| / Q_p (skips the MSE search, which is slow on an 11 M-parameter model)."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, WeightQuantizer) and not child.is_float:
                flat = module.weight.detach().reshape(module.weight.shape[0], -1).abs().amax(1).clamp_min(1e-8)
                bits = child.bits if isinstance(child, MixedWeightQuantizer) else (child.bits,)
                with torch.no_grad():
                    child.scale.copy_(torch.stack([flat / QF.weight_qmax(b) for b in bits]).view_as(child.scale))
                child.initialized.fill_(True)


def _supernet(arch: str, deploy: str, size: int = 224, num_classes: int = 10) -> tuple[nn.Module, SearchSpace]:
    model = gmpq.create_model(arch, num_classes=num_classes)
    space = search_space(model, BITS, BITS, 8, deployment_macs(deploy, size, num_classes), deploy, size)
    return model, space


# ------------------------------------------------------------------------------------------------ supernet
def test_supernet_layers_and_deployment_macs():
    model, space = _supernet("mobilenetv2_050_cifar", "mobilenetv2_050")
    assert space.kept == ("conv_stem", "classifier")
    assert len(space.layers) == len(gmpq.searchable_layer_names(model))
    report = gmpq.count_bops(gmpq.create_model("mobilenetv2_050", num_classes=10), 224)
    by_name = {r.name: r.macs for r in report.layers}
    assert space.macs == tuple(by_name[n] for n in space.layers)  # MACs at 224 of the ImageNet layout, not at 32
    build_supernet(model, space)
    assert list(mixed_layers(model)) == list(space.layers)
    assert isinstance(model.conv_stem, QConv2d) and isinstance(model.classifier, QLinear)
    assert model.conv_stem.w_bits == 8 and model.classifier.a_bits == 8
    alphas = alpha_parameters(model)
    assert len(alphas) == 2 * len(space.layers) and all(a.detach().abs().sum().item() == 0 for a in alphas)
    with pytest.raises(gmpq.ModelError, match="float"):
        build_supernet(model, space)
    with pytest.raises(gmpq.ModelError, match="deploy arch"):
        search_space(gmpq.create_model("resnet18_cifar", num_classes=10), BITS, BITS, 8,
                     deployment_macs("mobilenetv2_050", 224, 10), "mobilenetv2_050", 224)


def test_decoded_supernet_matches_policy_model():
    """Fixing the supernet at a policy gives the layers gmpq.quantize builds from policy.json (same bits/names)."""
    model, space = _supernet("mobilenetv2_050_cifar", "mobilenetv2_050")
    build_supernet(model, space)
    choices = {n: (BITS[i % 4], BITS[(i + 1) % 4]) for i, n in enumerate(space.layers)}
    policy = space.policy(choices, {"strategy": "test"})
    fixed = fix_supernet(model, choices)
    reference = gmpq.create_model("mobilenetv2_050_cifar", policy=policy, num_classes=10)
    for (name, a), (_, b) in zip(gmpq.quantizable_layers(fixed).items(), gmpq.quantizable_layers(reference).items(),
                                 strict=True):
        assert type(a) is type(b) and (a.w_bits, a.a_bits) == (b.w_bits, b.a_bits), name
    deployed = gmpq.count_bops(gmpq.create_model("mobilenetv2_050", policy=policy, num_classes=10), 224)
    assert policy.bops_searched_g == pytest.approx(deployed.bops_searched_g, rel=1e-12)
    assert policy.bops_total_g == pytest.approx(deployed.bops_total_g, rel=1e-12)


# ------------------------------------------------------------------------------------------------ attribution
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_closed_form_cam_equals_autograd(arch):
    """Closed-form Grad-CAM (W_cls[c] times the head quantizer's STE mask) equals autograd's, maps and alpha
    gradients of the attribution loss, to 1e-5 relative."""
    torch.manual_seed(0)
    model, space = _supernet(arch, arch)
    teacher = AttributionModel(copy.deepcopy(model).eval())
    build_supernet(model, space)
    _fast_steps(model)
    x = torch.randn(2, 3, 128, 128)  # final feature map 4x4
    model(x)  # calibrates the activation clips on this batch
    with torch.no_grad():
        for p in alpha_parameters(model):
            p.copy_(torch.randn_like(p))
        _, cam_fp = teacher(x)
    wrapped = AttributionModel(model)
    assert wrapped.method == "closed"
    features = model.forward_features(x)  # one trunk forward, both Grad-CAMs on it
    results = {}
    for method in ("closed", "autograd"):
        logits, cam = wrapped.attribute(features, method)
        loss = attribution_loss(cam_fp, cam, 3.0)
        grads = torch.autograd.grad(loss, [*alpha_parameters(model), model.get_classifier().weight],
                                    retain_graph=True)
        results[method] = (logits.detach(), cam.detach(), torch.cat([g.flatten() for g in grads[:-1]]), grads[-1])
    closed, auto = results["closed"], results["autograd"]
    assert cam.shape == (2, 4, 4) and float(cam.sum()) > 0
    torch.testing.assert_close(closed[0], auto[0], rtol=1e-6, atol=1e-6)
    for got, want, what in zip(closed[1:], auto[1:], ("cam", "alpha gradients", "classifier gradient"), strict=True):
        assert float(want.norm()) > 0, what
        assert float((got - want).norm() / want.norm()) < 1e-5, what
    assert AttributionModel(teacher.model).method == "closed"


class _MLPHeadNet(nn.Module):
    """A timm-style model whose head is pooling + a two-layer MLP (no closed form)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)

    def forward_features(self, x):
        return torch.relu(self.stem(x))

    def forward_head(self, x):
        return self.fc2(torch.relu(self.fc1(self.global_pool(x).flatten(1))))

    def get_classifier(self):
        return self.fc2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_non_linear_head_uses_autograd_and_small_maps_warn():
    net = _MLPHeadNet()
    assert linear_head(net) is None
    with pytest.raises(ValueError, match="not global average pooling"):
        AttributionModel(net, "closed")
    wrapped = AttributionModel(net)
    assert wrapped.method == "autograd"
    x = torch.randn(3, 3, 6, 6)
    logits, cam = wrapped(x)
    c = logits.argmax(1)
    feats = net.forward_features(x).detach().requires_grad_()
    score = net.forward_head(feats).gather(1, c[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feats)
    want = torch.relu((grad.sum((2, 3))[:, :, None, None] * feats).sum(1))
    torch.testing.assert_close(cam, want.detach())
    cam.sum().backward()  # differentiable through the head's gradient (create_graph)
    assert net.fc1.weight.grad is not None and float(net.fc1.weight.grad.abs().sum()) > 0
    with pytest.warns(UserWarning, match="smaller than 4x4"):
        AttributionModel(net)(torch.randn(1, 3, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttributionModel(net)(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_frozen_teacher_compiles_frozen(autocast):
    """On the compile backend the frozen teacher's trunk is compiled with its weights inlined as constants (BN folded
    into the convolutions): a weight changed in place after the first call no longer reaches it, while the eager
    trunk sees the change. Before that its maps equal the eager teacher's (to the folding's rounding; bf16 within the
    bf16 teacher's own tolerance)."""
    torch.manual_seed(0)
    model = gmpq.create_model("resnet18_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    eager = AttributionModel(copy.deepcopy(model)).freeze(autocast)
    with fused.using_backend("compile"):
        teacher = AttributionModel(model).freeze(autocast)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compiler failure would fall back to eager with one
            logits, cam = teacher(x)
            want_logits, want_cam = eager(x)
            tolerance = 1e-4 if autocast is None else 0.05
            assert torch.equal(logits.float().argmax(1), want_logits.float().argmax(1))
            assert float((cam.float() - want_cam.float()).abs().max()) <= tolerance * float(want_cam.abs().max())
            with torch.no_grad():
                model.conv1.weight.mul_(-1.0)
            assert torch.equal(teacher(x)[1], cam)  # the compiled trunk kept the weights it was compiled with
            assert not torch.equal(teacher.model.forward_features(x), eager.model.forward_features(x))


# ------------------------------------------------------------------------------------------------ losses
def test_attribution_loss_definition():
    torch.manual_seed(0)
    a_fp, a_q = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    p = 2.5
    t = a_fp.flatten(1) ** p
    t = t / t.norm(dim=1, keepdim=True)
    q = a_q.flatten(1) / a_q.flatten(1).norm(dim=1, keepdim=True)
    want = ((t - q) ** 2).sum(1).mean() / 20  # batch mean of the squared distance over H*W
    assert float(attribution_loss(a_fp, a_q, p)) == pytest.approx(float(want), rel=1e-6)
    assert float(attribution_loss(a_fp, a_fp ** p * 7.0, p)) == pytest.approx(0.0, abs=1e-12)  # scale invariant
    assert torch.isfinite(attribution_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), 3.0))
    with pytest.raises(ValueError, match="shape"):
        attribution_loss(torch.rand(2, 4, 4), torch.rand(2, 2, 2), 3.0)


def test_capacity_p_and_expected_bops():
    model, space = _supernet("mobilenetv2_050_cifar", "mobilenetv2_050")
    build_supernet(model, space)
    mean_bits = sum(BITS) / 4
    assert capacity_p(model, space, 24.0) == pytest.approx(24.0 / mean_bits**2, rel=1e-6)
    assert float(expected_bops_g(model, space)) == pytest.approx(sum(space.macs) * mean_bits**2 / 1e9, rel=1e-5)
    layer = mixed_layers(model)[space.layers[0]]
    with torch.no_grad():
        layer.alpha_w.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
        layer.alpha_a.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    e = {n: (mean_bits, mean_bits) for n in space.layers} | {space.layers[0]: (6.0, 2.0)}
    want_p = 24.0 * sum(1 / (w * a) for w, a in e.values()) / len(e)
    assert capacity_p(model, space, 24.0) == pytest.approx(want_p, rel=1e-5)
    objective = SearchObjective(space, BudgetPenalty(1.0), 40.0, "auto", 24.0)
    assert objective.exponent(model) == pytest.approx(want_p, rel=1e-5)
    with pytest.raises(ValueError, match="p must be"):
        SearchObjective(space, BudgetPenalty(1.0), 40.0, "fixed")


def test_every_loss_term_reaches_alpha():
    torch.manual_seed(0)
    model, space = _supernet("mobilenetv2_050_cifar", "mobilenetv2_050")
    teacher = AttributionModel(copy.deepcopy(model).eval())
    build_supernet(model, space)
    _fast_steps(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    student = AttributionModel(model)
    with torch.no_grad():
        _, cam_fp = teacher(x)
    penalty = BudgetPenalty(0.5 * float(expected_bops_g(model, space)), mu=1.0)
    logits, cam = student(x)
    terms = SearchObjective(space, penalty, 40.0, 3.0)(model, logits, y, cam, cam_fp)
    assert float(terms.total) == pytest.approx(float(terms.ce + 40.0 * terms.attr + terms.complexity), rel=1e-6)
    for name in ("ce", "attr", "complexity"):
        grads = torch.autograd.grad(getattr(terms, name), alpha_parameters(model), retain_graph=True,
                                    allow_unused=True)
        nonzero = sum(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert nonzero == len(grads), f"{name}: {nonzero}/{len(grads)} alphas get a gradient"
    # above the budget the complexity term lowers the expected bits of every layer
    grads = torch.autograd.grad(terms.complexity, alpha_parameters(model))
    assert all(float(g[-1]) > 0 > float(g[0]) for g in grads)


def test_budget_penalty_steers_expected_bops_to_the_budget():
    """Only the complexity term, SGD on the alphas as in the search: E[BOPs] settles at the budget from above and
    from below."""
    _, space = _supernet("mobilenetv2_050_cifar", "mobilenetv2_050")
    macs, bits = torch.tensor(space.macs, dtype=torch.float32), torch.tensor(BITS, dtype=torch.float32)
    lo, hi = bops_range(space)
    for budget in (lo + 0.15 * (hi - lo), lo + 0.7 * (hi - lo)):
        alpha_w = torch.zeros(len(space.layers), 4, requires_grad=True)
        alpha_a = torch.zeros(len(space.layers), 4, requires_grad=True)
        penalty = BudgetPenalty(budget, scale=len(space.layers))
        optimizer = torch.optim.SGD([alpha_w, alpha_a], lr=0.01, momentum=0.9)
        for _ in range(600):
            bops = gmpq.expected_bops(macs, alpha_w.softmax(1), alpha_a.softmax(1), bits, bits)
            optimizer.zero_grad()
            penalty(bops).backward()
            optimizer.step()
            penalty.update(float(bops))
        assert float(bops) == pytest.approx(budget, rel=0.01)
    other = BudgetPenalty(1.0)
    other.load_state_dict(penalty.state_dict())
    assert other.mu == penalty.mu != 0


# ------------------------------------------------------------------------------------------------ budget decoding
def _tiny_space(macs=(3_000_000, 1_000_000, 7_000_000), w_bits=BITS, a_bits=BITS) -> SearchSpace:
    names = tuple(f"l{i}" for i in range(len(macs)))
    return SearchSpace("tiny", "tiny", 32, names, tuple(macs), ("stem",), (100_000,), w_bits, a_bits, 8)


@pytest.mark.parametrize(("w_bits", "a_bits"), [(BITS, BITS), ((2, 3, 4), (3, 4)), ((3, 8), (2, 4, 6))],
                         ids=["shared", "fewer-activation-bits", "fewer-weight-bits"])
def test_decode_is_the_exact_optimum(w_bits, a_bits):
    """On a space small enough to enumerate, the ILP decodes the most probable policy inside the window, with one
    candidate list or different ones for weights and activations."""
    space = _tiny_space(w_bits=w_bits, a_bits=a_bits)
    rng = np.random.default_rng(0)
    pairs = list(itertools.product(w_bits, a_bits))
    lo, hi = bops_range(space)
    for trial in range(6):
        lw = np.log(rng.dirichlet(np.ones(len(w_bits)), size=3))
        la = np.log(rng.dirichlet(np.ones(len(a_bits)), size=3))
        budget = lo + (hi - lo) * rng.uniform(0.1, 0.9)
        best_lp = -math.inf
        for combo in itertools.product(pairs, repeat=3):
            bops = sum(m * w * a for m, (w, a) in zip(space.macs, combo, strict=True)) / 1e9
            if 0.97 * budget <= bops <= budget:
                lp = sum(lw[i, w_bits.index(w)] + la[i, a_bits.index(a)] for i, (w, a) in enumerate(combo))
                best_lp = max(best_lp, lp)
        decoded = decode(space, lw, la, budget)
        assert -decoded.cost == pytest.approx(best_lp, abs=1e-9), trial
        assert 0.97 * budget <= decoded.bops_g <= budget


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_decode_respects_budget_on_random_alphas(arch):
    _, space = _supernet(arch + "_cifar", arch)
    lo, hi = bops_range(space)
    gen = torch.Generator().manual_seed(1)
    for frac in (0.0, 0.05, 0.3, 0.6, 0.95):
        budget = lo + frac * (hi - lo) + 1e-6
        logits_w = torch.randn(len(space.layers), 4, generator=gen) * 3
        logits_a = torch.randn(len(space.layers), 4, generator=gen) * 3
        decoded = decode(space, torch.log_softmax(logits_w, 1), torch.log_softmax(logits_a, 1), budget)
        assert 0.97 * budget <= decoded.bops_g <= budget
        assert decoded.bops_g == pytest.approx(space.searched_bops_g(decoded.choices), rel=1e-12)


def test_infeasible_and_too_large_budgets():
    _, space = _supernet("resnet18_cifar", "resnet18")
    lo, hi = bops_range(space)
    assert lo == pytest.approx(sum(space.macs) * 4 / 1e9)
    with pytest.raises(gmpq.BudgetError, match=r"smallest feasible budget is search.budget_g=") as info:
        check_budget(space, 0.5 * lo)
    smallest = float(str(info.value).rpartition("=")[2])
    assert lo <= smallest <= lo * 1.0001
    with pytest.raises(gmpq.BudgetError, match="nothing to search"):
        check_budget(space, 2 * hi)
    with pytest.raises(gmpq.BudgetError, match="positive"):
        check_budget(space, -1.0)
    check_budget(space, smallest)  # the suggested budget is feasible
    check_budget(space, hi)
    with pytest.raises(gmpq.BudgetError):
        decode_uniform(space, 0.5 * lo)
    # a space whose achievable BOPs leave a gap around the budget
    sparse = _tiny_space(macs=(10_000_000,))
    with pytest.raises(gmpq.BudgetError, match="nearest policy below it costs 0.16 GBOPs"):
        check_budget(sparse, 0.175)


def test_separate_candidates_bound_the_budget_by_their_own_extremes():
    """Weights over {2, 3, 4}, activations over {3, 4}: the smallest policy is W2A3, the largest W4A4, and the
    messages name them; uniform policies are pairs of the two lists."""
    _, space = _supernet("resnet18_cifar", "resnet18")
    space = dataclasses.replace(space, w_bits=(2, 3, 4), a_bits=(3, 4))
    total = sum(space.macs) / 1e9
    lo, hi = bops_range(space)
    assert (lo, hi) == (pytest.approx(total * 6), pytest.approx(total * 16))
    message = r"with candidate bits \[2, 3, 4\] \(weights\) and \[3, 4\] \(activations\) the smallest policy " \
              r"\(every searched layer at 2/3 bits\) costs"
    with pytest.raises(gmpq.BudgetError, match=message) as info:
        check_budget(space, 0.9 * lo)
    assert lo <= float(str(info.value).rpartition("=")[2]) <= lo * 1.0001
    with pytest.raises(gmpq.BudgetError, match=r"largest policy \(every searched layer at 4/4 bits\)"):
        check_budget(space, 1.1 * hi)
    with pytest.raises(gmpq.BudgetError, match="2/3 bits"):
        decode_uniform(space, total * 5)  # W2A2 would fit, but 2 bits are no activation candidate
    assert set(decode_uniform(space, total * 7.9).choices.values()) == {(2, 3)}  # 2x4 = 8 does not fit
    assert set(decode_uniform(space, total * 8.5).choices.values()) == {(2, 4)}
    assert set(decode_uniform(space, total * 8.5, "above").choices.values()) == {(3, 3)}
    with pytest.raises(gmpq.BudgetError, match=r"\[2, 3, 4\] \(weights\) and \[3, 4\] \(activations\) costs more"):
        decode_uniform(space, total * 16, "above")


def test_separate_candidates_shape_the_supernet_and_its_expectations():
    """alpha_w over the weight candidates, alpha_a over the activation ones; expected bits, BOPs and the
    capacity-aware p use each list; the decoded policy keeps activations among theirs."""
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    space = search_space(model, (2, 3, 4), (3, 4), 8, deployment_macs("mobilenetv2_050", 224, 10),
                         "mobilenetv2_050", 224)
    assert (space.w_bits, space.a_bits) == ((2, 3, 4), (3, 4)) and len(space.pairs) == 6
    build_supernet(model, space)
    for layer in mixed_layers(model).values():
        assert (layer.w_candidates, layer.a_candidates) == ((2, 3, 4), (3, 4))
        assert layer.alpha_w.shape == (3,) and layer.alpha_a.shape == (2,) and layer.wq.scale.shape[0] == 3
    w_probs, a_probs = layer_probabilities(model, space)
    assert w_probs.shape == (len(space.layers), 3) and a_probs.shape == (len(space.layers), 2)
    assert capacity_p(model, space, 24.0) == pytest.approx(24.0 / (3.0 * 3.5), rel=1e-6)
    assert float(expected_bops_g(model, space)) == pytest.approx(sum(space.macs) * 3.0 * 3.5 / 1e9, rel=1e-5)
    lo, hi = bops_range(space)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in alpha_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 3)
    budget = lo + 0.4 * (hi - lo)
    decoded = get_strategy("gmpq").decode(space, budget, model)
    assert 0.97 * budget <= decoded.bops_g <= budget
    assert {a for _, a in decoded.choices.values()} <= {3, 4} and {w for w, _ in decoded.choices.values()} <= {2, 3, 4}
    table = alpha_table(model, space)[space.layers[0]]
    assert (len(table["alpha_w"]), len(table["w"]), len(table["alpha_a"]), len(table["a"])) == (3, 3, 2, 2)


@pytest.mark.parametrize("budget", [0.5, 3.0, 200.0])
def test_every_budget_suggestion_is_itself_feasible(budget):
    """Whatever the message suggests passes check_budget: suggestions are rounded up, to 5 significant digits (a
    policy costing 11.111111 G gets 11.112, not 11.1111; a tiny one 3.3334e-05 G gets 0.000033334, not 0.0000)."""
    for macs in ((2_777_777_750,), (1_111_111, 2_222_222_222), (8_333,), (123_456_789, 987)):
        space = SearchSpace("tiny", "tiny", 32, tuple(f"l{i}" for i in range(len(macs))), macs, (), (), (2, 8), (2, 8),
                            8)
        for scale in (1e-6, 1.0):
            try:
                check_budget(space, budget * scale)
            except gmpq.BudgetError as e:
                suggested = float(str(e).split("search.budget_g=")[1].split()[0])
                check_budget(space, suggested)
    lo, _ = bops_range(SearchSpace("t", "t", 32, ("l0",), (2_777_777_750,), (), (), (2, 8), (2, 8), 8))
    assert lo == pytest.approx(11.111111)


def test_strategies_share_one_interface():
    model, space = _supernet("resnet18_cifar", "resnet18")
    lo, hi = bops_range(space)
    budget = 15.3
    uniform, settings = get_strategy("uniform"), ScoreSettings(seed=0, hutchinson_samples=1, ompq_beta=1.0,
                                                                     uniform_side="below")
    scores = uniform.score(None, [], space, settings)
    assert scores.costs.shape == (len(space.layers), 4, 4) and not scores.costs.any()  # no preference
    decoded = uniform.decode(space, scores, budget, settings)
    assert set(decoded.choices.values()) == {(3, 3)}  # 9 bits^2 = 15.26 G fits 15.3 G, 3x4 = 12 does not
    assert decoded.bops_g <= budget
    tie = uniform.decode(space, scores, sum(space.macs) * 8.5 / 1e9, settings)
    assert set(tie.choices.values()) == {(2, 4)}  # 2x4 = 4x2 = 8: the tie goes to more activation bits
    build_supernet(model, space)
    for name in ("gmpq", "edmips"):
        strategy = get_strategy(name)
        assert strategy.trains_supernet and strategy.lambda_attr(40.0) == (40.0 if name == "gmpq" else 0.0)
        decoded = strategy.decode(space, budget, model)
        assert 0.97 * budget <= decoded.bops_g <= budget
    w_probs, _ = layer_probabilities(model, space)
    assert torch.allclose(w_probs, torch.full_like(w_probs, 0.25))
    with pytest.raises(gmpq.RecipeError, match="unknown search.strategy.*hawq, ompq, uniform, random"):
        get_strategy("limpq")
    assert isinstance(mixed_layers(model)[space.layers[0]], MixedConv2d)


def test_the_search_core_loads_neither_train_nor_data() -> None:
    """At run time too: importing the search core (and gmpq itself) loads neither the training loop, the data nor the
    stages; calling gmpq.search(recipe) loads the stage then."""
    import subprocess
    import sys

    code = ("import sys, gmpq.search, gmpq.search.supernet, gmpq.search.losses, gmpq.search.budget; "
            "assert not {'gmpq.train', 'gmpq.data', 'gmpq.stages', 'accelerate'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class _ChannelsLastNet(nn.Module):
    """A timm-style model whose forward_features returns [B, H, W, C] (timm's output_fmt = 'NHWC')."""

    output_fmt = "NHWC"

    def __init__(self, linear_head: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True, input_fmt="NHWC")
        self.norm = nn.Identity() if linear_head else nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)
        self.num_features = 8

    def forward_features(self, x):
        return torch.relu(self.stem(x)).permute(0, 2, 3, 1)

    def forward_head(self, x):
        return self.fc(self.norm(self.global_pool(x)))

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("linear", [True, False], ids=["closed", "autograd"])
def test_channels_last_feature_maps_give_the_same_grad_cam(linear):
    """For an NHWC model (MambaOut-style) both methods give the Grad-CAM of the channels-first formula."""
    net = _ChannelsLastNet(linear)
    wrapped = AttributionModel(net)
    assert wrapped.method == ("closed" if linear else "autograd")
    x = torch.randn(3, 3, 6, 5)
    logits, cam = wrapped(x)
    assert cam.shape == (3, 6, 5)
    feats = net.forward_features(x).detach().requires_grad_()
    score = net.forward_head(feats).gather(1, logits.argmax(1)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feats)
    want = torch.relu((grad.sum((1, 2))[:, None, None, :] * feats).sum(3))
    torch.testing.assert_close(cam, want.detach(), rtol=1e-5, atol=1e-6)


def test_a_token_sequence_is_refused_with_a_clear_error():
    vit = gmpq.create_model("test_vit", num_classes=5)
    with pytest.raises(gmpq.ModelError, match=r"forward_features returns \[2, \d+, \d+\].*search.strategy=edmips"):
        AttributionModel(vit)(torch.randn(2, 3, 160, 160))


def test_attribution_loss_is_finite_for_large_teacher_maps():
    """n(A^p) is scale-free, so a map of 1e20 (whose cube overflows float32) gives the loss of the same map at 1."""
    cam = torch.rand(2, 4, 4)
    student = torch.rand(2, 4, 4)
    small = attribution_loss(cam, student, 3.0)
    large = attribution_loss(cam * 1e20, student, 3.0)
    assert torch.isfinite(large) and torch.allclose(large, small, rtol=1e-5)


def test_budget_suggestions_round_up_without_trailing_zeros():
    from gmpq.search.budget import _round_up

    assert _round_up(0.044) == "0.044" and _round_up(0.0440001) == "0.044001" and _round_up(2.0) == "2"
    assert float(_round_up(0.160493827)) >= 0.160493827
