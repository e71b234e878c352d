"""gmpq — generalizable mixed-precision quantization for timm CNNs.

The public API, one import away::

    import gmpq
    model = gmpq.create_model("resnet18", num_classes=10, policy="policy.json")
    report = gmpq.count_bops(model, input_size=224)
    result = gmpq.search(recipe)          # metrics of the search stage; result.policy is the decoded Policy
    gmpq.pretrain(recipe); gmpq.finetune(recipe); gmpq.evaluate(recipe); gmpq.run(recipe)   # the other stages
    qmodel = gmpq.ptq(float_model, "policy.json", images)   # post-training quantization on 1,024 training images
    gmpq.run_study("gmpq/recipe_files/studies/<name>.yaml")   # strategies x budgets x seeds, proxy -> target, statistics
"""

import types

from gmpq import ptq, search  # packages made callable below: gmpq.search(recipe) runs the search stage,

# gmpq.ptq(model, policy, images) post-training quantization
from gmpq.complexity import BopsReport, count_bops, expected_bops, layer_macs
from gmpq.errors import (
    BudgetError,
    CheckpointError,
    DatasetError,
    GmpqError,
    ModelError,
    PolicyError,
    RecipeError,
    RunError,
    StorageError,
)
from gmpq.hub import export_onnx, from_pretrained, push_to_hub, save_pretrained
from gmpq.models import (
    base_arch,
    create_model,
    kept_layer_names,
    list_cifar_variants,
    quantizable_layers,
    quantize,
    searchable_layer_names,
    uniform_policy,
)
from gmpq.policy import LayerBits, Policy
from gmpq.quant import calibrate
from gmpq.version import __version__
from gmpq.viz import compare_runs, plot_compare, plot_policies, plot_search

__all__ = [
    "BopsReport", "BudgetError", "CheckpointError", "DatasetError", "GmpqError", "LayerBits", "ModelError",
    "Policy", "PolicyError", "RecipeError", "__version__", "base_arch", "calibrate", "count_bops", "create_model",
    "expected_bops", "kept_layer_names", "layer_macs", "list_cifar_variants", "quantizable_layers", "quantize",
    "searchable_layer_names", "uniform_policy",
    "RunError", "StorageError", "compare_runs", "plot_compare", "plot_policies", "plot_search",
    "export_onnx", "from_pretrained", "push_to_hub", "save_pretrained",
    "ptq", "search", "pretrain", "finetune", "evaluate", "run", "run_study",
]

#: Stages and the pipeline, imported on first use (they pull in accelerate and datasets).
_LAZY = {"pretrain": "gmpq.stages", "finetune": "gmpq.stages", "evaluate": "gmpq.stages", "run": "gmpq.pipeline",
         "run_study": "gmpq.study.runner"}


class _SearchPackage(types.ModuleType):
    """The type of :mod:`gmpq.search`: the search core's package, which calling runs the search stage."""

    def __call__(self, recipe, attribution="auto"):  # noqa: ANN001, ANN204 — the signature of gmpq.stages.search
        from gmpq.stages import search as search_stage

        return search_stage(recipe, attribution)


search.__class__ = _SearchPackage


class _PtqPackage(types.ModuleType):
    """The type of :mod:`gmpq.ptq`: the post-training package, which calling runs :func:`gmpq.ptq.ptq`."""

    def __call__(self, model, policy, images, config=None, **kwargs):  # noqa: ANN001, ANN204 — gmpq.ptq.ptq's
        return self.ptq(model, policy, images, config, **kwargs)


ptq.__class__ = _PtqPackage


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmpq' has no attribute {name!r}")
