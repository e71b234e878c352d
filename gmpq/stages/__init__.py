"""Layer 9 — the stages of a run as plain functions over the training loop (:mod:`gmpq.train`), the search core
(:mod:`gmpq.search`), the data (:mod:`gmpq.data`) and the model format (:mod:`gmpq.hub`):

* :func:`pretrain` (:mod:`~gmpq.stages.pretraining`) — the full-precision model (the search's teacher);
* :func:`search` (:mod:`~gmpq.stages.searching`) — the mixed-precision policy under a BOPs budget;
* :func:`finetune` (:mod:`~gmpq.stages.finetuning`) — quantization-aware fine-tuning of a policy, optionally
  distilled;
* :func:`ptq` (:mod:`~gmpq.stages.posttraining`) — post-training quantization of a policy on a thousand training images
  (``finetune.mode=ptq`` makes :func:`finetune` run it);
* :func:`evaluate` (:mod:`~gmpq.stages.evaluation`) — top-1 / top-5, BOPs and size of a run's model or of any gmpq
  model directory;
* :mod:`~gmpq.stages.common` — where a run's float weights are, model size and BOPs, the end of a stage.

Each takes a :class:`~gmpq.recipes.Recipe`, works in its stage directory of the recipe's run
(:class:`~gmpq.rundir.RunDir`, which it holds for the duration) and returns the stage's final metrics. ``resume=true``
continues a stage from its last checkpoint (a finished stage is returned as is); ``force=true`` restarts it. Works
the same under ``torchrun --nproc_per_node N`` (global batches are split across processes).
"""

from gmpq.stages.common import model_size_mb, policy_bops, resolve_policy
from gmpq.stages.evaluation import evaluate
from gmpq.stages.finetuning import finetune
from gmpq.stages.posttraining import ptq
from gmpq.stages.pretraining import pretrain
from gmpq.stages.searching import SearchResult, SupernetStep, search

__all__ = ["SearchResult", "SupernetStep", "evaluate", "finetune", "model_size_mb", "policy_bops", "pretrain",
           "ptq", "resolve_policy", "search"]
