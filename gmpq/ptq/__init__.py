"""Layer 7 — post-training quantization: a policy applied to a float model with a thousand calibration images and no
training run. Calibration, then AdaRound's learned rounding fitted block by block to the float model's block
outputs (BRECQ) with the activation steps learned jointly and, optionally, QDrop (:mod:`gmpq.ptq.reconstruct`);
the blocks and their captured inputs (:mod:`gmpq.ptq.blocks`); BatchNorm folding (:mod:`gmpq.ptq.batchnorm`).

``gmpq.ptq(model, policy, images)`` is :func:`ptq` (the package is callable, like :mod:`gmpq.search`).
"""

from gmpq.ptq.batchnorm import fold_batchnorm
from gmpq.ptq.blocks import Block, reconstruction_blocks
from gmpq.ptq.reconstruct import STATE_FILE, BlockResult, PtqReport, block_errors, peak_rss_mb, ptq

__all__ = ["STATE_FILE", "Block", "BlockResult", "PtqReport", "block_errors", "fold_batchnorm", "peak_rss_mb", "ptq",
           "reconstruction_blocks"]
