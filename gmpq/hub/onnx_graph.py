"""The conventions an exported gmpq ONNX graph follows, shared by its writer (:mod:`gmpq.hub.onnx_export`) and its
runner (:mod:`gmpq.hub.onnx_runtime`): the input and output names, the reader of the ``gmpq.*`` metadata, the
graph's consumer map, and the optional import of ``onnx`` / ``onnxruntime``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gmpq.errors import ModelError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_INSTALL_HINT = 'install the ONNX extra: pip install "gmpq[onnx]" (or pip install onnx onnxruntime onnxscript)'


def require_onnx() -> tuple[Any, Any]:
    """Import and return ``(onnx, onnxruntime)`` (and check onnxscript), or raise a :class:`ModelError` saying how
    to install them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter runs on it)
    except ImportError as e:
        raise ModelError(f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing); "
                         f"{_INSTALL_HINT}") from None
    return onnx, onnxruntime


def consumers_of(graph: Any) -> dict[str, list[Any]]:
    """Value name -> the nodes of ``graph`` that read it, in graph order."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    return consumers


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The gmpq metadata of an exported ``.onnx`` file, JSON fields decoded (``policy``, ``layers``, ...)."""
    onnx, _ = require_onnx()
    proto = onnx.load_model(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith("gmpq."):
            key = entry.key.removeprefix("gmpq.")
            try:
                out[key] = json.loads(entry.value)
            except json.JSONDecodeError:
                out[key] = entry.value
    return out
