"""A ``torch.utils.data.Dataset`` over a :class:`~gmpq.data.loading.ClassificationSplit`: (transformed image, label)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from gmpq.data.loading import ClassificationSplit


class ImageDataset(Dataset):
    """Index ``i`` -> ``(transform(image_i), label_i)``; images are decoded lazily by ``datasets``."""

    def __init__(self, split: ClassificationSplit, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.split.dataset[int(index)]
        return self.transform(row["image"]), int(row["label"])

    @property
    def num_classes(self) -> int:
        return self.split.num_classes
