"""RunDir: the paths of a run, and who owns it (a second process is refused; a killed holder blocks nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmpq.cli import main
from gmpq.errors import RunError
from gmpq.rundir import RunDir, StageDir

HOLD = """
import sys, time
from gmpq.rundir import RunDir
with RunDir(sys.argv[1]).claim():
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(root: Path, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_paths_of_a_run() -> None:
    run = RunDir(Path("runs/x"))
    assert run.float_model == Path("runs/x/pretrain/model") and run.policy == Path("runs/x/search/policy.json")
    assert run.trained_models == (Path("runs/x/finetune/model"), Path("runs/x/pretrain/model"))
    assert run.uniform.search.policy == Path("runs/x/uniform/search/policy.json")
    assert run.search.epoch_log.name == "search_log.jsonl" and run.pretrain.epoch_log.name == "metrics.jsonl"
    assert StageDir.holding(run.tuned_model) == StageDir(run.finetune.path.resolve(), "finetune")
    assert StageDir.holding(run.tuned_model).run.root == Path("runs/x").resolve()
    with pytest.raises(ValueError, match="unknown stage"):
        run.stage("export")


def test_a_second_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path: Path, capsys) -> None:
    holder = _hold(tmp_path)
    try:
        with pytest.raises(RunError, match=rf"in use by another gmpq process \(pid {holder.pid} on "):
            with RunDir(tmp_path).claim():
                pass
        # the CLI refuses a stage in the held directory before any work, with one line and exit code 2
        assert main(["pretrain", "/dev/null", "model.arch=test_resnet", f"output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gmpq: error: output directory") and f"pid {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(tmp_path).claim():  # the lock file stays, but nobody holds it any more
        with RunDir(tmp_path).claim():  # claims nest within a process
            assert RunDir(tmp_path).lock_file.is_file()
    with RunDir(tmp_path).claim():
        pass


def test_ranks_of_one_distributed_job_share_the_directory(tmp_path: Path) -> None:
    """Rank 0 of a job holds the lock for all its processes; the other ranks do not contend for it."""
    holder = _hold(tmp_path, RANK="0")
    try:
        rank1 = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(tmp_path)],
                               env={**os.environ, "RANK": "1"}, capture_output=True, text=True, timeout=120)
        assert rank1.returncode == 0 and rank1.stdout.strip() == "held", rank1.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    with RunDir(tmp_path).claim():
        assert time.monotonic() - start < 5
