"""The README's post-training table: round-to-nearest against learned rounding (AdaRound + BRECQ + QDrop) on the
CIFAR ResNet-20 float reference, top-1 on the full CIFAR-10 test split, calibration images from the training split.

    python tools/ptq_table.py --float runs/resnet20_cifar10_float/pretrain/model \
        --data ../shared/data/cifar10 --policy w4a4 --policy w3a3 --policy mixed=runs/hawq/search/policy.json \
        --policy w2a4 --out runs/ptq_table

Every policy runs twice on the same calibration images (``rounding=nearest``, then ``learned``); the table gives top-1
on the held-out slice of the training split (``--holdout``, the float reference's own held-out images, never used for
calibration) and on the test split, searched BOPs, the reconstruction's wall time and the process's peak memory.
Among the policies named ``mixed*``, the one with the best held-out top-1 after learned rounding is marked: that
choice reads no test image. ``--mobilenet-blocks K`` times the
reconstruction of the first K blocks of a random-weight ``mobilenetv2_100`` at 224x224 and extrapolates by MACs.
Writes ``table.md``, ``results.json`` and, per learned run, the per-block figure.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import gmpq
from gmpq.complexity import count_bops
from gmpq.models import uniform_policy
from gmpq.policy import Policy
from gmpq.ptq import peak_rss_mb
from gmpq.recipes import PtqConfig, load_recipe
from gmpq.train import build_dataloaders, calibration_batches
from gmpq.viz import plot_ptq


@torch.no_grad()
def top1(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float", dest="float_model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--policy", action="append", default=[], help="wXaY or NAME=policy.json")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--holdout", type=int, default=2000, help="training images held out (the float reference's "
                    "held-out slice): calibration never sees them, and they choose among the mixed policies")
    ap.add_argument("--seed", type=int, default=0, help="the calibration images' draw and the reconstruction's seed")
    ap.add_argument("--iters", type=int, default=PtqConfig.iters)
    ap.add_argument("--batchnorm", default="keep")
    ap.add_argument("--qdrop", type=float, default=PtqConfig.qdrop)
    ap.add_argument("--mobilenet-blocks", type=int, default=0)
    ap.add_argument("--mobilenet-iters", type=int, default=None, help="iterations per timed block (default --iters); "
                    "the fit time is scaled to --iters")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe("resnet20_cifar10_float", [f"data.path={args.data}", f"data.holdout={args.holdout}",
                                                   f"data.batch_size={args.images}", f"seed={args.seed}"])
    images = calibration_batches(recipe, 1)[0]
    test = build_dataloaders(recipe, train=False, eval_split="test", eval_batch_size=500).eval
    held = build_dataloaders(recipe, train=False, eval_split="holdout", eval_batch_size=500).eval
    model = gmpq.from_pretrained(args.float_model)
    rows = [{"policy": "float", "rounding": "-", "top1": top1(model, test), "holdout_top1": top1(model, held)}]
    print(rows[-1], flush=True)
    cfg = PtqConfig(num_images=args.images, iters=args.iters, batchnorm=args.batchnorm, qdrop=args.qdrop)
    for spec in args.policy:
        match = re.fullmatch(r"w(\d)a(\d)", spec)
        if match:
            name, policy = spec.upper(), uniform_policy(model, int(match[1]), int(match[2]))
        else:
            name, path = spec.split("=", 1)
            policy = Policy.load(path)
        bops = count_bops(gmpq.create_model("resnet20_cifar", policy=policy), 32).bops_searched_g
        for rounding in ("nearest", "learned"):
            t0 = time.perf_counter()
            q = gmpq.ptq(model, policy, images, cfg, rounding=rounding, progress=False, seed=args.seed)
            wall = time.perf_counter() - t0
            rows.append({"policy": name, "rounding": rounding, "top1": top1(q, test), "holdout_top1": top1(q, held),
                         "bops_searched_g": bops, "mean_w_bits": policy.mean_bits[0],
                         "mean_a_bits": policy.mean_bits[1], "wall_s": wall, "peak_rss_mb": peak_rss_mb()})
            print(rows[-1], flush=True)
            if rounding == "learned":
                plot_ptq(q.gmpq_ptq, out / f"{name.lower()}_blocks.png", title=f"ResNet-20 {name}")
                (out / f"{name.lower()}_report.json").write_text(json.dumps(q.gmpq_ptq.to_dict(), indent=1))
    if args.mobilenet_blocks:
        rows.append(mobilenet_timing(args.mobilenet_blocks, args.images, cfg, args.mobilenet_iters or cfg.iters))
        print(rows[-1], flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table(rows, cfg))
    print(table(rows, cfg))


def mobilenet_timing(blocks: int, images: int, cfg: PtqConfig, iters: int) -> dict:
    """Reconstruct the first ``blocks`` blocks of a random-weight mobilenetv2_100 at 224 (W4A4) with ``iters``
    iterations each; extrapolate to all blocks at ``cfg.iters`` iterations, the fitting time in proportion to the
    blocks' MACs and the iterations, the capture time in proportion to the number of blocks."""
    from gmpq.complexity import layer_macs
    from gmpq.ptq import reconstruction_blocks

    model = gmpq.create_model("mobilenetv2_100").eval()
    policy = uniform_policy(model, 4, 4)
    x = torch.randn(images, 3, 224, 224)
    probe = gmpq.quantize(gmpq.create_model("mobilenetv2_100"), policy)
    all_blocks = reconstruction_blocks(probe, x[:2])
    macs = layer_macs(probe, 224)
    block_macs = [sum(macs[n] for n in b.layers) for b in all_blocks]
    t0 = time.perf_counter()
    q = gmpq.ptq(model, policy, x, cfg, progress=False, max_blocks=blocks, iters=iters)
    wall = time.perf_counter() - t0
    fitted = sum(r.seconds for r in q.gmpq_ptq.blocks)
    done = sum(block_macs[:blocks])
    return {"policy": "mobilenetv2_100 W4A4 (random weights, 224)", "rounding": "learned",
            "blocks_measured": blocks, "blocks": len(all_blocks), "wall_s_measured": wall,
            "fit_s_measured": fitted, "wall_s_extrapolated": (wall - fitted) * len(all_blocks) / blocks
            + fitted * sum(block_macs) / done * cfg.iters / iters, "iters_measured": iters,
            "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict], cfg: PtqConfig) -> str:
    lines = [f"ResNet-20 (CIFAR-10 JPEG), {cfg.num_images} calibration images from the training split, "
             f"{cfg.iters} iterations per block, batch {cfg.batch_size}, QDrop p={cfg.qdrop}, BatchNorm "
             f"{cfg.batchnorm}; top-1 on the held-out training images and on the 10,000 test images. *: the mixed "
             "policy with the best held-out top-1 after learned rounding (chosen without the test split).", "",
             "| policy | searched BOPs (G) | mean W / A bits | round-to-nearest top-1 (held-out / test) | learned "
             "rounding top-1 (held-out / test) | reconstruction wall (s) | peak memory (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["policy"], {})[r["rounding"]] = r
    mixed = [n for n, runs in by.items() if n.lower().startswith("mixed") and "learned" in runs]
    chosen = max(mixed, key=lambda n: by[n]["learned"]["holdout_top1"]) if mixed else None
    for name, runs in by.items():
        if name == "float":
            f = runs["-"]
            lines.append(f"| float | - | 32 / 32 | {f['holdout_top1']:.2f} / {f['top1']:.2f} | - | - | - |")
        elif "nearest" in runs:
            n, ln = runs["nearest"], runs["learned"]
            mark = " *" if name == chosen else ""
            lines.append(f"| {name}{mark} | {n['bops_searched_g']:.3f} | {n['mean_w_bits']:.2f} / "
                         f"{n['mean_a_bits']:.2f} | {n['holdout_top1']:.2f} / {n['top1']:.2f} | "
                         f"{ln['holdout_top1']:.2f} / {ln['top1']:.2f} | {ln['wall_s']:.0f} | {ln['peak_rss_mb']:.0f} |")
        else:
            m = runs["learned"]
            lines.append(f"| {name} | - | 4 / 4 | - | {m['blocks_measured']} of {m['blocks']} blocks in "
                         f"{m['wall_s_measured']:.0f} s ({m['iters_measured']} iterations each) | extrapolated "
                         f"{m['wall_s_extrapolated']:.0f} | {m['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
