"""Dataloaders for a recipe: datasets, transforms and normalisation from the model's configuration.

:func:`build_dataloaders` returns plain ``torch`` dataloaders whose batch size is the recipe's *global* batch;
:func:`gmpq.train.engine.make_accelerator` configures accelerate with ``split_batches=True``, so after
``accelerator.prepare`` each of N processes receives 1/N of every global batch and a run on N processes sees exactly
the samples, in the same order, of a 1-process run with the same seed. Shuffling uses accelerate's seedable sampler
(order of epoch ``e`` = permutation seeded with ``seed + e``), which makes resumption at an epoch boundary exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from gmpq.data import ImageDataset, build_transform, get_dataset_spec, load_split
from gmpq.errors import RecipeError
from gmpq.models import model_data_config

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gmpq.recipes import Recipe


#: Seed of the subset ``data.max_eval_samples`` keeps: fixed, so that runs with different seeds are evaluated on the
#: same images (their accuracies are then paired).
EVAL_SUBSET_SEED = 0


@dataclass
class Loaders:
    """The dataloaders of one stage and what the model needs to know about the data."""

    train: DataLoader | None
    eval: DataLoader
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None
    train_source: str | None
    eval_source: str


def build_dataloaders(recipe: Recipe, accelerator: Accelerator | None = None, *, train: bool = True,
                      eval_split: str | None = None, eval_batch_size: int | None = None,
                      shuffle_train: bool = True) -> Loaders:
    """Training (optional) and evaluation dataloaders of ``recipe.data`` for ``recipe.model.arch``.

    Batches are global (see the module docstring). The training loader drops its last incomplete batch; the
    evaluation loader keeps every sample (``accelerator.gather_for_metrics`` removes the padding that distributed
    evaluation adds). With an ``accelerator`` the main process reads (and caches) the data first. ``num_classes`` is
    ``recipe.model.num_classes`` or, when unset, the dataset's class count.
    """
    data = recipe.data
    spec = get_dataset_spec(data.dataset, data.path)
    cfg = model_data_config(recipe.model.arch)
    size = data.input_size or cfg.input_size
    train_split = data.train_split or spec.train_split
    eval_split = eval_split or data.eval_split or spec.eval_split
    num_processes = accelerator.num_processes if accelerator is not None else 1

    def load(split: str, max_samples: int | None, seed: int):
        if accelerator is None:
            return load_split(spec, split, data.path, max_samples, seed, data.holdout, train_split, data.classes)
        with accelerator.main_process_first():
            return load_split(spec, split, data.path, max_samples, seed, data.holdout, train_split, data.classes)

    eval_bs = eval_batch_size or data.eval_batch_size or 2 * data.batch_size
    for key, bs in (("data.batch_size", data.batch_size), ("evaluation batch size", eval_bs)):
        if bs % num_processes:
            raise RecipeError(f"{key}={bs} is a global batch and must be divisible by the number of processes "
                              f"({num_processes})")
    eval_part = load(eval_split, data.max_eval_samples, EVAL_SUBSET_SEED)
    eval_ds = ImageDataset(eval_part, build_transform(spec.family, size, cfg.mean, cfg.std, train=False))
    common: dict[str, Any] = {"num_workers": data.num_workers, "persistent_workers": data.num_workers > 0}
    eval_loader = DataLoader(eval_ds, batch_size=eval_bs, shuffle=False, drop_last=False, **common)
    train_loader, train_source = None, None
    num_classes = eval_part.num_classes
    if train:
        train_part = load(train_split, data.max_train_samples, subset_seed(recipe))
        if len(train_part) < data.batch_size:
            raise RecipeError(f"data.batch_size={data.batch_size} exceeds the {len(train_part)} training samples of "
                              f"{spec.name!r}; lower data.batch_size")
        train_ds = ImageDataset(train_part, build_transform(spec.family, size, cfg.mean, cfg.std, train=True))
        generator = torch.Generator().manual_seed(recipe.seed)
        train_loader = DataLoader(train_ds, batch_size=data.batch_size, shuffle=shuffle_train, drop_last=True,
                                  generator=generator, **common)
        train_source = train_part.source
        num_classes = max(num_classes, train_part.num_classes)
    return Loaders(train_loader, eval_loader, recipe.model.num_classes or num_classes, size, cfg.mean, cfg.std,
                   eval_part.class_names, train_source, eval_part.source)


def subset_seed(recipe: Recipe) -> int:
    """The seed of the shuffle that picks ``data.max_train_samples``: ``data.subset_seed``, else the recipe's."""
    return recipe.seed if recipe.data.subset_seed is None else recipe.data.subset_seed


def calibration_batches(recipe: Recipe, num_batches: int, accelerator: Accelerator | None = None) -> list[torch.Tensor]:
    """The images of :func:`labelled_batches`: ``num_batches`` global batches of training images with the
    *evaluation* transform, for calibration."""
    return [images for images, _ in labelled_batches(recipe, num_batches, accelerator)]


def labelled_batches(recipe: Recipe, num_batches: int,
                     accelerator: Accelerator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` global batches of ``(images, labels)`` from the training split, with the *evaluation*
    transform (calibration, sensitivity scores).

    The images are the first ``num_batches * data.batch_size`` of a permutation seeded with ``recipe.seed``; every
    process gets the same batches, so calibration gives the same quantizers on every rank and for any number of
    processes.
    """
    data = recipe.data
    spec = get_dataset_spec(data.dataset, data.path)
    cfg = model_data_config(recipe.model.arch)
    split = data.train_split or spec.train_split
    if accelerator is None:
        part = load_split(spec, split, data.path, data.max_train_samples, subset_seed(recipe), data.holdout, split,
                          data.classes)
    else:
        with accelerator.main_process_first():
            part = load_split(spec, split, data.path, data.max_train_samples, subset_seed(recipe), data.holdout,
                              split, data.classes)
    ds = ImageDataset(part, build_transform(spec.family, data.input_size or cfg.input_size, cfg.mean, cfg.std,
                                            train=False))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    order = order[: num_batches * data.batch_size]
    batches = []
    for k in range(0, len(order), data.batch_size):
        items = [ds[i] for i in order[k: k + data.batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return batches
