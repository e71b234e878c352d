"""What the bits buy at inference: ONNX Runtime latency, file size and integer kernels of gmpq's ONNX export.

    python tools/bench_onnx.py                               # both models, CPU, all cores
    python tools/bench_onnx.py --threads 1 --repeats 9 --parity --json bench_onnx.json

For each model, three variants exported by ``gmpq.export_onnx`` from the same weights, side by side in one process:

* ``float``: every layer at 32 bits (a plain float graph, BatchNorm folded);
* ``W8A8``: every layer at 8 bits (stem and classifier included), calibrated on a few batches;
* ``mixed``: a mixed-precision policy (the published model's own; a 2/3/4/6-bit pattern for resnet18), <= 4-bit
  tensors in INT4/UINT4;
* ``mixed, 8-bit types``: the same model exported with ``low_bit_storage="int8"``.

Models: the published ``hub/mobilenetv2_050_cifar-gmpq-embedded`` at 32x32 (its float and W8A8 variants take its
dequantized weights, W8A8 calibrated on embedded CIFAR-10 training images), and timm's resnet18 at 224x224 with random
weights (latency does not depend on the values; calibrated on random images).

Latency: ONNX Runtime's CPU provider with all graph optimizations, batch 1 and batch 32; after warm-up, the variants
run in turn ``--repeats`` times and each reports its median (ratios to the float variant of the same model). Size:
the ``.onnx`` file. Kernels: per layer, the operator ONNX Runtime runs after its optimizations
(:func:`gmpq.hub.onnx_runtime.kernel_report`): an integer kernel (QLinearConv ...) or the float operator on
dequantized weights and inputs. ``--parity`` also measures, on the published model's held-out split, ONNX Runtime
against gmpq's float32 forward and gmpq's float32 forward against its float64 forward (the model's own numerical
noise floor). Prints a Markdown table; ``--json`` writes everything, per-layer kernels included.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader

import gmpq
from gmpq.data import ImageDataset, build_transform, get_dataset_spec, load_split
from gmpq.hub.onnx_runtime import kernel_report, onnx_parity, session

HUB_MODEL = "hub/mobilenetv2_050_cifar-gmpq-embedded"
MIXED_BITS = [(2, 3), (3, 6), (4, 2), (6, 4), (3, 3), (6, 6), (2, 4), (4, 6)]


def _embedded(split: str, mean, std) -> ImageDataset:
    spec = get_dataset_spec("cifar10_embedded")
    return ImageDataset(load_split(spec, split), build_transform(spec.family, 32, mean, std, train=False))


def _requantized(model: nn.Module, w_bits: int, a_bits: int, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of the gmpq ``model``'s network at uniform ``w_bits``/``a_bits`` on every layer, same weights,
    calibrated on ``batches`` (32 bits: no calibration needed)."""
    arch = model.gmpq_arch
    twin = gmpq.create_model(arch, num_classes=model.num_classes)
    policy = gmpq.uniform_policy(twin, w_bits, a_bits, kept_bits=w_bits)
    gmpq.quantize(twin, policy)
    float_state = {k: v for k, v in model.state_dict().items() if ".wq." not in k and ".aq." not in k}
    twin.load_state_dict(float_state, strict=False)
    if w_bits < 32:
        gmpq.calibrate(twin, batches)
    return twin.eval()


def hub_variants(batches: list[torch.Tensor]) -> tuple[dict[str, nn.Module], int]:
    mixed = gmpq.from_pretrained(HUB_MODEL)
    return {"float": _requantized(mixed, 32, 32, batches), "W8A8": _requantized(mixed, 8, 8, batches),
            "mixed": mixed}, 32


def resnet18_variants() -> tuple[dict[str, nn.Module], int]:
    torch.manual_seed(0)
    base = gmpq.create_model("resnet18", num_classes=1000)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(2)]
    variants = {}
    for label in ("float", "W8A8", "mixed"):
        model = copy.deepcopy(base)
        if label == "mixed":
            policy = gmpq.uniform_policy(model, 4, 4, input_size=224)
            cycle = itertools.cycle(MIXED_BITS)
            policy.layers = {name: gmpq.LayerBits(*next(cycle)) for name in policy.layers}
        else:
            bits = 32 if label == "float" else 8
            policy = gmpq.uniform_policy(model, bits, bits, kept_bits=bits, input_size=224)
        gmpq.quantize(model, policy)
        if label != "float":
            gmpq.calibrate(model, batches)
        variants[label] = model.eval()
    return variants, 224


def _latency(sessions: dict[str, Any], batch: int, size: int, repeats: int) -> dict[str, float]:
    """Median seconds per run of each session on one random batch, the sessions taking turns."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    for s in sessions.values():
        for _ in range(2):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def bench(name: str, variants: dict[str, nn.Module], size: int, out_dir: Path, threads: int,
          repeats: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    sessions = {}
    exports = [(label, model, "int4") for label, model in variants.items()]
    exports.append(("mixed, 8-bit types", variants["mixed"], "int8"))
    for label, model, low_bit_storage in exports:
        start = time.perf_counter()
        export = gmpq.export_onnx(model, out_dir / f"{name}-{len(rows)}.onnx", input_size=size,
                                  low_bit_storage=low_bit_storage)
        kernels = kernel_report(export.path)
        records = {r.name: r for r in export.layers}
        rows[label] = {
            "file_bytes": export.file_bytes, "export_s": time.perf_counter() - start,
            "integer_layers": sum(k.integer for k in kernels), "layers": len(kernels),
            "integer_kernels": sorted({k.kernel for k in kernels if k.integer}),
            "per_layer": [{"name": k.name, "w_bits": records[k.name].w_bits, "a_bits": records[k.name].a_bits,
                           "weight": records[k.name].weight, "activation": records[k.name].activation,
                           "kernel": k.kernel, "integer": k.integer} for k in kernels],
        }
        sessions[label] = session(export.path, threads=threads)
    for batch in (1, 32):
        for label, seconds in _latency(sessions, batch, size, repeats).items():
            rows[label][f"latency_b{batch}_ms"] = 1000 * seconds
    for row in rows.values():
        for key in ("file_bytes", "latency_b1_ms", "latency_b32_ms"):
            row[f"{key}_vs_float"] = row[key] / rows["float"][key]
    return {"model": name, "input_size": size, "variants": rows}


@torch.no_grad()
def parity(threads: int, out_dir: Path) -> dict[str, Any]:
    """The published model on its held-out split: ONNX Runtime vs gmpq float32, and gmpq float32 vs float64."""
    model = gmpq.from_pretrained(HUB_MODEL)
    cfg = model.gmpq_config
    path = gmpq.export_onnx(model, out_dir / "hub-parity.onnx").path
    data = _embedded(cfg["metrics"]["eval_split"], cfg["mean"], cfg["std"])
    ort_parity = onnx_parity(model, path, DataLoader(data, batch_size=50), threads=threads)
    double = copy.deepcopy(model).double()
    same = total = 0
    max_diff = 0.0
    for images, _ in DataLoader(data, batch_size=50):
        a, b = model(images), double(images.double()).float()
        same += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(images)
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {"model": HUB_MODEL, "samples": ort_parity.samples, "onnxruntime_vs_gmpq": asdict(ort_parity),
            "gmpq_float64_vs_float32": {"agreement": 100.0 * same / total, "max_logit_diff": max_diff}}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | .onnx bytes | vs float | batch 1 ms | vs float | batch 32 ms | vs float | "
             "layers on integer kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for label, r in result["variants"].items():
            kinds = f" ({', '.join(r['integer_kernels'])})" if r["integer_kernels"] else ""
            lines.append(f"| {result['model']} {result['input_size']}x{result['input_size']} | {label} | "
                         f"{r['file_bytes']:,} | {r['file_bytes_vs_float']:.3f} | {r['latency_b1_ms']:.2f} | "
                         f"{r['latency_b1_ms_vs_float']:.2f} | {r['latency_b32_ms']:.1f} | "
                         f"{r['latency_b32_ms_vs_float']:.2f} | {r['integer_layers']} of {r['layers']}{kinds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant and batch size")
    parser.add_argument("--models", nargs="*", choices=("hub", "resnet18"), default=["hub", "resnet18"],
                        help="models to time (none with --parity: parity only)")
    parser.add_argument("--parity", action="store_true", help="also measure parity on the hub model's held-out split")
    parser.add_argument("--json", type=Path, help="write all results (per-layer kernels included) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = gmpq.from_pretrained(HUB_MODEL).gmpq_config
    train = _embedded("train", cfg["mean"], cfg["std"])
    batches = [torch.stack([train[i][0] for i in range(j, j + 32)]) for j in range(0, 128, 32)]
    results = []
    with tempfile.TemporaryDirectory(prefix="gmpq-bench-onnx-") as tmp:
        if "hub" in args.models:
            variants, size = hub_variants(batches)
            results.append(bench("mobilenetv2_050_cifar", variants, size, Path(tmp), args.threads, args.repeats))
        if "resnet18" in args.models:
            variants, size = resnet18_variants()
            results.append(bench("resnet18", variants, size, Path(tmp), args.threads, args.repeats))
        extra = {"parity": parity(args.threads, Path(tmp))} if args.parity else {}
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                          "onnxruntime": ort.__version__, "torch": torch.__version__}, "repeats": args.repeats,
              "results": results, **extra}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if results:
        print(markdown(results))
    if extra:
        print(json.dumps(extra, indent=2))


if __name__ == "__main__":
    main()
