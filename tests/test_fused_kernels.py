"""The fused quantization kernels on every backend: torch.compile, Triton (through Triton's CPU interpreter here, on
CUDA where a GPU is present) against the eager reference; bf16 autocast; no host-device synchronisation.

The CUDA comparisons run with TF32 off (:func:`ieee_float32`): cuDNN convolutions default to TF32 on Ampere and newer
GPUs, which rounds their operands to 10 mantissa bits, so two convolution algorithms (e.g. for contiguous and
channels_last tensors) differ by about 1e-3 relative on the same inputs — far more than the kernels' own rounding."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gmpq.errors import ModelError
from gmpq.quant import functional as QF
from gmpq.quant import fused, to_mixed, to_quantized

BITS = (2, 3, 4, 6)
CUDA = torch.cuda.is_available()
#: Set in the child process of test_triton_kernels_in_the_interpreter (Triton reads it when it is first imported).
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


backend = fused.using_backend


def _kernel_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 7, generator=gen)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, -1.5, 2.0])  # exactly on a clip, a lower bound, zero
    w = torch.randn(6, 5, 3, 3, generator=gen)
    tensors = dict(x=x, g=torch.randn(3, 5, 7, 7, generator=gen), w=w, gw=torch.randn(6, 5, 3, 3, generator=gen),
                   probs=torch.softmax(torch.randn(4, generator=gen), 0), clip=torch.tensor([0.5, 1.0, 1.5, 2.0]),
                   scales=torch.rand(4, 6, generator=gen) * 0.2 + 0.05)
    out = {k: v.to(device) for k, v in tensors.items()}
    for k in ("x", "g", "gw"):
        out[k] = out[k].to(dtype)
    return out


def _all_kernels(t: dict, signed: bool, out_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every output of the four kernels (activation / weight, forward / backward)."""
    gx, gp, gc = fused._act_backward(t["x"], t["g"], t["probs"], t["clip"], BITS, signed)
    gw, gpw, gs = fused._weight_backward(t["w"], t["gw"], t["probs"], t["scales"], BITS)
    return {"x_mix": fused._act_forward(t["x"], t["probs"], t["clip"], BITS, signed, out_dtype), "grad_x": gx,
            "grad_probs_a": gp, "grad_clip": gc, "w_mix": fused._weight_forward(t["w"], t["probs"], t["scales"], BITS,
                                                                               out_dtype),
            "grad_w": gw, "grad_probs_w": gpw, "grad_scales": gs}


def _compare(got: dict, want: dict, exact: tuple[str, ...] = (), rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal dtypes; values bit for bit (``exact``) or within ``rtol`` and ``atol`` times the largest magnitude
    (sums in another order differ by rounding relative to their terms, not to the result). A failure names the
    tensor, its largest absolute and relative differences and how many elements are off."""
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        a, b = got[key].cpu(), want[key].cpu()
        if key in exact:
            assert torch.equal(a, b), f"{key} differs: max |diff| {float((a.double() - b.double()).abs().max())}"
        else:
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale,
                                       msg=lambda report, key=key, scale=scale: f"{key} differs (largest |value| "
                                       f"{scale:.3g}): {report}")


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matrix products in IEEE float32 on CUDA (no TF32), restored afterwards: torch >= 2.9's
    ``fp32_precision`` settings (mixing them with the legacy ``allow_tf32`` flags raises), else the legacy flags."""
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.fixture
def interpreted_triton():
    """The Triton kernels on Triton's CPU interpreter as the ``triton`` backend (only in the child process that
    test_triton_kernels_in_the_interpreter starts)."""
    if not INTERPRETER:
        pytest.skip("runs in a child process with TRITON_INTERPRET=1 (test_triton_kernels_in_the_interpreter)")
    module = pytest.importorskip("gmpq.quant.triton_kernels")
    assert module.interpreted()
    with backend("triton"):
        yield module


def test_triton_kernels_in_the_interpreter():
    """This module's interpreter tests, in a child process with TRITON_INTERPRET=1: Triton reads it when it is first
    imported, which in this process has already happened."""
    if INTERPRETER:
        pytest.skip("this is the child process")
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreter", "-p", "no:cacheprovider"],
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 7, result.stdout[-3000:]  # the kernel, bf16 and layer tests ran


def _compiled(run):
    """``run()`` on the compiled kernels; skips where compilation is unavailable (no C++ compiler)."""
    with backend("compile"):
        try:
            return run()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("signed", [False, True])
def test_compiled_kernels_match_eager(signed):
    """torch.compile'd kernels (one fused loop per tensor) equal the eager ones."""
    t = _kernel_inputs()
    assert fused.get_backend() == "eager"  # tests/conftest.py selects the eager kernels
    eager = _all_kernels(t, signed)
    _compare(_compiled(lambda: _all_kernels(t, signed)), eager, rtol=1e-5, atol=2e-6)


def test_compiled_fixed_layer_matches_autograd():
    """A fixed-bit layer on the compiled K = 1 kernels gives the autograd quantizers' output and gradients."""
    layer, x = _ready_fixed(*LAYERS[0][1:])
    want = _grads(layer, x)
    _compare(_compiled(lambda: _grads(layer, x)), want, exact=("output",), rtol=1e-5, atol=2e-6)


def test_compiled_kernels_keep_channels_last_without_copies():
    """On the compile backend a channels_last activation and weight are read as stored: every output keeps the
    input's layout, and the values and gradients equal those of the contiguous tensors (a mixed conv and QDrop)."""
    layer, x = _ready_mixed(lambda: nn.Conv2d(5, 6, 3, padding=1), (2, 5, 6, 6), False)
    with backend("compile"):
        want = _grads(copy.deepcopy(layer), x)
        got = _grads(layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last))
        _compare(got, want, rtol=1e-5, atol=2e-6)
        t = _kernel_inputs()
        last = {k: (v.to(memory_format=torch.channels_last) if v.dim() == 4 else v) for k, v in t.items()}
        outputs = _all_kernels(last, True)
        for name in ("x_mix", "grad_x", "w_mix", "grad_w"):
            assert outputs[name].is_contiguous(memory_format=torch.channels_last), name
        _compare(outputs, _all_kernels(t, True), exact=("x_mix", "w_mix"), rtol=1e-5, atol=1e-6)
        seed = torch.tensor(7, dtype=torch.int64)
        xs = t["x"].to(memory_format=torch.channels_last).requires_grad_()
        y = fused.qdrop_activation(xs, t["clip"][1], 3, True, 0.5, seed)
        y.backward(t["g"])
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert xs.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("signed", [False, True])
def test_qdrop_kernel_matches_its_op_by_op_reference(signed):
    """QDrop's fused kernel: the eager form's mask and values, the gradients of torch.where(keep, x, Q_a(x)) by
    autograd, a kept fraction near p, and the end cases p = 0 (the quantizer) and p = 1 (the identity)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 9, 9, generator=gen)
    clip = torch.tensor(1.3)
    grad = torch.randn(x.shape, generator=gen)
    seed = torch.tensor(2**31 + 12345, dtype=torch.int64)

    def run(name, p, make):
        xx, cc = x.clone().requires_grad_(), clip.clone().requires_grad_()
        with backend(name):
            y = make(xx, cc, p)
        (y * grad).sum().backward()
        return y.detach(), xx.grad, cc.grad

    def reference(xx, cc, p):
        keep = fused.dropout_keep(xx.numel(), seed, int(p * 2**32), xx.device).view(xx.shape)
        return torch.where(keep, xx, QF.quantize_activation(xx, cc, 3, signed))

    for p in (0.0, 0.5, 1.0):
        fused_out = run("compile", p, lambda xx, cc, p: fused.qdrop_activation(xx, cc, 3, signed, p, seed))
        eager_out = run("eager", p, lambda xx, cc, p: fused.qdrop_activation(xx, cc, 3, signed, p, seed))
        autograd_out = run("eager", p, reference)
        for got in (fused_out, eager_out):
            torch.testing.assert_close(got[0], autograd_out[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], autograd_out[1], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[2], autograd_out[2], rtol=1e-5, atol=1e-5)
        kept = (fused_out[0] == x) & (QF.quantize_activation(x, clip, 3, signed) != x)
        changed = QF.quantize_activation(x, clip, 3, signed) != x
        fraction = float(kept.sum() / changed.sum())
        assert abs(fraction - p) < 0.05, (p, fraction)
    other = fused.qdrop_activation(x, clip, 3, signed, 0.5, seed + 1)
    assert not torch.equal(other, fused.qdrop_activation(x, clip, 3, signed, 0.5, seed))  # the seed draws the mask


@pytest.mark.parametrize("signed", [False, True])
def test_triton_kernels_match_eager_in_the_interpreter(interpreted_triton, signed):
    """The Triton kernels give the eager kernels' values: elementwise outputs bit for bit, sums to rounding."""
    t = _kernel_inputs()
    got = _all_kernels(t, signed)
    with backend("eager"):
        want = _all_kernels(t, signed)
    _compare(got, want, exact=("x_mix", "grad_x", "w_mix", "grad_w"), rtol=1e-5, atol=2e-6)


def test_triton_kernels_bf16_in_the_interpreter(interpreted_triton):
    """bf16 activations and gradients are read, computed in float32 and written back in bf16."""
    t = _kernel_inputs(dtype=torch.bfloat16)
    got = _all_kernels(t, True, out_dtype=torch.bfloat16)
    with backend("eager"):
        want = _all_kernels(t, True, out_dtype=torch.bfloat16)
    # the interpreter's float32 -> bf16 conversion rounds ties up: one bf16 ulp
    _compare(got, want, rtol=1e-2, atol=1e-2)


LAYERS = [
    ("conv", lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True), (3, 6, 7, 7), False),
    ("conv-signed-strided", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (3, 6, 9, 9), True),
    ("depthwise", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (2, 8, 6, 6), False),
    ("linear", lambda: nn.Linear(12, 5), (4, 12), True),
]


def _exactly_on(q: float, s: torch.Tensor) -> torch.Tensor | None:
    """A float32 ``v`` with ``v / s == q`` exactly (the nearest ones to ``q * s``), or ``None`` if there is none."""
    v = q * s
    for _ in range(4):
        if float(v / s) == q:
            return v
        v = torch.nextafter(v, v * 2 if float(v / s) * q < q * q else v / 2)
    return None


def _on_bounds(weight: torch.Tensor, steps: torch.Tensor, bits: tuple[int, ...]) -> None:
    """Put two weights exactly on each candidate's clipping bounds, ``W / s_j = +-Q_p`` (``steps``: [K, C]), where the
    gradients' definition matters most (torch's own clamp changed its subgradient there)."""
    qmax, _, gammas = fused.weight_constants(bits, weight[0].numel(), steps.device, steps.dtype)
    eff = fused.effective_scales(steps.detach(), gammas)
    flat = weight.detach().view(weight.shape[0], -1)
    rows = weight.shape[0]
    with torch.no_grad():
        for j, q in enumerate(qmax):
            for r in (j + i for i in range(rows)):
                values = [_exactly_on(sign * q, eff[j, r % rows]) for sign in (1.0, -1.0)]
                if all(v is not None for v in values):
                    flat[r % rows, :2] = torch.stack(values)
                    break
            else:
                raise AssertionError(f"no channel's step puts a weight exactly on +-{q}")


def _ready_mixed(make, shape, signed, device="cpu"):
    layer = to_mixed(make(), BITS, BITS).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    x = (x if signed else x.relu()).to(device)
    layer.aq.observe(x)
    layer.aq.finish_calibration()
    layer.wq.init_scale(layer.weight)
    _on_bounds(layer.weight, layer.wq.scale, BITS)
    with torch.no_grad():
        layer.alpha_w.copy_(torch.randn(len(BITS), generator=gen))
        layer.alpha_a.copy_(torch.randn(len(BITS), generator=gen))
    return layer, x


def _ready_fixed(make, shape, signed, device="cpu"):
    layer = to_quantized(make(), 4, 3).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    x = (x if signed else x.relu()).to(device)
    layer(x)  # calibrates itself on the first batch
    _on_bounds(layer.weight, layer.wq.scale[None], (4,))
    return layer, x


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None, autocast: bool = False):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = layer(x)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(g.to(out.dtype))
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["input"] = x.grad.clone()
    grads["output"] = out.detach()
    return grads


@pytest.mark.parametrize("name,make,shape,signed", LAYERS, ids=[c[0] for c in LAYERS])
def test_layers_on_triton_match_the_reference_in_the_interpreter(interpreted_triton, name, make, shape, signed):
    """Mixed layers on the Triton kernels give the autograd composite's output and gradients; fixed-bit layers give
    the autograd quantizers' (their fused K = 1 path)."""
    layer, x = _ready_mixed(make, shape, signed)
    reference = copy.deepcopy(layer)
    reference.fused = False
    got, want = _grads(layer, x), _grads(reference, x)
    _compare(got, want, exact=("output",), rtol=1e-5, atol=2e-6)
    fixed, x = _ready_fixed(make, shape, signed)
    got = _grads(fixed, x)
    with backend("eager"):  # fixed-bit layers take the autograd form off the triton backend
        want = _grads(fixed, x)
    _compare(got, want, exact=("output",), rtol=1e-5, atol=2e-6)


def test_channels_last_and_long_rows_on_triton_in_the_interpreter(interpreted_triton):
    """channels_last activations and weights are indexed in their own layout (outputs keep it); weight rows longer
    than one chunk (1100 > 1024 columns) and activations over several blocks sum their partial gradients."""
    layer, x = _ready_mixed(lambda: nn.Conv2d(5, 6, 3, padding=1), (2, 5, 6, 6), False)
    reference = copy.deepcopy(layer)
    reference.fused = False
    want = _grads(reference, x)
    layer = layer.to(memory_format=torch.channels_last)
    _compare(_grads(layer, x.to(memory_format=torch.channels_last)), want, rtol=1e-5, atol=2e-6)
    layer, x = _ready_mixed(lambda: nn.Linear(1100, 3), (4, 1100), True)
    reference = copy.deepcopy(layer)
    reference.fused = False
    _compare(_grads(layer, x), _grads(reference, x), exact=("output",), rtol=1e-5, atol=2e-6)


def test_triton_kernels_compile_for_a_gpu_without_one():
    """The four kernels compile ahead of time for a Hopper GPU (sm_90; Triton's own ptxas, no GPU needed), in bf16,
    and their PTX rounds with ``cvt.rni``, divides with ``div.rn`` and has no fused multiply-add: the eager kernels'
    arithmetic, operation by operation."""
    if INTERPRETER:
        pytest.skip("the kernels are built for the interpreter in this process")
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from gmpq.quant import triton_kernels as tk

    pointers = {"fp32": "*fp32", "bf16": "*bf16"}

    def ptx(kernel, types: dict[str, str], constants: dict) -> str:
        signature = {name: pointers.get(types.get(name, "fp32"), "*fp32") if name.endswith("_ptr") else "i32"
                     for name in kernel.arg_names if name not in constants}
        signature.update({name: "constexpr" for name in constants})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        return compile(source, target=GPUTarget("cuda", 90, 32), options=dict(tk._OPTIONS)).asm["ptx"]

    bf16 = {"x_ptr": "bf16", "out_ptr": "bf16", "g_ptr": "bf16", "gx_ptr": "bf16"}
    act = {"K": 4, "SIGNED": True, "BLOCK": tk.ACT_BLOCK, "RINT": True}
    weight = {"K": 4, "BLOCK": tk.WEIGHT_BLOCKS[-1], "RINT": True}
    codes = [ptx(tk._act_fwd_kernel, bf16, act),
             ptx(tk._act_bwd_kernel, bf16, {**act, "NEED_GX": True, "NEED_PROBS": True}),
             ptx(tk._weight_fwd_kernel, bf16, weight), ptx(tk._weight_bwd_kernel, bf16, {**weight, "NEED_PROBS": True})]
    for code in codes:
        assert "cvt.rni.f32.f32" in code and "fma.rn.f32" not in code
    assert all("div.rn.f32" in code for code in codes)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    tk = pytest.importorskip("gmpq.quant.triton_kernels")
    if tk.interpreted():
        pytest.skip("TRITON_INTERPRET is set for this process")
    layer, x = _ready_mixed(*LAYERS[0][1:])
    with backend("triton"), pytest.raises(RuntimeError, match="CUDA tensors"):
        layer(x)


STRAYS = [(_ready_mixed, "aq", "clip"), (_ready_mixed, "wq", "scale"), (_ready_fixed, "aq", "clip"),
          (_ready_fixed, "wq", "scale")]


def _stray(ready, quantizer: str, name: str, device: str, stray_device: str):
    """A ready layer on ``device`` whose ``quantizer.name`` was left on ``stray_device``."""
    layer, x = ready(*LAYERS[0][1:], device=device)
    q = getattr(layer, quantizer)
    setattr(q, name, nn.Parameter(getattr(q, name).detach().to(stray_device)))
    return layer, x


@pytest.mark.parametrize("backend_name", ["eager", "compile", "auto"])
def test_tensors_on_two_devices_raise_a_model_error_on_every_backend(backend_name):
    """A quantizer left on another device than its layer is reported as such (naming the tensors), never taken for a
    kernel failure that a fallback hides."""
    for case in STRAYS:
        layer, x = _stray(*case, "cpu", "meta")
        with backend(backend_name), pytest.raises(ModelError, match=r"different devices \(.* on meta"):
            layer(x)


def test_quantized_weight_is_kept_without_autograd_until_it_changes():
    """Evaluation quantizes a weight once: without autograd the result is reused until the weight or its steps change
    in place (an optimizer step, a loaded state dict); with autograd it is computed every time."""
    layer, x = _ready_fixed(*LAYERS[0][1:])
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first
        layer.weight.mul_(1.5)
        second = layer.quantized_weight()
        assert second is not first and torch.equal(second, QF.quantize_weight(layer.weight, layer.wq.scale, 4))
        layer.load_state_dict({k: v * 2 if k == "wq.scale" else v for k, v in layer.state_dict().items()})
        third = layer.quantized_weight()
        assert third is not second
        assert torch.equal(third, QF.quantize_weight(layer.weight, layer.wq.scale, 4))
    with_grad = layer.quantized_weight()
    assert with_grad is not third and with_grad.requires_grad and torch.equal(with_grad, third)


# ------------------------------------------------------------------------------------------------ bf16 autocast
@pytest.mark.parametrize("name,make,shape,signed", LAYERS[:2] + LAYERS[3:], ids=["conv", "conv-signed", "linear"])
def test_layers_under_cpu_autocast(name, make, shape, signed):
    """Under bf16 autocast the mixtures are written in bf16, the layer's output is bf16, and every gradient is in its
    parameter's dtype and close to the float32 one."""
    for ready in (_ready_mixed, _ready_fixed):
        layer, x = ready(make, shape, signed)
        got, want = _grads(layer, x, autocast=True), _grads(layer, x)
        assert got["output"].dtype == torch.bfloat16
        for key, value in want.items():
            if key != "output":
                assert got[key].dtype == value.dtype, key
            assert torch.isfinite(got[key]).all(), key
            scale = value.abs().max().float().clamp_min(1e-3)
            assert (got[key].float() - value.float()).abs().max() <= 0.1 * scale, (ready.__name__, key)


# ------------------------------------------------------------------------------------------------ no synchronisation
class _HostReads(TorchDispatchMode):
    """Records the operators that read a device value on the host (``item``, ``bool``) or copy host data in
    (``torch.tensor(...)``): each a synchronisation on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "lift_fresh"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ready", [_ready_mixed, _ready_fixed], ids=["mixed", "fixed"])
def test_layers_never_read_device_values_on_the_host(ready):
    """After the first call (calibration, cached constants), forward and backward of a mixed or fixed-bit layer
    neither read a device value on the host nor copy host data to the device."""
    for _, make, shape, signed in LAYERS:
        layer, x = ready(make, shape, signed)
        _grads(layer, x)
        with _HostReads() as reads:
            _grads(layer, x)
        assert reads.ops == [], reads.ops


# ------------------------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_triton_kernels_match_eager(signed, dtype):
    t = _kernel_inputs("cuda", dtype)
    with backend("auto"):
        assert fused.get_backend("cuda") == "triton"
    with backend("triton"):  # explicit: a Triton failure raises instead of falling back to torch.compile
        got = _all_kernels(t, signed, out_dtype=dtype)
    with backend("eager"):
        want = _all_kernels(t, signed, out_dtype=dtype)
    if dtype == torch.float32:
        _compare(got, want, exact=("x_mix", "grad_x", "w_mix", "grad_w"), rtol=1e-5, atol=2e-6)
    else:
        _compare(got, want, rtol=1e-2, atol=1e-2)


@needs_cuda
@pytest.mark.parametrize("name,make,shape,signed", LAYERS, ids=[c[0] for c in LAYERS])
def test_cuda_layers_match_the_reference(name, make, shape, signed):
    """Mixed and fixed-bit layers on the Triton kernels give the autograd reference's output and gradients (TF32 off,
    weights on the clipping bounds included)."""
    with backend("triton"), ieee_float32():
        layer, x = _ready_mixed(make, shape, signed, "cuda")
        reference = copy.deepcopy(layer)
        reference.fused = False
        _compare(_grads(layer, x), _grads(reference, x), rtol=1e-5, atol=1e-5)
        fixed, x = _ready_fixed(make, shape, signed, "cuda")
        got = _grads(fixed, x)
    with backend("eager"), ieee_float32():
        want = _grads(fixed, x)
    _compare(got, want, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_large_tensors_and_channels_last():
    """Many kernel blocks (the partial sums), rows longer than one weight chunk, and channels_last tensors (TF32 off:
    the contiguous and channels_last convolutions are different cuDNN algorithms)."""
    with backend("triton"), ieee_float32():
        layer, x = _ready_mixed(lambda: nn.Conv2d(96, 64, 5, padding=2), (8, 96, 33, 33), False, "cuda")
        reference = copy.deepcopy(layer)
        reference.fused = False
        want = _grads(reference, x)
        _compare(_grads(layer, x), want, rtol=1e-4, atol=1e-4)
        layer = layer.to(memory_format=torch.channels_last)
        _compare(_grads(layer, x.to(memory_format=torch.channels_last)), want, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_layer_with_a_quantizer_on_the_cpu_raises_a_model_error():
    """The first GPU run's failure (a CUDA model whose fixed-bit quantizers stayed on the CPU) is named as a device
    mismatch instead of a Triton failure, and the backend stays on Triton."""
    for case in STRAYS:
        layer, x = _stray(*case, "cuda", "cpu")
        with backend("auto"), pytest.raises(ModelError, match=r"different devices \(.* on cpu"):
            layer(x)
    assert fused.get_backend("cuda") == "triton"


@needs_cuda
@pytest.mark.parametrize("ready", [_ready_mixed, _ready_fixed], ids=["mixed", "fixed"])
def test_cuda_layers_under_bf16_autocast(ready):
    with backend("triton"):
        for _, make, shape, signed in LAYERS:
            layer, x = ready(make, shape, signed, "cuda")
            got, want = _grads(layer, x, autocast=True), _grads(layer, x)
            assert got["output"].dtype == torch.bfloat16
            for key, value in want.items():
                assert torch.isfinite(got[key]).all(), key
                scale = value.abs().max().float().clamp_min(1e-3)
                assert (got[key].float() - value.float()).abs().max() <= 0.1 * scale, key


@needs_cuda
@pytest.mark.parametrize("ready", [_ready_mixed, _ready_fixed], ids=["mixed", "fixed"])
def test_cuda_layers_do_not_synchronise(ready):
    """Forward and backward of calibrated layers run without one host-device synchronisation
    (``torch.cuda.set_sync_debug_mode('error')`` raises on any)."""
    with backend("triton"):
        for _, make, shape, signed in LAYERS:
            layer, x = ready(make, shape, signed, "cuda")
            g = torch.randn(_grads(layer, x)["output"].shape, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _grads(layer, x, g=g)
            finally:
                torch.cuda.set_sync_debug_mode("default")

