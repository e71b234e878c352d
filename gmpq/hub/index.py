"""The local hub: a folder of exports (``hub/<name>/``) with an index file, ``hub/index.json``.

The index lists, per model, what its config.json records — name, arch, dataset, measured top-1, BOPs at the
deployment resolution, file size and ratio to FP32 — so ``gmpq hub list`` answers without loading any model.
It is derived data: :func:`update_index` rebuilds it from the exports' config.json files (``save_pretrained``
does so when it writes into a folder that has an index).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gmpq.errors import CheckpointError
from gmpq.hub import format as F
from gmpq.utils import atomic_write_text

INDEX_FILE = "index.json"
INDEX_VERSION = 1
#: The ``hub/`` folder of the gmpq checkout this package runs from (a source or editable install).
CHECKOUT_HUB = Path(__file__).resolve().parents[2] / "hub"


@dataclass(frozen=True)
class HubEntry:
    """One model of a local hub, as its config.json records it (``None`` where not measured)."""

    name: str
    path: str
    arch: str
    dataset: str | None
    top1: float | None
    bops_input_size: int
    bops_searched_g: float
    bops_total_g: float
    mean_w_bits: float | None
    mean_a_bits: float | None
    file_bytes: int
    ratio_fp32: float


def default_hub_dir() -> Path:
    """``./hub`` when it exists, else the gmpq checkout's ``hub/``."""
    local = Path("hub")
    return local if local.is_dir() else CHECKOUT_HUB


def _entry(export_dir: Path, hub_dir: Path) -> HubEntry:
    config = F.read_config(export_dir)
    metrics = config.get("metrics") or {}
    values: dict[str, Any] = {"name": config.get("name") or export_dir.name,
                              "path": export_dir.relative_to(hub_dir).as_posix(), "arch": config["arch"]}
    for f in fields(HubEntry):
        if f.name not in values:
            values[f.name] = metrics.get(f.name)
    return HubEntry(**values)


def update_index(hub_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild ``<hub_dir>/index.json`` from every export directly under ``hub_dir``; return its path."""
    root = Path(hub_dir) if hub_dir is not None else default_hub_dir()
    if not root.is_dir():
        raise CheckpointError(f"hub folder {str(root)!r} does not exist")
    entries = [_entry(d, root) for d in sorted(root.iterdir()) if (d / F.CONFIG_FILE).is_file()]
    data = {"index_version": INDEX_VERSION, "models": [asdict(e) for e in entries]}
    return atomic_write_text(root / INDEX_FILE, json.dumps(data, indent=2) + "\n")


def list_hub(hub_dir: str | os.PathLike | None = None) -> list[HubEntry]:
    """The models of the local hub, read from ``<hub_dir>/index.json`` (default: :func:`default_hub_dir`)."""
    root = Path(hub_dir) if hub_dir is not None else default_hub_dir()
    path = root / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(f"no hub index at {path}; run `gmpq hub index --hub {root}` to build it from the exports there")
    data = F.read_json(path)
    if not isinstance(data, dict) or data.get("index_version") != INDEX_VERSION or not isinstance(
            data.get("models"), list):
        raise CheckpointError(f"{path} is not a gmpq hub index (version {INDEX_VERSION}); rebuild it with "
                              f"`gmpq hub index --hub {root}`")
    names = {f.name for f in fields(HubEntry)}
    try:
        return [HubEntry(**{k: m.get(k) for k in names}) for m in data["models"]]
    except AttributeError:
        raise CheckpointError(f"{path}: every model entry must be an object; rebuild it with "
                              f"`gmpq hub index --hub {root}`") from None
