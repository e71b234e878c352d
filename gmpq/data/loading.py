"""Loading one split of an image-classification dataset through Hugging Face ``datasets``.

Sources, in order:

1. ``path`` (``data.path`` in a recipe), a local copy in one of three layouts:

   * a **parquet folder** (any depth), e.g. ``../shared/data/cifar10/{train,test}-0000x-of-0000n.parquet``, a Hub
     snapshot ``data/train-*.parquet`` or a parquet-converter tree ``default/train/0000.parquet``;
   * a **webdataset folder** of ``.tar`` shards whose names contain the split (``imagenet1k-train-0000.tar``);
   * an **imagefolder**, ``<path>/<split>/<class name>/<image>``;
   * a **Hub cache** directory (``~/.cache/huggingface/hub`` or one ``datasets--owner--name`` folder in it) holding
     a snapshot of the spec's Hub repository.

   Files belong to a split when a component of their path, or a ``-``/``_``/``.``-separated token of their file
   name, equals the split name.
2. the package's own data (``cifar10_embedded``), read through the parquet path above;
3. the Hub (``load_dataset(hub_id, split=...)``), which also serves ``datasets``' own cache when offline.

When none works, :class:`~gmpq.errors.DatasetError` names the dataset and how to point the recipe at a local copy.
Whatever the source, the returned :class:`ClassificationSplit` exposes a ``datasets.Dataset`` with an ``image``
(decoded to PIL on access) and an integer ``label`` column.

**Evaluation-split names.** Copies of one dataset name their held-out split differently (Tiny-ImageNet: ``valid`` on
the Hub, ``test`` in the shared local copy); a local copy without files for one of ``valid``, ``validation``,
``val``, ``test`` is read under another of these names (the source then says which).

**Held-out slice of the training split** (``holdout=N``): the split named ``holdout`` is the first N samples of a
fixed permutation (seed 0, whatever the run's seed) of the training split, and the training split itself is the rest.
Hyperparameters can then be chosen on data the model never trained on, without reading the test split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from gmpq.data.registry import DatasetSpec
from gmpq.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Names under which copies of one dataset store their held-out evaluation split (interchangeable in local copies).
EVAL_SPLIT_NAMES = ("valid", "validation", "val", "test")
#: The split name of a held-out slice of the training split (``holdout=N``).
HOLDOUT_SPLIT = "holdout"
#: Seed of the permutation that picks the held-out slice: fixed, so that every run seed holds out the same samples.
HOLDOUT_SEED = 0


@dataclass
class ClassificationSplit:
    """One split: ``dataset`` has columns ``image`` and ``label``; ``source`` says where it was read from."""

    dataset: datasets.Dataset
    num_classes: int
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.dataset)


def load_split(spec: DatasetSpec, split: str, path: str | None = None, max_samples: int | None = None,
               seed: int = 0, holdout: int | None = None, train_split: str | None = None,
               classes: int | None = None) -> ClassificationSplit:
    """Load ``split`` of ``spec`` (from ``path`` when given), normalised to ``image``/``label`` columns.

    ``max_samples`` keeps the first N samples after a shuffle seeded with ``seed`` (the same N for every seed-equal
    call, so every process of a distributed run sees the same subset). With ``holdout=N`` the training split
    (``train_split``, default the spec's) loses a fixed slice of N samples, which is the split ``"holdout"`` (module
    docstring); ``max_samples`` then applies to what remains. ``classes=N`` keeps only the samples of the first N
    classes (labels 0..N-1; before the holdout and ``max_samples``): a smaller task with the same images.
    """
    train_name = train_split or spec.train_split
    if split == HOLDOUT_SPLIT and not holdout:
        raise DatasetError(f"split {HOLDOUT_SPLIT!r} of dataset {spec.name!r} is a held-out slice of the training "
                           f"split; set its size with data.holdout=N (or target.holdout=N for a target)")
    source_split = train_name if split == HOLDOUT_SPLIT else split
    local = Path(path).expanduser() if path is not None else spec.local_dir
    if local is not None:
        ds, source = _load_local(spec, source_split, local)
    else:
        ds, source = _load_hub(spec, source_split), f"hub:{spec.hub_id}"
    ds = _normalise_columns(ds, spec, source)
    if classes is not None:
        ds, source = _first_classes(ds, classes, spec.name), f"{source} (first {classes} classes)"
    if holdout and source_split == train_name:
        ds, source = _holdout_part(ds, holdout, held=split == HOLDOUT_SPLIT, name=spec.name), f"{source} ({split})"
    if max_samples is not None and max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_samples))
    if len(ds) == 0:
        raise DatasetError(f"split {split!r} of dataset {spec.name!r} ({source}) is empty")
    label_feature = ds.features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes, names = label_feature.num_classes, list(label_feature.names)
    else:
        num_classes, names = spec.num_classes or int(max(ds["label"])) + 1, None
    _check_labels(ds, num_classes, split, spec.name, source)
    if classes is not None:
        num_classes, names = classes, names[:classes] if names else None
    return ClassificationSplit(ds, num_classes, names, source)


def _check_labels(ds: datasets.Dataset, num_classes: int, split: str, name: str, source: str) -> None:
    """Every label in ``0..num_classes-1``; else :class:`DatasetError` naming the first row outside."""
    labels = np.asarray(ds["label"])
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(f"split {split!r} of dataset {name!r} ({source}): row {int(bad[0])} has label "
                           f"{int(labels[bad[0]])}, outside the {num_classes} classes 0..{num_classes - 1} "
                           f"({bad.size} such rows); fix the labels or the dataset's class count")


def _first_classes(ds: datasets.Dataset, classes: int, name: str) -> datasets.Dataset:
    """The samples of labels 0..classes-1."""
    labels = np.asarray(ds["label"])
    if not 0 < classes <= int(labels.max()) + 1:
        raise DatasetError(f"classes={classes} must be between 1 and the {int(labels.max()) + 1} classes of dataset "
                           f"{name!r}")
    return ds.select(np.flatnonzero(labels < classes).tolist())


def _holdout_part(ds: datasets.Dataset, holdout: int, held: bool, name: str) -> datasets.Dataset:
    """The held-out slice (``held``) or the rest of a training split (see the module docstring)."""
    if not 0 < holdout < len(ds):
        raise DatasetError(f"holdout={holdout} must be between 1 and {len(ds) - 1}: the training split of dataset "
                           f"{name!r} has {len(ds)} samples")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(ds))
    return ds.select(sorted(order[:holdout].tolist()) if held else sorted(order[holdout:].tolist()))


# ------------------------------------------------------------------------------------------------ local copies
def _split_matches(rel: Path, split: str) -> bool:
    if split in rel.parts[:-1]:
        return True
    return split in re.split(r"[-_.]", rel.name)


def _load_local(spec: DatasetSpec, split: str, root: Path) -> tuple[datasets.Dataset, str]:
    if not root.exists():
        raise DatasetError(f"local copy of dataset {spec.name!r} not found: {str(root)!r} does not exist; "
                           f"fix data.path (a parquet folder, an imagefolder or a Hub cache dir)")
    if not root.is_dir():
        raise DatasetError(f"data.path {str(root)!r} for dataset {spec.name!r} must be a directory")
    cached = _hub_cache_snapshot(spec, root)
    if cached is not None:
        root = cached
    names = [split] + [n for n in EVAL_SPLIT_NAMES if n != split] if split in EVAL_SPLIT_NAMES else [split]
    for suffix, builder in ((".parquet", "parquet"), (".tar", "webdataset")):
        for name in names:
            files = sorted(p for p in root.rglob(f"*{suffix}") if _split_matches(p.relative_to(root), name))
            if files:
                where = f"{builder}:{root}" + ("" if name == split else f" (split {name!r} read as {split!r})")
                return _load_files(spec, builder, name, files, root), where
        if any(root.rglob(f"*{suffix}")):
            raise DatasetError(
                f"dataset {spec.name!r} at {str(root)!r} has {suffix} files but none for split {split!r} (a file "
                f"belongs to a split when its folder or a token of its name is the split, e.g. {split}-00000-of-00001"
                f"{suffix}); set data.train_split / data.eval_split to the split names present"
            )
    split_dir = root / split
    if split_dir.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in split_dir.rglob("*")):
        empty = sorted(d for d in split_dir.iterdir() if d.is_dir() and not any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in d.rglob("*")))
        if empty:
            raise DatasetError(f"imagefolder {str(root)!r} split {split!r}: class folder {str(empty[0])!r} holds no "
                               f"image ({len(empty)} such folders); the class numbering would shift without it: add "
                               "its images or remove the folder")
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=split)
        except (ValueError, datasets.exceptions.DatasetsError) as e:
            raise DatasetError(f"cannot read imagefolder {str(root)!r} split {split!r}: {e}") from None
        return ds, f"imagefolder:{root}"
    raise DatasetError(
        f"no data for split {split!r} of dataset {spec.name!r} under {str(root)!r}: expected {split}-*.parquet "
        f"files, .tar webdataset shards, an imagefolder {split}/<class>/<image>, or a Hub cache holding "
        f"{spec.hub_id or spec.name}"
    )


def _hub_cache_snapshot(spec: DatasetSpec, root: Path) -> Path | None:
    """The newest snapshot of ``spec.hub_id`` when ``root`` is a Hub cache (or one repo folder in it)."""
    if spec.hub_id is None:
        return None
    folder = "datasets--" + spec.hub_id.replace("/", "--")
    for repo in (root / folder, root / "hub" / folder, root):
        if repo.name == folder and (repo / "snapshots").is_dir():
            snaps = sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
            if snaps:
                return snaps[-1]
    return None


def _load_files(spec: DatasetSpec, builder: str, split: str, files: list[Path], root: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split)
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise DatasetError(f"cannot read the {builder} files of dataset {spec.name!r} split {split!r} under "
                           f"{str(root)!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ the Hub
def _load_hub(spec: DatasetSpec, split: str) -> datasets.Dataset:
    if spec.hub_id is None:
        raise DatasetError(f"dataset {spec.name!r} has neither a Hub id nor local data; set data.path")
    try:
        return datasets.load_dataset(spec.hub_id, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DatasetError(f"dataset {spec.name!r} ({spec.hub_id}) has no split {split!r}: {e}") from None
        raise DatasetError(_offline_message(spec, split, e)) from None
    except (OSError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        raise DatasetError(_offline_message(spec, split, e)) from None


def _offline_message(spec: DatasetSpec, split: str, error: BaseException) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"dataset {spec.name!r} (Hub {spec.hub_id}) is neither reachable nor cached ({reason[:200]}). Download it once "
        f"with network access (python -c \"import datasets; datasets.load_dataset('{spec.hub_id}')\"), or point the "
        f"recipe at a local copy: data.path=/path/to/{spec.name} (a folder of {split}-*.parquet files, an imagefolder "
        f"{split}/<class>/<image>, or a Hub cache dir)"
    )


# ------------------------------------------------------------------------------------------------ columns
def _normalise_columns(ds: datasets.Dataset, spec: DatasetSpec, source: str) -> datasets.Dataset:
    features = ds.features
    image_col = spec.image_column if spec.image_column in features else next(
        (n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        for candidate in ("image", "img", "jpg", "png", "webp"):
            if candidate in features:
                image_col = candidate
                break
    label_col = spec.label_column if spec.label_column in features else next(
        (n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label_col is None:
        label_col = next((c for c in ("label", "labels", "cls", "fine_label") if c in features), None)
    if image_col is None or label_col is None:
        raise DatasetError(
            f"dataset {spec.name!r} ({source}) lacks an image or a label column: found columns {list(features)}; "
            f"expected {spec.image_column!r} and {spec.label_column!r} (or an Image and a ClassLabel feature)"
        )
    ds = ds.select_columns([image_col, label_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds
