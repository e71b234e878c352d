"""Run the step benchmarks and append one JSON line per run to the record, ``benchmarks/record.jsonl``; print the
comparison with the last recorded run on the same kind of machine and flag every ratio that got worse by more than
``--tolerance`` (10 %).

    python tools/bench_record.py --threads 1 --repeats 7 --note "before the fix"
    python tools/bench_record.py --threads 2 --repeats 7          # on a 2-core machine, pinned to quiet cores
    python tools/bench_record.py --compare-only                   # print the last two runs of this machine kind

A benchmark is a tool in ``tools/`` that prints one JSON object with ``results`` (one record per step kind, each
with ``time_ratio`` and optionally ``memory_ratio``, ``float_step_s``, ``step_s``, ``float_peak_mb``, ``peak_mb``):
``bench_search_step.py`` (the GMPQ search step and the W4A4 QAT step against a float step) and ``bench_ptq.py`` (one
post-training reconstruction iteration of a block against a float training iteration of that block; its steps are
recorded as ``ptq:<block>``). Another benchmark joins by adding one entry to :data:`BENCHMARKS` (its tool, its
arguments); a listed tool that does not exist is skipped with one line.

A record line: ``commit`` (and ``dirty``: uncommitted changes), ``date`` (UTC), ``machine`` (``cpu`` model from
/proc/cpuinfo, ``threads``, ``device``), ``torch``, ``load_avg`` before/after, ``note``, and ``steps``: one entry per
step kind with its ratios and absolute times. "Same kind of machine" is the same ``cpu``, ``threads`` and
``device``. Ratios are medians of steps measured side by side in one process; absolute times are shown but never
compared across runs (the machine's load changes them). Lower ratios are better, so a ratio that grew by more than
the tolerance is flagged (REGRESSION) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "record.jsonl"
#: name -> (tool in tools/, extra arguments); each tool prints the ``results`` JSON of the module docstring.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "step": ("bench_search_step.py", ["--step", "gmpq", "qat"]),
    "ptq": ("bench_ptq.py", []),
}
RATIOS = ("time_ratio", "memory_ratio")
FIELDS = RATIOS + ("float_step_s", "step_s", "float_peak_mb", "peak_mb", "targets")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def uncommitted(record: Path) -> bool:
    """Whether a tracked file other than ``record`` differs from HEAD: lines appended to the record by earlier runs
    change nothing that is measured."""
    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "-uno").splitlines()]
    own = str(record.resolve().relative_to(ROOT)) if record.resolve().is_relative_to(ROOT) else None
    return any(path != own for path in changed)


def run_benchmark(tool: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``tools/<tool>`` in a subprocess with the common arguments; its JSON output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(ROOT / "tools" / tool), *extra, "--repeats", str(args.repeats), "--quiet",
               "--out", str(out), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        return json.loads(out.read_text())


def make_record(outputs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    env = next(iter(outputs.values()))["environment"]
    steps: dict[str, Any] = {}
    for bench, output in outputs.items():
        for r in output["results"]:
            key = r["step"] if bench == "step" else f"{bench}:{r['step']}"
            key += "" if r.get("precision", "fp32") == "fp32" else f":{r['precision']}"
            steps[key] = {"arch": r.get("arch"), "batch": r.get("batch"), "input_size": r.get("input_size"),
                          **({"error": r["error"]} if "error" in r else {}),
                          **{k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in FIELDS if k in r}}
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": uncommitted(args.record),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "threads": env["threads"], "device": env["device"],
                        **({"gpu": env["gpu"]} if "gpu" in env else {})},
            "torch": env["torch"], "backend": env.get("backend"), "repeats": args.repeats,
            "load_avg": [output.get("load_avg_before"), output.get("load_avg_after")], "note": args.note,
            "steps": steps}


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_kind(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a["machine"].get(k) == b["machine"].get(k) for k in ("cpu", "threads", "device", "gpu"))


def compare(new: dict[str, Any], old: dict[str, Any] | None, tolerance: float) -> list[str]:
    """Print each step's ratios beside the previous run's; return the regressions (ratio > old * (1 + tol))."""
    m = new["machine"]
    print(f"{new['commit']}{'+dirty' if new['dirty'] else ''} {new['date']}  {m['cpu']}, {m['threads']} threads"
          f"  torch {new['torch']}  {new['note'] or ''}")
    if old is None:
        print("  no earlier run on this kind of machine")
    else:
        print(f"  against {old['commit']}{'+dirty' if old['dirty'] else ''} {old['date']}  {old['note'] or ''}")
    regressions = []
    for step, s in new["steps"].items():
        o = (old or {}).get("steps", {}).get(step, {})
        cells = []
        for k in RATIOS:
            if k not in s:
                continue
            cell = f"{k} {s[k]:.3f}"
            if k in o:
                change = s[k] / o[k] - 1
                cell += f" (was {o[k]:.3f}, {change:+.1%})"
                if change > tolerance:
                    cell += " REGRESSION"
                    regressions.append(f"{step} {k}")
            target = s.get("targets", {}).get(k)
            if target is not None and s[k] > target:
                cell += f" [over target {target}]"
            cells.append(cell)
        times = f"{s['step_s']:.3f} s vs float {s['float_step_s']:.3f} s" if "step_s" in s else s.get("error", "")
        print(f"  {step:<8} {'; '.join(cells)}  ({times})")
    return regressions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every benchmark")
    parser.add_argument("--repeats", type=int, default=7, help="timed pairs per step kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="what this run measures (e.g. 'before the fix')")
    parser.add_argument("--record", type=Path, default=RECORD, help="the JSON-lines record")
    parser.add_argument("--tolerance", type=float, default=0.10, help="flag ratios worse by more than this")
    parser.add_argument("--no-append", action="store_true", help="measure and compare, but do not record")
    parser.add_argument("--compare-only", action="store_true", help="compare the last two runs of the record "
                                                                    "(of --threads' kind, if given); measure nothing")
    args = parser.parse_args()
    runs = read_record(args.record)
    if args.compare_only:
        if args.threads:
            runs = [r for r in runs if r["machine"]["threads"] == args.threads]
        if not runs:
            sys.exit(f"bench_record: no runs in {args.record}")
        new = runs[-1]
        old = next((r for r in reversed(runs[:-1]) if same_kind(r, new)), None)
        sys.exit(1 if compare(new, old, args.tolerance) else 0)
    outputs = {}
    for name, (tool, extra) in BENCHMARKS.items():
        if not (ROOT / "tools" / tool).exists():
            print(f"bench_record: {name}: tools/{tool} does not exist yet, skipped", file=sys.stderr)
            continue
        outputs[name] = run_benchmark(tool, extra, args)
    new = make_record(outputs, args)
    old = next((r for r in reversed(runs) if same_kind(r, new)), None)
    regressions = compare(new, old, args.tolerance)
    if not args.no_append:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        with args.record.open("a") as f:
            f.write(json.dumps(new) + "\n")
        print(f"appended to {args.record}")
    if regressions:
        print("REGRESSIONS: " + ", ".join(regressions))
        sys.exit(1)


if __name__ == "__main__":
    main()
