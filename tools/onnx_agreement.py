"""How often ONNX Runtime's top-1 class agrees with gmpq's, for a published model on its evaluation data.

    python tools/onnx_agreement.py hub/resnet20_cifar-gmpq-0.28g --data ../shared/data/cifar10 --split test

Loads the model (``gmpq.from_pretrained``), exports it with ``gmpq.export_onnx`` into a temporary directory, runs
both on every image of the split (batches of 500, ONNX Runtime's CPU provider) and prints one JSON line: top-1 of
gmpq and of ONNX Runtime against the labels, and the share of images where their top-1 classes agree.
``tests/test_hub_published.py`` asserts at least 99.5 % agreement for the models fine-tuned on the full CIFAR-10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from torch.utils.data import DataLoader

import gmpq
from gmpq.data import ImageDataset, build_transform, get_dataset_spec, load_split


def agreement(model_id: str, data: str | None, split: str | None, batch_size: int = 500) -> dict[str, float | int]:
    model = gmpq.from_pretrained(model_id)
    config = model.gmpq_config
    metrics = config.get("metrics") or {}
    spec = get_dataset_spec(metrics.get("dataset") or "cifar10")
    split = split or metrics.get("eval_split") or "test"
    images = ImageDataset(load_split(spec, split, path=data),
                          build_transform(spec.family, config["input_size"][-1], config["mean"], config["std"],
                                          train=False))
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(str(gmpq.export_onnx(model, Path(tmp) / "onnx").path),
                                       providers=["CPUExecutionProvider"])
        ours_ok = theirs_ok = agree = total = 0
        with torch.no_grad():
            for x, y in DataLoader(images, batch_size=batch_size):
                ours = model(x).argmax(1)
                theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).argmax(1)
                ours_ok += int((ours == y).sum())
                theirs_ok += int((theirs == y).sum())
                agree += int((ours == theirs).sum())
                total += len(x)
    return {"model": model_id, "split": split, "images": total, "gmpq_top1": 100.0 * ours_ok / total,
            "onnxruntime_top1": 100.0 * theirs_ok / total, "agreement": 100.0 * agree / total,
            "card_top1": metrics.get("top1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a published model: hub/<name>, an export directory or a Hub repo id")
    parser.add_argument("--data", help="local copy of the model's dataset (default: the dataset's own location)")
    parser.add_argument("--split", help="split to measure on (default: the one the card names)")
    args = parser.parse_args()
    print(json.dumps(agreement(args.model, args.data, args.split)))


if __name__ == "__main__":
    main()
