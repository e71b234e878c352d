"""Mixed-precision (EdMIPS composite) layers and their fused kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gmpq.quant import MixedConv2d, MixedLinear, QConv2d, QLinear, calibrate, fused, mixed_layers, to_mixed
from gmpq.quant import functional as QF
from gmpq.quant.quantizers import optimal_clip

BITS = (2, 3, 4, 6)


def _ready(layer: MixedConv2d | MixedLinear, x: torch.Tensor) -> None:
    """Calibrate ``layer`` on ``x`` and give it random (non-uniform) alphas."""
    layer.aq.observe(x)
    layer.aq.finish_calibration()
    layer.wq.init_scale(layer.weight)
    with torch.no_grad():
        layer.alpha_w.copy_(torch.randn(len(layer.alpha_w)))
        layer.alpha_a.copy_(torch.randn(len(layer.alpha_a)))


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(g)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["input"] = x.grad.clone()
    grads["output"] = out.detach()
    return grads


CASES = [
    ("conv", lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True), (3, 6, 7, 7), False),
    ("conv-signed-strided", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (3, 6, 9, 9), True),
    ("depthwise", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (2, 8, 6, 6), False),
    ("linear", lambda: nn.Linear(12, 5), (4, 12), True),
]


@pytest.mark.parametrize(("w_bits", "a_bits"), [(BITS, BITS), ((2, 3, 4), (3, 4, 6, 8))], ids=["shared", "separate"])
@pytest.mark.parametrize("name,make,shape,signed", CASES, ids=[c[0] for c in CASES])
def test_fused_layer_matches_autograd_composite(name, make, shape, signed, w_bits, a_bits):
    """The fused kernels give the EdMIPS composite's output exactly and autograd's gradients for every parameter,
    with one candidate list or with different weight and activation candidates (K_w = 3, K_a = 4)."""
    layer = to_mixed(make(), w_bits, a_bits)
    assert layer.alpha_w.shape == (len(w_bits),) and layer.aq.clip.shape == (len(a_bits),)
    x = torch.randn(*shape) if signed else torch.randn(*shape).relu()
    _ready(layer, x)
    assert bool(layer.aq.signed) == signed
    reference = copy.deepcopy(layer)
    reference.fused = False
    g = torch.randn_like(reference(x))
    got, want = _grads(layer, x, g), _grads(reference, x, g)
    assert torch.equal(got["output"], want["output"])
    assert set(got) == {"output", "input", "weight", "alpha_w", "alpha_a", "wq.scale", "aq.clip"} | (
        {"bias"} if layer.bias is not None else set())
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name}: gradient of {key}")
        if key not in ("output", "bias"):
            assert got[key].abs().sum() > 0, f"{name}: no gradient reaches {key}"


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_one_hot_alpha_equals_fixed_bit_layer(kind):
    """With one-hot probabilities the mixed layer computes exactly the fixed-bit QConv2d / QLinear."""
    float_layer = nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else nn.Linear(10, 3)
    x = torch.randn(2, 4, 8, 8).relu() if kind == "conv" else torch.randn(5, 10)
    layer = to_mixed(float_layer, BITS, BITS)
    _ready(layer, x)
    for w_bits, a_bits in [(2, 6), (4, 4), (6, 3)]:
        with torch.no_grad():
            layer.alpha_w.fill_(float("-inf"))
            layer.alpha_w[BITS.index(w_bits)] = 0.0
            layer.alpha_a.fill_(float("-inf"))
            layer.alpha_a[BITS.index(a_bits)] = 0.0
        fixed = layer.to_fixed(w_bits, a_bits)
        assert isinstance(fixed, QConv2d if kind == "conv" else QLinear)
        assert (fixed.w_bits, fixed.a_bits) == (w_bits, a_bits)
        g = torch.randn_like(fixed(x))
        got, want = _grads(layer, x, g), _grads(fixed, x, g)
        assert torch.equal(got["output"], want["output"]), (w_bits, a_bits)
        torch.testing.assert_close(got["input"], want["input"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-5, atol=1e-6)


def test_forward_stores_no_quantizer_intermediates():
    """The fused layer saves only its input and weight (plus small per-candidate tensors) for the backward pass."""
    layer = to_mixed(nn.Conv2d(8, 8, 3, padding=1, bias=False), BITS, BITS)
    x = torch.randn(4, 8, 16, 16).relu().requires_grad_()
    _ready(layer, x.detach())
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    reference = copy.deepcopy(layer)
    reference.fused = False
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reference(x).sum().backward()
    assert sum(t.numel() >= x.numel() for t in saved) > 4 * len(BITS)  # what the fused form avoids


def test_calibrate_sets_every_candidate():
    """gmpq.quant.calibrate fills per-candidate MSE-optimal clips and steps, and the shared sign mode."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(256, 3))
    model[2] = to_mixed(model[2], BITS, BITS)
    model[4] = to_mixed(model[4], (3, 4), (2, 8))
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    assert calibrate(model, batches) == 2
    conv, linear = model[2], model[4]
    assert bool(conv.aq.calibrated) and bool(conv.wq.initialized) and not bool(conv.aq.signed)
    assert bool(linear.aq.signed)  # the conv output feeding it is signed
    clips = conv.aq.clip.detach()
    assert clips.shape == (4,) and bool((clips[1:] >= clips[:-1]).all())  # more bits -> wider optimal clip
    with torch.no_grad():
        inputs = model[1](model[0](torch.cat(batches)))
    assert conv.aq.clip[0].item() == pytest.approx(optimal_clip(inputs.flatten(), 2, False), rel=0.05)
    flat = conv.weight.detach().reshape(4, -1)
    for j, b in enumerate(BITS):
        want = QF.mse_optimal_scale(flat, flat.abs().amax(1), QF.weight_qmax(b))
        torch.testing.assert_close(conv.wq.scale[j].detach(), want)
    assert linear.wq.scale.shape == (2, 3) and linear.aq.clip.shape == (2,)
    assert list(mixed_layers(model)) == ["2", "4"]


def test_uncalibrated_layer_calibrates_itself_and_bypass():
    layer = to_mixed(nn.Conv2d(3, 4, 3), BITS, BITS)
    x = torch.randn(2, 3, 6, 6)
    layer(x)
    assert bool(layer.aq.calibrated) and bool(layer.wq.initialized) and bool(layer.aq.signed)
    from gmpq.quant import quantization_bypassed

    with quantization_bypassed():
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias))


def test_bad_candidates_raise():
    with pytest.raises(ValueError, match="32"):
        MixedConv2d(3, 4, 3, w_bits=(2, 32))
    with pytest.raises(ValueError, match="empty"):
        MixedLinear(3, 4, a_bits=())
    with pytest.raises(ValueError, match="backend"):
        fused.set_backend("fast")

