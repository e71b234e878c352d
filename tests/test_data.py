"""Datasets: registry, the embedded subset, local layouts (parquet, Hub cache, imagefolder), offline errors, transforms."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from gmpq.data import (
    ImageDataset,
    build_transform,
    class_balanced_indices,
    get_dataset_spec,
    list_datasets,
    load_split,
    write_class_balanced_subset,
)
from gmpq.data.registry import EMBEDDED_DIR
from gmpq.errors import DatasetError

EMBEDDED = EMBEDDED_DIR / "cifar10"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def offline(monkeypatch):
    """No network: ``datasets`` and ``huggingface_hub`` in offline mode (fails fast instead of retrying)."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_registry_has_the_paper_datasets():
    names = set(list_datasets())
    assert {"cifar10", "cifar10_embedded", "cars", "flowers", "aircraft", "pets", "food", "imagenet"} <= names
    assert get_dataset_spec("cifar10").hub_id == "uoft-cs/cifar10"
    assert get_dataset_spec("cifar10").image_column == "img"
    assert get_dataset_spec("imagenet").eval_split == "validation"
    assert get_dataset_spec("aircraft").label_column == "variant"
    assert get_dataset_spec("cars").family == "fine_grained" and get_dataset_spec("cifar10").family == "cifar"


def test_unknown_dataset_suggests_names():
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'.*did you mean 'cifar10'"):
        get_dataset_spec("cifar")
    assert get_dataset_spec("someone/their-data").hub_id == "someone/their-data"
    assert get_dataset_spec("mine", path="/somewhere").hub_id is None


def test_embedded_subset_is_small_balanced_and_loads_through_datasets():
    size = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert size <= 3 * 1024 * 1024
    assert (EMBEDDED_DIR / "README.md").read_text().count("uoft-cs/cifar10") >= 1
    spec = get_dataset_spec("cifar10_embedded")
    train, test = load_split(spec, "train"), load_split(spec, "test")
    assert (len(train), len(test)) == (1500, 500)
    assert isinstance(train.dataset, datasets.Dataset) and train.source.startswith("parquet:")
    assert set(Counter(train.dataset["label"]).values()) == {150}
    assert set(Counter(test.dataset["label"]).values()) == {50}
    assert train.num_classes == 10 and train.class_names[0] == "airplane" and train.class_names[-1] == "truck"
    image = train.dataset[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_max_samples_is_a_seeded_subset():
    spec = get_dataset_spec("cifar10_embedded")
    a = load_split(spec, "test", max_samples=40, seed=1)
    b = load_split(spec, "test", max_samples=40, seed=1)
    c = load_split(spec, "test", max_samples=40, seed=2)
    assert len(a) == 40 and a.dataset["label"] == b.dataset["label"]
    assert np.asarray(a.dataset["image"][0]).tolist() == np.asarray(b.dataset["image"][0]).tolist()
    assert a.dataset["label"] != c.dataset["label"]


@pytest.mark.parametrize("layout", ["flat", "data_dir", "converter", "hub_cache"])
def test_local_parquet_layouts(tmp_path, layout):
    src = {s: EMBEDDED / f"{s}-00000-of-00001.parquet" for s in ("train", "test")}
    root = tmp_path / "copy"
    targets = {
        "flat": {s: root / f"{s}-00000-of-00001.parquet" for s in src},
        "data_dir": {s: root / "data" / f"{s}-00000-of-00003.parquet" for s in src},
        "converter": {s: root / "plain_text" / s / "0000.parquet" for s in src},
        "hub_cache": {s: root / "datasets--uoft-cs--cifar10" / "snapshots" / "abc123" / "plain_text" /
                      f"{s}-00000-of-00001.parquet" for s in src},
    }[layout]
    for split, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[split], target)
    part = load_split(get_dataset_spec("cifar10"), "test", path=str(root))
    assert len(part) == 500 and part.num_classes == 10
    assert set(part.dataset.column_names) == {"image", "label"}


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    part = load_split(get_dataset_spec("pets_local", path=str(tmp_path)), "train", path=str(tmp_path))
    assert len(part) == 6 and part.num_classes == 2 and part.class_names == ["cat", "dog"]
    ds = ImageDataset(part, build_transform("fine_grained", 16, MEAN, STD, train=True))
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and label in (0, 1)


def test_local_copy_errors(tmp_path):
    spec = get_dataset_spec("cifar10")
    with pytest.raises(DatasetError, match="does not exist; fix data.path"):
        load_split(spec, "train", path=str(tmp_path / "absent"))
    shutil.copy(EMBEDDED / "test-00000-of-00001.parquet", tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match="none for split 'train'.*data.train_split / data.eval_split"):
        load_split(spec, "train", path=str(tmp_path))
    part = load_split(spec, "validation", path=str(tmp_path))  # evaluation-split names stand for one another
    assert len(part) == 500 and "split 'test' read as 'validation'" in part.source
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no data for split 'train'.*imagefolder"):
        load_split(spec, "train", path=str(empty))


def test_columns_are_detected_or_reported(tmp_path):
    ds = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (8, 8))] * 4, "y": [0, 1, 0, 1]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "y": datasets.ClassLabel(names=["a", "b"])}))
    ds.to_parquet(str(tmp_path / "train-0.parquet"))
    part = load_split(get_dataset_spec("custom", path=str(tmp_path)), "train", path=str(tmp_path))
    assert part.num_classes == 2 and part.class_names == ["a", "b"] and len(part) == 4
    other = tmp_path / "other"
    other.mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1.0, 2.0]}).to_parquet(str(other / "train-0.parquet"))
    with pytest.raises(DatasetError, match="lacks an image or a label column: found columns \\['text', 'score'\\]"):
        load_split(get_dataset_spec("custom", path=str(other)), "train", path=str(other))


def test_unreachable_hub_dataset_is_one_clear_error(offline):
    with pytest.raises(DatasetError) as e:
        load_split(get_dataset_spec("cars"), "train")
    msg = str(e.value)
    assert "'cars'" in msg and "tanganke/stanford_cars" in msg and "neither reachable nor cached" in msg
    assert "data.path=" in msg


@pytest.mark.parametrize("family, size", [("cifar", 32), ("cifar", 40), ("fine_grained", 24), ("imagenet", 32)])
def test_transform_shapes_and_determinism(family, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    train = build_transform(family, size, MEAN, STD, train=True)
    evaluate = build_transform(family, size, MEAN, STD, train=False)
    if family == "cifar":
        image = image.resize((32, 32))
    assert train(image).shape == (3, size, size)
    assert torch.equal(evaluate(image), evaluate(image))
    assert evaluate(image.convert("L")).shape == (3, size, size)  # grayscale is converted to RGB


def test_normalisation_constants_are_applied():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    x = build_transform("cifar", 32, (0.5, 0.4, 0.3), (0.5, 0.2, 0.1), train=False)(white)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 3.0, 7.0]))


def test_class_balanced_indices():
    labels = [0] * 10 + [1] * 5 + [2] * 7
    idx = class_balanced_indices(labels, 4, seed=0)
    assert Counter(labels[i] for i in idx) == {0: 4, 1: 4, 2: 4} and idx == sorted(set(idx))
    assert idx == class_balanced_indices(labels, 4, seed=0) and idx != class_balanced_indices(labels, 4, seed=1)
    with pytest.raises(DatasetError, match="class 1 has only 5 samples"):
        class_balanced_indices(labels, 6)


def test_write_class_balanced_subset_keeps_the_schema(tmp_path):
    out = write_class_balanced_subset(EMBEDDED, tmp_path, {"test": 3}, seed=0)
    assert out["test"].name == "test-00000-of-00001.parquet"
    part = load_split(get_dataset_spec("cifar10"), "test", path=str(tmp_path))
    assert len(part) == 30 and part.class_names[0] == "airplane"


def test_full_shared_cifar10(shared_cifar10: Path):
    part = load_split(get_dataset_spec("cifar10"), "test", path=str(shared_cifar10))
    assert len(part) == 10000 and part.num_classes == 10


def test_webdataset_shards(tmp_path):
    import io
    import tarfile

    for split in ("train", "validation"):
        with tarfile.open(tmp_path / f"imagenet1k-{split}-0000.tar", "w") as tar:
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(buf, format="JPEG")
                for name, payload in ((f"{i:04d}.jpg", buf.getvalue()), (f"{i:04d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    part = load_split(get_dataset_spec("imagenet"), "validation", path=str(tmp_path))
    assert len(part) == 4 and part.num_classes == 1000 and part.source.startswith("webdataset:")
    assert part.dataset["label"] == [0, 1, 2, 0] and part.dataset[1]["image"].size == (12, 10)


def test_holdout_is_a_fixed_disjoint_slice_of_the_training_split():
    spec = get_dataset_spec("cifar10_embedded")
    held = load_split(spec, "holdout", holdout=100, seed=3)
    rest = load_split(spec, "train", holdout=100, seed=7)
    assert (len(held), len(rest)) == (100, 1400) and "(holdout)" in held.source
    key = [np.asarray(im).tobytes() for im in held.dataset["image"]]
    assert not set(key) & {np.asarray(im).tobytes() for im in rest.dataset["image"]}
    again = load_split(spec, "holdout", holdout=100, seed=0)  # the run seed does not move the slice
    assert [np.asarray(im).tobytes() for im in again.dataset["image"]] == key
    assert len(load_split(spec, "train", holdout=100, max_samples=50)) == 50
    with pytest.raises(DatasetError, match="data.holdout=N"):
        load_split(spec, "holdout")
    with pytest.raises(DatasetError, match="between 1 and 1499"):
        load_split(spec, "holdout", holdout=1500)


def test_classes_keeps_the_first_n_classes_before_the_holdout():
    spec = get_dataset_spec("cifar10_embedded")
    part = load_split(spec, "train", classes=3)
    assert part.num_classes == 3 and set(part.dataset["label"]) == {0, 1, 2} and "first 3 classes" in part.source
    assert part.class_names is None or len(part.class_names) == 3
    held = load_split(spec, "holdout", holdout=20, classes=3)
    assert len(held) == 20 and set(held.dataset["label"]) <= {0, 1, 2}
    with pytest.raises(DatasetError, match="classes=11 must be between 1 and the 10 classes"):
        load_split(spec, "train", classes=11)


def test_tinyimagenet_is_registered_as_a_target():
    spec = get_dataset_spec("tinyimagenet")
    assert (spec.hub_id, spec.num_classes, spec.train_split, spec.eval_split) == ("zh-plus/tiny-imagenet", 200,
                                                                                   "train", "valid")


def test_shared_tinyimagenet_loads_with_its_test_split_as_valid():
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyimagenet"
    if not (root / "test-00000-of-00001.parquet").exists():
        pytest.skip(f"Tiny-ImageNet subset not found at {root} (only present on the developers' machines)")
    spec = get_dataset_spec("tinyimagenet")
    valid = load_split(spec, "valid", path=str(root))
    assert len(valid) == 5000 and valid.num_classes == 200
    image = valid.dataset[0]["image"]
    assert image.size == (64, 64)
