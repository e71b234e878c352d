"""The ``gmpq`` command. Thin: every verb parses its arguments and calls a public Python function.

Any :class:`gmpq.GmpqError` (bad input) becomes one line on stderr and exit code 2. A stop from outside is one line
saying how to continue: Ctrl-C (SIGINT) exits 130, SIGTERM (a scheduler's or torchrun's stop) exits 143 — 128 plus
the signal's number, as a shell reports a process killed by it; files being written are left as they were before. A
distributed run whose other process died or hung (a collective failed or timed out after ``dist_timeout_s``) is one
line and exit code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from gmpq.errors import GmpqError, ModelError, RunError

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_for_report(arch: str, policy: str | None, num_classes: int):
    from gmpq.models import create_model

    if not arch:
        raise ModelError("architecture name is empty")
    return create_model(arch, policy=policy, num_classes=num_classes)


def cmd_layers(args: argparse.Namespace) -> int:
    """``gmpq layers ARCH``: the quantizable layers with their type, how gmpq converts them, MACs and role."""
    from gmpq.complexity import count_bops

    report = count_bops(_model_for_report(args.arch, None, args.num_classes), args.input_size)
    unsupported = [r for r in report.layers if r.conversion is None]
    if args.json:
        print(json.dumps({"arch": report.arch, "input_size": report.input_size, "macs": report.macs,
                          "layers": [{"name": r.name, "type": r.layer_type, "conversion": r.conversion,
                                      "kind": r.kind, "macs": r.macs, "kept": r.kept} for r in report.layers]},
                         indent=2))
        return 0
    width = max(len(r.name) for r in report.layers)
    type_width = max(len(r.layer_type) for r in report.layers)
    print(f"{report.arch} at {report.input_size}x{report.input_size}: {len(report.layers)} quantizable layers, "
          f"{report.macs / 1e6:.1f} M MACs")
    print(f"{'layer':<{width}}  {'type':<{type_width}}  {'kind':<7} {'MMACs':>9}  {'role':<8}  quantized as")
    for r in report.layers:
        print(f"{r.name:<{width}}  {r.layer_type:<{type_width}}  {r.kind:<7} {r.macs / 1e6:>9.2f}  "
              f"{'kept' if r.kept else 'searched':<8}  {r.conversion or 'no conversion: gmpq.quantize refuses it'}")
    if unsupported:
        types = ", ".join(sorted({r.layer_type for r in unsupported}))
        print(f"{len(unsupported)} layer(s) of a type without a conversion ({types}): gmpq cannot quantize this model "
              "as it is")
    return 0


def cmd_bops(args: argparse.Namespace) -> int:
    """``gmpq bops ARCH [--policy FILE]``: BOPs of the float model, or of the model under a policy."""
    from gmpq.complexity import count_bops

    report = count_bops(_model_for_report(args.arch, args.policy, args.num_classes), args.input_size)
    if args.json:
        out = report.to_dict()
        out["layers"] = [{"name": r.name, "w_bits": r.w_bits, "a_bits": r.a_bits, "macs": r.macs, "kept": r.kept,
                          "bops_g": r.bops / 1e9} for r in report.layers]
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(r.name) for r in report.layers)
    print(f"{report.arch} at {report.input_size}x{report.input_size}" + (f", policy {args.policy}" if args.policy else
                                                                          ", float (32/32)"))
    print(f"{'layer':<{width}}  {'W':>2} {'A':>2} {'MMACs':>9} {'GBOPs':>9}  role")
    for r in report.layers:
        print(f"{r.name:<{width}}  {r.w_bits:>2} {r.a_bits:>2} {r.macs / 1e6:>9.2f} {r.bops / 1e9:>9.3f}  "
              f"{'kept' if r.kept else 'searched'}")
    print(f"MACs {report.macs / 1e9:.3f} G | BOPs searched {report.bops_searched_g:.2f} G | "
          f"kept {report.bops_kept_g:.2f} G | total {report.bops_total_g:.2f} G | searched + kept at 8 bits (preset "
          f"kept8) {report.bops_g('kept8'):.2f} G")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    """``gmpq backbones``: the CIFAR variants gmpq registers in timm (any other timm name works too)."""
    from gmpq.models import base_arch, list_cifar_variants, model_data_config
    from gmpq.models.cifar import VARIANTS

    for name in list_cifar_variants():
        size = model_data_config(name).input_size
        print(f"{name:<24} base={base_arch(name):<18} input={size:<4} {VARIANTS[name][1]}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``gmpq plot POLICY.json [MORE.json ...] -o FIG`` or ``gmpq plot --search RUN_DIR -o FIG``."""
    from gmpq.errors import PolicyError
    from gmpq.viz import plot_policies, plot_search

    if bool(args.policies) == bool(args.search):
        raise PolicyError("gmpq plot: give policy JSON files, or --search RUN_DIR for a search run's figure "
                          "(one of the two)")
    if args.search:
        path = plot_search(args.search, args.output, title=args.title)
    else:
        path = plot_policies(args.policies, args.output, labels=args.labels, style=args.style, title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``gmpq compare RUN_DIR ... [-o FIG] [--json]``: a table of the runs, and a top-1 vs BOPs scatter plot; a study
    directory stands for its finished cells."""
    from gmpq.study import finished_cell_dirs, is_study_directory
    from gmpq.viz import compare_runs, format_compare_table, plot_compare

    dirs = [cell for d in args.runs for cell in (finished_cell_dirs(d) if is_study_directory(d) else [d])]
    if not dirs:
        raise RunError(f"the study directories {', '.join(args.runs)} have no finished cells yet")
    runs = compare_runs(dirs)
    print(json.dumps([r.to_dict() for r in runs], indent=2) if args.json else format_compare_table(runs))
    if args.output:
        path = plot_compare(runs, args.output, bops=args.bops)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``gmpq export RUN_OR_MODEL --out DIR [--format packed|float|onnx]``: packed low-bit safetensors + policy +
    config + model card, or an ONNX QDQ graph + model card."""
    from gmpq.hub.export import export_report_dict
    from gmpq.hub.onnx_export import DEFAULT_OPSET
    from gmpq.pipeline import export_run, export_run_onnx

    onnx_only = {"--input-size": args.input_size, "--opset": args.opset, "--low-bit-storage": args.low_bit_storage}
    if args.format == "onnx":
        if args.repo_id or args.bops_input_size or args.command:
            raise ModelError("--repo-id, --bops-input-size and --command apply to the safetensors formats; --format "
                             "onnx takes --input-size, --opset and --low-bit-storage")
        onnx_report = export_run_onnx(args.source, args.out, input_size=args.input_size,
                                      opset=args.opset or DEFAULT_OPSET,
                                      low_bit_storage=args.low_bit_storage or "int4", name=args.name)
        print(json.dumps(onnx_report.to_dict(), indent=2) if args.json else onnx_report.summary())
        return 0
    given = [flag for flag, value in onnx_only.items() if value is not None]
    if given:
        raise ModelError(f"{', '.join(given)} apply to --format onnx only")
    report = export_run(args.source, args.out, format=args.format, name=args.name,
                        bops_input_size=args.bops_input_size, repo_id=args.repo_id, command=args.command)
    print(json.dumps(export_report_dict(report), indent=2) if args.json else report.summary())
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    """``gmpq hub list [--hub DIR]`` (the local hub's models) and ``gmpq hub index [--hub DIR]`` (rebuild its index)."""
    from dataclasses import asdict

    from gmpq.hub.index import list_hub, update_index

    if args.action == "index":
        print(f"wrote {update_index(args.hub)}")
        return 0
    entries = list_hub(args.hub)
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
        return 0
    rows = [(e.name, e.arch, e.dataset or "-", "-" if e.top1 is None else f"{e.top1:.2f}",
             f"{e.bops_searched_g:.3f}/{e.bops_total_g:.3f} @{e.bops_input_size}", f"{e.file_bytes / 1e6:.3f}",
             f"{1 / e.ratio_fp32:.1f}x") for e in entries]
    head = ("name", "arch", "dataset", "top-1 %", "GBOPs searched/total", "MB", "vs FP32")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _say(text: str) -> None:
    """Print the result of a training verb once: under torchrun / accelerate launch only rank 0 prints it."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        _say(json.dumps(metrics, indent=2, sort_keys=True))
        return
    keys = ("top1", "top5", "loss", "bops_searched_g", "bops_total_g", "model_size_mb", "wall_s")
    _say(" | ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))))


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``gmpq pretrain RECIPE [key=value ...]``: full-precision training (the search's teacher)."""
    from gmpq.recipes import load_recipe
    from gmpq.stages import pretrain

    _print_metrics(pretrain(load_recipe(args.recipe, args.overrides)), args.json)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``gmpq finetune RECIPE [key=value ...]``: calibrate and quantization-aware fine-tune a policy."""
    from gmpq.recipes import load_recipe
    from gmpq.stages import finetune

    _print_metrics(finetune(load_recipe(args.recipe, args.overrides)), args.json)
    return 0


def cmd_ptq(args: argparse.Namespace) -> int:
    """``gmpq ptq RECIPE [key=value ...]``: post-training quantization of a policy on ptq.num_images training images
    (learned rounding block by block); writes the run's deployed model like ``gmpq finetune``."""
    from gmpq.recipes import load_recipe
    from gmpq.stages import ptq

    _print_metrics(ptq(load_recipe(args.recipe, args.overrides)), args.json)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """``gmpq search RECIPE [key=value ...]``: mixed-precision search under ``search.budget_g``; writes policy.json."""
    from gmpq.recipes import load_recipe
    from gmpq.stages import search

    metrics = search(load_recipe(args.recipe, args.overrides))
    if args.json:
        _say(json.dumps(dict(metrics), indent=2, sort_keys=True))
        return 0
    _say(f"{metrics['strategy']} policy: {metrics['policy']}")
    preset = metrics.get("bops_preset", "searched")
    counted = "" if preset == "searched" else f", {preset} BOPs {metrics['bops_budgeted_g']:.4g} G"
    _say(f"searched BOPs {metrics['bops_searched_g']:.4g} G{counted} of budget {metrics['budget_g']:.4g} G "
          f"({100 * metrics['budget_fraction']:.1f} %), total {metrics['bops_total_g']:.4g} G on "
          f"{metrics['deploy_arch']} at {metrics['deploy_input_size']} | mean bits W{metrics['mean_w_bits']:.2f} "
          f"A{metrics['mean_a_bits']:.2f}" + (f" | decoded top1 {metrics['decoded_top1']:.2f}"
                                              if metrics.get("decoded_top1") is not None else "")
          + (f" | scored in {metrics['score_s']:.1f} s" if "score_s" in metrics else "")
          + f" | {metrics['wall_s']:.0f} s")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``gmpq evaluate RECIPE|DIR [key=value ...]``: top-1/top-5, BOPs and size of a run's or a directory's model."""
    from gmpq.stages import evaluate

    _print_metrics(evaluate(args.target, args.overrides), args.json)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """``gmpq recipes``: the recipes and studies shipped inside gmpq, by name, with their first comment line."""
    from gmpq.recipes import packaged_recipes, recipe_description

    recipes = {name: recipe_description(path) for name, path in packaged_recipes().items()}
    studies = {name: recipe_description(path) for name, path in packaged_recipes("study").items()}
    if args.json:
        print(json.dumps([{"name": name, "kind": kind, "description": text}
                          for kind, entries in (("recipe", recipes), ("study", studies))
                          for name, text in entries.items()], indent=2))
        return 0
    width = max(map(len, [*recipes, *studies]))
    for name, text in recipes.items():
        print(f"{name:<{width}}  {text}")
    print(f"run one by name: gmpq run {next(iter(recipes))} [key=value ...]; a YAML path works as well")
    if studies:
        print("\nstudies (gmpq study NAME):")
        for name, text in studies.items():
            print(f"{name:<{width}}  {text}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``gmpq run RECIPE [key=value ...]``: pretrain -> search -> finetune -> evaluate -> export, one directory."""
    from gmpq.pipeline import format_summary, run
    from gmpq.recipes import load_recipe

    result = run(load_recipe(args.recipe, args.overrides))
    _say(json.dumps(result.metrics, indent=2) if args.json else format_summary(result))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``gmpq study STUDY.yaml [key=value ...]``: strategies x budgets x seeds, proxy search, target fine-tuning."""
    from gmpq.study import run_study
    from gmpq.study.results import finished_cells

    result = run_study(args.study, args.overrides, cells=args.cells, shard=args.shard, report_only=args.report,
                       unpack=args.unpack or (), pack=args.pack, pack_models=args.pack_models)
    _say(f"study {result.directory}: {finished_cells(result.rows)} of {result.total_cells} cells finished"
         + (f" ({len(result.ran)} run now)" if result.ran else "")
         + (f"; float target top-1 {result.float_top1:.2f} %" if result.float_top1 is not None else ""))
    if result.summary is not None:
        _say(f"  {result.summary}  {result.directory / 'results.csv'}"
             + (f"  {result.figure}" if result.figure is not None else ""))
    if args.pack:
        _say(f"  packed finished cells into {args.pack}")
    if result.failed:
        _say(f"  {len(result.failed)} cell(s) failed: {', '.join(result.failed)} (errors in results.csv); exit 1")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gmpq.version import __version__

    parser = argparse.ArgumentParser(prog="gmpq", description="Generalizable mixed-precision quantization for timm CNNs.")
    parser.add_argument("--version", action="version", version=f"gmpq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    for name, handler, text in (("layers", cmd_layers, "list the quantizable layers of an architecture"),
                                ("bops", cmd_bops, "count MACs and BOPs, float or under a policy")):
        p = verb(name, handler, text)
        p.add_argument("arch", help="registered backbone or timm model name")
        if name == "bops":
            p.add_argument("--policy", help="policy JSON file (default: every layer float, 32/32)")
        p.add_argument("--input-size", type=_positive_int, default=None, help="input resolution (default: native)")
        p.add_argument("--num-classes", type=_positive_int, default=1000, help="classifier outputs (default 1000)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    verb("backbones", cmd_backbones, "list the CIFAR variants gmpq adds to timm's registry")
    p = verb("plot", cmd_plot, "draw policies (per-layer W/A bits) or a search run (BOPs, bit probabilities)")
    p.add_argument("policies", nargs="*", metavar="POLICY.json", help="policy files, one panel each")
    p.add_argument("--search", metavar="RUN_DIR", help="a search output_dir (or its search_log.jsonl) instead")
    p.add_argument("-o", "--output", required=True, help="image file to write (.png, .svg or .pdf)")
    p.add_argument("--labels", nargs="+", metavar="TEXT", help="panel titles, one per policy")
    p.add_argument("--style", choices=("side", "mirror"), default="side",
                   help="W and A bars side by side (default) or mirrored (W up, A down)")
    p.add_argument("--title", help="figure title")
    p = verb("compare", cmd_compare, "compare runs: a table of top-1, BOPs and size, and a top-1 vs BOPs plot")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run output directories (each with metrics.json), or study "
                                                              "directories (their finished cells)")
    p.add_argument("-o", "--output", help="also write a scatter plot of top-1 against BOPs (.png, .svg or .pdf)")
    p.add_argument("--bops", choices=("searched", "total"), default="searched",
                   help="x axis: BOPs of the searched layers (default) or of all layers")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    p = verb("export", cmd_export, "export a fine-tuned quantized model: packed low-bit safetensors, policy, config, "
                                   "model card; or an ONNX QDQ graph for ONNX Runtime / TensorRT / OpenVINO")
    p.add_argument("source", metavar="RUN_OR_MODEL",
                   help="a fine-tune run, its finetune/ stage or its model/ directory; with --format onnx also an "
                        "exported model (hub/<name>, an export directory or a Hub repo id)")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory (e.g. hub/<name>)")
    p.add_argument("--format", choices=("packed", "float", "onnx"), default="packed",
                   help="packed integer codes (default), dequantized float weights, or an ONNX graph with integer "
                        "weights and QuantizeLinear/DequantizeLinear activations (needs gmpq[onnx])")
    p.add_argument("--input-size", type=_positive_int, help="onnx: input resolution of the graph (default: native)")
    p.add_argument("--opset", type=_positive_int, help="onnx: ONNX opset (default 21; INT4 storage needs 21)")
    p.add_argument("--low-bit-storage", choices=("int4", "int8"),
                   help="onnx: store <= 4-bit tensors as INT4/UINT4 (default) or in 8-bit types")
    p.add_argument("--name", help="model name on the card (default: the directory name)")
    p.add_argument("--bops-input-size", type=_positive_int, help="resolution for BOPs (default: the model's native)")
    p.add_argument("--repo-id", help="id in the card's loading snippet (default: the --out path)")
    p.add_argument("--command", help="the command that made the model, on the card (default: what the run recorded)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p = verb("recipes", cmd_recipes, "list the recipes shipped inside gmpq (run one by name: gmpq run quickstart)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p = verb("hub", cmd_hub, "the local hub: list its models, or rebuild its index")
    p.add_argument("action", choices=("list", "index"), help="list: print the index; index: rebuild it")
    p.add_argument("--hub", metavar="DIR", help="hub folder (default: ./hub, else the gmpq checkout's hub/)")
    p.add_argument("--json", action="store_true", help="print one JSON list (list)")
    for name, handler, text in (
            ("run", cmd_run, "the whole pipeline of a recipe: pretrain, search, finetune, evaluate, export"),
            ("pretrain", cmd_pretrain, "train the full-precision model of a recipe (the search's teacher)"),
            ("search", cmd_search, "search a mixed-precision policy under a BOPs budget "
                                  "(gmpq | edmips | hawq | ompq | uniform | random)"),
            ("finetune", cmd_finetune, "apply a policy, calibrate, and quantization-aware fine-tune (optional KD)"),
            ("ptq", cmd_ptq, "apply a policy after training: calibration and learned rounding fitted block by block "
                             "on ptq.num_images training images (AdaRound + BRECQ + QDrop), no fine-tuning"),
            ("evaluate", cmd_evaluate, "top-1/top-5, BOPs and size of a run's model, or of a model directory")):
        p = verb(name, handler, text)
        if name == "evaluate":
            p.add_argument("target", metavar="RECIPE|DIR", help="recipe YAML, run/stage directory or model directory")
        else:
            p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file, or a packaged recipe's name "
                                                            "(gmpq recipes)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="recipe overrides, e.g. finetune.epochs=1 output_dir=runs/try1")
        p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p = verb("study", cmd_study, "a study: search on a proxy, fine-tune on a target, strategies x budgets x seeds, "
                                 "with statistics (results.csv, summary.md, study.png)")
    p.add_argument("study", metavar="STUDY.yaml",
                   help="study file, or a packaged study's name (embedded_to_tinyimagenet_cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the base recipe (finetune.epochs=1), or of the study (study.seeds=[0,1])")
    p.add_argument("--cells", metavar="A:B", help="run only these runs of the grid (0-based slice, B excluded)")
    p.add_argument("--shard", metavar="K/N", help="run every N-th run of the grid from the K-th (0-based)")
    p.add_argument("--report", action="store_true", help="run nothing: rewrite the results from finished cells")
    p.add_argument("--unpack", nargs="+", metavar="ARCHIVE", help="first merge these archives of finished cells")
    p.add_argument("--pack", metavar="ARCHIVE", help="finally pack the finished cells into this .tar.gz")
    p.add_argument("--pack-models", action="store_true", help="with --pack: include the cells' fine-tuned weights")
    return parser


#: Exit code of a distributed run that lost one of its processes (an environment fault, not bad input).
EXIT_LOST_PROCESS = 3


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that it unwinds like Ctrl-C (temporary files removed, locks released)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


#: What rerunning an interrupted verb takes (default: the same command).
_RESUME_HINT = {name: "rerun the same command with resume=true to continue from the last checkpoint"
                for name in ("run", "pretrain", "search", "finetune", "ptq")}
_RESUME_HINT["study"] = "rerun the same command to continue (finished cells are kept, the interrupted one resumes)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    hint = _RESUME_HINT.get(args.command, "rerun the same command")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.handler(args)
    except GmpqError as e:
        print(f"gmpq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmpq: interrupted (Ctrl-C); {hint}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"gmpq: terminated (SIGTERM); {hint}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except RuntimeError as e:
        from gmpq.train.engine import lost_process_message

        message = lost_process_message(e)
        if message is None:
            raise
        print(f"gmpq: error: {message}; {hint}", file=sys.stderr)
        return EXIT_LOST_PROCESS
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
