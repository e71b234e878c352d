"""Training and evaluation transforms per dataset family, at the resolution the recipe asks for.

Reference setups (as in the GMPQ / EdMIPS experiments):

* ``cifar``: training = random crop of ``size`` with ``size / 8`` zero padding (4 px at 32) + horizontal flip;
  evaluation = the image itself. Images are first resized to ``size`` when it differs from 32.
* ``fine_grained``: training = random-resized crop to ``size`` (scale 0.08..1) + horizontal flip; evaluation =
  resize of the short side to ``size / 0.875`` then center crop ``size``.
* ``imagenet``: as ``fine_grained``; at 224 the evaluation is the standard resize 256 / center crop 224.

All end with ``ToTensor`` and ``Normalize(mean, std)``, the constants of the model's pretrained configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

EVAL_CROP_PCT = 0.875


def build_transform(family: str, size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The transform mapping a PIL image to a normalised ``[3, size, size]`` tensor."""
    if size <= 0:
        raise ValueError(f"input size must be positive, got {size}")
    steps: list[Callable] = [_to_rgb]
    if family == "cifar":
        if size != 32:
            steps.append(T.Resize((size, size)))
        if train:
            steps += [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()]
    elif family in ("fine_grained", "imagenet"):
        if train:
            steps += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(round(size / EVAL_CROP_PCT)), T.CenterCrop(size)]
    else:
        raise ValueError(f"unknown transform family {family!r}; expected cifar, fine_grained or imagenet")
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
