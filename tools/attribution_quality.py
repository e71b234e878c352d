"""Is a search teacher's Grad-CAM worth imitating? A deletion test on the proxy's held-out slice.

For each held-out image the teacher's Grad-CAM of its predicted class (the map the attribution loss makes the
quantized network imitate) is upsampled to the input; the top ``--fraction`` of pixels by attribution are replaced by
the dataset mean (0 after normalisation) and the drop in the teacher's probability of that class is measured, beside
the drop when the *least* attributed pixels are deleted instead (MoRF against LeRF: both masks are as coherent as the
upsampled map, so neither is scattered noise). A map that points at the evidence the teacher uses drops the
probability far more through its top pixels; similar drops mean the maps carry little the student can
learn from. Drops are reported absolute and relative to the teacher's mean confidence.

    python tools/attribution_quality.py runs/studies/<study>/cells/gmpq_ood_b0.28_s0/search/recipe.yaml

The recipe is a search recipe (a study cell's ``search/recipe.yaml``): its teacher (``search.teacher``, else
``model.checkpoint``) and its proxy's held-out slice (``data.holdout``) are read; the test split never is.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from gmpq.hub.load import load_model_dir
from gmpq.recipes import load_recipe
from gmpq.search.attribution import AttributionModel
from gmpq.train import build_dataloaders


def deletion_test(model: torch.nn.Module, loader, fraction: float) -> dict[str, float]:
    """Top-1 of ``model`` on ``loader`` and the mean drop in its predicted-class probability when the top (or the
    bottom) ``fraction`` of pixels by Grad-CAM are set to 0 (the normalised dataset mean)."""
    wrapped = AttributionModel(model.eval())
    n = correct = 0
    drops = {"most": 0.0, "least": 0.0}
    confidence = 0.0
    for images, labels in loader:
        logits, cam = wrapped(images)
        with torch.no_grad():
            pred = logits.argmax(1)
            p0 = logits.softmax(1).gather(1, pred[:, None])[:, 0]
            cam = F.interpolate(cam[:, None].detach(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            k = max(1, int(fraction * cam[0].numel()))
            flat = cam.flatten(1)
            for which, largest in (("most", True), ("least", False)):
                idx = flat.topk(k, dim=1, largest=largest).indices
                mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
                kept = images * (~mask).view(images.shape[0], 1, *images.shape[-2:])
                p1 = model(kept).softmax(1).gather(1, pred[:, None])[:, 0]
                drops[which] += float((p0 - p1).sum())
            confidence += float(p0.sum())
            correct += int((pred == labels).sum())
            n += images.shape[0]
    return {"images": n, "top1": 100.0 * correct / n, "fraction": fraction, "drop_most": drops["most"] / n,
            "drop_least": drops["least"] / n, "confidence": confidence / n,
            "relative_drop_most": drops["most"] / confidence, "relative_drop_least": drops["least"] / confidence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a search recipe (a study cell's search/recipe.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of pixels deleted (default 0.25)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    teacher = recipe.search.teacher or recipe.model.checkpoint
    loaders = build_dataloaders(recipe, train=False, eval_split="holdout")
    result = deletion_test(load_model_dir(teacher), loaders.eval, args.fraction)
    print(json.dumps({"teacher": teacher, "dataset": recipe.data.dataset, "split": "holdout", **result}, indent=1))


if __name__ == "__main__":
    main()
