"""Calibration of activation quantizers (sign mode and clip) and weight steps on real batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], sync: bool = True) -> int:
    """Calibrate every quantizer of ``model`` on ``batches`` (input tensors); return the number of batches used.

    Each :class:`ActQuantizer` observes its float inputs, then fixes its sign mode (signed if any input was
    negative) and sets its clip to the MSE-optimal value; each layer's :class:`WeightQuantizer` resets its steps to the
    MSE-optimal ones for the weight its operation uses (``T(W)``, see :mod:`gmpq.quant.conversion`). The model runs
    in eval mode and is put back in its previous mode.
    With ``sync`` and an initialised ``torch.distributed`` process group, clips are averaged and sign modes OR-ed
    across processes so that every rank holds the same quantizers.
    """
    act_quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    was_training = model.training
    model.eval()
    for q in act_quantizers:
        q.observing = True
    device = next(model.parameters()).device
    count = 0
    try:
        for batch in batches:
            model(batch.to(device))
            count += 1
    finally:
        for q in act_quantizers:
            q.observing = False
    if count == 0:
        raise ValueError("calibrate() needs at least one batch")
    for q in act_quantizers:
        q.finish_calibration()
    for module in model.modules():
        wq = getattr(module, "wq", None)
        if isinstance(wq, WeightQuantizer):
            wq.init_scale(module.effective_weight())
    if sync:
        _synchronise(act_quantizers)
    model.train(was_training)
    return count


def _synchronise(quantizers: list[ActQuantizer]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not quantizers:
        return
    # Flattened so that quantizers with one clip and mixed ones with K clips (gmpq.quant.mixed) sync together.
    clips = torch.cat([q.clip.detach().reshape(-1) for q in quantizers])
    signs = torch.stack([q.signed.float() for q in quantizers])
    dist.all_reduce(clips)
    dist.all_reduce(signs, op=dist.ReduceOp.MAX)
    clips /= dist.get_world_size()
    for q, c, s in zip(quantizers, clips.split([q.clip.numel() for q in quantizers]), signs, strict=True):
        q.clip.data.copy_(c.view_as(q.clip))
        q.signed.fill_(bool(s > 0))
