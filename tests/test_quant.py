"""Quantizers and fixed-bit quantized layers: levels, STE gradients, sign modes, float equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmpq.quant import ActQuantizer, QConv2d, QLinear, WeightQuantizer, calibrate, check_bits, to_quantized
from gmpq.quant import functional as QF


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_weight_quantizer_has_2b_minus_1_symmetric_levels_per_channel(bits: int) -> None:
    w = torch.randn(4, 8, 3, 3) * torch.tensor([0.1, 1.0, 5.0, 0.01]).view(4, 1, 1, 1)
    q = WeightQuantizer(bits, 4)
    out = q(w)
    for c in range(4):
        levels = torch.unique(torch.round(out[c] / q.scale[c]))
        assert levels.abs().max() <= 2 ** (bits - 1) - 1
        assert len(levels) <= 2**bits - 1
    # a ramp covering every code hits exactly 2^b - 1 levels including zero
    ramp = torch.linspace(-1, 1, 1001).view(1, -1)
    q2 = WeightQuantizer(bits, 1)
    q2.scale.data.fill_(1.0 / (2 ** (bits - 1) - 1))
    q2.initialized.fill_(True)
    codes = torch.unique(torch.round(q2(ramp) / q2.scale))
    assert len(codes) == 2**bits - 1 and 0 in codes.tolist()


def test_weight_scale_is_per_output_channel_and_mse_initialised() -> None:
    w = torch.randn(3, 16) * torch.tensor([[0.01], [1.0], [100.0]])
    q = WeightQuantizer(4, 3)
    q(w)
    assert bool(q.initialized)
    ratio = q.scale / w.abs().amax(dim=1)
    assert torch.all(ratio > 0.02) and torch.all(ratio <= 1.0 / 7 + 1e-6)
    # the MSE-optimal step beats the naive max-abs step
    naive = w.abs().amax(dim=1) / 7
    err = lambda s: (QF.quantize_weight(w, s, 4) - w).pow(2).sum()  # noqa: E731
    assert err(q.scale.detach()) <= err(naive) + 1e-6


def test_weight_ste_gradient_passes_inside_and_blocks_outside_the_range() -> None:
    w = torch.tensor([[-3.0, -0.4, 0.1, 0.45, 3.0]], requires_grad=True)
    scale = torch.tensor([0.5], requires_grad=True)
    out = QF.quantize_weight(w, scale, 2)  # codes in [-1, 1], range [-0.5, 0.5]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    assert scale.grad is not None and scale.grad.abs().item() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unsigned_activation_has_2b_levels_on_0_clip(bits: int) -> None:
    x = torch.linspace(-1, 3, 10001)
    clip = torch.tensor(2.0)
    out = QF.quantize_activation(x, clip, bits, signed=False)
    levels = torch.unique(out)
    assert len(levels) == 2**bits
    assert levels.min() == 0 and torch.isclose(levels.max(), clip)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_activation_has_2b_minus_1_symmetric_levels(bits: int) -> None:
    x = torch.linspace(-3, 3, 10001)
    out = QF.quantize_activation(x, torch.tensor(2.0), bits, signed=True)
    levels = torch.unique(out)
    assert len(levels) == 2**bits - 1
    assert torch.isclose(levels.min(), torch.tensor(-2.0)) and torch.isclose(levels.max(), torch.tensor(2.0))


def test_activation_gradients_ste_inside_and_pact_clip_gradient_outside() -> None:
    x = torch.tensor([-1.0, 0.3, 1.2, 5.0], requires_grad=True)
    clip = torch.tensor(2.0, requires_grad=True)
    QF.quantize_activation(x, clip, 4, signed=False).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # above the clip d/dc = 1; inside, the LSQ rounding residual (small)
    x2 = torch.tensor([5.0, 6.0])
    c2 = torch.tensor(2.0, requires_grad=True)
    QF.quantize_activation(x2, c2, 4, signed=False).sum().backward()
    assert c2.grad.item() == pytest.approx(2.0)


def test_weight_gradients_on_the_clipping_bounds_are_lsqs_on_every_torch_version() -> None:
    """W / s = +-Q_p counts as clipped: no gradient to the weight, +-Q_p to the step (LSQ). torch.clamp's own
    gradient there is 1 in torch 2.11 and 0 in torch 2.14, so the quantizer defines it itself."""
    w = torch.tensor([[-0.75, -0.5, 0.2, 0.5, 0.75]], requires_grad=True)  # W / s = -1.5, -1, 0.4, 1, 1.5
    scale = torch.tensor([0.5], requires_grad=True)
    out = QF.quantize_weight(w, scale, 2)  # Q_p = 1
    assert out.tolist() == [[-0.5, -0.5, 0.0, 0.5, 0.5]]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    lsq = (-1 - 1 + (round(0.4) - 0.4) + 1 + 1) / 5**0.5  # LSQ's gradient scale 1 / sqrt(numel * Q_p)
    assert scale.grad.item() == pytest.approx(lsq, rel=1e-6)


def test_sign_mode_is_calibrated_from_real_batches() -> None:
    relu_like = ActQuantizer(4)
    relu_like.observing = True
    relu_like(torch.rand(64, 8))
    relu_like.finish_calibration()
    assert not bool(relu_like.signed)
    signed = ActQuantizer(4)
    signed.observing = True
    signed(torch.randn(64, 8))
    signed.finish_calibration()
    assert bool(signed.signed)
    x = -torch.rand(10)
    assert torch.all(signed(x) <= 0) and signed(x).abs().sum() > 0  # negative inputs survive (no silent ReLU)


def test_uncalibrated_quantizer_calibrates_itself_on_its_first_batch() -> None:
    q = ActQuantizer(3)
    q(torch.randn(1000))
    assert bool(q.calibrated) and bool(q.signed) and q.clip.item() > 0


def test_mobilenetv2_linear_bottleneck_inputs_are_signed_after_calibration() -> None:
    import gmpq

    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    layers = gmpq.quantizable_layers(model)
    # the expansion conv of block 2 reads the previous block's linear-bottleneck output: signed
    assert bool(layers["blocks.2.0.conv_pw"].aq.signed)
    # the depthwise conv reads a ReLU6 output: unsigned
    assert not bool(layers["blocks.2.0.conv_dw"].aq.signed)


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, groups=4, bias=False),
     nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Linear(8, 5)],
    ids=["conv", "grouped", "depthwise", "linear"],
)
def test_32_bit_layers_equal_the_float_layer_exactly(layer: nn.Module) -> None:
    x = torch.randn(2, 8, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(2, 8)
    q = to_quantized(layer, 32, 32)
    assert torch.equal(q(x), layer(x))


@pytest.mark.parametrize("groups", [1, 8])
def test_low_bit_conv_matches_manual_fake_quantization(groups: int) -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    q = QConv2d.from_float(conv, 3, 4)
    x = torch.randn(2, 8, 6, 6)
    out = q(x)
    wq = QF.quantize_weight(conv.weight, q.wq.scale, 3)
    xq = QF.quantize_activation(x, q.aq.clip, 4, bool(q.aq.signed))
    assert torch.allclose(out, nn.functional.conv2d(xq, wq, conv.bias, padding=1, groups=groups), atol=1e-6)
    assert q.w_bits == 3 and q.a_bits == 4


def test_quantized_layer_loads_float_state_dict_and_keeps_names() -> None:
    lin = nn.Linear(4, 3)
    q = QLinear(4, 3, w_bits=4, a_bits=4)
    missing, unexpected = q.load_state_dict(lin.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"wq.scale", "wq.initialized", "aq.clip", "aq.signed", "aq.calibrated"}
    assert torch.equal(q.weight, lin.weight)


@pytest.mark.parametrize("bad", [1, 9, 16, 0, 2.0, True, "4"])
def test_bad_bit_widths_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        check_bits(bad)
