"""Layer 8 — studies: strategies x budgets x seeds, searched on a proxy, fine-tuned and measured on a target.

* :mod:`gmpq.study.config` — ``STUDY.yaml`` (``load_study``, ``StudyConfig``, ``Cell``) and the protocol checks.
* :mod:`gmpq.study.grid` — the cells in run order (uniform policies below and above each budget).
* :mod:`gmpq.study.runner` — ``run_study``: the shared float models, the cells (``gmpq run`` directories), slices.
* :mod:`gmpq.study.results` — one row per finished cell (``results.csv``), the finished cells' run directories.
* :mod:`gmpq.study.stats` — means, standard deviations, paired differences with 95 % t-intervals over seeds.
* :mod:`gmpq.study.report` — ``results.csv``, ``summary.md``, ``study.png``.
* :mod:`gmpq.study.archive` — pack finished cells, merge archives (studies that span several GPU leases).
* :mod:`gmpq.study.baselines` — borrow another study's cells as baselines (a rerun of some strategies).

``gmpq study STUDY.yaml`` is :func:`run_study`; ``gmpq.run_study`` is the same call.
"""

from gmpq.study.config import Cell, StudyConfig, is_study_directory, load_study, study_from_dict
from gmpq.study.results import finished_cell_dirs
from gmpq.study.runner import StudyResult, run_study
from gmpq.study.stats import PairedDifference, Spread, paired_difference, spread

__all__ = ["Cell", "PairedDifference", "Spread", "StudyConfig", "StudyResult", "finished_cell_dirs",
           "is_study_directory", "load_study", "paired_difference", "run_study", "spread", "study_from_dict"]
