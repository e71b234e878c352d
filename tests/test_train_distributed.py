"""Two processes under torchrun (gloo on CPU) against one process on the same global batch.

``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate issue #2741), so the multi-process
path is exercised with ``torchrun --standalone --nproc_per_node 2 -m gmpq.cli ...``. Global batches are split across
processes (each sees half of every batch, the same samples in the same order as the single process); only BatchNorm
statistics differ (per half batch), so metrics agree within a small tolerance. Evaluation uses an odd number of
samples, so the last distributed batch is padded and ``gather_for_metrics`` must drop the padding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmpq.stages import finetune, pretrain

RECIPE = {
    "name": "dist", "seed": 0,
    "model": {"arch": "test_resnet", "deploy_input_size": 32},
    "data": {"input_size": 32, "batch_size": 16, "eval_batch_size": 8, "max_train_samples": 96,
             "max_eval_samples": 37},
    "pretrain": {"epochs": 2, "lr": 0.02},
    "finetune": {"epochs": 1, "lr": 0.005, "policy": "w4a4", "calibration_batches": 2},
}


def torchrun(args: list[str]) -> str:
    """Run ``gmpq ARGS`` on two processes; return their stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gmpq.cli",
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_whole_pipeline_runs_unchanged_on_two_processes(tmp_path):
    """``gmpq run`` under torchrun: every stage on 2 processes, one export, one summary printed (by rank 0)."""
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_mobilenet.yaml"
    out = tmp_path / "run"
    stdout = torchrun(["run", str(quickstart), "data.max_train_samples=64", "data.max_eval_samples=37",
                       "data.batch_size=16", "pretrain.epochs=1", "pretrain.max_steps=2", "search.epochs=1",
                       "search.max_steps=2", "finetune.epochs=1", "finetune.max_steps=2",
                       "finetune.calibration_batches=1", f"output_dir={out}"])
    assert stdout.count("gmpq run quickstart_mobilenet:") == 1, stdout
    for stage in ("pretrain", "search", "finetune", "evaluate", "uniform/finetune"):
        assert json.loads((out / stage / "metrics.json").read_text())["world_size"] == 2, stage
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["top1"] == json.loads((out / "evaluate" / "metrics.json").read_text())["top1"]
    assert 0.97 * 0.45 <= summary["bops_searched_g"] <= 0.45
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "search.png").is_file()


def test_two_processes_match_one(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    from gmpq.recipes import load_recipe

    single = load_recipe(path, [f"output_dir={tmp_path / 'one'}"])
    one = {"pretrain": pretrain(single), "finetune": finetune(single)}
    for verb in ("pretrain", "finetune"):
        torchrun([verb, str(path), f"output_dir={tmp_path / 'two'}"])
    two = {s: json.loads((tmp_path / "two" / s / "metrics.json").read_text()) for s in ("pretrain", "finetune")}
    env = json.loads((tmp_path / "two" / "pretrain" / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"] == "MULTI_CPU"
    for stage in ("pretrain", "finetune"):
        a, b = one[stage], two[stage]
        assert a["world_size"] == 1 and b["world_size"] == 2
        assert a["num_eval_samples"] == b["num_eval_samples"] == 37  # no double counting of the padded batch
        assert abs(a["top1"] - b["top1"]) <= 100 * 3 / 37, (stage, a["top1"], b["top1"])  # at most 3 of 37 images
        assert abs(a["loss"] - b["loss"]) <= 0.05 * a["loss"], (stage, a["loss"], b["loss"])
        rows_a = [json.loads(x) for x in (tmp_path / "one" / stage / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(x) for x in (tmp_path / "two" / stage / "metrics.jsonl").read_text().splitlines()]
        assert abs(rows_a[0]["train_loss"] - rows_b[0]["train_loss"]) <= 0.04 * rows_a[0]["train_loss"]
        assert rows_a[0]["lr"] == rows_b[0]["lr"]  # same number of optimizer steps
    assert Path(tmp_path / "two" / "finetune" / "model" / "policy.json").exists()
