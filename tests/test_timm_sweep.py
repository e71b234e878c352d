"""The timm sweep: one model of every timm CNN family, quantized and searched on a tiny input.

For each family (timm model module) the test builds one small model with 10 classes and checks, on 2 random images:

* 32/32 bits everywhere (stem and classifier too): the quantized model's logits equal the float model's
  (max |q - f| / max |f| <= 1e-5);
* 4/4 bits (stem and classifier 8/8), calibrated: it runs, every quantized layer is called and its output is finite;
* BOPs are counted: every layer has MACs, and the searched BOPs are MACs x 4 x 4;
* the supernet (bits {2, 4}) runs a search step: its Grad-CAM is computed (closed form where the head is GAP +
  linear, checked against autograd; autograd otherwise), the loss CE + attribution + complexity is finite and every
  architecture logit gets a finite, non-zero gradient.

Every module of ``timm.list_modules()`` is either in :data:`FAMILIES` or in :data:`EXCLUDED` with the reason (the
README lists them): a timm upgrade that adds a family fails :func:`test_every_timm_family_is_swept_or_excluded`
until it is classified. The families that take more than a few seconds are marked ``timm_tail``: they run with
``--timm-tail`` (``.ci/run`` does), and are skipped otherwise.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import timm
import torch

import gmpq
from gmpq.quant import calibrate, conversion_for
from gmpq.search import (
    AttributionModel,
    BudgetPenalty,
    SearchObjective,
    alpha_parameters,
    build_supernet,
    search_space,
)
from gmpq.search.attribution import channels_last

TRANSFORMER = "vision transformer: a token sequence and self-attention, no convolutional feature map"
HYBRID = ("convolution + self-attention hybrid: the attention's products of two activations are not Conv2d/Linear "
          "layers, so gmpq would leave them in float and out of the BOPs count")
MLP_ONLY = "MLP-only: token-mixing MLPs, no convolutional feature map"
RECURRENT = "recurrent token mixing (bidirectional nn.LSTM), which gmpq does not quantize"
STATE_SPACE = ("state-space (Mamba-style) mixing: products of two activations, and forward_features returns a list "
               "of feature maps")

#: timm modules left out of the sweep, with the reason (also listed in the README).
EXCLUDED: dict[str, str] = {
    **{m: TRANSFORMER for m in (
        "beit", "cait", "coat", "convit", "crossvit", "davit", "deepseek_vit", "deit", "eva", "gcvit", "gemma4_vit",
        "hiera", "hieradet_sam2", "levit", "mvitv2", "naflexvit", "nest", "pit", "pvt_v2", "qwen3_vit",
        "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "tiny_vit", "tnt", "twins",
        "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "vision_transformer_sam",
        "vitamin", "volo", "xcit")},
    **{m: HYBRID for m in (
        "byoanet", "cpubone", "csatv2", "edgenext", "efficientformer", "efficientformer_v2", "efficientvit_mit",
        "efficientvit_msra", "iformer", "lowformer", "maxxvit", "mobilenetv5", "mobilevit", "nextvit", "shvit",
        "swiftformer", "visformer")},
    "mlp_mixer": MLP_ONLY,
    "sequencer": RECURRENT,
    "efficientvim": STATE_SPACE,
}


@dataclass(frozen=True)
class Family:
    """One swept model: its timm module, a small model of it, the input size, and whether it is in the long tail."""

    module: str
    arch: str
    size: int = 32
    tail: bool = False
    known_bug: str | None = None  # an open bug: the test must fail with it (strict xfail) until it is fixed

    @property
    def id(self) -> str:
        return self.arch if self.arch.startswith(self.module) else f"{self.module}-{self.arch}"


#: One small model per CNN family, plus the models that carry timm's other convolution types (Conv2dSame,
#: StdConv2d, ScaledStdConv2dSame).
FAMILIES: tuple[Family, ...] = (
    Family("byobnet", "test_byobnet"),
    Family("convmixer", "convmixer_768_32", tail=True,
           known_bug="supernet step: NaN alpha gradients from BatchNorm's backward (2 random images, 32 px); open"),
    Family("convnext", "test_convnext"),
    Family("cspnet", "cs3darknet_focus_s"),
    Family("cspnext", "cspnext_tiny"),
    Family("densenet", "densenet121", tail=True),
    Family("dla", "dla46_c"),
    Family("dpn", "dpn48b", tail=True),
    Family("efficientnet", "test_efficientnet"),
    Family("efficientnet", "tf_efficientnet_b0", size=64),  # Conv2dSame
    Family("fasternet", "fasternet_t0"),
    Family("fastvit", "fastvit_t8"),
    Family("focalnet", "focalnet_tiny_srf", tail=True),
    Family("ghostnet", "ghostnet_050"),
    Family("hardcorenas", "hardcorenas_a", tail=True),
    Family("hgnet", "hgnetv2_b0", tail=True),
    Family("hrnet", "hrnet_w18_small", size=64, tail=True),
    Family("inception_next", "inception_next_atto"),
    Family("inception_resnet_v2", "inception_resnet_v2", size=96, tail=True),
    Family("inception_v3", "inception_v3", size=96, tail=True),
    Family("inception_v4", "inception_v4", size=96, tail=True),
    Family("lcnetv2", "lcnetv2_small", tail=True),
    Family("mambaout", "test_mambaout"),  # channels-last feature map
    Family("metaformer", "poolformerv2_s12", tail=True),
    Family("mobilenetv3", "mobilenetv3_small_050"),
    Family("mobilenetv3", "tf_mobilenetv3_small_100", size=64),  # Conv2dSame
    Family("nasnet", "nasnetalarge", size=64, tail=True),
    Family("nfnet", "test_nfnet"),  # ScaledStdConv2d
    Family("nfnet", "dm_nfnet_f0", size=64, tail=True),  # ScaledStdConv2dSame
    Family("pnasnet", "pnasnet5large", size=64, tail=True),
    Family("rdnet", "rdnet_tiny", tail=True),
    Family("regnet", "regnetx_002"),
    Family("repghost", "repghostnet_050", tail=True),
    Family("repvit", "repvit_m0_9", tail=True),
    Family("res2net", "res2net50_48w_2s", tail=True),
    Family("resnest", "resnest14d", tail=True),
    Family("resnet", "test_resnet"),
    Family("resnetv2", "resnetv2_50x1_bit", size=64),  # StdConv2d (BiT)
    Family("rexnet", "rexnet_100", tail=True),
    Family("selecsls", "selecsls42b", tail=True),
    Family("senet", "legacy_seresnet18", tail=True),
    Family("sknet", "skresnet18", tail=True),
    Family("starnet", "starnet_s050"),
    Family("tresnet", "tresnet_m", size=64, tail=True),
    Family("vgg", "vgg11", tail=True),
    Family("vovnet", "ese_vovnet19b_slim_dw"),
    Family("xception", "legacy_xception", tail=True),
    Family("xception_aligned", "xception41p", tail=True),
)


def test_every_timm_family_is_swept_or_excluded():
    from timm.models._registry import _model_to_module, model_entrypoint

    # timm's own model modules (gmpq's CIFAR variants and models that tests register live elsewhere)
    modules = {_model_to_module[name] for name in timm.list_models()
               if model_entrypoint(name).__module__.startswith("timm.models.")}
    swept = {f.module for f in FAMILIES}
    assert not swept & set(EXCLUDED), f"both swept and excluded: {sorted(swept & set(EXCLUDED))}"
    unclassified = sorted(modules - swept - set(EXCLUDED))
    assert not unclassified, f"timm families neither swept nor excluded (add them to FAMILIES or EXCLUDED): {unclassified}"
    gone = sorted((swept | set(EXCLUDED)) - modules)
    assert not gone, f"no longer timm modules: {gone}"
    for family in FAMILIES:
        assert _model_to_module[family.arch] == family.module, family


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@torch.no_grad()
def _wake_up(model: torch.nn.Module, size: int) -> None:
    """A float model whose every branch matters: random norm scales, gains, layer scales and biases (every parameter
    of at most one dimension; several families initialise residual branches to zero: zero BN gamma, layer scale 1e-6,
    skip-init gain 0), and BatchNorm statistics of 16 random images (with unit running variances, a randomly
    initialised network in eval mode can shrink its activations to nothing, e.g. CSPNeXt's to 1e-10)."""
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            p.copy_(torch.randn_like(p) * 0.05 if name.endswith("bias") else torch.rand_like(p) + 0.5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()(torch.randn(16, 3, size, size))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def check_family(arch: str, size: int) -> dict[str, object]:
    """Run every check of the module docstring on ``arch``; return what was measured."""
    torch.manual_seed(0)
    float_model = gmpq.create_model(arch, num_classes=10)
    _wake_up(float_model, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = float_model(x)
    assert not torch.allclose(reference[0], reference[1]), f"{arch}: the float logits do not depend on the input"
    for name, layer in gmpq.quantizable_layers(float_model).items():
        conversion_for(layer, name)  # a layer type without a conversion fails here, naming it

    q32 = gmpq.quantize(copy.deepcopy(float_model), gmpq.uniform_policy(float_model, 32, 32, kept_bits=32))
    with torch.no_grad():
        rel32 = _relative_difference(q32(x), reference)
    assert rel32 <= 1e-5, f"{arch}: 32/32 bits differ from float by {rel32:.3g} (relative)"

    q4 = gmpq.quantize(copy.deepcopy(float_model), gmpq.uniform_policy(float_model, 4, 4))
    calibrate(q4, [x])
    called: set[str] = set()
    layers = gmpq.quantizable_layers(q4)
    hooks = [m.register_forward_hook(lambda *_a, n=n: called.add(n)) for n, m in layers.items()]
    with torch.no_grad():
        out4 = q4(x)
    for h in hooks:
        h.remove()
    assert torch.isfinite(out4).all(), f"{arch}: non-finite logits at 4/4 bits"
    assert not torch.equal(out4, reference), f"{arch}: 4/4 bits computed the float logits"
    assert called == set(layers), f"{arch}: quantized layers never called: {sorted(set(layers) - called)[:5]}"

    report = gmpq.count_bops(q4, size)
    assert all(r.macs > 0 for r in report.layers), f"{arch}: layers without MACs"
    searched_macs = sum(r.macs for r in report.layers if not r.kept)
    assert report.bops_searched_g == pytest.approx(searched_macs * 16 / 1e9, rel=1e-12) and searched_macs > 0

    supernet = copy.deepcopy(float_model).train()
    teacher = AttributionModel(copy.deepcopy(float_model)).eval().requires_grad_(False)
    space = search_space(supernet, (2, 4), (2, 4), 8, gmpq.layer_macs(float_model, size), arch, size)
    build_supernet(supernet, space)
    calibrate(supernet, [x])
    student = AttributionModel(supernet)
    with torch.no_grad():
        _, cam_fp = teacher(x)
    features = supernet.forward_features(x)
    logits, cam = student.attribute(features)
    spatial = features.shape[1:3] if channels_last(supernet) else features.shape[2:]
    assert cam.shape == (2, *spatial) == cam_fp.shape, f"{arch}: Grad-CAM of shape {tuple(cam.shape)}"
    if student.method == "closed":
        _, cam_autograd = student.attribute(features, "autograd")
        torch.testing.assert_close(cam, cam_autograd, rtol=1e-4, atol=1e-5)
    lowest = sum(space.macs) * 4 / 1e9
    terms = SearchObjective(space, BudgetPenalty(2 * lowest), 1.0, 3.0)(supernet, logits, torch.tensor([0, 1]),
                                                                        cam, cam_fp)
    assert torch.isfinite(terms.total), f"{arch}: search loss {terms.total}"
    terms.total.backward()
    for alpha in alpha_parameters(supernet):
        assert alpha.grad is not None and torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0, arch
    return {"rel32": rel32, "attribution": student.method, "layers": len(report.layers)}


@pytest.mark.parametrize(
    "family", [pytest.param(f, id=f.id, marks=([pytest.mark.timm_tail] if f.tail else [])
                            + ([pytest.mark.xfail(strict=True, reason=f.known_bug)] if f.known_bug else []))
               for f in FAMILIES])
def test_family_quantizes_exactly_and_searches(family: Family):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the final feature map is")  # tiny inputs, tiny maps
        check_family(family.arch, family.size)
