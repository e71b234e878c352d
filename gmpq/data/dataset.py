"""A ``torch.utils.data.Dataset`` over a :class:`~gmpq.data.loading.ClassificationSplit`: (transformed image, label).

Images are decoded lazily. One that is not RGB (grayscale ``L``, ``RGBA``, palette ``P``, ``CMYK``...) is converted to
RGB and counted (:attr:`ImageDataset.converted`: a counter in shared memory, so that dataloader worker processes add
to it too; the training loop logs it per epoch). A row whose bytes are not a readable image raises
:class:`~gmpq.errors.DatasetError` naming the row and the split's source.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from gmpq.data.loading import ClassificationSplit
from gmpq.errors import DatasetError

#: Slots of the conversion counter: the main process and up to this many - 1 dataloader workers.
_SLOTS = 64


class ImageDataset(Dataset):
    """Index ``i`` -> ``(transform(image_i), label_i)``; images are decoded lazily by ``datasets``."""

    def __init__(self, split: ClassificationSplit, transform: Callable) -> None:
        self.split = split
        self.transform = transform
        self._converted = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.split.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            row = self.split.dataset[int(index)]
            image = row["image"]
            if image.mode != "RGB":
                image = image.convert("RGB")
                worker = get_worker_info()
                self._converted[0 if worker is None else 1 + worker.id % (_SLOTS - 1)] += 1
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"row {int(index)} of {self.split.source} is not a readable image ({type(e).__name__}: "
                               f"{e}); remove or replace it") from None
        return self.transform(image), int(row["label"])

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def converted(self) -> int:
        """How many decoded images were converted to RGB since the last :meth:`take_converted`."""
        return int(self._converted.sum())

    def take_converted(self) -> int:
        """:attr:`converted`, and reset the count."""
        n = self.converted
        self._converted.zero_()
        return n
