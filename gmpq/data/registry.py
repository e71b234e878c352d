"""The dataset registry: named image-classification datasets with their Hub ids, columns, splits and transform family.

Every entry was checked against its Hub dataset card (parquet or webdataset repositories only: ``datasets`` >= 4 no
longer runs loading scripts). Each can also be read from a local copy (``data.path``), see :mod:`gmpq.data.loading`.

==================  ==================================  ==============  ===========  ===================  =======
name                Hub id                              image / label   classes      splits (train, eval) family
==================  ==================================  ==============  ===========  ===================  =======
cifar10             uoft-cs/cifar10                     img / label     10           train, test          cifar
cifar10_embedded    (inside the package, 1500 + 500)    img / label     10           train, test          cifar
cars                tanganke/stanford_cars              image / label   196          train, test          fine
flowers             dpdl-benchmark/oxford_flowers102    image / label   102          train, test          fine
aircraft            HuggingFaceM4/FGVC-Aircraft         image / variant 100          train, test          fine
pets                timm/oxford-iiit-pet                image / label   37           train, test          fine
food                ethz/food101                        image / label   101          train, validation    fine
imagenet            timm/imagenet-1k-wds                jpg / cls       1000         train, validation    imagenet
tinyimagenet        zh-plus/tiny-imagenet               image / label   200          train, valid         cifar
==================  ==================================  ==============  ===========  ===================  =======

Label mappings: all entries keep the official label order (``timm/oxford-iiit-pet`` and the Flowers-102 copy above
use the original class indices; some other Flowers-102 copies on the Hub sort class *names* as strings, which
permutes labels — do not swap them in without checking). Flowers-102 also has a ``validation`` split and Aircraft a
``validation`` split; ``data.train_split`` / ``data.eval_split`` select any split by name.

Tiny-ImageNet-200 (64x64, 100k train / 10k valid on the Hub) is the stand-in for ImageNet as a transfer *target*; it
uses the ``cifar`` transform family (random crop with 1/8 padding + flip at its native size, the image itself for
evaluation). A local copy may name its evaluation split ``test`` instead of ``valid`` (:mod:`gmpq.data.loading`
accepts the evaluation-split names ``valid``, ``validation``, ``val`` and ``test`` for one another in local copies).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gmpq.errors import DatasetError

Family = Literal["cifar", "fine_grained", "imagenet"]

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset.

    Attributes:
        name: registry name (``data.dataset`` in a recipe).
        hub_id: Hugging Face Hub dataset repository, or None for data shipped inside the package.
        image_column / label_column: column names in the Hub copy (local copies may use other names; the first
            ``Image`` / ``ClassLabel`` feature is used then).
        num_classes: number of classes.
        train_split / eval_split: default split names.
        family: transform family — ``cifar`` (random crop with 1/8 padding + flip at native 32 px), ``fine_grained``
            (random-resized crop + flip, resize/center-crop evaluation) or ``imagenet`` (same, 256/224 evaluation).
        local_dir: a directory inside the package holding the data (the embedded subset), else None.
        description: one line for listings.
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    num_classes: int
    train_split: str
    eval_split: str
    family: Family
    local_dir: Path | None = None
    description: str = ""


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry (a name can be registered once)."""
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_DATASETS)


def get_dataset_spec(name: str, path: str | None = None) -> DatasetSpec:
    """The spec of ``name``.

    An unregistered ``name`` is accepted as a Hub id (``owner/name``) or, with a local ``path``, as a custom
    dataset; its columns are detected from the features and its transforms are the ``fine_grained`` ones.
    Anything else raises :class:`DatasetError` with the closest registered names.
    """
    if name in _DATASETS:
        return _DATASETS[name]
    if "/" in name or path is not None:
        return DatasetSpec(name=name, hub_id=name if "/" in name else None, image_column="image", label_column="label",
                           num_classes=0, train_split="train", eval_split="test", family="fine_grained",
                           description="custom dataset")
    close = difflib.get_close_matches(name, list_datasets(), n=2)
    raise DatasetError(
        f"unknown dataset {name!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
        + f" Registered: {', '.join(list_datasets())}; or give a Hub id (owner/name) or a local copy with data.path"
    )


for _spec in (
    DatasetSpec("cifar10", "uoft-cs/cifar10", "img", "label", 10, "train", "test", "cifar",
                description="CIFAR-10, 50k/10k 32x32 images"),
    DatasetSpec("cifar10_embedded", None, "img", "label", 10, "train", "test", "cifar",
                local_dir=EMBEDDED_DIR / "cifar10",
                description="class-balanced CIFAR-10 subset shipped with gmpq (1500 train / 500 test)"),
    DatasetSpec("cars", "tanganke/stanford_cars", "image", "label", 196, "train", "test", "fine_grained",
                description="Stanford Cars, 8144/8041 images"),
    DatasetSpec("flowers", "dpdl-benchmark/oxford_flowers102", "image", "label", 102, "train", "test",
                "fine_grained", description="Oxford Flowers-102, 1020/1020/6149 images (train/validation/test)"),
    DatasetSpec("aircraft", "HuggingFaceM4/FGVC-Aircraft", "image", "variant", 100, "train", "test", "fine_grained",
                description="FGVC-Aircraft variants, 3334/3333/3333 images (train/validation/test)"),
    DatasetSpec("pets", "timm/oxford-iiit-pet", "image", "label", 37, "train", "test", "fine_grained",
                description="Oxford-IIIT Pet breeds, 3680/3669 images"),
    DatasetSpec("food", "ethz/food101", "image", "label", 101, "train", "validation", "fine_grained",
                description="Food-101, 75750/25250 images"),
    DatasetSpec("imagenet", "timm/imagenet-1k-wds", "jpg", "cls", 1000, "train", "validation", "imagenet",
                description="ImageNet-1k (ILSVRC 2012), webdataset shards; gated: accept the terms on the Hub"),
    DatasetSpec("tinyimagenet", "zh-plus/tiny-imagenet", "image", "label", 200, "train", "valid", "cifar",
                description="Tiny-ImageNet-200, 64x64, 100k/10k images (train/valid): the ImageNet stand-in target"),
):
    register_dataset(_spec)
