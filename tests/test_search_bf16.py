"""The search under bf16 autocast (CPU autocast here; the same code runs CUDA's): finite float32 losses, the budget
terms in float32, a bf16 teacher under inference mode, and a decoded policy inside the budget window."""

from __future__ import annotations

import copy

import pytest
import torch

import gmpq
from gmpq.quant import calibrate
from gmpq.search import (
    AttributionModel,
    BudgetPenalty,
    SearchObjective,
    alpha_parameters,
    bops_range,
    build_supernet,
    deployment_macs,
    expected_bops_g,
    get_strategy,
    search_space,
    weight_param_groups,
)

BITS = (2, 3, 4, 6)


def test_teacher_in_bf16_under_inference_mode():
    model = gmpq.create_model("resnet18_cifar", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    want_logits, want_cam = AttributionModel(copy.deepcopy(model)).freeze()(x)
    logits, cam = AttributionModel(model).freeze(torch.bfloat16)(x)
    assert logits.dtype == cam.dtype == torch.bfloat16 and torch.is_inference(cam) and not cam.requires_grad
    assert torch.equal(logits.float().argmax(1), want_logits.argmax(1))
    assert float((cam.float() - want_cam).abs().max()) <= 0.05 * float(want_cam.abs().max())


def test_search_steps_under_bf16_autocast():
    """Three search steps under autocast: every loss term is a finite float32 number, the cross-entropy close to the
    float32 step's, the budget terms exactly the float32 ones; the alphas move, and the decoded policy lies in
    [97 %, 100 %] of the budget."""
    torch.manual_seed(0)
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    space = search_space(model, BITS, BITS, 8, deployment_macs("mobilenetv2_050", 224, 10), "mobilenetv2_050", 224)
    teacher = AttributionModel(copy.deepcopy(model)).freeze(torch.bfloat16)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    build_supernet(model, space)
    calibrate(model, [x])
    lo, hi = bops_range(space)
    budget = lo + 0.3 * (hi - lo)
    reference = copy.deepcopy(model)

    def step_terms(net, autocast: bool):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits, cam_q = AttributionModel(net)(x)
            _, cam_fp = teacher(x)
            return SearchObjective(space, BudgetPenalty(budget, scale=len(space.layers)), 40.0, 3.0)(
                net, logits, y, cam_q, cam_fp)

    with torch.no_grad():
        want = step_terms(reference, autocast=False)
    penalty = BudgetPenalty(budget, scale=len(space.layers))
    objective = SearchObjective(space, penalty, 40.0, 3.0)
    opt_w = torch.optim.SGD(weight_param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    opt_a = torch.optim.SGD(alpha_parameters(model), lr=3.0, momentum=0.9)
    before = [a.detach().clone() for a in alpha_parameters(model)]
    for step in range(3):
        with torch.autocast("cpu", torch.bfloat16):
            logits, cam_q = AttributionModel(model)(x)
            _, cam_fp = teacher(x)
            terms = objective(model, logits, y, cam_q, cam_fp)
        assert logits.dtype == torch.bfloat16
        for name in ("total", "ce", "attr", "complexity", "expected_bops_g"):
            value = getattr(terms, name)
            assert value.dtype == torch.float32 and torch.isfinite(value), name
        if step == 0:  # (the attribution loss may differ more: a sample's predicted class can flip in bf16)
            assert terms.ce.item() == pytest.approx(want.ce.item(), rel=0.05)
            assert terms.complexity.item() == want.complexity.item()
            assert terms.expected_bops_g.item() == expected_bops_g(model, space).item()
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        terms.total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt_w.step()
        opt_a.step()
        penalty.update(terms.expected_bops_g.item())
    assert all(torch.isfinite(a).all() for a in alpha_parameters(model))
    assert any(not torch.equal(a, b) for a, b in zip(alpha_parameters(model), before, strict=True))
    decoded = get_strategy("gmpq").decode(space, budget, model)
    assert 0.97 * budget <= decoded.bops_g <= budget
