"""The on-disk format of an exported gmpq model (format version 1).

An export directory holds::

    model.safetensors   the tensors (below)
    policy.json         the mixed-precision policy (gmpq.Policy JSON)
    config.json         arch, model kwargs, input size, mean/std, versions, measured metrics, and the SHA-256 and
                        size of model.safetensors and policy.json (so a truncated, tampered or half-rewritten
                        export is refused)
    README.md           the model card, with policy.png

``model.safetensors`` comes in two layouts, named by its metadata key ``weights``:

* ``packed`` (default). The weights of every quantized layer (``w_bits`` in 2..8) are stored as integer codes
  ``q = W_q / s`` in ``[-Q_p, Q_p]`` (``Q_p = 2^(b-1) - 1``), offset to ``u = q + Q_p`` in ``[0, 2^b - 2]`` and packed
  densely to ``b`` bits (:mod:`gmpq.hub.packing`). Everything else of the model's state dict — per-channel weight
  steps ``wq.scale``, activation clips ``aq.clip``, sign modes ``aq.signed``, calibration flags, BN statistics,
  biases, float layers — is kept exactly. A layer whose float type transforms its weight (timm's weight-standardised
  convolutions) is stored with the transform folded in: ``weight`` is ``T(W)`` and the transform's parameters are
  left out (:func:`deployment_state`); a loader folds the rebuilt model's layers the same way before loading.
  To keep the safetensors header small (a few hundred tensors of a small CNN would otherwise cost over 10 % of the
  file), tensors are concatenated into four streams::

      codes    uint8    packed codes, layer after layer (each layer starts on a byte boundary)
      float32  float32  every floating-point tensor, flattened
      bool     bool     every boolean tensor (sign modes, calibration flags)
      int64    int64    every integer tensor (BN num_batches_tracked)

  and the metadata key ``index`` maps ``{module path: {tensor name: [stream, *shape]}}`` in stream order, with the
  stream tags ``c`` (codes), ``f``, ``b`` and ``i``.
* ``float``. A plain state dict (one named tensor per entry) whose quantized weights are dequantized, ``s * q``.

Both carry metadata ``format`` (``gmpq``), ``format_version``, ``weights`` (the layout) and ``bits``
(``{layer: [w_bits, a_bits]}``, which must agree with policy.json). ``index`` and ``bits`` are stored as
base64(zlib(compact JSON)): the JSON would be escaped inside the safetensors header and cost ~20 kB, over 4 % of a
MobileNetV2-0.5 file, while compressed it costs ~2 kB. Loading reads safetensors and JSON only; nothing is unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmpq.errors import CheckpointError
from gmpq.models import quantizable_layers
from gmpq.quant import QuantMixin, fold_weight_transform
from gmpq.utils import read_user_text

FORMAT_NAME = "gmpq"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
POLICY_FILE = "policy.json"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FIGURE_FILE = "policy.png"
#: Files of an export that a loader needs (the card is for people).
REQUIRED_FILES = (CONFIG_FILE, POLICY_FILE, WEIGHTS_FILE)
LAYOUTS = ("packed", "float")

#: Stream tag -> (safetensors tensor name, dtype).
STREAMS: dict[str, tuple[str, torch.dtype]] = {
    "c": ("codes", torch.uint8),
    "f": ("float32", torch.float32),
    "b": ("bool", torch.bool),
    "i": ("int64", torch.int64),
}


@dataclass(frozen=True)
class Entry:
    """One state-dict tensor in a packed file: its key, stream tag and shape."""

    key: str
    tag: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def stream_tag(tensor: torch.Tensor) -> str:
    """The stream a non-packed tensor belongs to: ``f`` (floating), ``b`` (bool) or ``i`` (integer)."""
    if tensor.is_floating_point():
        return "f"
    if tensor.dtype == torch.bool:
        return "b"
    return "i"


def encode_meta(value: Any) -> str:
    """A JSON value as metadata text: base64(zlib(compact JSON))."""
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_meta(text: str | None, key: str) -> Any:
    """Inverse of :func:`encode_meta`; a missing or undecodable value raises :class:`CheckpointError`."""
    if text is None:
        raise CheckpointError(f"{WEIGHTS_FILE} has no {key!r} metadata; it was not written by gmpq's export")
    try:
        return json.loads(zlib.decompress(base64.b64decode(text, validate=True)))
    except (ValueError, zlib.error) as e:
        raise CheckpointError(f"{WEIGHTS_FILE}: the {key!r} metadata cannot be decoded ({e}); the file is "
                              "corrupted") from None


def encode_index(entries: list[Entry]) -> str:
    """The ``index`` metadata: ``{module: {name: [tag, *shape]}}``, insertion-ordered like ``entries``."""
    tree: dict[str, dict[str, list[Any]]] = {}
    for e in entries:
        module, _, name = e.key.rpartition(".")
        tree.setdefault(module, {})[name] = [e.tag, *e.shape]
    return encode_meta(tree)


def decode_index(text: str | None) -> list[Entry]:
    """Parse the ``index`` metadata back into entries; a malformed index raises :class:`CheckpointError`."""
    tree = decode_meta(text, "index")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{WEIGHTS_FILE}: the 'index' metadata must be a JSON object")
    entries: list[Entry] = []
    for module, leaves in tree.items():
        if not isinstance(leaves, dict):
            raise CheckpointError(f"{WEIGHTS_FILE}: index entry {module!r} must be an object")
        for name, spec in leaves.items():
            key = f"{module}.{name}" if module else name
            ok = (isinstance(spec, list) and spec and spec[0] in STREAMS
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec[1:]))
            if not ok:
                raise CheckpointError(f"{WEIGHTS_FILE}: index entry {key!r} is malformed: {spec!r}")
            entries.append(Entry(key, spec[0], tuple(spec[1:])))
    return entries


def encode_bits(bits: dict[str, tuple[int, int]]) -> str:
    """The ``bits`` metadata: ``{layer: [w_bits, a_bits]}``."""
    return encode_meta({name: list(b) for name, b in bits.items()})


def decode_bits(text: str | None) -> dict[str, tuple[int, int]]:
    """Parse the ``bits`` metadata; a malformed value raises :class:`CheckpointError`."""
    raw = decode_meta(text, "bits")
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(b, int) for b in v) for v in raw.values()):
        raise CheckpointError(f"{WEIGHTS_FILE}: malformed 'bits' metadata (expected {{layer: [w_bits, a_bits]}})")
    return {name: (v[0], v[1]) for name, v in raw.items()}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Parse a JSON file of an export; an unreadable or invalid file raises :class:`CheckpointError`."""
    text = read_user_text(path, "export file", CheckpointError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the export is corrupted — export it again") from None


def coded_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """The layers whose weights a packed file stores as codes: quantized, ``w_bits`` in 2..8; by module path."""
    return {name: m for name, m in quantizable_layers(model).items()
            if isinstance(m, QuantMixin) and not m.wq.is_float}


def deployment_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict an export stores: ``model.state_dict()`` with every quantized layer's weight transform folded
    in — ``weight`` holds ``T(W)`` and the transform's own parameters (e.g. ``gain``) are gone (see
    :func:`gmpq.quant.fold_weight_transform`); the packed codes are those of ``Q_w(T(W))`` either way."""
    state = model.state_dict()
    for name, layer in quantizable_layers(model).items():
        conversion = getattr(layer, "conversion", None)
        if isinstance(layer, QuantMixin) and conversion is not None and conversion.weight is not None:
            state[f"{name}.weight"] = layer.effective_weight().detach()
            for param in conversion.parameters:
                del state[f"{name}.{param}"]
    return state


def fold_weight_transforms(model: nn.Module) -> nn.Module:
    """Fold every quantized layer's weight transform into its weight, in place: the model a loader fills with a
    :func:`deployment_state`."""
    for layer in quantizable_layers(model).values():
        if isinstance(layer, QuantMixin):
            fold_weight_transform(layer)
    return model


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s * q`` with one step per output channel (the first dimension of ``codes``), in float32."""
    return codes.float() * scale.float().view(-1, *([1] * (codes.dim() - 1)))
