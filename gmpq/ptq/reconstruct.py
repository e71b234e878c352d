"""``ptq(model, policy, images)``: a policy applied to a float model with a thousand images and no training run.

1. A copy of the float model is quantized with the policy (BatchNorm kept, or folded into the weights first:
   :mod:`gmpq.ptq.batchnorm`) and calibrated on the images (:func:`gmpq.quant.calibrate`: MSE-optimal activation
   clips and per-channel weight steps). With ``rounding="nearest"`` this is the model: round-to-nearest PTQ.
2. With ``rounding="learned"`` each block (:mod:`gmpq.ptq.blocks`), in execution order, is then fitted to the float
   model's output of that block (BRECQ, Li et al. 2021). With ``x_q`` the block's input in the quantized model
   (earlier blocks already fixed), ``x`` its input in the float model, ``f`` / ``f_q`` the float / quantized
   block::

       min_(V, c)  E || f_q(x_q; V, c) - f(x) ||^2  +  lambda * sum_layers R(V; beta)

   over AdaRound's rounding variables ``V`` of every quantized weight (:mod:`gmpq.quant.rounding`; steps fixed) and,
   jointly, the activation clips ``c`` (Adam, learning rate ``act_lr`` per activation step ``c / n``, cosine to 0);
   the squared error is summed over channels and averaged over images and positions; ``beta`` is annealed from
   ``beta[0]`` to ``beta[1]`` after a warm-up without the regulariser. With ``qdrop = p > 0`` (QDrop, Wei et al.
   2022) each activation quantizer of the block passes its input unquantized with probability ``p``, element by
   element, during the fit. The rounding is then fixed (the hard codes written back as the weights, on which the
   layers' own quantizers give exactly these codes) before the next block's inputs are computed.

The result is an ordinary gmpq quantized model (``model.gmpq_policy``), exported like any other; ``model.gmpq_ptq``
holds the :class:`PtqReport` (per block: output error of round-to-nearest and of the learned rounding on the fitting
images, loss curve, time). Same seed, same machine: the same model bit for bit. With ``state_dir`` the model is
saved after every block; a killed reconstruction started again with the same arguments resumes at the block it
stopped in (that block restarts from its beginning, so the result equals an uninterrupted run's).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gmpq.errors import CheckpointError, ModelError
from gmpq.models import quantizable_layers, quantize
from gmpq.models.adapter import PolicyLike
from gmpq.policy import as_policy
from gmpq.ptq.batchnorm import fold_batchnorm
from gmpq.ptq.blocks import Block, capture, reconstruction_blocks, run_block
from gmpq.quant import QuantMixin, calibrate, fold_weight_transform, fused
from gmpq.quant import functional as QF
from gmpq.quant.quantizers import host_bool
from gmpq.quant.rounding import LearnedRounding
from gmpq.recipes import PtqConfig
from gmpq.utils import atomic_write

#: The file in ``state_dir`` holding a reconstruction's progress.
STATE_FILE = "ptq_state.pt"
#: Loss-curve points kept per block.
_CURVE_POINTS = 50


@dataclass
class BlockResult:
    """One block's reconstruction: output errors (squared error summed over channels, mean over images and
    positions) against the float block on the fitting images, before (round-to-nearest) and after."""

    name: str
    layers: list[str]
    iters: int
    nearest_error: float
    learned_error: float
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class PtqReport:
    """What :func:`ptq` did: the settings, the images, the blocks and the cost."""

    rounding: str
    images: int
    config: dict[str, Any]
    batchnorm_folded: list[tuple[str, str]]
    blocks: list[BlockResult]
    resumed_at_block: int | None
    wall_s: float
    peak_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ptq(model: nn.Module, policy: PolicyLike, images: torch.Tensor | Iterable[Any], config: PtqConfig | None = None,
        *, seed: int = 0, progress: bool = True, state_dir: str | os.PathLike | None = None,
        max_blocks: int | None = None, **overrides: Any) -> nn.Module:
    """Post-training quantization of float ``model`` under ``policy`` on calibration ``images``; return the new
    quantized model (``model`` itself is left as it was). See the module docstring.

    Args:
        model: a float model made by :func:`gmpq.create_model` (or loaded by :func:`gmpq.from_pretrained`), in the
            normalisation its images use.
        policy: a :class:`~gmpq.policy.Policy`, dict or JSON path for this architecture.
        images: a tensor ``[N, C, H, W]``, or an iterable of tensors or ``(images, labels)`` batches; the first
            ``images`` of the settings (1,024 by default) are used, from a training split, never a test split.
        config: the settings (:class:`~gmpq.recipes.PtqConfig`, a recipe's ``ptq`` section); ``overrides`` replace
            single fields, e.g. ``ptq(model, policy, x, rounding="nearest", iters=500, qdrop=0)``.
        seed: the seed of the batches and of QDrop's draws.
        progress: show a progress bar per block.
        state_dir: where to save progress after each block and resume from (see the module docstring).
        max_blocks: reconstruct only the first ``max_blocks`` blocks (timing a large model); None = all.
    """
    t0 = time.perf_counter()
    cfg = dataclasses.replace(config or PtqConfig(), **overrides)
    policy = as_policy(policy)
    if not quantizable_layers(model):
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear layer: nothing to quantize")
    if any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ModelError("the model is already quantized; post-training quantization starts from a float model")
    x = _take_images(images, cfg.num_images)
    device = next(model.parameters()).device
    x = x.to(device)
    float_model = model
    was_training = float_model.training
    float_model.eval()
    try:
        qmodel = copy.deepcopy(float_model)
        bits = policy.all_layers()
        folded = []
        if cfg.batchnorm == "fold":
            targets = [n for n, m in quantizable_layers(qmodel).items()
                       if isinstance(m, nn.Conv2d) and n in bits and bits[n].w_bits != QF.FLOAT_BITS]
            folded = fold_batchnorm(qmodel, targets, x[: cfg.calibration_batch_size])
        quantize(qmodel, policy)
        qmodel.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the activation observers subsample with the global generator
            calibrate(qmodel, (x[k: k + cfg.calibration_batch_size]
                               for k in range(0, len(x), cfg.calibration_batch_size)))
        results: list[BlockResult] = []
        resumed = None
        if cfg.rounding == "learned":
            results, resumed = _reconstruct(float_model, qmodel, x, cfg, seed, progress, state_dir, max_blocks)
    finally:
        float_model.train(was_training)
    qmodel.requires_grad_(True)
    qmodel.gmpq_ptq = PtqReport(cfg.rounding, len(x), dataclasses.asdict(cfg), folded, results, resumed,
                                time.perf_counter() - t0, peak_rss_mb())
    return qmodel


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB (1e6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def _take_images(images: torch.Tensor | Iterable[Any], wanted: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        batches = [images]
    else:
        batches, count = [], 0
        for item in images:
            batch = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(batch, torch.Tensor):
                raise ModelError(f"calibration images must be tensors or (images, labels) batches, got "
                                 f"{type(batch).__name__}")
            batches.append(batch)
            count += len(batch)
            if count >= wanted:
                break
    x = torch.cat(batches) if len(batches) > 1 else batches[0]
    if x.dim() != 4:
        raise ModelError(f"calibration images must be a [N, C, H, W] batch, got shape {tuple(x.shape)}")
    if len(x) < wanted:
        raise ModelError(f"post-training quantization asked for {wanted} calibration images but got {len(x)}; pass "
                         f"more training images or lower num_images= (ptq.num_images)")
    return x[:wanted]


class _QDrop(nn.Module):
    """An activation quantizer that passes each element unquantized with probability ``p`` (QDrop): one fused kernel
    (:func:`gmpq.quant.fused.qdrop_activation`) whose mask is drawn from one seed per call of ``generator``."""

    def __init__(self, aq: nn.Module, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.aq, self.p, self.generator = aq, p, generator
        self.bits = aq.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = torch.randint(2**32, (), generator=self.generator, device=self.generator.device, dtype=torch.int64)
        aq = self.aq
        return fused.qdrop_activation(x, aq.clip, aq.bits, host_bool(aq.signed), self.p, seed.to(x.device))


def _output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over images and positions."""
    return (out - target).pow(2).sum(1).mean()


@torch.no_grad()
def _error(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for k in range(0, len(inputs), batch_size):
        out = module(inputs[k: k + batch_size]).float()
        total += float(_output_error(out, targets[k: k + batch_size])) * len(out)
    return total / len(inputs)


def _fingerprint(qmodel: nn.Module, x: torch.Tensor, cfg: PtqConfig, seed: int, blocks: list[Block]) -> str:
    """A digest of everything a reconstruction's result depends on: a saved state is resumed only under the same."""
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": dataclasses.asdict(cfg), "seed": seed, "blocks": [b.name for b in blocks],
                         "policy": qmodel.gmpq_policy.to_dict()}, sort_keys=True, default=str).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    for name, tensor in sorted(qmodel.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot come from the atomic writer, but a foreign one may be anything
        raise CheckpointError(f"{path} is not a readable PTQ state ({e}); delete it to start again") from None
    return state if state.get("fingerprint") == fingerprint else None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _reconstruct(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor, cfg: PtqConfig, seed: int,
                 progress: bool, state_dir: str | os.PathLike | None,
                 max_blocks: int | None) -> tuple[list[BlockResult], int | None]:
    bs = cfg.calibration_batch_size
    blocks = reconstruction_blocks(qmodel, x[:2])[:max_blocks]
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    fingerprint = _fingerprint(qmodel, x, cfg, seed, blocks) if state_path is not None else ""
    results: list[BlockResult] = []
    start, resumed = 0, None
    if state_path is not None:
        state = _load_state(state_path, fingerprint)
        if state is not None:
            qmodel.load_state_dict(state["model"])
            results = [BlockResult(**r) for r in state["results"]]
            start = resumed = state["next_block"]
    # On CPUs the fit runs in channels_last (oneDNN's convolutions, depthwise ones above all, are faster there; the
    # fused quantizer kernels keep the layout): a copy of the float model, the quantized one until it is returned.
    layout = torch.channels_last if x.device.type == "cpu" and x.dim() == 4 else torch.contiguous_format
    float_model = copy.deepcopy(float_model).to(memory_format=layout).requires_grad_(False)
    qmodel.to(memory_format=layout).requires_grad_(False)
    x = x.contiguous(memory_format=layout)
    q_in = f_out = None
    try:
        for index in range(start, len(blocks)):
            block = blocks[index]
            fblock, qblock = float_model.get_submodule(block.name), qmodel.get_submodule(block.name)
            if block.chained and q_in is not None:
                q_in = run_block(qmodel.get_submodule(blocks[index - 1].name), q_in, bs)
                f_out = run_block(fblock, f_out, bs)
            else:
                q_in = capture(qmodel, block.name, x, bs, "input")
                f_out = capture(float_model, block.name, x, bs, "output")
            results.append(_fit_block(qmodel, block, qblock, q_in, f_out, cfg, seed * 1_000_003 + index, progress,
                                      f"ptq {index + 1}/{len(blocks)} {block.name}"))
            if state_path is not None:
                _save_state(state_path, {"fingerprint": fingerprint, "next_block": index + 1,
                                         "model": qmodel.state_dict(),
                                         "results": [dataclasses.asdict(r) for r in results]})
    finally:
        qmodel.to(memory_format=torch.contiguous_format)
    return results, resumed


class BlockFit:
    """The learned rounding and activation steps of one block while it is fitted (the module docstring's
    objective): made on the block's quantized layers (``(name, layer)`` pairs), it puts a :class:`LearnedRounding`
    in place of each quantized weight's quantizer and, with ``qdrop``, QDrop around each activation quantizer;
    :meth:`step` is one reconstruction iteration; :meth:`close` fixes the rounding (the hard codes written back as
    the weights) and puts the layers' own quantizers back. ``active`` is False when the block has nothing to fit
    (then nothing was changed)."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], cfg: PtqConfig, seed: int,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.layers = list(layers)
        self.rounding = [(layer, LearnedRounding(_plain_weight(layer), layer.wq.scale, layer.w_bits))
                         for _, layer in self.layers if layer.w_bits != QF.FLOAT_BITS]
        self.acts = [layer for _, layer in self.layers if layer.a_bits != QF.FLOAT_BITS]
        self.active = bool(self.rounding) or bool(self.acts and cfg.act_lr > 0)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.originals = {id(layer): (layer.wq, layer.aq) for _, layer in self.layers}
        self.warmup = int(cfg.warmup * cfg.iters)
        if not self.active:
            return
        groups: list[dict[str, Any]] = []
        for layer, r in self.rounding:
            layer.wq = r
        if self.rounding:
            groups.append({"params": [r.v for _, r in self.rounding], "lr": cfg.lr, "kind": "round"})
        for layer in self.acts:
            if cfg.act_lr > 0:
                layer.aq.clip.requires_grad_(True)
                levels = QF.act_levels(layer.aq.bits, bool(layer.aq.signed))
                groups.append({"params": [layer.aq.clip], "lr": cfg.act_lr * levels, "kind": "act"})
            if cfg.qdrop > 0:
                layer.aq = _QDrop(layer.aq, cfg.qdrop, self.generator)
        self.optimizer = torch.optim.Adam(groups)
        self.base_lrs = [g["lr"] for g in groups]

    def step(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, it: int) -> torch.Tensor:
        """Iteration ``it`` (of ``cfg.iters``) on a random batch of the block's ``inputs`` and float ``targets``;
        returns the batch's reconstruction error (detached)."""
        cfg = self.cfg
        idx = torch.randint(len(inputs), (cfg.batch_size,), generator=self.generator, device=inputs.device)
        rec = _output_error(module(inputs[idx]).float(), targets[idx])
        loss = rec
        if it >= self.warmup and self.rounding:
            progress_frac = (it - self.warmup) / max(1, cfg.iters - self.warmup)
            beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * progress_frac))
            loss = loss + cfg.reg_weight * sum(r.regulariser(beta) for _, r in self.rounding)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            if g["kind"] == "act":
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * (it + 1) / cfg.iters))
        for layer in self.acts:  # a clip stays positive
            aq = self.originals[id(layer)][1]
            aq.clip.data.clamp_(min=1e-6)
        return rec.detach()

    def close(self) -> None:
        """Fix the rounding and restore the layers' quantizers (see the class docstring)."""
        if not self.active:
            return
        for layer, r in self.rounding:
            with torch.no_grad():
                layer.weight.copy_(r.hard_weight())
        for _, layer in self.layers:
            layer.wq, layer.aq = self.originals[id(layer)]
            layer.aq.clip.requires_grad_(False)


def _fit_block(qmodel: nn.Module, block: Block, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               cfg: PtqConfig, seed: int, progress: bool, desc: str) -> BlockResult:
    """Fit the rounding and activation steps of ``block`` (module docstring), then fix the rounding."""
    t0 = time.perf_counter()
    bs = cfg.calibration_batch_size
    nearest = _error(module, inputs, targets, bs)
    fit = BlockFit([(name, qmodel.get_submodule(name)) for name in block.layers], cfg, seed, inputs.device)
    if not fit.active:
        return BlockResult(block.name, list(block.layers), 0, nearest, nearest, time.perf_counter() - t0)
    curve: list[tuple[int, float]] = []
    every = max(1, cfg.iters // _CURVE_POINTS)
    bar = tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for it in bar:
            rec = fit.step(module, inputs, targets, it)
            if it % every == 0 or it == cfg.iters - 1:
                curve.append((it, float(rec)))
                bar.set_postfix(rec=f"{float(rec):.4g}")
    finally:
        bar.close()
        fit.close()
    learned = _error(module, inputs, targets, bs)
    return BlockResult(block.name, list(block.layers), cfg.iters, nearest, learned, time.perf_counter() - t0, curve)


def _plain_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight with its weight transform folded in (the rounding is learned on ``T(W)``)."""
    fold_weight_transform(layer)
    return layer.weight


def block_errors(float_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                 blocks: Sequence[str] | None = None, batch_size: int = 128) -> dict[str, float]:
    """Per block: ``E || f_q(x_q) - f(x) ||^2`` (the reconstruction objective, without regulariser) of quantized
    ``qmodel`` against ``float_model`` on ``images``, each block fed its input in its own model."""
    names = blocks if blocks is not None else [b.name for b in reconstruction_blocks(qmodel, images[:2])]
    out = {}
    for name in names:
        q_out = capture(qmodel, name, images, batch_size, "output")
        f_out = capture(float_model, name, images, batch_size, "output")
        out[name] = float(_output_error(q_out, f_out))
    return out
