"""tools/bench_record.py: the record's comparison (same kind of machine, ratios worse by more than the tolerance
flagged) and its append, without running a benchmark."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_record.py"
spec = importlib.util.spec_from_file_location("bench_record", TOOL)
bench_record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_record)


def run(cpu: str, threads: int, gmpq: float, qat: float, memory: float = 1.2) -> dict:
    return {"commit": "abc", "dirty": False, "date": "2026-12-03T08:00:00+00:00", "torch": "2.14.1", "note": "",
            "machine": {"cpu": cpu, "threads": threads, "device": "cpu"},
            "steps": {"gmpq": {"time_ratio": gmpq, "memory_ratio": memory, "step_s": 1.0, "float_step_s": 0.7},
                      "qat": {"time_ratio": qat, "step_s": 0.8, "float_step_s": 0.7}}}


def test_flags_only_ratios_worse_than_tolerance(capsys):
    old = run("Xeon", 2, gmpq=1.50, qat=1.05)
    assert bench_record.compare(run("Xeon", 2, gmpq=1.64, qat=1.10), old, 0.10) == []  # +9.3 %, +4.8 %
    assert bench_record.compare(run("Xeon", 2, gmpq=1.66, qat=0.90), old, 0.10) == ["gmpq time_ratio"]
    assert bench_record.compare(run("Xeon", 2, 1.5, 1.05, memory=1.4), old, 0.10) == ["gmpq memory_ratio"]
    assert "REGRESSION" in capsys.readouterr().out
    assert bench_record.compare(run("Xeon", 2, 9.0, 9.0), None, 0.10) == []  # nothing to compare with


def test_compare_only_picks_the_last_run_of_the_same_kind(tmp_path):
    record = tmp_path / "record.jsonl"
    lines = [run("Xeon", 2, 1.50, 1.05), run("Xeon", 1, 1.20, 1.05), run("EPYC", 2, 1.00, 1.00),
             run("Xeon", 2, 1.70, 1.05)]
    record.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, str(TOOL), "--compare-only", "--record", str(record)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr  # 1.70 against the 2-thread Xeon's 1.50, not EPYC's 1.00
    assert "was 1.500" in out.stdout and "REGRESSION" in out.stdout
    out = subprocess.run([sys.executable, str(TOOL), "--compare-only", "--threads", "1", "--record", str(record)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "no earlier run" in out.stdout


def test_every_listed_benchmark_exists():
    assert set(bench_record.BENCHMARKS) == {"step", "ptq"}
    for tool, _ in bench_record.BENCHMARKS.values():
        assert (TOOL.parent / tool).is_file(), tool


def test_only_changes_beside_the_record_make_a_run_dirty(monkeypatch):
    """Lines an earlier run appended to the record are no uncommitted change to what is measured; any other tracked
    change is (git's porcelain lines, the first of which git() hands over with its leading space stripped)."""
    record = bench_record.RECORD
    status = {"out": ""}
    monkeypatch.setattr(bench_record, "git", lambda *args: status["out"])
    for out, dirty in (("", False), ("M benchmarks/record.jsonl", False),
                       ("M benchmarks/record.jsonl\n M gmpq/quant/fused.py", True), ("M README.md", True)):
        status["out"] = out
        assert bench_record.uncommitted(record) is dirty, out
