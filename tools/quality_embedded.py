"""Quality check on the embedded CIFAR-10 subset: float pretraining, then uniform WbAb QAT from it.

Runs, through the public stage functions (the same code as ``gmpq pretrain`` / ``gmpq finetune``):

1. ``pretrain`` of ``--arch`` (default ``mobilenetv2_050_cifar``) from scratch on the 1500 embedded training images;
2. for each bit width b in ``--bits`` (default 4 3 2) and each of ``--variants``: ``ptq`` = calibration only
   (``finetune.epochs=0``: post-training quantization with calibrated clips/steps), ``qat`` = QAT for
   ``--qat-epochs`` epochs from the float weights, ``qat_fbn`` = the same with ``finetune.freeze_bn=true``; WbAb on
   every searched layer, kept layers (stem, classifier) at 8 bits. A run that diverges is reported as such;

and reports top-1 / top-5 on the 500 embedded test images, with the drop from float, as ``results.json`` and a
Markdown table ``results.md`` in ``--out``. Usage::

    OMP_NUM_THREADS=1 python tools/quality_embedded.py --out runs/quality     # ~1.5 h on one busy CPU core
    python tools/quality_embedded.py --epochs 2 --qat-epochs 1 --bits 4 --out runs/quality-smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gmpq.errors import RecipeError
from gmpq.recipes import load_recipe
from gmpq.stages import finetune, pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mobilenetv2_050_cifar")
    ap.add_argument("--epochs", type=int, default=15, help="float pretraining epochs")
    ap.add_argument("--qat-epochs", type=int, default=4, help="QAT epochs per bit width")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05, help="float peak lr (QAT uses lr/5)")
    ap.add_argument("--distill", type=float, default=0.0, help="KD weight during QAT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--resume", action="store_true", help="reuse finished stages in --out")
    ap.add_argument("--variants", nargs="+", choices=("ptq", "qat", "qat_fbn"), default=["ptq", "qat", "qat_fbn"])
    args = ap.parse_args()

    out = Path(args.out)
    common = [f"model.arch={args.arch}", f"data.batch_size={args.batch_size}", f"seed={args.seed}",
              f"resume={str(args.resume).lower()}", f"force={str(not args.resume).lower()}"]
    t0 = time.perf_counter()
    float_recipe = load_recipe(None, common + [
        "name=float", f"output_dir={out / 'float'}", f"pretrain.epochs={args.epochs}", f"pretrain.lr={args.lr}",
        "pretrain.warmup_epochs=1", "pretrain.weight_decay=5e-4"])
    float_metrics = pretrain(float_recipe)
    results = {"arch": args.arch, "dataset": "cifar10_embedded (1500 train / 500 test)", "seed": args.seed,
               "float": float_metrics, "quantized": {}}
    previous = out / "results.json"
    if args.resume and previous.is_file():  # keep the rows of earlier invocations with other --bits / --variants
        results["quantized"] = json.loads(previous.read_text()).get("quantized", {})
    float_dir = out / "float" / "pretrain" / "model"
    for b in args.bits:
        for mode in args.variants:
            name = f"w{b}a{b}-{mode.replace('_', '-')}"
            recipe = load_recipe(None, common + [
                f"name={name}", f"output_dir={out / name}", f"model.checkpoint={float_dir}",
                f"finetune.policy=w{b}a{b}", f"finetune.epochs={0 if mode == 'ptq' else args.qat_epochs}",
                f"finetune.lr={args.lr / 5}", f"finetune.distill={args.distill}", "finetune.weight_decay=1e-4",
                f"finetune.freeze_bn={str(mode == 'qat_fbn').lower()}"])
            try:
                m = finetune(recipe)
            except RecipeError as e:
                if "diverged" not in str(e):
                    raise
                m = {"diverged": str(e), "epochs": recipe.finetune.epochs}
            results["quantized"][f"w{b}a{b}_{mode}"] = m
            print(f"W{b}A{b} {mode}: " + (f"top1 {m['top1']:.2f}" if "top1" in m else "diverged")
                  + f" (float {float_metrics['top1']:.2f})", flush=True)
    results["total_wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results)
    (out / "results.md").write_text(table)
    print(table)


def _table(results: dict) -> str:
    f = results["float"]
    lines = [f"{results['arch']} on {results['dataset']}, seed {results['seed']}",
             "", "| model | epochs | top-1 | top-5 | drop vs float (top-1) | BOPs searched / total (G, base arch @224) |",
             "|---|---|---|---|---|---|",
             f"| float | {f['epochs']} | {f['top1']:.2f} | {f['top5']:.2f} | - | - |"]
    labels = {"ptq": "calibration only (PTQ)", "qat": "QAT", "qat_fbn": "QAT, frozen BN statistics"}
    order = list(labels)
    rows = sorted(results["quantized"].items(),
                  key=lambda kv: (-int(kv[0].split("a", 1)[0][1:]), order.index(kv[0].split("_", 1)[1])))
    for key, m in rows:
        bits, mode = key.split("_", 1)
        label = f"{bits.upper()} {labels[mode]}"
        if "diverged" in m:
            lines.append(f"| {label} | {m['epochs']} | diverged (non-finite loss) | - | - | - |")
            continue
        lines.append(f"| {label} | {m['epochs']} | {m['top1']:.2f} | {m['top5']:.2f} | {m['top1'] - f['top1']:+.2f} | "
                     f"{m['bops_searched_g']:.2f} / {m['bops_total_g']:.2f} |")
    lines.append("")
    lines.append(f"wall time of this invocation {results['total_wall_s'] / 60:.1f} min (stages reused with --resume "
                 "not counted)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
