"""Cost of the score + decode strategies against one float training step, side by side in one process.

    python tools/bench_strategies.py                                   # mobilenetv2_050_cifar, 32x32, batch 64, CPU
    python tools/bench_strategies.py --arch resnet18 --input-size 224 --batch-size 64 --device cuda
    python tools/bench_strategies.py --arch mobilenetv2_100 --input-size 224 --batch-size 64 --device cuda

Each score strategy (hawq, ompq, uniform, random) scores the same float model on ``--batches`` batches of random
images (``--samples`` Hutchinson probes per block and batch for hawq) and decodes under ``--budget`` (default: the
middle of the feasible range, BOPs counted at 224x224 on the deployment arch); the reference is one float training
step (forward, cross-entropy, backward, SGD) on one batch of the same size, timed before and after the strategies
(the median of ``--repeats`` steps each time). Random weights (BatchNorm scales drawn in [0.5, 1.5], so that no
residual branch is switched off) and random images: the times, not the policies, are what this measures. Prints one
JSON object: per strategy the score and decode seconds, their ratio to the float step, and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gmpq
from gmpq.models import base_arch
from gmpq.search import STRATEGIES, ScoreSettings, ScoreStrategy, bops_range, deployment_macs, search_space


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def float_step_s(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    """Median seconds of one float training step (forward, cross-entropy, backward, SGD)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        _sync(images.device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        _sync(images.device)
        times.append(time.perf_counter() - t0)
    model.eval()
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenetv2_050_cifar")
    parser.add_argument("--input-size", type=int, default=32, help="resolution of the scoring batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--samples", type=int, default=2, help="hawq: Rademacher probes per block and batch")
    parser.add_argument("--budget", type=float, default=None, help="GBOPs (default: middle of the feasible range)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = gmpq.create_model(args.arch, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    deploy = base_arch(args.arch)
    space = search_space(model, (2, 3, 4, 6), (2, 3, 4, 6), 8, deployment_macs(deploy, 224, 10), deploy, 224)
    lo, hi = bops_range(space)
    budget = args.budget or round(0.5 * (lo + hi), 4)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=gen).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)) for _ in range(args.batches)]
    step_before = float_step_s(model, *batches[0], args.repeats)
    settings = ScoreSettings(seed=0, hutchinson_samples=args.samples, ompq_beta=1.0, uniform_side="below")
    rows = {}
    for name, strategy in STRATEGIES.items():
        if not isinstance(strategy, ScoreStrategy):
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        scores = strategy.score(model if strategy.needs_float_model else None,
                                batches if strategy.reads_batches else [], space, settings)
        _sync(device)
        t1 = time.perf_counter()
        decoded = strategy.decode(space, scores, budget, settings)
        t2 = time.perf_counter()
        rows[name] = {"score_s": t1 - t0, "decode_s": t2 - t1, "budget_fraction": decoded.bops_g / budget,
                      "mean_bits": [float(np.mean([c[k] for c in decoded.choices.values()])) for k in (0, 1)],
                      "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    step_after = float_step_s(model, *batches[0], args.repeats)
    step = statistics.mean([step_before, step_after])
    for row in rows.values():
        row["score_over_float_step"] = row["score_s"] / step
    print(json.dumps({
        "arch": args.arch, "input_size": args.input_size, "batch_size": args.batch_size, "batches": args.batches,
        "hutchinson_samples": args.samples, "searched_layers": len(space.layers), "budget_g": budget,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "float_step_s": {"before": step_before, "after": step_after},
        "strategies": rows, "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
