"""The conversion table: every float layer type gmpq quantizes is reproduced exactly (padding, weight transform),
by fixed-bit and mixed layers; types without an entry are refused; quantizers follow the layer's device and dtype.

The CUDA tests at the end run where a GPU is present (``python -m pytest tests/test_conversion.py -k cuda``) and are
skipped elsewhere; they import nothing beyond torch, timm and gmpq's model/quant/search/hub code (no ``datasets``).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.linear import Linear as TimmLinear
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

import gmpq
from gmpq.quant import (
    MixedConv2d,
    MixedLinear,
    QConv2d,
    QLinear,
    WeightQuantizer,
    calibrate,
    conversions,
    fold_weight_transform,
    to_mixed,
    to_quantized,
)
from gmpq.quant import functional as QF
from gmpq.search import AttributionModel, build_supernet, fix_supernet, search_space

BITS = (2, 4)


def _scaled(cls, *args, **kwargs):
    layer = cls(*args, **kwargs)
    with torch.no_grad():  # a non-trivial gain, so that a transform that ignores it shows
        layer.gain.copy_(torch.rand_like(layer.gain) + 0.5)
    return layer


#: (id, float layer factory, input shape). Odd spatial sizes with stride 2 make TF 'SAME' padding asymmetric.
CASES = [
    ("Conv2d", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9)),
    ("Conv2d-reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False), (2, 4, 7, 7)),
    ("Linear", lambda: nn.Linear(8, 5), (3, 8)),
    ("timm.Linear", lambda: TimmLinear(8, 5), (3, 8)),
    ("Conv2dSame", lambda: Conv2dSame(4, 6, 3, stride=2), (2, 4, 9, 9)),
    ("Conv2dSame-depthwise", lambda: Conv2dSame(4, 4, 5, stride=2, groups=4, bias=False), (2, 4, 10, 10)),
    ("Conv2dSameExport", lambda: Conv2dSameExport(4, 6, 3, stride=2), (2, 4, 9, 9)),
    ("StdConv2d", lambda: StdConv2d(4, 6, 3, stride=2), (2, 4, 9, 9)),
    ("StdConv2dSame", lambda: StdConv2dSame(4, 6, 3, stride=2, bias=True), (2, 4, 9, 9)),
    ("ScaledStdConv2d", lambda: _scaled(ScaledStdConv2d, 4, 6, 3, stride=2), (2, 4, 9, 9)),
    ("ScaledStdConv2dSame", lambda: _scaled(ScaledStdConv2dSame, 4, 6, 3, stride=2, gamma=1.7), (2, 4, 9, 9)),
]
IDS = [c[0] for c in CASES]


# ------------------------------------------------------------------------ independent references (the docstrings' math)
def _reference_weight(layer: nn.Module) -> torch.Tensor:
    """T(W): identity, or (W - mean) / sqrt(var + eps) per output channel (times gain * gamma / sqrt(fan_in))."""
    w = layer.weight.detach()
    if not isinstance(layer, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)):
        return w
    flat = w.reshape(w.shape[0], -1)
    std = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + layer.eps)
    if isinstance(layer, (ScaledStdConv2d, ScaledStdConv2dSame)):
        std = std * layer.gain.detach().reshape(-1, 1) * layer.scale
    return std.reshape_as(w)


def _reference_pad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TensorFlow 'SAME': total padding max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0), the smaller half first."""
    if not isinstance(layer, (Conv2dSame, Conv2dSameExport)) and not getattr(layer, "same_pad", False):
        return x
    pads = []
    for i, k, s, d in zip(x.shape[-2:], layer.kernel_size, layer.stride, layer.dilation, strict=True):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def _reference_forward(float_layer: nn.Module, q: QConv2d | QLinear, x: torch.Tensor) -> torch.Tensor:
    """op(pad(Q_a(x)), Q_w(T(W))) + b with the quantized layer's clip, sign mode and steps."""
    xq = QF.quantize_activation(x, q.aq.clip.detach(), q.a_bits, bool(q.aq.signed))
    wq = QF.quantize_weight(_reference_weight(float_layer), q.wq.scale.detach(), q.w_bits)
    if isinstance(float_layer, nn.Linear):
        return F.linear(xq, wq, float_layer.bias)
    xq = _reference_pad(float_layer, xq)
    if float_layer.padding_mode != "zeros":
        pad = [p for p in reversed(float_layer.padding) for _ in range(2)]
        return F.conv2d(F.pad(xq, pad, mode=float_layer.padding_mode), wq, float_layer.bias, float_layer.stride, 0,
                        float_layer.dilation, float_layer.groups)
    return F.conv2d(xq, wq, float_layer.bias, float_layer.stride, float_layer.padding, float_layer.dilation,
                    float_layer.groups)


def _one_hot(layer: MixedConv2d | MixedLinear, w_bits: int, a_bits: int) -> None:
    with torch.no_grad():
        for alpha, bits in ((layer.alpha_w, w_bits), (layer.alpha_a, a_bits)):
            alpha.fill_(float("-inf"))
            alpha[BITS.index(bits)] = 0.0


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(g)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    grads["output"] = out.detach()
    return grads


# ------------------------------------------------------------------------------------------------ the table
def test_every_conv_and_linear_subclass_of_timm_has_an_entry():
    """A timm upgrade that adds a Conv2d/Linear subclass fails here until the table has an entry for it."""
    found = {cls for name, module in list(sys.modules.items()) if name.startswith("timm.") and module is not None
             for cls in vars(module).values()
             if isinstance(cls, type) and issubclass(cls, (nn.Conv2d, nn.Linear)) and cls.__module__.startswith("timm.")}
    assert {Conv2dSame, Conv2dSameExport, StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame,
            TimmLinear} <= found
    missing = sorted(cls.__qualname__ for cls in found - set(conversions()))
    assert not missing, f"timm layer types without a conversion: {missing}"


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES], ids=IDS)
def test_fixed_bit_layer_reproduces_the_float_forward(make, shape):
    """32/32 bits: bit-identical to the float layer. 4/4 bits: op(pad(Q_a(x)), Q_w(T(W))) + b, with the steps
    calibrated on T(W) (not on the raw weight), and gradients reaching every float parameter (gain included)."""
    torch.manual_seed(0)
    float_layer = make()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = float_layer(x)
    q32 = to_quantized(float_layer, 32, 32)
    assert isinstance(q32, QConv2d if isinstance(float_layer, nn.Conv2d) else QLinear)
    assert set(float_layer.state_dict()) <= set(q32.state_dict())
    for key, value in float_layer.state_dict().items():
        assert torch.equal(q32.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(q32(x), want)
    torch.testing.assert_close(q32.effective_weight(), _reference_weight(float_layer), rtol=1e-5, atol=1e-6)

    q4 = to_quantized(float_layer, 4, 4)
    calibrate(q4, [x])
    expected_steps = WeightQuantizer(4, q4.wq.scale.numel())
    expected_steps.init_scale(_reference_weight(float_layer))
    torch.testing.assert_close(q4.wq.scale.detach(), expected_steps.scale.detach(), rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        q4.wq.scale.copy_(expected_steps.scale)  # the reference below uses the same steps
        got = q4(x)
        torch.testing.assert_close(got, _reference_forward(float_layer, q4, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, want)
    q4(x).square().sum().backward()
    for name, p in q4.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES], ids=IDS)
def test_mixed_layer_reproduces_the_float_forward(make, shape):
    """Bypassed: the float forward exactly. One-hot alphas: the fixed-bit layer of that choice (output equal,
    gradients close), which carries the conversion, its attributes and parameters. Fused = autograd reference."""
    torch.manual_seed(0)
    float_layer = make()
    x = torch.randn(*shape)
    layer = to_mixed(float_layer, BITS, BITS)
    assert isinstance(layer, MixedConv2d if isinstance(float_layer, nn.Conv2d) else MixedLinear)
    assert layer.conversion is conversions()[type(float_layer)]
    with torch.no_grad(), gmpq.quant.quantization_bypassed():
        assert torch.equal(layer(x), float_layer(x))
    calibrate(layer, [x])
    reference = copy.deepcopy(layer)
    reference.fused = False
    with torch.no_grad():
        layer.alpha_w.copy_(torch.randn(len(BITS)))
        layer.alpha_a.copy_(torch.randn(len(BITS)))
        reference.load_state_dict(layer.state_dict())
    g = torch.randn_like(reference(x))
    got, want = _grads(layer, x, g), _grads(reference, x, g)
    assert set(got) == set(want)
    assert "gain" in got or not hasattr(float_layer, "gain")
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"fused vs reference: {key}")

    _one_hot(layer, 4, 2)
    fixed = layer.to_fixed(4, 2)
    assert fixed.conversion is layer.conversion and (fixed.w_bits, fixed.a_bits) == (4, 2)
    assert set(float_layer.state_dict()) <= set(fixed.state_dict())
    g = torch.randn_like(fixed(x))
    got, want = _grads(layer, x, g), _grads(fixed, x, g)
    torch.testing.assert_close(got["output"], want["output"], rtol=1e-6, atol=1e-6)
    for key in ("input", "weight", *(("gain",) if "gain" in want else ())):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES if "Std" in c[0]], ids=[i for i in IDS if "Std" in i])
def test_folding_the_weight_transform_keeps_the_output(make, shape):
    """What an export stores: weight = T(W), no gain; the folded layer computes the same at 32 and at 4 bits."""
    float_layer = make()
    x = torch.randn(*shape)
    q = to_quantized(float_layer, 4, 4)
    calibrate(q, [x])
    with torch.no_grad():
        want = q(x)
    removed = fold_weight_transform(q)
    assert removed == (["gain"] if isinstance(float_layer, (ScaledStdConv2d, ScaledStdConv2dSame)) else [])
    assert not hasattr(q, "gain")
    assert q.conversion.weight is None and "gain" not in q.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(q(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["test_nfnet", "tf_mobilenetv3_small_100"])
@pytest.mark.parametrize("layout", ["packed", "float"])
def test_an_export_reloads_to_the_same_logits(tmp_path, arch, layout):
    """Scaled weight standardisation (folded into the stored weight) and 'SAME' padding survive export + load."""
    model = gmpq.create_model(arch, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.mul_(torch.rand_like(p) + 0.5)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 3))
    x = torch.randn(2, 3, 40, 40)
    calibrate(model, [x])
    with torch.no_grad():
        want = model.eval()(x)
    gmpq.save_pretrained(model, tmp_path / arch, format=layout, card=False)
    loaded = gmpq.from_pretrained(tmp_path / arch)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    assert any(name.endswith("gain") for name, _ in model.named_parameters()) == (arch == "test_nfnet")
    assert not any(name.endswith("gain") for name, _ in loaded.named_parameters())


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES if "Std" in c[0]], ids=[i for i in IDS if "Std" in i])
def test_an_evaluation_after_a_weight_update_sees_the_new_weight(make, shape):
    """Without autograd T(W) and Q_w(T(W)) are kept between calls; every in-place update of the weight or the gain
    (what an optimizer step does) is seen by the next call, which equals a fresh copy's output."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    q = to_quantized(make(), 4, 4)
    calibrate(q, [x])
    with torch.no_grad():
        previous = q(x)
        assert torch.equal(q(x), previous)
        for step in range(6):
            q.weight.add_(torch.randn_like(q.weight) * 0.3)
            if hasattr(q, "gain") and step % 2:
                q.gain.mul_(1.5)
            got = q(x)
            assert torch.equal(got, copy.deepcopy(q)(x)) and not torch.equal(got, previous), step
            previous = got


# ------------------------------------------------------------------------------------------------ refusal
class _OwnConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _with_own_conv() -> nn.Module:
    model = gmpq.create_model("resnet18_cifar", num_classes=10)
    old = model.layer1[0].conv1
    model.layer1[0].conv1 = _OwnConv(old.in_channels, old.out_channels, 3, padding=1, bias=False)
    return model


def test_a_subclass_without_an_entry_is_refused_naming_the_layer_and_its_type():
    model = _with_own_conv()
    before = {n: type(m) for n, m in model.named_modules()}
    policy = gmpq.uniform_policy(model, 4, 4)
    with pytest.raises(gmpq.ModelError, match=r"layer 'layer1\.0\.conv1' is a .*_OwnConv, a subclass of nn\.Conv2d "
                                              r"that gmpq has no conversion for") as info:
        gmpq.quantize(model, policy)
    assert "already quantized" not in str(info.value) and "register_conversion" in str(info.value)
    assert {n: type(m) for n, m in model.named_modules()} == before  # refused before anything was replaced
    space = search_space(model, BITS, BITS, 8, gmpq.layer_macs(model, 32), "resnet18_cifar", 32)
    with pytest.raises(gmpq.ModelError, match=r"layer1\.0\.conv1.*_OwnConv"):
        build_supernet(model, space)
    assert {n: type(m) for n, m in model.named_modules()} == before
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass whose forward MHA never calls
    with pytest.raises(gmpq.ModelError, match="NonDynamicallyQuantizableLinear"):
        to_quantized(attention.out_proj, 4, 4, "attn.out_proj")


def test_a_registered_conversion_makes_a_subclass_quantizable():
    from gmpq.quant.conversion import _TABLE, Conversion, register_conversion

    conversion = Conversion(_OwnConv, "conv2d", "conv2d, output doubled", weight=lambda layer, w: 2 * w)
    register_conversion(conversion)
    try:
        model = _with_own_conv().eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want = model(x)
            gmpq.quantize(model, gmpq.uniform_policy(model, 32, 32, kept_bits=32))
            assert torch.equal(model(x), want)
        assert model.layer1[0].conv1.conversion is conversion
    finally:
        del _TABLE[_OwnConv]


# ------------------------------------------------------------------------------------------------ device and dtype
def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _off_device(model: nn.Module, device: str, dtype: torch.dtype) -> list[str]:
    return [f"{n} ({t.device}, {t.dtype})" for n, t in _tensors(model)
            if t.device.type != device or (t.is_floating_point() and t.dtype != dtype)]


@pytest.mark.parametrize("arch", ["resnet18_cifar", "tf_mobilenetv3_small_100", "nf_resnet26"])
def test_quantizers_follow_the_layer_device_and_dtype_on_the_meta_device(arch):
    """create_model(policy=, device=, dtype=), build_supernet and fix_supernet on a meta-device float64 model: every
    quantizer tensor (steps, clips, flags, alphas) is created there, none on the CPU in float32."""
    cpu = gmpq.create_model(arch, num_classes=10)
    policy = gmpq.uniform_policy(cpu, 4, 4)
    model = gmpq.create_model(arch, num_classes=10, policy=policy, device="meta", dtype=torch.float64)
    assert isinstance(next(iter(gmpq.quantizable_layers(model).values())), QConv2d)
    assert not _off_device(model, "meta", torch.float64)
    supernet = gmpq.create_model(arch, num_classes=10, device="meta", dtype=torch.float64)
    space = search_space(supernet, BITS, BITS, 8, gmpq.layer_macs(cpu, 32), arch, 32)
    build_supernet(supernet, space)
    assert not _off_device(supernet, "meta", torch.float64)
    fix_supernet(supernet, {name: (4, 2) for name in space.layers})
    assert not _off_device(supernet, "meta", torch.float64)


def test_a_float64_model_quantizes_exactly_at_32_bits_and_calibrates_in_float64():
    model = gmpq.create_model("tf_mobilenetv3_small_100", num_classes=10, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    q32 = gmpq.quantize(copy.deepcopy(model), gmpq.uniform_policy(model, 32, 32, kept_bits=32))
    with torch.no_grad():
        assert torch.equal(q32(x), want)
    q4 = gmpq.quantize(copy.deepcopy(model), gmpq.uniform_policy(model, 4, 4))
    calibrate(q4, [x])
    assert not _off_device(q4, "cpu", torch.float64)
    with torch.no_grad():
        out = q4(x)
    assert out.dtype == torch.float64 and torch.isfinite(out).all() and not torch.equal(out, want)


# ------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("arch", ["mobilenetv2_050_cifar", "tf_mobilenetv3_small_100", "resnetv2_50x1_bit"])
def test_cuda_resident_model_quantizes_calibrates_and_matches_the_cpu(arch):
    """A model built on CUDA (create_model(policy=, device='cuda')) or moved there before gmpq.quantize: its
    quantizers live on CUDA, calibration runs there, and with the CPU model's calibrated state its 4-bit logits are
    the CPU model's (calibration subsamples activations at random, so two calibrations differ slightly)."""
    torch.manual_seed(0)
    cpu_float = gmpq.create_model(arch, num_classes=10).eval()
    policy = gmpq.uniform_policy(cpu_float, 4, 4)
    x = torch.randn(4, 3, 64, 64)
    built = gmpq.create_model(arch, num_classes=10, policy=policy, device="cuda")
    assert not _off_device(built, "cuda", torch.float32)
    moved = gmpq.quantize(copy.deepcopy(cpu_float).cuda(), policy)
    assert not _off_device(moved, "cuda", torch.float32)
    cpu = gmpq.quantize(copy.deepcopy(cpu_float), policy)
    calibrate(cpu, [x])
    calibrate(moved, [x.cuda()])
    calibrate(built, [x.cuda()])
    assert not _off_device(built, "cuda", torch.float32)
    assert all(bool(q.calibrated) for q in moved.modules() if isinstance(q, gmpq.quant.ActQuantizer))
    moved.load_state_dict(cpu.state_dict())
    with torch.no_grad():
        assert torch.isfinite(built.eval()(x.cuda())).all()
        torch.testing.assert_close(moved.eval()(x.cuda()).cpu(), cpu.eval()(x), rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.parametrize("arch", ["mobilenetv2_050_cifar", "tf_efficientnet_b0", "nf_resnet26"])
def test_cuda_supernet_search_step_with_attribution(arch):
    """build_supernet on a CUDA model, one search step (CE + attribution + complexity, backward, an alpha step) and
    fix_supernet, all on CUDA."""
    from gmpq.search import BudgetPenalty, SearchObjective, alpha_parameters

    torch.manual_seed(0)
    model = gmpq.create_model(arch, num_classes=10, device="cuda")
    teacher = AttributionModel(copy.deepcopy(model)).eval().requires_grad_(False)
    space = search_space(model, BITS, BITS, 8, gmpq.layer_macs(gmpq.create_model(arch, num_classes=10), 128), arch,
                         128)
    build_supernet(model, space)
    assert not _off_device(model, "cuda", torch.float32)
    student = AttributionModel(model)
    x, y = torch.randn(8, 3, 128, 128, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    calibrate(model, [x])
    objective = SearchObjective(space, BudgetPenalty(0.5 * sum(space.macs) * 16 / 1e9), 1.0, 3.0)
    with torch.no_grad():
        _, cam_fp = teacher(x)
    logits, cam_q = student(x)
    terms = objective(model, logits, y, cam_q, cam_fp)
    terms.total.backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
               for a in alpha_parameters(model))
    torch.optim.Adam(alpha_parameters(model), lr=0.01).step()
    fix_supernet(model, {name: (4, 4) for name in space.layers})
    assert not _off_device(model, "cuda", torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@cuda
def test_cuda_from_pretrained_and_export_of_a_cuda_model(tmp_path):
    """from_pretrained(device='cuda') computes the CPU model's logits; a CUDA model exports and reloads."""
    cpu = gmpq.from_pretrained("hub/mobilenetv2_050_cifar-gmpq-embedded")
    gpu = gmpq.from_pretrained("hub/mobilenetv2_050_cifar-gmpq-embedded", device="cuda")
    assert not _off_device(gpu, "cuda", torch.float32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-3)
    gmpq.save_pretrained(gpu, tmp_path / "again", card=False)
    again = gmpq.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(x), cpu(x), rtol=1e-5, atol=1e-5)

