"""The layout of a run directory, and who owns it. Every path of a run is named here and nowhere else.

A run directory (a recipe's ``output_dir``)::

    <output_dir>/
      pretrain/ search/ finetune/ evaluate/   one StageDir per stage (below)
      export/                                 the exported model (gmpq run)
      uniform/                                a nested run: the best uniform policy under the budget (gmpq run)
      uniform_above/                          a nested run: the nearest uniform policy above it (run.compare_uniform_above)
      policy.png search.png                   figures (gmpq run)
      metrics.json                            the run's summary (gmpq run)
      .gmpq.lock                              ownership (see RunDir.claim)

A stage directory::

    recipe.yaml env.json                      the resolved recipe and the environment
    metrics.jsonl metrics.csv                 one row per epoch (the search's: search_log.jsonl / .csv)
    checkpoints/epoch_NNNN                    the training state of the last epochs (resume)
    model/                                    the stage's model (pretrain, finetune): a gmpq model directory
    policy.json alphas.json                   the policy (search, finetune) and the final architecture logits (search)
    scores.json                               a score + decode search's cost table, in place of alphas.json
    metrics.json                              the stage's final numbers, written last: the stage is finished

**Ownership.** A process that works in a run directory holds an exclusive ``flock`` on its ``.gmpq.lock``
(:meth:`RunDir.claim`); a second process is refused with a :class:`~gmpq.errors.BusyError` (a ``RunError``) naming the holder (its pid,
host, command and start time). The operating system releases the lock when the holder exits, however it exits, so
the file a killed run leaves behind blocks nothing: ``resume=true`` continues that run. The processes of one
distributed job (``torchrun`` / ``accelerate launch``) share the directory: the job's rank 0 holds the lock for all
of them. Claims nest within a process (``gmpq run`` holds the run while each stage claims it again). Where the
platform has no ``fcntl`` (Windows), ownership is not enforced.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq.errors import BusyError
from gmpq.utils import ensure_directory

try:
    import fcntl
except ImportError:  # pragma: no cover — Windows
    fcntl = None

if TYPE_CHECKING:
    from gmpq.recipes import Recipe

#: The stages of a run, in pipeline order; each has a StageDir of the same name.
STAGES = ("pretrain", "search", "finetune", "evaluate")
LOCK_FILE = ".gmpq.lock"


@dataclass(frozen=True)
class StageDir:
    """The directory of one stage: ``path``; ``kind`` names the stage (``train`` for a stand-alone training run)."""

    path: Path
    kind: str = "train"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, directory: str | os.PathLike | StageDir) -> StageDir:
        """``directory`` as a StageDir (a plain path: a stand-alone training run)."""
        return directory if isinstance(directory, StageDir) else cls(Path(directory))

    @classmethod
    def holding(cls, model_dir: str | os.PathLike) -> StageDir | None:
        """The stage whose ``model/`` is ``model_dir``, else None."""
        path = Path(model_dir)
        if path.name != "model":
            return None
        parent = path.resolve().parent
        return cls(parent, parent.name if parent.name in STAGES else "train")

    @property
    def run(self) -> RunDir:
        """The run directory this stage belongs to."""
        return RunDir(self.path.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        """The final numbers, written last: the stage is finished when this file exists."""
        return self.path / "metrics.json"

    @property
    def epoch_log(self) -> Path:
        """One JSON object per epoch."""
        return self.path / ("search_log.jsonl" if self.kind == "search" else "metrics.jsonl")

    @property
    def epoch_table(self) -> Path:
        """The epoch log's scalar columns as CSV."""
        return self.epoch_log.with_suffix(".csv")

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def policy(self) -> Path:
        return self.path / "policy.json"

    @property
    def alphas(self) -> Path:
        return self.path / "alphas.json"

    @property
    def scores(self) -> Path:
        return self.path / "scores.json"

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()


@dataclass(frozen=True)
class RunDir:
    """A run directory (module docstring): where each stage, figure and export of a run lives."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, recipe_or_dir: Recipe | str | os.PathLike) -> RunDir:
        """The run directory of a recipe (its ``output_dir``) or at a path."""
        if isinstance(recipe_or_dir, (str, os.PathLike)):
            return cls(recipe_or_dir)
        return cls(recipe_or_dir.output_dir)

    def stage(self, name: str) -> StageDir:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        return StageDir(self.root / name, name)

    @property
    def pretrain(self) -> StageDir:
        return self.stage("pretrain")

    @property
    def search(self) -> StageDir:
        return self.stage("search")

    @property
    def finetune(self) -> StageDir:
        return self.stage("finetune")

    @property
    def evaluate(self) -> StageDir:
        return self.stage("evaluate")

    @property
    def float_model(self) -> Path:
        """Where this run's float model is (the pretrain stage's)."""
        return self.pretrain.model

    @property
    def policy(self) -> Path:
        """Where this run's searched policy is."""
        return self.search.policy

    @property
    def tuned_model(self) -> Path:
        """Where this run's fine-tuned (quantized) model is."""
        return self.finetune.model

    @property
    def trained_models(self) -> tuple[Path, ...]:
        """This run's models, the one to evaluate first: the fine-tuned one, then the float one."""
        return self.tuned_model, self.float_model

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def uniform(self) -> RunDir:
        """The nested run of the best uniform policy under the budget."""
        return RunDir(self.root / "uniform")

    @property
    def uniform_above(self) -> RunDir:
        """The nested run of the nearest uniform policy above the budget."""
        return RunDir(self.root / "uniform_above")

    @property
    def summary(self) -> Path:
        """The run's summary (``gmpq run``)."""
        return self.root / "metrics.json"

    @property
    def policy_figure(self) -> Path:
        return self.root / "policy.png"

    @property
    def search_figure(self) -> Path:
        return self.root / "search.png"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @contextmanager
    def claim(self) -> Iterator[RunDir]:
        """Hold this run directory for the duration of the block (module docstring: ownership)."""
        if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
            yield self
            return
        ensure_directory(self.root)
        key = self.lock_file.resolve()
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
        else:
            _HELD[key] = (_acquire(key), 1)
        try:
            yield self
        finally:
            fd, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (fd, depth - 1)
            else:
                del _HELD[key]
                os.ftruncate(fd, 0)
                os.close(fd)  # closing the descriptor releases the lock


#: Locks this process holds: lock file -> (descriptor, nesting depth).
_HELD: dict[Path, tuple[int, int]] = {}


def _acquire(lock: Path) -> int:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise BusyError(f"output directory {str(lock.parent)!r} is in use by another gmpq process ({holder}); wait "
                       "for it to finish, stop it, or choose another output_dir") from None
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "its details are not recorded yet"
    return (f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")
