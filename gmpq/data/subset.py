"""Class-balanced subsets: small proxy datasets cut from a large one (how the embedded CIFAR-10 subset was made).

GMPQ searches on a *small* proxy dataset. :func:`write_class_balanced_subset` takes ``per_class`` samples of each
class from each split of a local parquet copy (seeded, without replacement) and writes them as
``<split>-00000-of-00001.parquet`` with the source's columns and ``datasets`` features unchanged, so the result loads
through the same code path as the original. Example (the embedded subset)::

    write_class_balanced_subset("../shared/data/cifar10", "gmpq/data/embedded/cifar10",
                                {"train": 150, "test": 50}, label_column="label", seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

from gmpq.errors import DatasetError


def class_balanced_indices(labels: Sequence[int], per_class: int, seed: int = 0) -> list[int]:
    """Indices of ``per_class`` samples of every class in ``labels``, drawn uniformly without replacement.

    The result is sorted (the source order is kept). A class with fewer than ``per_class`` samples raises
    :class:`DatasetError`.
    """
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == cls)
        if len(members) < per_class:
            raise DatasetError(f"class {int(cls)} has only {len(members)} samples, fewer than per_class={per_class}")
        chosen.extend(rng.choice(members, size=per_class, replace=False).tolist())
    return sorted(chosen)


def write_class_balanced_subset(
    source: str | os.PathLike, dest: str | os.PathLike, per_class: Mapping[str, int], label_column: str = "label",
    seed: int = 0,
) -> dict[str, Path]:
    """Write a class-balanced subset of each split of the parquet folder ``source`` into ``dest``; return the files."""
    src, out = Path(source), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, n in per_class.items():
        files = sorted(str(p) for p in src.glob(f"{split}-*.parquet"))
        if not files:
            raise DatasetError(f"no {split}-*.parquet files in {str(src)!r}")
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        if label_column not in ds.column_names:
            raise DatasetError(f"{str(src)!r} has no column {label_column!r} (columns: {ds.column_names})")
        subset = ds.select(class_balanced_indices(ds[label_column], n, seed))
        target = out / f"{split}-00000-of-00001.parquet"
        subset.to_parquet(str(target))
        written[split] = target
    return written
