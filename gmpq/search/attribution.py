"""Grad-CAM attribution of a network's own predicted class at its last feature map.

With ``F = forward_features(x)`` (shape [B, C, H, W]) and ``c`` the network's own predicted class::

    w_k = sum_(h,w) d y_c / d F_k(h, w),        A = ReLU(sum_k w_k F_k)        (shape [B, H, W])

**Closed form.** When the head is global average pooling followed by a linear classifier (ResNet, MobileNetV2,
EfficientNet, ...), ``y = W_cls . Q(mean_hw F) + b`` and the sum over positions cancels the 1/(HW) of the mean::

    w_k = W_cls[c, k] * Q'(z_k),      z = mean_hw F

where ``W_cls`` is the classifier's (quantized) weight and ``Q'`` the straight-through derivative of its input
quantizer (1 for a float classifier). This needs no backward pass; gradients reach the classifier weight through
``W_cls`` exactly as through autograd's ``create_graph=True`` path, and nothing else (``Q'`` is piecewise constant).

**Autograd fallback.** Any other head: ``w = autograd.grad(y_c, F, create_graph=True)`` summed over positions, which
differentiates the head (only the head: the gradient is taken w.r.t. F) twice. It runs inside the wrapped forward, so
it also works under DDP: the head's parameters receive both gradient paths summed before DDP's reduction hook fires.

A final feature map smaller than 4x4 has (almost) no spatial attribution to preserve; :class:`AttributionModel`
warns about it once. Models whose ``forward_features`` returns channels last (timm's ``output_fmt = 'NHWC'``, e.g.
MambaOut) are handled by the same formulas with the spatial axes (1, 2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.errors import ModelError
from gmpq.models import classifier, gap_linear_classifier
from gmpq.quant import QuantMixin, fused, quantization_bypassed
from gmpq.quant.fused import activation_ste_mask
from gmpq.quant.mixed import MixedLinear
from gmpq.quant.quantizers import host_bool

Method = Literal["auto", "closed", "autograd"]
MIN_ATTRIBUTION_SIZE = 4


def channels_last(model: nn.Module) -> bool:
    """Whether ``model.forward_features`` returns [B, H, W, C] (timm's ``output_fmt = 'NHWC'``), not [B, C, H, W]."""
    return str(getattr(model, "output_fmt", "NCHW")) == "NHWC"


def _spatial_dims(model: nn.Module) -> tuple[int, int]:
    return (1, 2) if channels_last(model) else (2, 3)


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The classifier of ``model`` if its head is verified to be global average pooling + that linear layer.

    Structure: declared GAP + linear by the model (:func:`gmpq.models.gap_linear_classifier`). Behaviour:
    ``forward_head(F)`` must equal ``classifier(mean_hw F)`` on a random probe (evaluation mode, quantizers
    bypassed). Otherwise ``None``.
    """
    head = gap_linear_classifier(model)
    if head is None:
        return None
    was_training = model.training
    model.eval()
    try:
        features = head.in_features
        shape = (2, 3, 3, features) if channels_last(model) else (2, features, 3, 3)
        probe = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(head.weight)
        with torch.no_grad(), quantization_bypassed():
            expected = model.forward_head(probe)
            closed = head(probe.mean(_spatial_dims(model)))
    except Exception:  # noqa: BLE001 — any head we cannot probe is not a plain GAP + linear head
        return None
    finally:
        model.train(was_training)
    if expected.shape != closed.shape or not torch.allclose(expected, closed, rtol=1e-5, atol=1e-6):
        return None
    return head


def class_weights(head: nn.Linear, pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` Grad-CAM channel weights ``w_k = d y_c / d z_k`` of a linear ``head`` at pooled features ``z``."""
    if isinstance(head, MixedLinear):
        p_w, p_a = head.probs()
        weight = head.wq(head.weight, p_w)
        signed = host_bool(head.aq.signed)
        mask = sum(p_a[i] * activation_ste_mask(pooled, head.aq.clip[i], signed) for i in range(len(head.aq.bits)))
    elif isinstance(head, QuantMixin):
        weight = head.quantized_weight()
        aq = head.aq
        mask = 1.0 if aq.is_float else activation_ste_mask(pooled, aq.clip, host_bool(aq.signed))
    else:
        weight, mask = head.weight, 1.0
    # the rows W[c_b] as a one-hot product: its backward is a matrix product, whereas indexing's backward
    # (index_put_ with accumulation over repeated classes) is not deterministic on several CPU threads
    rows = F.one_hot(classes, weight.shape[0]).to(weight.dtype) @ weight
    return rows * mask


def cam_from_weights(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k F_k)``: [B, C, H, W] features and [B, C] weights -> [B, H, W] maps."""
    return F.relu(torch.einsum("bchw,bc->bhw", features, weights.to(features.dtype)))


class AttributionModel(nn.Module):
    """Wraps a timm-style model: ``forward(x) -> (logits, cam)`` with the Grad-CAM of the predicted class.

    ``method`` is ``closed`` (GAP + linear heads only), ``autograd`` or ``auto`` (closed when :func:`linear_head`
    verifies the head, else autograd). Being one ``nn.Module``, it can be wrapped by DDP as a whole.
    """

    def __init__(self, model: nn.Module, method: Method = "auto") -> None:
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError(f"{type(model).__name__} has no forward_features/forward_head; attribution needs a "
                            "timm-style model")
        self.model = model
        head = linear_head(model) if method in ("auto", "closed") else None
        if method == "closed" and head is None:
            raise ValueError(f"the head of {type(model).__name__} is not global average pooling + linear; use the "
                             "autograd attribution")
        self.method: Literal["closed", "autograd"] = "closed" if head is not None else "autograd"
        self._warned = False
        self._frozen: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._teacher = False
        self._autocast_dtype: torch.dtype | None = None

    def _check_size(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ModelError(f"Grad-CAM attribution needs a feature map ([B, C, H, W], or [B, H, W, C] with timm's "
                             f"output_fmt='NHWC'), but {type(self.model).__name__}.forward_features returns {shape} "
                             "(a transformer's tokens?); search it without attribution (search.strategy=edmips)")
        if self._warned:
            return
        self._warned = True
        h, w = (features.shape[d] for d in _spatial_dims(self.model))
        if h < MIN_ATTRIBUTION_SIZE or w < MIN_ATTRIBUTION_SIZE:
            warnings.warn(f"the final feature map is {h}x{w}, smaller than {MIN_ATTRIBUTION_SIZE}x"
                          f"{MIN_ATTRIBUTION_SIZE}: the attribution maps have almost no spatial extent to preserve, "
                          f"so the attribution loss carries little information; search at a larger input resolution",
                          UserWarning, stacklevel=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, cam)``: the model's logits and the Grad-CAM [B, H, W] of its predicted classes."""
        if not self._teacher:
            return self._forward(x)
        with ExitStack() as stack:
            # a frozen teacher: no autograd at all for the closed form (the autograd form differentiates its head)
            stack.enter_context(torch.inference_mode() if self.method == "closed" else torch.no_grad())
            if self._autocast_dtype is not None:
                stack.enter_context(torch.autocast(x.device.type, self._autocast_dtype))
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._frozen_features(x) if self._frozen is not None else self.model.forward_features(x)
        self._check_size(features)
        return self.attribute(features)

    def freeze(self, autocast_dtype: torch.dtype | None = None) -> AttributionModel:
        """Make this a frozen teacher: evaluation mode, no gradients, its forward under ``torch.inference_mode``
        (``no_grad`` for the autograd Grad-CAM) and, with ``autocast_dtype`` (e.g. ``torch.bfloat16``), under autocast
        to that dtype. On CPUs, where the fused kernels compile (:func:`gmpq.quant.fused.get_backend`),
        ``forward_features`` is compiled for inference with its weights folded in as constants at its first call
        (conv + BN folding, prepacked weights; resnet18_cifar b32: 0.15 s against 0.18 s eager at 2 threads); on
        GPUs it runs eagerly (cuDNN; no compilation delay). Returns ``self``."""
        self.eval().requires_grad_(False)
        self._teacher, self._autocast_dtype = True, autocast_dtype
        if fused.get_backend() == "compile":
            self._frozen = torch.compile(self.model.forward_features)
        return self

    def _frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training or fused.get_backend(x.device) != "compile":
            return self.model.forward_features(x)
        try:
            # freezing set in inductor's config itself: torch.compile(options={"freezing": True}) is not seen where
            # Dynamo decides to lift the parameters as constants, and compiled an unfrozen graph (torch 2.14)
            from torch._inductor import config as inductor_config  # noqa: PLC0415 — loaded by torch.compile anyway

            with inductor_config.patch(freezing=True):
                return self._frozen(x)
        except Exception as e:  # noqa: BLE001 — any compiler failure: the eager teacher computes the same maps
            warnings.warn(f"gmpq: compiling the float teacher failed ({type(e).__name__}); running it eagerly",
                          RuntimeWarning, stacklevel=3)
            self._frozen = None
            return self.model.forward_features(x)

    def attribute(self, features: torch.Tensor,
                  method: Literal["closed", "autograd"] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, cam)`` from the last feature map (as ``forward_features`` returns it), with this model's method
        or the given one."""
        spatial = _spatial_dims(self.model)
        if (method or self.method) == "closed":
            if method == "closed" and self.method != "closed":
                raise ValueError("this model's head has no closed-form Grad-CAM")
            head = classifier(self.model)
            pooled = features.mean(spatial)
            logits = head(pooled)
            classes = logits.detach().argmax(1)
            return logits, cam_from_weights(self._channels_first(features), class_weights(head, pooled, classes))
        return self._autograd(features, spatial)

    def _channels_first(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 3, 1, 2) if channels_last(self.model) else features

    def _autograd(self, features: torch.Tensor, spatial: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        differentiable = torch.is_grad_enabled() and features.requires_grad
        with torch.enable_grad():
            source = features if differentiable else features.detach().requires_grad_()
            logits = self.model.forward_head(source)
            classes = logits.detach().argmax(1)
            score = logits.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(score, source, create_graph=differentiable)
        cam = cam_from_weights(self._channels_first(features if differentiable else features.detach()),
                               grad.sum(spatial))
        if not differentiable:
            return logits.detach(), cam.detach()
        return logits, cam
