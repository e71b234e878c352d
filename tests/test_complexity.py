"""MACs and BOPs accounting against the paper's figures, and the differentiable expected BOPs."""

from __future__ import annotations

import pytest
import torch

import gmpq
from gmpq.complexity import expected_bops, layer_macs


def test_float_resnet18_at_224_is_within_1_percent_of_the_paper() -> None:
    report = gmpq.count_bops(gmpq.create_model("resnet18"), 224)
    assert report.bops_total_g == pytest.approx(1853.4, rel=0.01)
    assert report.macs == pytest.approx(1.814e9, rel=1e-3)


def test_conv_macs_formula_including_depthwise() -> None:
    model = gmpq.create_model("mobilenetv2_100")
    macs = layer_macs(model, 224)
    # stem: 112x112 outputs, 32 channels, 3x3x3 kernel
    assert macs["conv_stem"] == 112 * 112 * 32 * 27
    # first depthwise: 112x112, 32 channels, 3x3 per channel
    assert macs["blocks.0.0.conv_dw"] == 112 * 112 * 32 * 9
    assert macs["classifier"] == 1280 * 1000


def test_policy_bops_split_searched_and_kept() -> None:
    model = gmpq.create_model("resnet18", num_classes=1000)
    float_report = gmpq.count_bops(model, 224)
    quantized = gmpq.create_model("resnet18", policy=gmpq.uniform_policy(model, 4, 4))
    report = gmpq.count_bops(quantized, 224)
    kept_macs = sum(r.macs for r in report.layers if r.kept)
    assert report.bops_kept_g == pytest.approx(kept_macs * 64 / 1e9)
    assert report.bops_searched_g == pytest.approx((float_report.macs - kept_macs) * 16 / 1e9)
    assert {r.name for r in report.layers if r.kept} == {"conv1", "fc"}


def test_counting_never_calibrates_a_quantized_model() -> None:
    model = gmpq.create_model("resnet18_cifar", num_classes=10, policy=gmpq.uniform_policy(
        gmpq.create_model("resnet18_cifar", num_classes=10), 4, 4))
    gmpq.count_bops(model, 32)
    assert not any(bool(m.aq.calibrated) for m in gmpq.quantizable_layers(model).values())


def test_expected_bops_is_differentiable_and_exact_for_one_hot() -> None:
    macs = torch.tensor([1e9, 2e9])
    bits = torch.tensor([2.0, 4.0, 8.0])
    alpha_w = torch.zeros(2, 3, requires_grad=True)
    alpha_a = torch.zeros(2, 3, requires_grad=True)
    value = expected_bops(macs, alpha_w.softmax(-1), alpha_a.softmax(-1), bits, bits)
    value.backward()
    assert value.item() == pytest.approx(3 * (14 / 3) ** 2)
    assert alpha_w.grad.abs().sum() > 0 and alpha_a.grad.abs().sum() > 0
    one_hot = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert expected_bops(macs, one_hot, one_hot, bits, bits).item() == pytest.approx(1 * 4 + 2 * 64)
