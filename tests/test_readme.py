"""The README runs as written: every ```bash and ```python block is executed, from an empty directory.

A block is skipped only when the line before its fence says ``<!-- readme-test: skip (reason) -->``. Every line of a
bash block must be a ``gmpq`` command (comments after ``#`` are dropped, globs expanded), run in this process through
:func:`gmpq.cli.main` and expected to exit 0. Commands that train get smoke-sized overrides (one step per stage on 8
images): every recipe the blocks load goes through :func:`smoke_recipe`, the same recipe with :data:`SMOKE` appended.
"""

from __future__ import annotations

import glob
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

import gmpq.recipes
import gmpq.stages.evaluation
from gmpq.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: The smallest work that passes through every stage (cf. tests/test_pipeline.py).
SMOKE = ["data.batch_size=4", "data.max_train_samples=8", "data.max_eval_samples=8", "pretrain.epochs=1",
         "pretrain.max_steps=1", "search.epochs=1", "search.max_steps=1", "finetune.epochs=1", "finetune.max_steps=1",
         "finetune.calibration_batches=1", "evaluate.batch_size=8"]


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every fenced block, in order."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((match.group(1), match.group(2), skip.group(1) if skip else None))
    return blocks


@pytest.fixture()
def smoke_recipes(monkeypatch, tmp_path):
    """An empty working directory in which every recipe loaded gets the :data:`SMOKE` overrides."""
    real = gmpq.recipes.load_recipe

    def smoke_recipe(path=None, overrides=(), **defaults):
        return real(path, [*overrides, *SMOKE], **defaults)

    monkeypatch.setattr(gmpq.recipes, "load_recipe", smoke_recipe)
    monkeypatch.setattr(gmpq.stages.evaluation, "load_recipe", smoke_recipe)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shell_commands(code: str) -> Iterator[list[str]]:
    """The argv of each line of a bash block, comments dropped and globs expanded (when the line is reached, as a
    shell would); every line must run gmpq."""
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "gmpq", f"a README bash block runs {argv[0]!r}, not gmpq: mark it skipped with a reason"
        yield [expanded for arg in argv[1:] for expanded in (sorted(glob.glob(arg)) or [arg])]


def test_the_readme_has_runnable_blocks_and_every_skip_has_a_reason():
    blocks = readme_blocks()
    run = [lang for lang, _, skip in blocks if lang in ("bash", "python") and skip is None]
    assert run.count("bash") >= 1 and run.count("python") >= 1
    assert all(skip.strip() for _, _, skip in blocks if skip is not None)


def test_every_bash_and_python_block_of_the_readme_runs(smoke_recipes, capsys):
    for lang, code, skip in readme_blocks():
        if skip is not None or lang not in ("bash", "python"):
            continue
        if lang == "python":
            exec(compile(code, f"{README}:python block", "exec"), {"__name__": "__readme__"})  # noqa: S102
            continue
        for argv in shell_commands(code):
            code_ = main(argv)
            captured = capsys.readouterr()
            assert code_ == 0, f"`gmpq {' '.join(argv)}` exited {code_}: {captured.err.strip()}"
    assert (smoke_recipes / "runs" / "quickstart" / "export" / "config.json").exists()
    assert (smoke_recipes / "hub" / "my-model" / "README.md").exists()
    assert (smoke_recipes / "hub" / "my-model-py" / "config.json").exists()
