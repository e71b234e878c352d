"""Test-only fault injection: a process signals itself at a named point, so that a test kills a run exactly there.

``GMPQ_FAULT=POINT:N[:SIGNAL]`` makes the process send itself ``SIGNAL`` (default ``KILL``; ``TERM``, ``INT``,
``STOP``...) the ``N``-th time it reaches ``POINT`` (``write/NAME``: the ``write`` point of files named ``NAME``); ``GMPQ_FAULT_RANK=R`` restricts it to the process of rank ``R``
of a distributed run. Unset (always, outside the fault battery ``tests/test_faults.py``), :func:`fault_point` costs
one dictionary lookup. The points:

* ``step`` — after each optimizer step of :func:`gmpq.train.fit` (a kill in the middle of an epoch);
* ``checkpoint`` — after each epoch's checkpoint is complete (a kill between epochs);
* ``write`` — inside :func:`gmpq.utils.atomic_write`, when the temporary file is written but not yet renamed over
  its target (a kill in the middle of writing any file: a checkpoint's state, a model, an export, an archive);
* ``cell`` — after each finished cell of a study.
"""

from __future__ import annotations

import os
import signal

#: How many times this process has reached each point.
_REACHED: dict[str, int] = {}


def fault_point(name: str, detail: str = "") -> None:
    """Reach the point ``name`` (of ``detail``, e.g. a file name): signal this process when ``GMPQ_FAULT`` asks for it
    here (module docstring)."""
    spec = os.environ.get("GMPQ_FAULT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point not in (name, f"{name}/{detail}"):
        return
    rank = os.environ.get("GMPQ_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    count, _, sig = rest.partition(":")
    _REACHED[point] = _REACHED.get(point, 0) + 1
    if _REACHED[point] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
