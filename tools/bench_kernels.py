"""Time the Triton quantization kernels on a GPU against plain copies of the same bytes (a bandwidth yardstick).

    python tools/bench_kernels.py [--sweep] [--out kernels.json]

Sizes are those of the largest searched layers of the benchmark networks: an activation of 256 x 64 x 32 x 32
(resnet18_cifar's first stage at batch 256) and a weight of 512 x 4608 (resnet18's last 3x3 convolutions), with 4
candidates. For each kernel: microseconds per call (CUDA events, median of ``--reps``), the bytes it must move, the
bandwidth that makes, and the time of a ``torch`` elementwise operation moving the same bytes (``x * 2`` for one
read and one write; ``x + g`` for two reads and one write). ``--sweep`` also times the activation kernels at other
block sizes and warp counts (fp32), to tune ``ACT_BLOCK`` and the warps without another GPU session. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from gmpq.quant import fused
from gmpq.utils import atomic_write_text

ACT_SHAPE = (256, 64, 32, 32)
WEIGHT_SHAPE = (512, 4608)
BITS = (2, 3, 4, 6)


def cuda_time_us(fn: Callable[[], object], reps: int) -> float:
    """Median microseconds of ``fn`` over ``reps`` calls, after three warm-up calls (compilation included)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def row(name: str, us: float, nbytes: int, yardstick_us: float) -> dict:
    return {"kernel": name, "us": round(us, 2), "mb_moved": round(nbytes / 2**20, 1),
            "gb_per_s": round(nbytes / us / 1e3, 1), "torch_same_bytes_us": round(yardstick_us, 2),
            "vs_torch": round(us / yardstick_us, 2)}


def kernel_rows(tk, dtype: torch.dtype, probs, clip, levels, qmax_tuple, qmax, gammas, gen, reps: int) -> list[dict]:
    """The four kernels with ``dtype`` activations and gradients (weights stay float32)."""
    dev = probs.device
    tag = str(dtype).removeprefix("torch.")
    x = torch.randn(ACT_SHAPE, device=dev, generator=gen).relu().to(dtype)
    g = torch.randn(ACT_SHAPE, device=dev, generator=gen).to(dtype)
    size = x.numel() * x.element_size()
    w = torch.randn(WEIGHT_SHAPE, device=dev, generator=gen)
    gw = torch.randn(WEIGHT_SHAPE, device=dev, generator=gen).to(dtype)
    scales = (w.abs().amax(1) / torch.tensor(qmax_tuple, device=dev)[:, None]).contiguous()
    wsize, wout = w.numel() * 4, w.numel() * torch.finfo(dtype).bits // 8
    return [
        row(f"act_forward {tag}", cuda_time_us(lambda: tk.act_forward(x, probs, clip, levels, False, dtype), reps),
            2 * size, cuda_time_us(lambda: x * 2, reps)),
        row(f"act_backward {tag}", cuda_time_us(
            lambda: tk.act_backward(x, g, probs, clip, levels, False, True, True), reps), 3 * size,
            cuda_time_us(lambda: x + g, reps)),
        row(f"weight_forward {tag}", cuda_time_us(
            lambda: tk.weight_forward(w, probs, scales, qmax, gammas, dtype), reps), wsize + wout,
            cuda_time_us(lambda: w * 2, reps)),
        row(f"weight_backward {tag}", cuda_time_us(
            lambda: tk.weight_backward(w, gw, probs, scales, qmax, gammas, True), reps), 2 * wsize + wout,
            cuda_time_us(lambda: w + w, reps)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes and warp counts")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="print nothing (with --out)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from gmpq.quant import triton_kernels as tk

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    probs = torch.softmax(torch.randn(4, device=dev, generator=gen), 0)
    clip = torch.tensor([0.5, 1.0, 1.5, 2.0], device=dev)
    levels = fused.act_levels(BITS, False, dev, torch.float32)
    qmax_tuple, qmax, gammas = fused.weight_constants(BITS, WEIGHT_SHAPE[1], dev, torch.float32)
    rows = [r for dtype in (torch.float32, torch.bfloat16)
            for r in kernel_rows(tk, dtype, probs, clip, levels, qmax_tuple, qmax, gammas, gen, args.reps)]
    sweep = []
    if args.sweep:
        x = torch.randn(ACT_SHAPE, device=dev, generator=gen).relu()
        g = torch.randn(ACT_SHAPE, device=dev, generator=gen)
        for block in (1024, 2048, 4096):
            for warps in (4, 8):
                fwd = cuda_time_us(lambda b=block, nw=warps: tk.act_forward(x, probs, clip, levels, False,
                                                                            torch.float32, b, nw), args.reps)
                bwd = cuda_time_us(lambda b=block, nw=warps: tk.act_backward(x, g, probs, clip, levels, False, True,
                                                                             True, b, nw), args.reps)
                sweep.append({"block": block, "num_warps": warps, "act_forward_us": round(fwd, 2),
                              "act_backward_us": round(bwd, 2)})
    output = {"gpu": torch.cuda.get_device_name(dev), "defaults": {"act_block": tk.ACT_BLOCK,
              "num_warps": tk._OPTIONS.get("num_warps")}, "kernels": rows, "sweep": sweep}
    text = json.dumps(output, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    if not args.quiet:
        print(text)


if __name__ == "__main__":
    main()
