"""What a stage writes into its directory (:class:`~gmpq.rundir.StageDir`) besides checkpoints and models.

* the epoch log (``metrics.jsonl``; the search's ``search_log.jsonl``) and its CSV table (scalar columns) — one row
  per epoch (:class:`MetricsLogger`), rewritten atomically from the full history after each epoch, so that after a
  resume they hold exactly the epochs of the resumed run.
* ``metrics.json`` — the stage's final numbers (:func:`write_metrics_json`).
* ``recipe.yaml`` and ``env.json`` — the resolved recipe and the environment: package versions, device, world size,
  mixed precision (:func:`write_run_info`).

Only the main process writes. :func:`prepare_output_dir` enforces the resume / force rules.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmpq.errors import RecipeError
from gmpq.rundir import StageDir
from gmpq.utils import atomic_write_text, ensure_directory

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gmpq.recipes import Recipe


def _is_main(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_main_process


class MetricsLogger:
    """Writes the per-epoch history of a stage as its epoch log (JSONL) and table (CSV of the scalar columns)."""

    def __init__(self, directory: str | os.PathLike | StageDir, accelerator: Accelerator | None = None) -> None:
        self.stage = StageDir.of(directory)
        self.accelerator = accelerator

    def write(self, history: Sequence[dict[str, Any]]) -> None:
        if not _is_main(self.accelerator) or not history:
            return
        lines = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write_text(self.stage.epoch_log, lines)
        columns = list(dict.fromkeys(k for row in history for k, v in row.items() if not isinstance(v, (dict, list))))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in columns})
        atomic_write_text(self.stage.epoch_table, buf.getvalue())


def write_metrics_json(directory: str | os.PathLike | StageDir, metrics: dict[str, Any],
                       accelerator: Accelerator | None = None) -> Path:
    """Write ``metrics`` as the stage's final numbers (main process only, atomically)."""
    path = StageDir.of(directory).metrics
    if _is_main(accelerator):
        atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def command_line() -> str | None:
    """The gmpq command this process runs (``gmpq run quickstart seed=1``), None when it is not the gmpq CLI."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog not in ("gmpq", "cli.py", "__main__.py") or (prog != "gmpq" and "gmpq" not in Path(sys.argv[0]).parts):
        return None
    return shlex.join(["gmpq", *sys.argv[1:]])


def environment(accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Versions, device, world size and mixed precision of this run."""
    import accelerate
    import datasets
    import timm
    import torch

    from gmpq.version import __version__

    env: dict[str, Any] = {
        "gmpq": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "accelerate": accelerate.__version__, "datasets": datasets.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cuda_available": torch.cuda.is_available(),
        "command": command_line(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    if accelerator is not None:
        env.update({"device": str(accelerator.device), "world_size": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                    "mixed_precision": accelerator.mixed_precision})
    else:
        env.update({"device": "cpu", "world_size": 1})
    return env


def write_run_info(directory: str | os.PathLike | StageDir, recipe: Recipe,
                   accelerator: Accelerator | None = None) -> None:
    """Write the resolved recipe (``recipe.yaml``) and :func:`environment` (``env.json``) into the stage directory."""
    if not _is_main(accelerator):
        return
    stage = StageDir.of(directory)
    atomic_write_text(stage.recipe, recipe.to_yaml())
    atomic_write_text(stage.env, json.dumps(environment(accelerator), indent=2) + "\n")


def prepare_output_dir(directory: str | os.PathLike | StageDir, resume: bool, force: bool,
                       accelerator: Accelerator | None = None) -> bool:
    """Make a stage directory ready; return True when it holds a *finished* stage to reuse (resume).

    A directory holding a stage (final metrics or checkpoints) is continued with ``resume`` (a finished stage is
    reused as is), cleared with ``force``, and otherwise refused with :class:`RecipeError`.
    """
    stage = StageDir.of(directory)
    out = stage.path
    finished = stage.finished
    started = finished or stage.checkpoints.is_dir()
    if started and not resume and not force:
        raise RecipeError(f"output directory {str(out)!r} already holds a run; pass resume=true to continue it, "
                          f"force=true to overwrite it, or choose another output_dir")
    if started and force and not resume and _is_main(accelerator):
        shutil.rmtree(out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if _is_main(accelerator):
        ensure_directory(out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return finished and resume and not force
