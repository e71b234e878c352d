"""Layer 5 — data: the dataset registry, loading through Hugging Face ``datasets``, transforms, proxy subsets.

Quick use::

    from gmpq.data import get_dataset_spec, load_split, ImageDataset, build_transform
    spec = get_dataset_spec("cifar10_embedded")
    split = load_split(spec, "train")                      # or path="../shared/data/cifar10" for a local copy
    ds = ImageDataset(split, build_transform(spec.family, 32, mean, std, train=True))
    image, label = ds[0]                                    # a [3, 32, 32] tensor and an int
"""

from gmpq.data.dataset import ImageDataset
from gmpq.data.loading import ClassificationSplit, load_split
from gmpq.data.registry import DatasetSpec, get_dataset_spec, list_datasets, register_dataset
from gmpq.data.subset import class_balanced_indices, write_class_balanced_subset
from gmpq.data.transforms import build_transform

__all__ = [
    "ClassificationSplit", "DatasetSpec", "ImageDataset", "build_transform", "class_balanced_indices",
    "get_dataset_spec", "list_datasets", "load_split", "register_dataset", "write_class_balanced_subset",
]
