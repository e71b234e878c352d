"""The one loader of gmpq's model directories (:mod:`gmpq.hub.format`): ``load_model_dir(path)`` and
``from_pretrained(path_or_repo_id)`` -> an eval-mode float or quantized model.

Every check runs before the model is returned, so a bad directory never yields a half-loaded model:

1. config.json: format ``gmpq``, a supported ``format_version``, a known layout; the SHA-256 and size it records for
   model.safetensors and policy.json (a truncated, tampered or half-rewritten directory is refused).
2. policy.json (quantized models) parses and fits the architecture, which gmpq rebuilds (random init, no download,
   the caller's random number generator untouched) from config.json.
3. model.safetensors: the per-layer bits in its metadata equal the policy's; every tensor of the rebuilt model is
   present with its shape, and nothing else; packed codes lie in ``[0, 2^b - 2]``.
4. The state dict is loaded strictly, including the quantizers' ``initialized`` / ``calibrated`` flags, so the loaded
   model never re-calibrates.

Only safetensors and JSON are read; nothing is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gmpq.errors import CheckpointError, GmpqError
from gmpq.hub import format as F
from gmpq.hub.index import CHECKOUT_HUB
from gmpq.hub.packing import packed_nbytes, unpack_codes
from gmpq.hub.remote import download_snapshot
from gmpq.models import create_model, quantizable_layers
from gmpq.policy import Policy
from gmpq.quant import QuantMixin
from gmpq.quant import functional as QF


def from_pretrained(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a gmpq model from a local model directory or a Hugging Face Hub repo id.

    Args:
        path_or_repo_id: a model directory (``hub/<name>`` is also looked up in the gmpq checkout's ``hub/``) or
            a Hub repo id (``user/name``), downloaded through ``huggingface_hub`` into its cache.
        revision: branch, tag or commit of a Hub repo.
        local_files_only: use only the Hugging Face cache (``None`` follows ``HF_HUB_OFFLINE``).
        cache_dir: the Hugging Face cache directory (default: ``$HF_HOME/hub``).
        token: Hub token for private repos.
        device: where the returned model lives.

    Returns the model in eval mode, with ``gmpq_arch``, ``gmpq_input_size``, ``gmpq_config`` (config.json, with any
    measured metrics) and, when quantized, ``gmpq_policy``. Any problem raises :class:`~gmpq.errors.CheckpointError`.
    """
    directory = resolve_model_dir(path_or_repo_id, revision=revision, local_files_only=local_files_only,
                                  cache_dir=cache_dir, token=token)
    return load_model_dir(directory).to(device)


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
) -> Path:
    """The local model directory of ``path_or_repo_id``: itself if it is a directory; ``hub/<name>`` in the gmpq
    checkout for a ``hub/<name>`` path that is not one relative to the working directory; else the snapshot of the
    Hugging Face repo ``path_or_repo_id`` (downloaded into, or found in, the HF cache)."""
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text!r} is a file; pass the model directory that holds {F.CONFIG_FILE}")
    parts = Path(text).parts
    if len(parts) == 2 and parts[0] == "hub" and CHECKOUT_HUB.is_dir():
        if (CHECKOUT_HUB / parts[1]).is_dir():
            return CHECKOUT_HUB / parts[1]
        names = sorted(p.parent.name for p in CHECKOUT_HUB.glob(f"*/{F.CONFIG_FILE}"))
        raise CheckpointError(f"no model {parts[1]!r} in ./hub or {CHECKOUT_HUB}; published there: "
                              f"{', '.join(names) or 'none'} (`gmpq hub list`)")
    if path.is_absolute() or text.startswith((".", "~")) or len(parts) > 2 or "\\" in text:
        raise CheckpointError(f"no model directory at {text!r}")
    return download_snapshot(text, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                             token=token)


def load_model_dir(directory: str | os.PathLike) -> nn.Module:
    """Load and verify the model directory ``directory`` (see the module docstring)."""
    root = Path(directory)
    config = F.read_config(root)
    _verify_files(root, config)
    policy = _read_policy(root) if F.is_quantized(config) else None
    with torch.random.fork_rng(devices=[]):  # a fresh init that the loaded weights replace: leave the caller's RNG
        model = _rebuild(root, config, policy)
    state = _read_state(root / F.WEIGHTS_FILE, config, model)
    check_finite(state, root / F.WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{root / F.WEIGHTS_FILE} does not fit {config['arch']!r}: {e}") from None
    model.gmpq_input_size = int(config["input_size"][-1])
    model.gmpq_config = config
    return model.eval()


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of the model in ``directory``, verified; a float layout is read without building the model."""
    root = Path(directory)
    config = F.read_config(root)
    if config["weights"] != "float":
        return load_model_dir(root).state_dict()
    _verify_files(root, config)
    path = root / F.WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            if config["format_version"]:
                _check_format(path, f.metadata() or {}, "float")
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    check_finite(state, path)
    return state


def check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """``state`` when every floating-point tensor in it is finite; else :class:`CheckpointError` naming the first
    tensor holding NaN or Inf (the weights of a diverged run: nothing trained from them is meaningful)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise CheckpointError(f"{source}: tensor {name!r} holds {kind} values (weights of a diverged run?); "
                                  "use another checkpoint")
    return state


def _read_policy(root: Path) -> Policy:
    try:
        return Policy.load(root / F.POLICY_FILE)
    except GmpqError as e:
        raise CheckpointError(f"{root}: invalid {F.POLICY_FILE}: {e}") from None


def _verify_files(root: Path, config: Mapping[str, Any]) -> None:
    if config["format_version"] == 0:
        return  # gmpq 0.1's training directories recorded no hashes
    for name, record in config["files"].items():
        if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
            raise CheckpointError(f"{root / F.CONFIG_FILE} does not record the SHA-256 and size of {name}")
        path = root / name
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{path} has {size:,} bytes but config.json records {record['bytes']:,}: the file "
                                  "is truncated or from another export — download or export it again")
        if F.sha256_file(path) != record["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded in config.json: the file is corrupted "
                                  "or was modified — download or export it again")


def _rebuild(root: Path, config: Mapping[str, Any], policy: Policy | None) -> nn.Module:
    try:
        return create_model(config["arch"], policy=policy, **config["model_kwargs"])
    except GmpqError as e:
        raise CheckpointError(f"{root}: cannot rebuild the model from its config.json and policy: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{root}: cannot build {config['arch']!r} with model_kwargs "
                              f"{config['model_kwargs']}: {e}") from None


def _read_state(path: Path, config: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    layout = config["weights"]
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get(F.TRANSFORMS_KEY) == "folded":
                F.fold_weight_transforms(model)
            if config["format_version"]:
                _check_format(path, metadata, layout)
                _check_bits(path, metadata, model)
            if layout == "packed":
                tensors = {name: f.get_tensor(name) for name, _ in F.STREAMS.values() if name in f.keys()}
                return _unpack_state(path, metadata, tensors, model)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            _check_entries(path, [F.Entry(k, F.stream_tag(t), tuple(t.shape)) for k, t in tensors.items()], model,
                           packed=False)
            return tensors
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _check_format(path: Path, metadata: Mapping[str, str], layout: str) -> None:
    if metadata.get("format") != F.FORMAT_NAME or metadata.get("format_version") != str(F.FORMAT_VERSION):
        raise CheckpointError(f"{path}: metadata says format {metadata.get('format')!r} version "
                              f"{metadata.get('format_version')!r}; this gmpq reads {F.FORMAT_NAME!r} version "
                              f"{F.FORMAT_VERSION}")
    if metadata.get("weights") != layout:
        raise CheckpointError(f"{path} holds {metadata.get('weights')!r} weights but config.json says {layout!r}")


def _check_bits(path: Path, metadata: Mapping[str, str], model: nn.Module) -> None:
    stored = F.decode_bits(metadata.get("bits"))
    expected = {name: (m.w_bits, m.a_bits) for name, m in quantizable_layers(model).items()
                if isinstance(m, QuantMixin)}
    for name, bits in expected.items():
        if name not in stored:
            raise CheckpointError(f"{path} has no bits for layer {name!r} of the policy")
        if stored[name] != bits:
            raise CheckpointError(f"layer {name!r}: {path.name} holds W{stored[name][0]}/A{stored[name][1]} but "
                                  f"policy.json says W{bits[0]}/A{bits[1]}; the files come from different exports")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{path} has bits for layer {extra[0]!r}, which the policy's model does not have")


def _check_entries(path: Path, entries: list[F.Entry], model: nn.Module, packed: bool) -> None:
    """Every tensor of ``model`` present once with its shape and stream, and nothing else."""
    expected = model.state_dict()
    coded = {f"{name}.weight" for name in F.coded_layers(model)} if packed else set()
    seen = set()
    for e in entries:
        if e.key not in expected:
            raise CheckpointError(f"{path} holds tensor {e.key!r}, which {model.gmpq_arch!r} (with its policy, if "
                                  "any) does not have")
        if e.key in seen:
            raise CheckpointError(f"{path} holds tensor {e.key!r} twice")
        seen.add(e.key)
        want = expected[e.key]
        if e.shape != tuple(want.shape):
            raise CheckpointError(f"tensor {e.key!r} in {path.name} has shape {list(e.shape)} but the model built "
                                  f"from the directory's config (and policy) needs {list(want.shape)}")
        tag = "c" if e.key in coded else F.stream_tag(want)
        if e.tag != tag:
            raise CheckpointError(f"tensor {e.key!r} in {path.name} is stored as {e.tag!r} but the policy needs "
                                  f"{tag!r} ({'packed codes' if tag == 'c' else 'plain values'})")
    missing = [k for k in expected if k not in seen]
    if missing:
        raise CheckpointError(f"{path} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) of the model")


def _unpack_state(path: Path, metadata: Mapping[str, str], streams: Mapping[str, torch.Tensor],
                  model: nn.Module) -> dict[str, torch.Tensor]:
    entries = F.decode_index(metadata.get("index"))
    _check_entries(path, entries, model, packed=True)
    layers = {f"{name}.weight": m for name, m in F.coded_layers(model).items()}
    need = {tag: 0 for tag in F.STREAMS}
    for e in entries:
        need[e.tag] += packed_nbytes(e.numel, layers[e.key].w_bits) if e.tag == "c" else e.numel
    for tag, (name, dtype) in F.STREAMS.items():
        stream = streams.get(name)
        if stream is None or stream.dtype != dtype or stream.dim() != 1 or stream.numel() != need[tag]:
            got = "nothing" if stream is None else f"{stream.dtype} of shape {list(stream.shape)}"
            raise CheckpointError(f"{path}: stream {name!r} should be {dtype} of {need[tag]} values, holds {got}")
    offsets = {tag: 0 for tag in F.STREAMS}
    state: dict[str, torch.Tensor] = {}
    codes: dict[str, torch.Tensor] = {}
    for e in entries:
        stream = streams[F.STREAMS[e.tag][0]]
        start = offsets[e.tag]
        if e.tag == "c":
            bits = layers[e.key].w_bits
            stop = start + packed_nbytes(e.numel, bits)
            unsigned = unpack_codes(stream[start:stop], bits, e.numel)
            if e.numel and int(unsigned.max()) > 2 * QF.weight_qmax(bits):
                raise CheckpointError(f"{path}: codes of {e.key!r} exceed the {bits}-bit range; the file is corrupted")
            codes[e.key] = (unsigned.to(torch.int16) - QF.weight_qmax(bits)).reshape(e.shape)
        else:
            stop = start + e.numel
            state[e.key] = stream[start:stop].reshape(e.shape).clone()
        offsets[e.tag] = stop
    for key, q in codes.items():
        state[key] = F.dequantize(q, state[key.removesuffix("weight") + "wq.scale"])
    return state
