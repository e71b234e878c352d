"""Layer 6 — figures: policies, search runs and run comparisons (matplotlib, Agg, written atomically)."""

from gmpq.viz.policy import PolicyLayer, plot_policies, policy_layers

__all__ = ["PolicyLayer", "plot_policies", "policy_layers"]
