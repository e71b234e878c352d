"""Layer 6 — figures: policies, search runs and run comparisons (matplotlib, Agg, written atomically).

- :func:`plot_policies`: per-layer weight/activation bits of one or more policies, one panel each.
- :func:`plot_search`: a search run's BOPs against its budget and per-layer expected bits over epochs.
- :func:`plot_ptq`: a post-training reconstruction's per-block output errors and loss curves.
- :func:`compare_runs` / :func:`format_compare_table` / :func:`plot_compare`: runs side by side, top-1 against BOPs.
"""

from gmpq.viz.compare import RunSummary, compare_runs, format_compare_table, plot_compare, summarize_run
from gmpq.viz.policy import PolicyLayer, plot_policies, policy_layers
from gmpq.viz.ptq import plot_ptq
from gmpq.viz.search import SearchTrace, plot_search, read_search_log, search_trace

__all__ = [
    "PolicyLayer", "RunSummary", "SearchTrace", "compare_runs", "format_compare_table", "plot_compare",
    "plot_policies", "plot_ptq", "plot_search", "policy_layers", "read_search_log", "search_trace", "summarize_run",
]
