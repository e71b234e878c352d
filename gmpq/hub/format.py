"""gmpq's one model-directory format (format version 1): float, fake-quant and packed models alike.

Every model gmpq writes — a stage's ``model/`` (pretrain, finetune), an export (``gmpq export``, ``gmpq run``), a
published ``hub/<name>`` — is a directory holding::

    model.safetensors   the tensors (below)
    policy.json         the mixed-precision policy (gmpq.Policy JSON); only for a quantized model
    config.json         arch, model kwargs, input size, mean/std, versions, optionally the training data section,
                        measured metrics and the card's extras, and the SHA-256 and size of model.safetensors and
                        policy.json (so a truncated, tampered or half-rewritten directory is refused)
    README.md           the model card, with policy.png (exports only)

The model is quantized exactly when config.json's ``files`` record lists policy.json. One loader
(:func:`gmpq.hub.load.load_model_dir`) reads them all.

``model.safetensors`` comes in two layouts, named by its metadata key ``weights``:

* ``float``. A plain state dict (one named tensor per entry). A stage writes its model's state dict as it is (a
  fake-quant model keeps its latent float weights beside its quantizer state); an export of a quantized model in
  this layout stores the dequantized weights ``s * q``.
* ``packed`` (quantized models; the export default). The weights of every quantized layer (``w_bits`` in 2..8) are
  stored as integer codes ``q = W_q / s`` in ``[-Q_p, Q_p]`` (``Q_p = 2^(b-1) - 1``), offset to ``u = q + Q_p`` in
  ``[0, 2^b - 2]`` and packed densely to ``b`` bits (:mod:`gmpq.hub.packing`). Everything else of the model's state
  dict — per-channel weight steps ``wq.scale``, activation clips ``aq.clip``, sign modes ``aq.signed``, calibration
  flags, BN statistics, biases, float layers — is kept exactly. To keep the safetensors header small (a few hundred
  tensors of a small CNN would otherwise cost over 10 % of the file), tensors are concatenated into four streams::

      codes    uint8    packed codes, layer after layer (each layer starts on a byte boundary)
      float32  float32  every floating-point tensor, flattened
      bool     bool     every boolean tensor (sign modes, calibration flags)
      int64    int64    every integer tensor (BN num_batches_tracked)

  and the metadata key ``index`` maps ``{module path: {tensor name: [stream, *shape]}}`` in stream order, with the
  stream tags ``c`` (codes), ``f``, ``b`` and ``i``.

An export (either layout) stores a quantized layer whose float type transforms its weight (timm's
weight-standardised convolutions) with the transform folded in: ``weight`` is ``T(W)`` and the transform's parameters
are left out (:func:`deployment_state`), and the metadata key ``weight_transforms`` is ``folded``; a loader folds the
rebuilt model's layers the same way before loading. A stage's fake-quant model keeps ``W`` and the transform's
parameters (training goes on from it).

Both carry metadata ``format`` (``gmpq``), ``format_version``, ``weights`` (the layout) and ``bits``
(``{layer: [w_bits, a_bits]}`` of the quantized layers, which must agree with policy.json). ``index`` and ``bits``
are stored as base64(zlib(compact JSON)): the JSON would be escaped inside the safetensors header and cost ~20 kB,
over 4 % of a MobileNetV2-0.5 file, while compressed it costs ~2 kB. Loading reads safetensors and JSON only;
nothing is unpickled.

Directories written by gmpq 0.1's training stages (config ``format`` ``gmpq-float`` / ``gmpq-quantized``, no file
hashes) are read as format version 0: a plain state dict, quantized when its format says so.
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
LAYOUTS = ("packed", "float")
#: Metadata key (value ``folded``) of a file whose quantized layers hold ``T(W)`` (see :func:`deployment_state`).
TRANSFORMS_KEY = "weight_transforms"
#: The config ``format`` of gmpq 0.1's training directories (read as format version 0) -> quantized or not.
LEGACY_FORMATS = {"gmpq-float": False, "gmpq-quantized": True}

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
    text = read_user_text(path, "model file", CheckpointError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupted — write it again") from None


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


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a gmpq model directory (its config.json and model.safetensors; not yet verified)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def is_quantized(config: dict[str, Any]) -> bool:
    """Whether the checked ``config`` (:func:`read_config`) describes a quantized model (it records a policy.json)."""
    return POLICY_FILE in config["files"]


def read_config(root: Path) -> dict[str, Any]:
    """Read and check the config.json of the model directory ``root`` (format version 0 is converted)."""
    if not (root / CONFIG_FILE).is_file():
        raise CheckpointError(f"{root} is not a gmpq model directory: {CONFIG_FILE} is missing (a model directory "
                              f"holds {CONFIG_FILE}, {WEIGHTS_FILE} and, when quantized, {POLICY_FILE})")
    config = read_json(root / CONFIG_FILE)
    if isinstance(config, dict) and config.get("format") in LEGACY_FORMATS:
        config = _legacy_config(root, config)
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{root / CONFIG_FILE} is not a gmpq model config (its 'format' is not "
                              f"{FORMAT_NAME!r})")
    version = config.get("format_version")
    if version not in (0, FORMAT_VERSION):
        raise CheckpointError(f"{root}: format_version {version!r} is not supported; this gmpq reads version "
                              f"{FORMAT_VERSION} — upgrade gmpq or re-export the model")
    if config.get("weights") not in LAYOUTS:
        raise CheckpointError(f"{root / CONFIG_FILE}: 'weights' must be one of {', '.join(LAYOUTS)}, "
                              f"got {config.get('weights')!r}")
    kwargs = config.get("model_kwargs")
    size = config.get("input_size")
    if not isinstance(config.get("arch"), str) or not isinstance(kwargs, dict) or not (
            isinstance(size, list) and size and isinstance(size[-1], int)):
        raise CheckpointError(f"{root / CONFIG_FILE} needs 'arch' (str), 'model_kwargs' (object) and "
                              "'input_size' ([C, H, W])")
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{root / CONFIG_FILE} has no 'files' record (SHA-256 of the model's files)")
    for name in files:
        if not (root / name).is_file():
            raise CheckpointError(f"{root} is not a complete gmpq model directory: {name} is missing (its config.json "
                                  f"records {', '.join(files)})")
    return config


def _legacy_config(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A gmpq 0.1 training directory's config in the current shape (no file hashes: ``files`` values are None)."""
    for key in ("arch", "num_classes"):
        if key not in config:
            raise CheckpointError(f"{root / CONFIG_FILE} lacks the field {key!r}")
    files: dict[str, None] = {WEIGHTS_FILE: None}
    if LEGACY_FORMATS[config["format"]]:
        files[POLICY_FILE] = None
    size = config.get("input_size")
    return {**config, "format": FORMAT_NAME, "format_version": 0, "weights": "float",
            "model_kwargs": {"num_classes": int(config["num_classes"])},
            "input_size": [3, size, size] if isinstance(size, int) else size, "files": files}
