"""gmpq — generalizable mixed-precision quantization for timm CNNs.

The public API, one import away::

    import gmpq
    model = gmpq.create_model("resnet18", num_classes=10, policy="policy.json")
    report = gmpq.count_bops(model, input_size=224)
    result = gmpq.search(recipe)          # metrics of the search stage; result.policy is the decoded Policy
    gmpq.pretrain(recipe); gmpq.finetune(recipe); gmpq.evaluate(recipe); gmpq.run(recipe)   # the other stages
    gmpq.run_study("recipes/studies/<name>.yaml")   # strategies x budgets x seeds, proxy -> target, statistics
"""

from gmpq import search  # a callable package: gmpq.search(recipe) runs the search stage
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
)
from gmpq.hub import from_pretrained, push_to_hub, save_pretrained
from gmpq.models import (
    base_arch,
    create_model,
    kept_layer_names,
    list_backbones,
    quantizable_layers,
    quantize,
    register_backbone,
    searchable_layer_names,
    uniform_policy,
)
from gmpq.policy import LayerBits, Policy
from gmpq.quant import calibrate
from gmpq.viz import compare_runs, plot_compare, plot_policies, plot_search

__version__ = "0.1.0"

__all__ = [
    "BopsReport", "BudgetError", "CheckpointError", "DatasetError", "GmpqError", "LayerBits", "ModelError",
    "Policy", "PolicyError", "RecipeError", "__version__", "base_arch", "calibrate", "count_bops", "create_model",
    "expected_bops", "kept_layer_names", "layer_macs", "list_backbones", "quantizable_layers", "quantize",
    "register_backbone", "searchable_layer_names", "uniform_policy",
    "RunError", "compare_runs", "plot_compare", "plot_policies", "plot_search",
    "from_pretrained", "push_to_hub", "save_pretrained",
    "search", "pretrain", "finetune", "evaluate", "run", "run_study",
]

#: Stages and the pipeline, imported on first use (they pull in accelerate and datasets).
_LAZY = {"pretrain": "gmpq.train.stages", "finetune": "gmpq.train.stages", "evaluate": "gmpq.train.stages",
         "run": "gmpq.pipeline", "run_study": "gmpq.study.runner"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmpq' has no attribute {name!r}")
