"""Fault battery: what gmpq does when a file, the data or the storage goes wrong (see the README's fault table)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import gmpq
from gmpq.data import get_dataset_spec, load_split
from gmpq.data.registry import EMBEDDED_DIR
from gmpq.errors import CheckpointError, DatasetError, GmpqError
from gmpq.hub import format as F


@pytest.fixture(scope="module")
def float_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    model.eval()
    out = tmp_path_factory.mktemp("faults") / "float"
    gmpq.save_pretrained(model, out, dataset="cifar10_embedded")
    return out


def copy_of(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "m")
    return tmp_path / "m"


def test_read_only_model_dir_still_loads(float_export: Path, tmp_path: Path) -> None:
    root = copy_of(float_export, tmp_path)
    for p in [root, *root.iterdir()]:
        p.chmod(stat.S_IREAD | (stat.S_IEXEC if p.is_dir() else 0))
    try:
        assert isinstance(gmpq.from_pretrained(root), torch.nn.Module)
    finally:
        for p in [root, *root.iterdir()]:
            p.chmod(stat.S_IRWXU)


def test_truncated_safetensors_is_refused(float_export: Path, tmp_path: Path) -> None:
    root = copy_of(float_export, tmp_path)
    w = root / F.WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bytes but config.json records"):
        gmpq.from_pretrained(root)


def test_pth_pickle_in_place_of_weights_is_refused_without_unpickling(float_export: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_of(float_export, tmp_path)
    torch.save({"x": torch.zeros(1)}, root / F.WEIGHTS_FILE)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError):
        gmpq.from_pretrained(root)


def test_model_file_path_instead_of_directory_names_the_fix(float_export: Path) -> None:
    with pytest.raises(CheckpointError, match="is a file; pass the model directory"):
        gmpq.from_pretrained(float_export / F.WEIGHTS_FILE)


def test_missing_model_dir_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model directory"):
        gmpq.from_pretrained(tmp_path / "nope")


def embedded_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for s in ("train", "test"):
        shutil.copy(Path(EMBEDDED_DIR) / "cifar10" / f"{s}-00000-of-00001.parquet", root / f"{s}-00000-of-00001.parquet")
    return root


def test_truncated_parquet_shard_is_one_dataset_error(tmp_path: Path) -> None:
    root = embedded_copy(tmp_path)
    shard = root / "test-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DatasetError, match="cannot read the parquet files"):
        load_split(get_dataset_spec("cifar10"), "test", path=str(root))


def test_data_path_that_is_a_file_is_one_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DatasetError, match="must be a directory"):
        load_split(get_dataset_spec("cifar10"), "test", path=str(f))


def test_holdout_larger_than_the_split_is_one_error() -> None:
    with pytest.raises(DatasetError, match="holdout="):
        load_split(get_dataset_spec("cifar10_embedded"), "train", holdout=10**7)


def test_more_classes_than_the_dataset_has_is_one_error() -> None:
    with pytest.raises(DatasetError, match="classes="):
        load_split(get_dataset_spec("cifar10_embedded"), "train", classes=11)


def test_gmpq_errors_are_bad_input() -> None:
    assert issubclass(CheckpointError, GmpqError) and issubclass(DatasetError, GmpqError)


# ------------------------------------------------------------------------------------------------------- storage
def full_device(after: int):
    """A writer that puts ``after`` bytes into its temporary file, then fails as a full device does."""
    import errno

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * after)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EDQUOT"])
def test_disk_full_mid_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path, errno_name: str) -> None:
    import errno

    from gmpq.errors import StorageError
    from gmpq.utils import atomic_write, atomic_write_text
    target = atomic_write_text(tmp_path / "ckpt.json", "previous")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    with pytest.raises(StorageError, match="no space left on device while writing .*free some space"):
        atomic_write(target, write)
    assert target.read_text() == "previous" and list(tmp_path.iterdir()) == [target]


def test_disk_full_reported_by_safetensors_is_a_storage_error(tmp_path: Path) -> None:
    from gmpq.errors import StorageError
    from gmpq.utils import atomic_write

    def write(tmp: Path) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(StorageError):
        atomic_write(tmp_path / "model.safetensors", write)
    assert list(tmp_path.iterdir()) == []


def test_kill_during_write_leaves_the_previous_file(tmp_path: Path) -> None:
    from gmpq.utils import atomic_write, atomic_write_text
    target = atomic_write_text(tmp_path / "metrics.json", "previous")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_text() == "previous" and list(tmp_path.iterdir()) == [target]


def test_export_on_a_full_disk_keeps_the_previous_export(float_export: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch

    from gmpq.errors import StorageError
    root = copy_of(float_export, tmp_path)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    model = gmpq.from_pretrained(root)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    import gmpq.hub.export as export
    if hasattr(export, "save_file"):
        monkeypatch.setattr(export, "save_file", no_space)
    with pytest.raises(StorageError):
        gmpq.save_pretrained(model, root, dataset="cifar10_embedded")
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert isinstance(gmpq.from_pretrained(root), torch.nn.Module)


# ---------------------------------------------------------------------------------------------- study archives
def smoke_study(tmp_path: Path):
    import json

    from gmpq.study import study_from_dict
    from tests.test_study import SMOKE
    data = json.loads(json.dumps(SMOKE))
    data["output_dir"] = str(tmp_path / "out")
    return study_from_dict(data)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign"])
def test_bad_archive_to_unpack_is_one_run_error(tmp_path: Path, kind: str) -> None:
    import io
    import tarfile

    from gmpq.errors import RunError
    from gmpq.study.archive import unpack_study
    path = tmp_path / "a.tar.gz"
    if kind == "garbage":
        path.write_bytes(b"not an archive at all")
    else:
        with tarfile.open(path, "w:gz") as tar:
            data = b"x" * 50_000
            info = tarfile.TarInfo("readme.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RunError, match="study archive|not a gmpq study archive"):
        unpack_study(smoke_study(tmp_path), path)


# ---------------------------------------------------------------------------------------------------- processes
# A run is stopped at a named point by the test-only hook GMPQ_FAULT (gmpq/faults.py): the process signals itself
# there. SIGTERM and SIGINT are sent in-process through gmpq.cli.main (its handlers are what is tested); kill -9
# needs a child process (`python -m gmpq.cli`). Each stopped run is then resumed and compared with an uninterrupted
# run of the same recipe: weights bit for bit, the epoch log and the final numbers equal.
REPO = Path(__file__).resolve().parents[1]
TRAIN = ["model.arch=test_resnet", "data.dataset=cifar10_embedded", "data.input_size=32", "data.batch_size=8",
         "data.max_train_samples=32", "data.max_eval_samples=8", "pretrain.epochs=3", "pretrain.lr=0.05",
         "finetune.epochs=2", "finetune.calibration_batches=1", "finetune.policy=w4a4", "model.deploy_input_size=32"]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch):
    """Arm the fault hook in this process: ``faults("step:6:TERM")``."""
    from gmpq import faults as hook

    # a process started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: give this test process the interactive default while armed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def arm(spec: str | None) -> None:
        hook._REACHED.clear()
        if spec is None:
            monkeypatch.delenv("GMPQ_FAULT", raising=False)
        else:
            monkeypatch.setenv("GMPQ_FAULT", spec)
    yield arm
    hook._REACHED.clear()
    signal.signal(signal.SIGINT, previous)


def recipe_file(tmp_path: Path, out: Path, *extra: str) -> Path:
    """A recipe YAML of the tiny run into ``out`` (the CLI and the in-process reference read the same file)."""
    from gmpq.recipes import load_recipe
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(load_recipe(None, [*TRAIN, f"output_dir={out}", *extra]).to_yaml())
    return path


def gmpq_child(args: list[str], fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m gmpq.cli ARGS`` in a child process (``GMPQ_FAULT=fault`` when given)."""
    import sys
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("GMPQ_FAULT", None)
    if fault is not None:
        env["GMPQ_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "gmpq.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def leftovers(root: Path) -> list[str]:
    """Temporary files of interrupted writes under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


def assert_same_stage(done: Path, ref: Path, files: tuple[str, ...] = ("model/model.safetensors",)) -> None:
    """The stage ``done`` ended where the uninterrupted ``ref`` ended: its files (safetensors: tensor by tensor, bit
    for bit; others: text), its epoch log (but the epoch's wall time) and final top-1/top-5/loss."""
    from safetensors.torch import load_file
    for name in files:
        if name.endswith(".safetensors"):
            a, b = load_file(str(done / name)), load_file(str(ref / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        else:
            assert (done / name).read_text() == (ref / name).read_text(), name
    import json
    log = next(n for n in ("metrics.jsonl", "search_log.jsonl") if (ref / n).exists())

    def rows(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "epoch_s"} for line in path.read_text().splitlines()]
    assert rows(done / log) == rows(ref / log)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (done, ref))
    assert {k: ma.get(k) for k in ("top1", "top5", "loss")} == {k: mb.get(k) for k in ("top1", "top5", "loss")}


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted pretrain and finetune runs of the tiny recipe (the results every resumed run must reach)."""
    from gmpq.recipes import load_recipe
    from gmpq.stages import finetune, pretrain
    out = tmp_path_factory.mktemp("ref") / "run"
    recipe = load_recipe(None, [*TRAIN, f"output_dir={out}"])
    pretrain(recipe)
    finetune(recipe)
    return out


def test_sigterm_mid_epoch_stops_with_one_line_and_resume_is_exact(tmp_path: Path, reference_runs: Path, faults,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gmpq.cli import main
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out)
    faults("step:6:TERM")  # the 2nd of 4 steps of epoch 2
    assert main(["pretrain", str(recipe)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("gmpq: terminated (SIGTERM); rerun the same command with resume=true to continue from the "
                       "last checkpoint")
    stage = out / "pretrain"
    assert not (stage / "metrics.json").exists() and not (stage / "model").exists()  # not marked finished
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["epoch_0001"] and leftovers(out) == []
    faults(None)
    assert main(["pretrain", str(recipe), "resume=true"]) == 0
    assert json.loads((stage / "metrics.json").read_text())["resumed_from_epoch"] == 1
    assert_same_stage(stage, reference_runs / "pretrain")


def test_ctrl_c_in_finetune_stops_with_one_line_and_resume_is_exact(tmp_path: Path, reference_runs: Path, faults,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gmpq.cli import main
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out, f"model.checkpoint={reference_runs / 'pretrain' / 'model'}")
    faults("step:5:INT")  # the 1st step of epoch 2
    assert main(["finetune", str(recipe)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gmpq: interrupted (Ctrl-C); rerun the same command with resume=true to continue from the last checkpoint")
    stage = out / "finetune"
    assert not (stage / "metrics.json").exists() and leftovers(out) == []
    faults(None)
    assert main(["finetune", str(recipe), "resume=true"]) == 0
    assert_same_stage(stage, reference_runs / "finetune", ("model/model.safetensors", "policy.json"))


@pytest.mark.parametrize("point", [
    "step:6",  # mid-epoch 2
    pytest.param("write/trainer_state.json:2", marks=pytest.mark.slow),  # while epoch 2's checkpoint is written
    pytest.param("write/model.safetensors:1", marks=pytest.mark.slow),  # while the trained model is written
    pytest.param("write/metrics.json:1", marks=pytest.mark.slow),  # while the completion mark is written
])
def test_kill_9_of_pretrain_leaves_it_unfinished_and_resume_is_exact(tmp_path: Path, reference_runs: Path,
                                                                      point: str) -> None:
    from gmpq.recipes import load_recipe
    from gmpq.stages import pretrain
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out)
    done = gmpq_child(["pretrain", str(recipe)], fault=f"{point}:KILL")
    assert done.returncode == -9, done.stderr[-2000:]
    stage = out / "pretrain"
    assert not (stage / "metrics.json").exists()
    if (stage / "model").exists():  # a model written before the kill is whole, never half a file
        assert not list((stage / "model").glob("model.safetensors")) or gmpq.from_pretrained(stage / "model")
    metrics = pretrain(load_recipe(recipe, ["resume=true"]))  # the killed holder's lock blocks nothing
    assert metrics["resumed_from_epoch"] == (1 if point in ("step:6", "write/trainer_state.json:2") else 3)
    assert_same_stage(stage, reference_runs / "pretrain")


# ------------------------------------------------------------------------------------------------ study processes
def uniform_study(tmp_path: Path, name: str = "study.yaml", out: str = "out") -> Path:
    """The smoke study of tests/test_study.py with its two uniform cells only (no supernet: the cheapest cells)."""
    import yaml

    from tests.test_study import SMOKE
    data = json.loads(json.dumps(SMOKE))
    data.update(strategies=["uniform"], output_dir=str(tmp_path / out))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def hold_lock(directory: Path):
    """A child process holding ``directory``'s run lock, as a running gmpq process does (until it is killed)."""
    import subprocess
    import sys
    directory.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'{\"pid\": %d, \"command\": \"gmpq study\"}\\n' % "
            "os.getpid(), 0); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(directory / ".gmpq.lock")], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_failed_cell_is_recorded_the_others_finish_and_a_busy_cell_is_refused(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                capsys) -> None:
    import csv

    import gmpq.study.runner as runner
    from gmpq.cli import main
    from gmpq.errors import BusyError, RecipeError
    from gmpq.study import load_study
    path = uniform_study(tmp_path)
    study = load_study(path)
    first, second = (c.run_id for c in runner._unique_runs(runner.expand_grid(study)))
    # a second process on the same slice: the cell held by the first is refused with one line, not recorded
    holder = hold_lock(study.cell_dir(first))
    try:
        with pytest.raises(BusyError, match=f"in use by another gmpq process \\(pid {holder.pid}"):
            runner.run_study(path)
    finally:
        holder.kill()
        holder.wait()
    assert not study.cell_failure(first).exists()
    # a cell that fails (here its fine-tuning diverges) is recorded; the other cell finishes
    real = runner.run_pipeline

    def diverging(recipe):
        if recipe.output_dir.endswith(first):
            raise RecipeError("finetune 1/1: training diverged (loss nan) at batch 0; lower the learning rate")
        return real(recipe)
    monkeypatch.setattr(runner, "run_pipeline", diverging)
    capsys.readouterr()
    assert main(["study", str(path)]) == 1
    out = capsys.readouterr()
    assert f"cell {first} failed (RecipeError: finetune 1/1: training diverged" in out.err
    assert f"1 cell(s) failed: {first}" in out.out
    rows = list(csv.DictReader(io_of(study.directory / "results.csv")))
    assert [(r["run_id"], r["error"][:23], bool(r["top1"])) for r in rows] == [
        (second, "", True), (first, "RecipeError: finetune 1", False)]
    summary = (study.directory / "summary.md").read_text()
    assert "cells finished: 1 of 2" in summary and "cells failed: 1 (not in the statistics" in summary
    assert "| 1 |" in summary  # n per budget and strategy
    # rerunning the study retries the failed cell; its record goes once it finishes
    monkeypatch.setattr(runner, "run_pipeline", real)
    again = runner.run_study(path)
    assert again.ran == [first] and again.failed == [] and not study.cell_failure(first).exists()
    assert all(not r["error"] for r in csv.DictReader(io_of(study.directory / "results.csv")))


def io_of(path: Path):
    import io
    return io.StringIO(path.read_text())


def _rows_without_timing(path: Path) -> list[dict]:
    import csv
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "device"} for r in csv.DictReader(io_of(path))]


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uniform study run without interruption: its results.csv is what every interrupted study must reach."""
    from gmpq.study import run_study
    root = tmp_path_factory.mktemp("study")
    run_study(uniform_study(root))
    return root / "out"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["cell:1", "step:3", "write/model.safetensors:3"],
                         ids=["between-cells", "inside-a-cell", "writing-a-model"])
def test_kill_9_of_a_study_is_resumed_by_rerunning_it(tmp_path: Path, reference_study: Path, point: str) -> None:
    from gmpq.study import run_study
    path = uniform_study(tmp_path)
    done = gmpq_child(["study", str(path)], fault=f"{point}:KILL")
    assert done.returncode == -9, done.stderr[-2000:]
    cells = tmp_path / "out" / "cells"
    finished = sorted(p.parent.name for p in cells.glob("*/study_cell.json")) if cells.is_dir() else []
    assert len(finished) == (1 if point == "cell:1" else 0)
    again = run_study(path)
    assert sorted(again.ran) == sorted({c.name for c in cells.iterdir()} - set(finished))
    assert _rows_without_timing(tmp_path / "out" / "results.csv") == _rows_without_timing(
        reference_study / "results.csv")


@pytest.mark.slow
def test_sigterm_of_a_study_says_rerun_and_the_rerun_finishes(tmp_path: Path, reference_study: Path, faults,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from gmpq.cli import main
    path = uniform_study(tmp_path)
    faults("cell:1:TERM")
    assert main(["study", str(path)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gmpq: terminated (SIGTERM); rerun the same command to continue (finished cells are kept, the interrupted one "
        "resumes)")
    faults(None)
    assert main(["study", str(path)]) == 0
    assert _rows_without_timing(tmp_path / "out" / "results.csv") == _rows_without_timing(
        reference_study / "results.csv")


@pytest.mark.slow
def test_kill_9_while_packing_leaves_the_previous_archive_and_the_repack_unpacks(tmp_path: Path,
                                                                                 reference_study: Path) -> None:
    from gmpq.study import run_study
    study_dir = tmp_path / "out"
    shutil.copytree(reference_study, study_dir)
    path = uniform_study(tmp_path)
    archive = tmp_path / "cells.tar.gz"
    archive.write_bytes(b"the previous archive")
    done = gmpq_child(["study", str(path), "--report", "--pack", str(archive)], fault="write/cells.tar.gz:1:KILL")
    assert done.returncode == -9, done.stderr[-2000:]
    assert archive.read_bytes() == b"the previous archive"  # never replaced by half an archive
    run_study(path, report_only=True, pack=archive)
    moved = uniform_study(tmp_path, "moved.yaml", "elsewhere")
    merged = run_study(moved, unpack=[archive])
    assert merged.ran == [] and len(merged.rows) == 2


# ------------------------------------------------------------------------------------------- search, ptq, export
@pytest.fixture(scope="module")
def search_budget() -> float:
    from gmpq.search import bops_range, deployment_macs, search_space
    model = gmpq.create_model("test_resnet", num_classes=10)
    bits = (2, 3, 4, 6)
    lo, hi = bops_range(search_space(model, bits, bits, 8, deployment_macs("test_resnet", 32, 10), "test_resnet", 32))
    return round(lo + 0.3 * (hi - lo), 6)


@pytest.mark.slow
def test_kill_9_of_search_mid_epoch_resumes_to_the_same_policy(tmp_path: Path, reference_runs: Path,
                                                               search_budget: float) -> None:
    from gmpq.recipes import load_recipe
    from gmpq.stages import search
    extra = [f"model.checkpoint={reference_runs / 'pretrain' / 'model'}", f"search.budget_g={search_budget}",
             "search.epochs=2", "search.max_steps=2", "model.deploy_arch=test_resnet"]
    ref = load_recipe(recipe_file(tmp_path, tmp_path / "ref", *extra))
    search(ref)
    recipe = recipe_file(tmp_path, tmp_path / "run", *extra)
    done = gmpq_child(["search", str(recipe)], fault="step:3:KILL")  # the 1st step of epoch 2
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (tmp_path / "run" / "search" / "metrics.json").exists()
    assert search(load_recipe(recipe, ["resume=true"]))["resumed_from_epoch"] == 1
    assert_same_stage(tmp_path / "run" / "search", tmp_path / "ref" / "search", ("alphas.json", "policy.json"))


@pytest.mark.slow
def test_kill_9_of_ptq_between_blocks_resumes_to_the_same_model(tmp_path: Path, reference_runs: Path) -> None:
    from gmpq.recipes import load_recipe
    from gmpq.stages import ptq
    extra = [f"model.checkpoint={reference_runs / 'pretrain' / 'model'}", "ptq.num_images=16", "ptq.iters=4",
             "ptq.batch_size=8"]
    ptq(load_recipe(recipe_file(tmp_path, tmp_path / "ref", *extra)))
    recipe = recipe_file(tmp_path, tmp_path / "run", *extra)
    done = gmpq_child(["ptq", str(recipe)], fault="write/ptq_state.pt:3:KILL")  # while block 3's state is saved
    assert done.returncode == -9, done.stderr[-2000:]
    stage = next(p for p in (tmp_path / "run").iterdir() if p.is_dir())
    assert not (stage / "metrics.json").exists()
    ptq(load_recipe(recipe, ["resume=true"]))
    from safetensors.torch import load_file
    a = load_file(str(stage / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / stage.name / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_during_an_export_keeps_the_previous_export_and_the_rerun_completes(tmp_path: Path,
                                                                                     reference_runs: Path) -> None:
    from gmpq.pipeline import export_run
    out = tmp_path / "export"
    export_run(reference_runs, out)
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    export_run(reference_runs, out, format="float")  # the previous export, of another layout
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    done = gmpq_child(["export", str(reference_runs), "--out", str(out)], fault="write/config.json:1:KILL")
    assert done.returncode == -9, done.stderr[-2000:]
    # the new export was being built beside it: the previous one is untouched and loads
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert gmpq.from_pretrained(out).gmpq_config["weights"] == "float"
    export_run(reference_runs, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []  # staging removed
    again = {p.name: p.read_bytes() for p in out.iterdir()}
    assert again.keys() == whole.keys()
    # safetensors writes its metadata map in a per-process order, so the weights file (and its SHA-256 in
    # config.json) is compared by content: the same tensors bit for bit, the same metadata, every other byte equal
    from safetensors import safe_open
    from safetensors.torch import load
    assert {k: v for k, v in again.items() if k not in (F.WEIGHTS_FILE, F.CONFIG_FILE)} == {
        k: v for k, v in whole.items() if k not in (F.WEIGHTS_FILE, F.CONFIG_FILE)}
    a, b = load(again[F.WEIGHTS_FILE]), load(whole[F.WEIGHTS_FILE])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = []
    for blob in (again[F.WEIGHTS_FILE], whole[F.WEIGHTS_FILE]):
        (tmp_path / "w.safetensors").write_bytes(blob)
        with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
            meta.append(f.metadata())
    assert meta[0] == meta[1]

    def config(blob: bytes) -> dict:
        data = json.loads(blob)
        data["files"] = {k: {**v, "sha256": None} if k == F.WEIGHTS_FILE else v for k, v in data["files"].items()}
        return data
    assert config(again[F.CONFIG_FILE]) == config(whole[F.CONFIG_FILE])
    assert isinstance(gmpq.from_pretrained(out), torch.nn.Module)


# ----------------------------------------------------------------------------------------------- storage, more
@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_output_dir_that_is_a_file_or_under_one_is_one_error(tmp_path: Path, where: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from gmpq.cli import main
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "is-a-file" else blocker / "run"
    recipe = recipe_file(tmp_path, tmp_path / "r", f"output_dir={out}")
    assert main(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gmpq: error: cannot create the directory {str(out)!r}: {str(blocker)!r} is a file; choose "
                   "another output path or move the file away"]
    assert blocker.read_text() == "a file"


def test_disk_full_while_writing_a_metrics_line_keeps_the_log_and_stops_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import gmpq.train.runlog as runlog
    from gmpq.cli import main
    from gmpq.utils import atomic_write
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out, "pretrain.epochs=2", "data.max_train_samples=16")
    real, calls = runlog.atomic_write_text, []

    def full_on_the_second_epoch(path, text):
        calls.append(Path(path).name)
        if calls.count("metrics.jsonl") == 2 and Path(path).name == "metrics.jsonl":
            return atomic_write(path, full_device(len(text) // 2))
        return real(path, text)
    monkeypatch.setattr(runlog, "atomic_write_text", full_on_the_second_epoch)
    assert main(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gmpq: error: no space left on device while writing ") and "metrics.jsonl" in err[-1]
    stage = out / "pretrain"
    assert [json.loads(line)["epoch"] for line in (stage / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (stage / "metrics.json").exists() and leftovers(out) == []


def test_disk_full_while_packing_a_study_keeps_the_previous_archive(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tarfile

    from gmpq.errors import StorageError
    from gmpq.study import run_study
    path = uniform_study(tmp_path)
    archive = tmp_path / "cells.tar.gz"
    archive.write_bytes(b"the previous archive")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "addfile", no_space)
    with pytest.raises(StorageError, match="no space left on device while writing .*cells.tar.gz"):
        run_study(path, report_only=True, pack=archive)
    assert archive.read_bytes() == b"the previous archive" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- data, more
def image_bytes(mode: str, color: int | tuple = 0) -> bytes:
    import io

    from PIL import Image
    image = Image.new(mode, (32, 32), color)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def parquet_split(root: Path, images: list[bytes], labels: list[int], split: str = "train") -> Path:
    """A parquet shard ``<root>/<split>-00000-of-00001.parquet`` in the Hub layout (image bytes, integer label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], type=image_type),
                      "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table, root / f"{split}-00000-of-00001.parquet")
    return root


def test_rows_that_are_not_images_are_one_error_naming_the_row(tmp_path: Path) -> None:
    from gmpq.data import ImageDataset, build_transform
    root = parquet_split(tmp_path / "d", [image_bytes("RGB"), b"these bytes are not an image", image_bytes("RGB")],
                         [0, 1, 2])
    split = load_split(get_dataset_spec("cifar10"), "train", path=str(root))
    ds = ImageDataset(split, build_transform("cifar", 32, (0.5,) * 3, (0.5,) * 3, train=False))
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match=r"row 1 of parquet:.* is not a readable image .*remove or replace it"):
        ds[1]


def test_grayscale_rgba_palette_cmyk_images_are_converted_and_counted_in_the_log(tmp_path: Path) -> None:
    from gmpq.recipes import load_recipe
    from gmpq.stages import pretrain
    modes = ["L", "RGBA", "P", "CMYK", "RGB", "RGB", "RGB", "RGB"]
    root = parquet_split(tmp_path / "d", [image_bytes(m) for m in modes], list(range(8)))
    parquet_split(root, [image_bytes("RGB")] * 4, [0, 1, 2, 3], split="test")
    out = tmp_path / "run"
    metrics = pretrain(load_recipe(None, [*TRAIN, f"output_dir={out}", "data.dataset=cifar10", f"data.path={root}",
                                          "data.max_train_samples=null", "data.batch_size=4", "pretrain.epochs=1"]))
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["images_converted_to_rgb"] == 4 and metrics["num_train_samples"] == 8


def test_a_label_outside_the_classes_is_one_error_naming_it(tmp_path: Path) -> None:
    root = parquet_split(tmp_path / "d", [image_bytes("RGB")] * 3, [0, 12, 3])
    with pytest.raises(DatasetError, match=r"row 1 has label 12, outside the 10 classes 0\.\.9"):
        load_split(get_dataset_spec("cifar10"), "train", path=str(root))


def test_a_split_smaller_than_one_batch_is_one_error(tmp_path: Path) -> None:
    from gmpq.errors import RecipeError
    from gmpq.recipes import load_recipe
    from gmpq.train import build_dataloaders
    recipe = load_recipe(None, [*TRAIN, f"output_dir={tmp_path}", "data.max_train_samples=4"])
    with pytest.raises(RecipeError, match="data.batch_size=8 exceeds the 4 training samples"):
        build_dataloaders(recipe)


def test_an_imagefolder_with_an_empty_class_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for name, count in (("cat", 2), ("dog", 0), ("emu", 2)):
        (root / "train" / name).mkdir(parents=True)
        for i in range(count):
            (root / "train" / name / f"{i}.png").write_bytes(image_bytes("RGB"))
    with pytest.raises(DatasetError, match=r"class folder .*dog' holds no image"):
        load_split(get_dataset_spec("cifar10"), "train", path=str(root))


# ----------------------------------------------------------------------------------------------- model files, more
def test_a_checkpoint_of_another_architecture_is_refused_naming_both(tmp_path: Path) -> None:
    from gmpq.hub import write_model_dir
    from gmpq.train import init_from_checkpoint
    write_model_dir(gmpq.create_model("resnet20_cifar", num_classes=10), tmp_path / "other")
    with pytest.raises(CheckpointError, match="holds a 'resnet20_cifar' model, not 'test_resnet'"):
        init_from_checkpoint(gmpq.create_model("test_resnet", num_classes=10), str(tmp_path / "other"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_in_float_weights_is_refused_naming_the_tensor(tmp_path: Path, value: float) -> None:
    from safetensors.torch import save_file

    from gmpq.hub import write_model_dir
    from gmpq.train import init_from_checkpoint
    model = gmpq.create_model("test_resnet", num_classes=10)
    name = next(n for n, p in model.named_parameters() if p.ndim > 1)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[3] = value
    kind = "NaN" if value != value else "Inf"
    write_model_dir(model, tmp_path / "diverged")  # a diverged model, written whole (its SHA-256 is right)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds {kind} values"):
        gmpq.from_pretrained(tmp_path / "diverged")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds {kind} values"):
        init_from_checkpoint(gmpq.create_model("test_resnet", num_classes=10), str(tmp_path / "w.safetensors"))


def test_bits_outside_the_search_candidates_fine_tune_and_outside_the_policy_candidates_are_refused(
        tmp_path: Path, reference_runs: Path) -> None:
    """Fine-tuning needs no candidate set: any valid bits (5 here, while search.bits=[2,3,4,6]) are fine-tuned. No
    stage warm-starts a search from a policy, so none needs a policy's bits among search.bits; a policy file whose
    layers use bits outside its own candidate_bits is refused naming the layer."""
    from gmpq.errors import PolicyError
    from gmpq.recipes import load_recipe
    from gmpq.stages import finetune
    model = gmpq.create_model("test_resnet", num_classes=10)
    policy = gmpq.uniform_policy(model, 5, 5)
    policy.save(tmp_path / "w5a5.json")
    recipe = load_recipe(None, [*TRAIN, f"output_dir={tmp_path / 'run'}", f"finetune.policy={tmp_path / 'w5a5.json'}",
                                f"model.checkpoint={reference_runs / 'pretrain' / 'model'}", "finetune.epochs=1",
                                "finetune.max_steps=1"])
    assert recipe.search.bits == [2, 3, 4, 6] and finetune(recipe)["mean_w_bits"] == 5.0
    data = json.loads((tmp_path / "w5a5.json").read_text())
    data["candidate_bits"] = [2, 3, 4, 6]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PolicyError, match="layers"):
        gmpq.Policy.load(tmp_path / "bad.json")



def test_sigterm_during_an_export_leaves_nothing_and_the_rerun_loads(tmp_path: Path, reference_runs: Path, faults,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from gmpq.cli import main
    out = tmp_path / "export"
    faults("write/config.json:1:TERM")  # weights and card written, config.json not yet
    assert main(["export", str(reference_runs), "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gmpq: terminated (SIGTERM); rerun the same command"
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing
    with pytest.raises(CheckpointError):
        gmpq.from_pretrained(out)
    faults(None)
    assert main(["export", str(reference_runs), "--out", str(out)]) == 0
    assert isinstance(gmpq.from_pretrained(out), torch.nn.Module)

# ------------------------------------------------------------------------------------------ torchrun (2 processes)
def torchrun_child(args: list[str], fault: str | None = None, rank: int | None = None,
                   timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m gmpq.cli ARGS`` on the CPU (gloo), a fault armed on ``rank``."""
    import sys
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for key in ("GMPQ_FAULT", "GMPQ_FAULT_RANK"):
        env.pop(key, None)
    if fault is not None:
        env["GMPQ_FAULT"] = fault
    if rank is not None:
        env["GMPQ_FAULT_RANK"] = str(rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gmpq.cli",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_one_rank_killed_mid_epoch_stops_the_job_naming_it_and_resume_completes(tmp_path: Path) -> None:
    import time
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out)
    t0 = time.monotonic()
    done = torchrun_child(["pretrain", str(recipe)], fault="step:6:KILL", rank=1)
    assert done.returncode != 0 and time.monotonic() - t0 < 300
    assert "rank      : 1 (local_rank: 1)" in done.stderr and "exitcode  : -9" in done.stderr, done.stderr[-3000:]
    survivor = [line for line in done.stderr.splitlines() if line.startswith("gmpq: ")]
    assert "[rank0]: Traceback" not in done.stderr, done.stderr[-3000:]  # the survivor: one line, or stopped by torchrun
    assert all("lost contact with process 1 (its only peer)" in line or "terminated (SIGTERM)" in line
               for line in survivor)
    stage = out / "pretrain"
    assert not (stage / "metrics.json").exists()
    assert sorted(p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith("epoch_")) == ["epoch_0001"]
    again = torchrun_child(["pretrain", str(recipe), "resume=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == 3


@pytest.mark.slow
def test_one_rank_raising_on_bad_data_stops_every_rank(tmp_path: Path) -> None:
    images = [image_bytes("RGB")] * 16
    images[5] = b"not an image"
    root = parquet_split(tmp_path / "d", images, [i % 10 for i in range(16)])
    parquet_split(root, [image_bytes("RGB")] * 4, [0, 1, 2, 3], split="test")
    recipe = recipe_file(tmp_path, tmp_path / "run", "data.dataset=cifar10", f"data.path={root}",
                         "data.max_train_samples=null")
    done = torchrun_child(["pretrain", str(recipe)])
    assert done.returncode != 0
    assert "row 5 of parquet:" in done.stderr and "is not a readable image" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "pretrain" / "metrics.json").exists()


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_dist_timeout_s_with_one_line(tmp_path: Path) -> None:
    import time
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, out, "dist_timeout_s=15")
    t0 = time.monotonic()
    done = torchrun_child(["pretrain", str(recipe)], fault="step:6:STOP", rank=1)  # rank 1 stops answering
    assert done.returncode != 0 and time.monotonic() - t0 < 300
    lines = [line for line in done.stderr.splitlines() if line.startswith("gmpq: error: ")]
    assert len(lines) == 1 and "process 0 of 2 lost contact with process 1 (its only peer)" in lines[0], done.stderr[-3000:]
    assert "exitcode  : 3" in done.stderr and "[rank0]: Traceback" not in done.stderr
    assert not (out / "pretrain" / "metrics.json").exists()
    assert (out / "pretrain" / "checkpoints" / "epoch_0001" / "trainer_state.json").exists()
