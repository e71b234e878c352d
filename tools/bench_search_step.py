"""Speed and memory of one GMPQ search step against one plain float training step, side by side in one process.

    python tools/bench_search_step.py                      # resnet18_cifar, batch 32, 32x32, CPU
    python tools/bench_search_step.py --repeats 9 --threads 2 --backend compile

The float step is forward, cross-entropy, backward and an SGD step of the float model. The GMPQ step is what the
search loop does per batch: the supernet (every searched layer a mixed layer over bits {2,3,4,6} for weights and
activations, kept layers at 8 bits) forward with its closed-form Grad-CAM, the frozen float teacher's forward and
Grad-CAM without gradients, CE + 40 * attribution loss + budget penalty, one backward pass, an SGD step on the weights
and one on the alphas. Both models start from the same float weights.

Timing: after warm-up (which includes compiling the fused kernels), the two steps alternate ``--repeats`` times
(ABBA order, so that a change of machine load hits both); the time ratio is the median over repeats of
GMPQ-step / float-step of the adjacent pair. Memory: the peak of the bytes held by live CPU tensors during a step —
the persistent state (parameters, gradients, optimizer buffers, and the teacher for GMPQ) plus the step's largest
transient allocation, measured with ``torch.profiler`` memory events (allocator-level, so caching or reuse tricks
cannot hide anything). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import gmpq
from gmpq.quant import calibrate, fused
from gmpq.search import (
    AttributionModel,
    BudgetPenalty,
    SearchObjective,
    alpha_parameters,
    bops_range,
    build_supernet,
    deployment_macs,
    search_space,
    weight_param_groups,
    weight_parameters,
)

Step = Callable[[], None]


def float_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, list]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, [model, optimizer]


def gmpq_step(float_model: nn.Module, x: torch.Tensor, y: torch.Tensor, arch: str) -> tuple[Step, list]:
    teacher = AttributionModel(copy.deepcopy(float_model)).freeze()
    model = copy.deepcopy(float_model)
    deploy = gmpq.base_arch(arch)
    space = search_space(model, (2, 3, 4, 6), 8, deployment_macs(deploy, 224, 10), deploy, 224)
    build_supernet(model, space)
    calibrate(model, [x])
    student = AttributionModel(model)
    lo, hi = bops_range(space)
    penalty = BudgetPenalty(lo + 0.3 * (hi - lo), scale=len(space.layers))
    objective = SearchObjective(space, penalty, lambda_attr=40.0, p=3.0)
    opt_w = torch.optim.SGD(weight_param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    opt_a = torch.optim.SGD(alpha_parameters(model), lr=0.01, momentum=0.9)
    assert len(weight_parameters(model)) + len(alpha_parameters(model)) == len(list(model.parameters()))
    model.train()

    def step() -> None:
        logits, cam_q = student(x)
        with torch.no_grad():
            _, cam_fp = teacher(x)
        terms = objective(model, logits, y, cam_q, cam_fp)
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        terms.total.backward()
        opt_w.step()
        opt_a.step()
        objective.penalty.update(terms.expected_bops_g.item())

    return step, [model, opt_w, opt_a, teacher]


def live_bytes(objects: Iterable) -> int:
    """Bytes of the distinct tensor storages held by modules (parameters, gradients, buffers) and optimizers."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
    return sum(seen.values())


def peak_bytes(step: Step, objects: list) -> int:
    """Persistent bytes before a step plus the step's peak transient allocation (second of two profiled steps, so
    that frees of the previous step's gradients are seen)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        persistent = live_bytes(objects)
        with record_function("measured_step"):
            step()
    events = prof.profiler.kineto_results.events()
    start = min(e.start_ns() for e in events if e.name() == "measured_step")
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running = before = peak = 0
    for t, nbytes in memory:
        running += nbytes
        if t < start:
            before = peak = running
        else:
            peak = max(peak, running)
    return persistent + max(0, peak - before)


def timed(step: Step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18_cifar")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs (ABBA order)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--backend", choices=fused.BACKENDS, default="auto", help="fused-kernel backend")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fused.set_backend(args.backend)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    base = gmpq.create_model(args.arch, num_classes=10)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    f_step, f_objects = float_step(copy.deepcopy(base), x, y)
    g_step, g_objects = gmpq_step(base, x, y, args.arch)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        g_step()
        f_step()
    warmup_s = time.perf_counter() - t0
    f_times, g_times, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            f, g = timed(f_step), timed(g_step)
        else:
            g, f = timed(g_step), timed(f_step)
        f_times.append(f)
        g_times.append(g)
        ratios.append(g / f)
    result = {
        "arch": args.arch, "batch": args.batch, "input_size": args.size, "device": "cpu",
        "threads": torch.get_num_threads(), "backend": fused.get_backend(), "candidate_bits": [2, 3, 4, 6],
        "repeats": args.repeats, "float_step_s": statistics.median(f_times), "gmpq_step_s": statistics.median(g_times),
        "time_ratio": statistics.median(ratios), "time_ratio_of_medians":
            statistics.median(g_times) / statistics.median(f_times),
        "float_step_s_all": [round(t, 4) for t in f_times], "gmpq_step_s_all": [round(t, 4) for t in g_times],
        "warmup_s": warmup_s,
    }
    if not args.no_memory:
        f_peak = peak_bytes(f_step, f_objects)
        g_peak = peak_bytes(g_step, g_objects)
        result.update({"float_peak_mb": f_peak / 2**20, "gmpq_peak_mb": g_peak / 2**20,
                       "memory_ratio": g_peak / f_peak})
    result.update({"targets": {"time_ratio": 1.5, "memory_ratio": 1.6}, "load_avg_before": load_before,
                   "load_avg_after": os.getloadavg(), "torch": torch.__version__, "cpu": platform.processor() or
                   platform.machine()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
