"""Speed and memory of one post-training reconstruction iteration of a block against one float training iteration
of the same block, side by side in one process.

    python tools/bench_ptq.py                                  # resnet18_cifar W4A4, blocks layer1.0 and layer3.0
    python tools/bench_ptq.py --blocks layer2.0 --bits 3 --repeats 9 --threads 2 --out ptq.json

The reconstruction iteration is what :mod:`gmpq.ptq` runs ``iters`` times per block
(:class:`gmpq.ptq.reconstruct.BlockFit`, the default :class:`~gmpq.recipes.PtqConfig`): a random batch of the
block's captured inputs in the quantized model, the quantized block's forward with AdaRound's soft rounding in place
of every weight quantizer and QDrop around every activation quantizer, the squared error against the float block's
captured outputs plus the rounding regulariser (an iteration after the warm-up, where the regulariser is on), one
backward pass, Adam on the rounding variables and the activation clips. The float iteration is the same batch
drawing, the float block's forward (evaluation mode, as in the reconstruction), the same squared error, one backward
pass and Adam on the block's float weights. Both blocks come from the same float network (``--arch``, random
weights: the values do not change the timing), the quantized one uniformly at ``--bits`` (8-bit stem and
classifier) and calibrated on the images, as :func:`gmpq.ptq.ptq` does before it reconstructs.

Timing and memory are measured as in ``tools/bench_search_step.py`` (warm-up, then ``--repeats`` alternating pairs in
ABBA order; the median of the pairs' ratios; peak memory from ``torch.profiler``'s allocator events plus the
persistent state). Prints one JSON object (``results``: one record per block, ``step`` = the block's name, with
``time_ratio`` and ``memory_ratio``; a block that fails records its error) and one summary line per record on
stderr; ``--out`` also writes the JSON to a file, after every record. ``tools/bench_record.py`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search_step as steps  # noqa: E402 — the shared timing and memory measurement

import gmpq  # noqa: E402
from gmpq.ptq.blocks import capture  # noqa: E402
from gmpq.ptq.reconstruct import BlockFit, _output_error  # noqa: E402
from gmpq.quant import QuantMixin, calibrate, fused  # noqa: E402
from gmpq.recipes import PtqConfig  # noqa: E402

DEFAULT_BLOCKS = ("layer1.0", "layer3.0")


def float_iteration(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: PtqConfig,
                    seed: int) -> tuple[steps.Step, list]:
    """One training iteration of the float ``block`` on the reconstruction's objective (module docstring)."""
    block.eval().requires_grad_(True)
    optimizer = torch.optim.Adam(block.parameters(), lr=cfg.lr)
    generator = torch.Generator(device=inputs.device).manual_seed(seed)

    def step() -> None:
        idx = torch.randint(len(inputs), (cfg.batch_size,), generator=generator, device=inputs.device)
        loss = _output_error(block(inputs[idx]).float(), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, [block, optimizer]


def reconstruction_iteration(qmodel: nn.Module, name: str, inputs: torch.Tensor, targets: torch.Tensor,
                             cfg: PtqConfig, seed: int) -> tuple[steps.Step, list, BlockFit]:
    """One reconstruction iteration of block ``name`` of the calibrated ``qmodel`` (after the warm-up)."""
    module = qmodel.get_submodule(name)
    layers = [(n, m) for n, m in qmodel.named_modules()
              if isinstance(m, QuantMixin) and (n == name or n.startswith(name + "."))]
    fit = BlockFit(layers, cfg, seed, inputs.device)
    if not fit.active:
        raise ValueError(f"block {name!r} has nothing to reconstruct at these bits")
    count = [0]

    def step() -> None:
        it = fit.warmup + count[0] % max(1, cfg.iters - fit.warmup)
        count[0] += 1
        fit.step(module, inputs, targets, it)

    return step, [module, fit.optimizer], fit


def measure(name: str, float_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, cfg: PtqConfig,
            args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = images.device
    q_in = capture(qmodel, name, images, cfg.calibration_batch_size, "input")
    f_in = capture(float_model, name, images, cfg.calibration_batch_size, "input")
    f_out = capture(float_model, name, images, cfg.calibration_batch_size, "output")
    f_step, f_objects = float_iteration(copy.deepcopy(float_model.get_submodule(name)), f_in, f_out, cfg, 0)
    m_step, m_objects, fit = reconstruction_iteration(qmodel, name, q_in, f_out, cfg, 0)
    try:
        record: dict[str, Any] = {"step": name, "arch": args.arch, "batch": cfg.batch_size,
                                  "input_size": args.size, "precision": "fp32", "bits": args.bits,
                                  "qdrop": cfg.qdrop, "setup_s": round(time.perf_counter() - t0, 2)}
        record.update(steps.compare(f_step, m_step, device, args.warmup, args.repeats))
        if not args.no_memory:
            f_peak = steps.peak_bytes(f_step, f_objects, device)
            m_peak = steps.peak_bytes(m_step, m_objects, device)
            record.update({"float_peak_mb": round(f_peak / 2**20, 1), "peak_mb": round(m_peak / 2**20, 1),
                           "memory_ratio": m_peak / f_peak})
    finally:
        fit.close()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="resnet18_cifar")
    parser.add_argument("--blocks", nargs="+", default=list(DEFAULT_BLOCKS), help="blocks (module paths) to measure")
    parser.add_argument("--bits", type=int, default=4, help="uniform weight and activation bits")
    parser.add_argument("--size", type=int, default=32, help="input resolution")
    parser.add_argument("--images", type=int, default=256, help="calibration images (random)")
    parser.add_argument("--batch", type=int, default=None, help="images per iteration (default: PtqConfig's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs (ABBA order)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations of each kind first")
    steps.add_run_arguments(parser)
    args = parser.parse_args()
    device = steps.run_device(parser, args)
    cfg = PtqConfig()
    if args.batch:
        cfg = dataclasses.replace(cfg, batch_size=args.batch)
    torch.manual_seed(0)
    float_model = gmpq.create_model(args.arch, num_classes=10).to(device).eval()
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    qmodel = gmpq.quantize(copy.deepcopy(float_model), gmpq.uniform_policy(float_model, args.bits, args.bits)).eval()
    with fused.using_backend("eager"):  # calibration's values do not change the timing; no CPU compilation for it
        calibrate(qmodel, [images[k: k + cfg.calibration_batch_size]
                           for k in range(0, len(images), cfg.calibration_batch_size)])
    qmodel.requires_grad_(False)
    float_model.requires_grad_(False)
    output: dict[str, Any] = {"environment": steps.environment(device), "load_avg_before": os.getloadavg(),
                              "results": []}
    for name in args.blocks:
        try:
            record = measure(name, float_model, qmodel, images, cfg, args)
        except Exception as e:  # noqa: BLE001 — record it and go on with the other blocks
            record = {"step": name, "arch": args.arch, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=8)}
        steps.add_record(output, record, args, ("step", "arch", "time_ratio", "memory_ratio", "float_step_s",
                                                "step_s", "error"))
    if not args.quiet:
        print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
