"""Speed and memory of one GMPQ search step, and of one fixed-bit QAT step, against one plain float training step,
side by side in one process.

    python tools/bench_search_step.py                                  # resnet18_cifar, batch 32, 32x32, CPU
    python tools/bench_search_step.py --repeats 9 --threads 2 --backend compile
    python tools/bench_search_step.py --device cuda [--bf16] --step gmpq qat --out bench.json
                                              # CUDA: resnet18_cifar b256 32x32, resnet18 b64 224, mobilenetv2_100 b64 224

The float step is forward, cross-entropy, backward and an SGD step of the float model. The GMPQ step is what the
search loop does per batch: the supernet (every searched layer a mixed layer over bits {2,3,4,6} for weights and
activations, kept layers at 8 bits) forward with its closed-form Grad-CAM, the frozen float teacher's forward and
Grad-CAM (inference mode), CE + 40 * attribution loss + budget penalty, one backward pass, an SGD step on the weights
and one on the alphas, the budget multiplier's update. The QAT step is the float step of the same network quantized
uniformly (``--qat-bits``, 4: W4A4 searched layers, 8-bit stem and classifier; calibrated). All start from the same
float weights. ``--bf16`` runs every step (float ones too) under bf16 autocast, as ``mixed_precision: bf16`` does.
As in the pipeline, every model is built, quantized (or made a supernet) and calibrated on the CPU (calibration on
the first ``CALIBRATION_IMAGES`` images of the batch, with the eager kernels: its values do not change the timing, and
compiling CPU kernels for it would take longer than the measurement), then moved to the device.
float32 steps use torch's TF32 settings as they are (``environment.float32``: cuDNN convolutions default to TF32 on
Ampere and newer GPUs, matrix products to IEEE float32); the float step and the measured step run under the same.

Timing: after warm-up (which includes compiling the fused kernels), the float step and the measured step alternate
``--repeats`` times (ABBA order, so that a change of machine load hits both; on CUDA each step is bracketed by
``torch.cuda.synchronize``); the time ratio is the median over repeats of step / float step of the adjacent pair.
``host_s`` is the time until a step had queued all its work on the device: near the step's time, the step is bound
by Python and kernel launches, not by the GPU.
Memory: the persistent state (parameters, gradients, optimizer buffers, and the teacher for GMPQ) plus the step's
peak transient allocation above what was allocated when it started — on CPUs from ``torch.profiler`` memory events
(allocator-level, so caching or reuse tricks cannot hide anything), on CUDA from the caching allocator's peak.

Prints one JSON object (``results``: one record per configuration and step kind; a configuration that fails records
its error and the others still run) and one summary line per record on stderr; ``--out`` also writes the JSON to a
file, after every record.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

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
from gmpq.utils import atomic_write_text

Step = Callable[[], None]
#: perf_counter() when the running step had queued all its GPU work (before any wait for the device).
_queued: list[float] = []
#: (arch, batch, input size) measured by default.
CPU_CONFIGS = [("resnet18_cifar", 32, 32)]
CUDA_CONFIGS = [("resnet18_cifar", 256, 32), ("resnet18", 64, 224), ("mobilenetv2_100", 64, 224)]
CANDIDATE_BITS = (2, 3, 4, 6)
#: Images of the benchmark batch the quantizers are calibrated on (on the CPU).
CALIBRATION_IMAGES = 8
TARGETS = {"gmpq": {"time_ratio": 2.0, "memory_ratio": 1.6}, "qat": {"time_ratio": 1.3}}
CPU_TARGETS = {"gmpq": {"time_ratio": 1.5, "memory_ratio": 1.6}}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()


def float_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> tuple[Step, list]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> None:
        with autocast(x.device, bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _queued.append(time.perf_counter())

    return step, [model, optimizer]


def qat_model(float_model: nn.Module, calibration: torch.Tensor, bits: int, device: torch.device) -> nn.Module:
    """The CPU ``float_model`` copied, quantized uniformly at ``bits`` (searched layers; 8-bit kept ones) and
    calibrated on the CPU ``calibration`` images, then moved to ``device``."""
    model = gmpq.quantize(copy.deepcopy(float_model), gmpq.uniform_policy(float_model, bits, bits))
    with fused.using_backend("eager"):  # the observing pass quantizes weights: no CPU compilation for it
        calibrate(model, [calibration])
    return model.to(device)


def gmpq_step(float_model: nn.Module, calibration: torch.Tensor, x: torch.Tensor, y: torch.Tensor, arch: str,
              bf16: bool) -> tuple[Step, list]:
    """The search step of a supernet made from the CPU ``float_model`` and calibrated on the CPU ``calibration``
    images, then moved with its teacher to the device of ``x``."""
    teacher = AttributionModel(copy.deepcopy(float_model)).freeze().to(x.device)
    model = copy.deepcopy(float_model)
    deploy = gmpq.base_arch(arch)
    space = search_space(model, CANDIDATE_BITS, CANDIDATE_BITS, 8, deployment_macs(deploy, 224, 10), deploy, 224)
    build_supernet(model, space)
    with fused.using_backend("eager"):
        calibrate(model, [calibration])
    model.to(x.device)
    student = AttributionModel(model)
    lo, hi = bops_range(space)
    penalty = BudgetPenalty(lo + 0.3 * (hi - lo), scale=len(space.layers))
    objective = SearchObjective(space, penalty, lambda_attr=40.0, p=3.0)
    opt_w = torch.optim.SGD(weight_param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    opt_a = torch.optim.SGD(alpha_parameters(model), lr=0.01, momentum=0.9)
    assert len(weight_parameters(model)) + len(alpha_parameters(model)) == len(list(model.parameters()))
    model.train()

    def step() -> None:
        with autocast(x.device, bf16):
            logits, cam_q = student(x)
            _, cam_fp = teacher(x)
            terms = objective(model, logits, y, cam_q, cam_fp)
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        terms.total.backward()
        opt_w.step()
        opt_a.step()
        _queued.append(time.perf_counter())
        objective.penalty.update(terms.expected_bops_g.item())  # the loop's one wait for the device per step

    return step, [model, opt_w, opt_a, teacher]


# ------------------------------------------------------------------------------------------------ measurement
def live_bytes(objects: Iterable, device: torch.device) -> int:
    """Bytes of the distinct tensor storages on ``device`` held by modules (parameters, gradients, buffers) and
    optimizers."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == device.type:
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


def peak_bytes(step: Step, objects: list, device: torch.device) -> int:
    """Persistent bytes before a step plus the step's peak transient allocation (after one unmeasured step, so that
    frees of the previous step's gradients are seen)."""
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        persistent, before = live_bytes(objects, device), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return persistent + max(0, torch.cuda.max_memory_allocated() - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        persistent = live_bytes(objects, device)
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


def timed(step: Step, device: torch.device) -> tuple[float, float]:
    """``(wall seconds, host seconds)`` of one step: on CUDA the wall time runs until the device has finished, the
    host time until the step had queued all its work (close to the wall time: the step is bound by the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    _queued.clear()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    return t1 - t0, (_queued[-1] if _queued else t1) - t0


def compare(f_step: Step, m_step: Step, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Warm both steps up, then time them in ABBA order; ratios of the measured step to the float step."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        m_step()
        f_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    f_times, m_times, ratios, f_host, m_host = [], [], [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            (f, fh), (m, mh) = timed(f_step, device), timed(m_step, device)
        else:
            (m, mh), (f, fh) = timed(m_step, device), timed(f_step, device)
        f_times.append(f)
        m_times.append(m)
        f_host.append(fh)
        m_host.append(mh)
        ratios.append(m / f)
    return {"float_step_s": statistics.median(f_times), "step_s": statistics.median(m_times),
            "time_ratio": statistics.median(ratios),
            "time_ratio_of_medians": statistics.median(m_times) / statistics.median(f_times),
            "float_host_s": statistics.median(f_host), "host_s": statistics.median(m_host),
            "float_step_s_all": [round(t, 5) for t in f_times], "step_s_all": [round(t, 5) for t in m_times],
            "warmup_s": round(warmup_s, 2)}


def measure(kind: str, arch: str, batch: int, size: int, device: torch.device, args: argparse.Namespace
            ) -> dict[str, Any]:
    """One record: ``kind`` (gmpq | qat) against the float step on (arch, batch, size)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = gmpq.create_model(arch, num_classes=10)  # on the CPU: every model is built and calibrated there
    x_cpu = torch.randn(batch, 3, size, size)
    calibration = x_cpu[:CALIBRATION_IMAGES]
    x, y = x_cpu.to(device), torch.randint(0, 10, (batch,)).to(device)
    f_step, f_objects = float_step(copy.deepcopy(base).to(device), x, y, args.bf16)
    if kind == "gmpq":
        m_step, m_objects = gmpq_step(base, calibration, x, y, arch, args.bf16)
    else:
        m_step, m_objects = float_step(qat_model(base, calibration, args.qat_bits, device), x, y, args.bf16)
    record: dict[str, Any] = {"step": kind, "arch": arch, "batch": batch, "input_size": size,
                              "precision": "bf16" if args.bf16 else "fp32", "float32": float32_precision(),
                              "setup_s": round(time.perf_counter() - t0, 2)}
    record.update(compare(f_step, m_step, device, args.warmup, args.repeats))
    if not args.no_memory:
        f_peak = peak_bytes(f_step, f_objects, device)
        m_peak = peak_bytes(m_step, m_objects, device)
        record.update({"float_peak_mb": round(f_peak / 2**20, 1), "peak_mb": round(m_peak / 2**20, 1),
                       "memory_ratio": m_peak / f_peak})
    record["targets"] = (TARGETS if device.type == "cuda" else CPU_TARGETS).get(kind, {})
    return record


def float32_precision() -> dict[str, str]:
    """How float32 convolutions (cuDNN) and matrix products (cuBLAS) run on CUDA: ``tf32`` (TensorFloat-32 tensor
    cores, operands rounded to 10 mantissa bits; Ampere and newer GPUs) or ``ieee`` — torch's settings as they are
    (torch >= 2.9's ``fp32_precision``, where ``none`` defers to the level above, else the legacy flags)."""
    backends, cudnn, matmul = torch.backends, torch.backends.cudnn, torch.backends.cuda.matmul
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return {"conv": "tf32" if cudnn.allow_tf32 else "ieee", "matmul": "tf32" if matmul.allow_tf32 else "ieee"}

    def first_set(*levels: str) -> str | None:
        return next((v for v in levels if v != "none"), None)

    top = getattr(backends, "fp32_precision", "none")
    conv_p = first_set(conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"), top) or "tf32"
    matmul_p = first_set(matmul.fp32_precision, top) or (
        "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    return {"conv": conv_p, "matmul": matmul_p}


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "backend": fused.get_backend(device), "candidate_bits": list(CANDIDATE_BITS),
                           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                           "float32": float32_precision()}
    if device.type == "cuda":
        env.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version()})
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every step benchmark takes: threads, memory on/off, where the JSON goes (shared with
    ``tools/bench_ptq.py``)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--out", default=None, help="also write the JSON to this file (after every record)")
    parser.add_argument("--quiet", action="store_true", help="print only one summary line per record (stderr)")


def run_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """``args.device``, refused when it is CUDA without a device; sets ``args.threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def add_record(output: dict[str, Any], record: dict[str, Any], args: argparse.Namespace,
               summary_keys: Iterable[str]) -> None:
    """Append ``record`` to ``output["results"]``, print its summary line (and traceback) on stderr and, with
    ``--out``, write everything so far: a run stopped early keeps what it measured."""
    output["results"].append(record)
    print(json.dumps({k: record.get(k) for k in summary_keys}), file=sys.stderr, flush=True)
    if "traceback" in record:
        print(record["traceback"], file=sys.stderr, flush=True)
    output["load_avg_after"] = os.getloadavg()
    if args.out:
        atomic_write_text(args.out, json.dumps(output, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--step", nargs="+", choices=("gmpq", "qat"), default=["gmpq"], help="step kinds to measure")
    parser.add_argument("--arch", default=None, help="one architecture (default: resnet18_cifar on CPUs; the three "
                                                    "CUDA configurations on GPUs)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every step")
    parser.add_argument("--qat-bits", type=int, default=4, help="bits of the QAT step's searched layers")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (ABBA order; default 5 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--backend", choices=fused.BACKENDS, default="auto", help="fused-kernel backend")
    add_run_arguments(parser)
    args = parser.parse_args()
    device = run_device(parser, args)
    fused.set_backend(args.backend)
    if args.repeats is None:
        args.repeats = 10 if device.type == "cuda" else 5
    if args.arch:
        configs = [(args.arch, args.batch or 32, args.size or 32)]
    else:
        configs = [(a, args.batch or b, args.size or s) for a, b, s in
                   (CUDA_CONFIGS if device.type == "cuda" else CPU_CONFIGS)]
    output: dict[str, Any] = {"environment": environment(device), "load_avg_before": os.getloadavg(), "results": []}
    for arch, batch, size in configs:
        for kind in args.step:
            try:
                record = measure(kind, arch, batch, size, device, args)
            except Exception as e:  # noqa: BLE001 — record it and go on with the other configurations
                record = {"step": kind, "arch": arch, "batch": batch, "input_size": size,
                          "precision": "bf16" if args.bf16 else "fp32", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(limit=8)}
            gc.collect()  # the previous configuration's models and optimizers go before the next one's
            if device.type == "cuda":
                torch.cuda.empty_cache()
            output["environment"]["backend"] = fused.get_backend(device)  # a Triton failure switches it
            add_record(output, record, args, ("step", "arch", "precision", "float32", "time_ratio", "memory_ratio",
                                              "float_step_s", "step_s", "error"))
    if not args.quiet:
        print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
