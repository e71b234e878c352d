"""Pack a study's finished cells into one archive and merge such archives into a study directory.

GPU time comes in short leases on fresh machines: each lease runs a slice of the cells (``--cells`` / ``--shard``),
packs what it finished (``--pack cells.tar.gz``), and the next lease (or the CPU machine that writes the report)
unpacks it (``--unpack cells.tar.gz``) before running, so that several leases add up to one study.

An archive holds ``study_archive.json`` (the study's name, fingerprint and finished run ids), ``study.yaml``, every
float model (each proxy's and the target's model directory and metrics, :meth:`StudyConfig.float_dirs`: every cell
must start from the *same* float models) and the finished cells' records (metrics, policies, logs, figures, recipes)
— not training checkpoints, and not the cells' fine-tuned weights unless asked (``with_models``). Unpacking refuses
an archive of another study (fingerprint), refuses float models that differ from the ones already in the directory,
never overwrites a finished cell, and replaces an unfinished local copy of a cell the archive has finished. Archives
are written atomically and extracted with tarfile's ``data`` filter (no absolute paths, links out of the directory
or device files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch

from gmpq.errors import RunError
from gmpq.study.config import StudyConfig
from gmpq.utils import atomic_write

MANIFEST = "study_archive.json"
_SKIP_DIRS = {"checkpoints"}
_MODEL_FILES = {"model.safetensors"}


def _files(root: Path, base: Path, with_models: bool) -> list[Path]:
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(base)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if not with_models and path.name in _MODEL_FILES and "float" not in rel.parts[0]:
            continue
        out.append(path)
    return out


def pack_study(study: StudyConfig, path: str | os.PathLike, with_models: bool = False) -> Path:
    """Write the archive of ``study``'s finished cells and float models to ``path`` (``.tar.gz``); return it."""
    d = study.directory
    found = study.cells_dir.glob("*") if study.cells_dir.is_dir() else []
    cells = sorted(p.name for p in found if study.cell_finished(p.name))
    members: list[Path] = [study.study_file] if study.study_file.exists() else []
    for sub in study.float_dirs():
        if sub.is_dir():
            members += _files(sub, d, with_models=True)
    for run_id in cells:
        members += _files(study.cell_dir(run_id), d, with_models)
    manifest = {"name": study.name, "fingerprint": study.fingerprint(), "cells": cells}

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            blob = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            for member in members:
                tar.add(member, arcname=str(member.relative_to(d)), recursive=False)

    return atomic_write(path, write)


def unpack_study(study: StudyConfig, path: str | os.PathLike) -> list[str]:
    """Merge the archive at ``path`` into ``study``'s directory (rules in the module docstring); return the run ids
    of the cells it added."""
    archive = Path(path)
    try:
        tar = tarfile.open(archive, "r:*")
    except (EOFError, OSError, tarfile.TarError) as e:
        raise RunError(f"cannot read study archive {str(archive)!r}: {e}") from None
    with tar, tempfile.TemporaryDirectory(dir=study.directory.parent if study.directory.parent.exists() else None) \
            as tmp_name:
        try:
            manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
        except (EOFError, OSError, tarfile.TarError) as e:
            raise RunError(f"cannot read study archive {str(archive)!r} (truncated or corrupted?): {e}; copy it "
                           "again") from None
        except (KeyError, AttributeError, json.JSONDecodeError):
            raise RunError(f"{str(archive)!r} is not a gmpq study archive (no {MANIFEST})") from None
        if manifest.get("fingerprint") != study.fingerprint():
            raise RunError(f"study archive {str(archive)!r} belongs to another study ({manifest.get('name')!r}, "
                           f"fingerprint {manifest.get('fingerprint')}; this one is {study.fingerprint()}): its cells "
                           f"were run with another recipe")
        tmp = Path(tmp_name)
        try:
            tar.extractall(tmp, filter="data")
        except (EOFError, OSError, tarfile.TarError) as e:
            raise RunError(f"cannot extract study archive {str(archive)!r}: {e}") from None
        d = study.directory
        d.mkdir(parents=True, exist_ok=True)
        for sub in study.float_dirs():
            _merge_float(tmp / sub.name, sub, archive)
        added = []
        for run_id in manifest.get("cells", []):
            dst = study.cell_dir(run_id)
            src = tmp / dst.relative_to(d)
            if not src.is_dir() or study.cell_finished(run_id):
                continue
            if dst.exists():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            added.append(run_id)
    return added


def _merge_float(src: Path, dst: Path, archive: Path) -> None:
    """Take the archive's float model directory unless the study has one; if both exist, they must be identical."""
    if not src.is_dir():
        return
    mine, theirs = float_weights_digest(dst), float_weights_digest(src)
    if mine is not None and theirs is not None and mine != theirs:
        raise RunError(f"the float model in {str(dst)!r} differs from the one in {str(archive)!r}: cells trained from "
                       f"different float models are not comparable; unpack into a fresh study directory")
    if mine is None:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), str(dst))


def float_weights_digest(root: Path) -> str | None:
    """SHA-256 of the float model's tensors under ``root`` (its pretrain model: names, dtypes, shapes and values in
    name order, so that two saves of the same weights agree whatever the file's metadata order), None without one."""
    from safetensors.torch import load_file

    files = sorted(root.glob("*/model/model.safetensors")) if root.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(files[0]).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
