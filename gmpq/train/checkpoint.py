"""Checkpoints: per-epoch training state (accelerate) and final models (safetensors + JSON, never pickle).

* :class:`CheckpointManager` wraps ``accelerator.save_state`` / ``load_state``. Epoch ``e`` is written by every
  process into ``checkpoints/.tmp-epoch_000e`` together with ``trainer_state.json`` (epoch, metrics history), then
  renamed to ``checkpoints/epoch_000e`` by the main process: a kill at any moment leaves either the complete previous
  checkpoint or the complete new one. Only the newest ``keep`` checkpoints are kept.
* :func:`save_float_model` / :func:`save_quantized_model` write a model directory — ``model.safetensors`` (the state
  dict), ``config.json`` (format, arch, num_classes, input size, normalisation) and, for a quantized model,
  ``policy.json``; :func:`load_model` rebuilds the module from such a directory (``load_float_model`` /
  ``load_quantized_model`` insist on the kind). Each file is written atomically, ``config.json`` last.
* :func:`init_from_checkpoint` initialises a float model from a gmpq model or run directory, a ``.safetensors`` /
  ``.pth`` state dict (read with ``weights_only=True``) or a Hugging Face Hub / timm model id.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gmpq.errors import CheckpointError
from gmpq.models import create_model, default_input_size
from gmpq.policy import Policy
from gmpq.quant import QuantMixin
from gmpq.utils import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

FLOAT_FORMAT = "gmpq-float"
QUANTIZED_FORMAT = "gmpq-quantized"
CONFIG_SCHEMA_VERSION = 1
_EPOCH_PREFIX = "epoch_"


# ------------------------------------------------------------------------------------------------ training state
class CheckpointManager:
    """Atomic per-epoch ``save_state`` / ``load_state`` under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, accelerator: Accelerator, keep: int = 2) -> None:
        self.root = Path(root)
        self.accelerator = accelerator
        self.keep = keep

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(_EPOCH_PREFIX) and (p / "trainer_state.json").exists():
                try:
                    found.append(int(p.name[len(_EPOCH_PREFIX):]))
                except ValueError:
                    continue
        return sorted(found)

    def path(self, epoch: int) -> Path:
        return self.root / f"{_EPOCH_PREFIX}{epoch:04d}"

    def latest(self) -> Path | None:
        epochs = self.epochs()
        return self.path(epochs[-1]) if epochs else None

    def save(self, epoch: int, trainer_state: dict[str, Any]) -> Path:
        """Save the prepared objects' state and ``trainer_state`` as epoch ``epoch``, atomically."""
        acc = self.accelerator
        tmp = self.root / f".tmp-{_EPOCH_PREFIX}{epoch:04d}"
        final = self.path(epoch)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.epochs()[: -self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_latest(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint into the prepared objects; return its trainer state (None if none)."""
        latest = self.latest()
        if latest is None:
            return None
        try:
            state = json.loads((latest / "trainer_state.json").read_text())
            self.accelerator.load_state(str(latest))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"cannot resume from {str(latest)!r}: {e}; delete it to resume from the one "
                                  f"before, or pass force=true to start over") from None
        return state


# ------------------------------------------------------------------------------------------------ model directories
def _config(model: nn.Module, fmt: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    from gmpq.version import __version__

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "schema_version": CONFIG_SCHEMA_VERSION,
        "format": fmt,
        "arch": getattr(model, "gmpq_arch", None) or type(model).__name__,
        "num_classes": int(getattr(model, "num_classes", 0) or _num_outputs(model)),
        "input_size": default_input_size(model),
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "gmpq_version": __version__,
        **(extra or {}),
    }


def _num_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def _write_weights(model: nn.Module, directory: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantMixin) for m in model.modules())


def save_float_model(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write a float model to ``directory`` (``model.safetensors`` + ``config.json``); return the directory."""
    if _is_quantized(model):
        raise CheckpointError("save_float_model() got a quantized model; use save_quantized_model()")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(model, out)
    atomic_write_text(out / "config.json", json.dumps(_config(model, FLOAT_FORMAT, extra), indent=2) + "\n")
    return out


def save_quantized_model(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized model (weights with quantizer steps/clips, ``policy.json``, ``config.json``)."""
    policy: Policy | None = getattr(model, "gmpq_policy", None)
    if policy is None or not _is_quantized(model):
        raise CheckpointError("save_quantized_model() needs a model quantized with gmpq.quantize(model, policy)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(model, out)
    policy.save(out / "policy.json")
    atomic_write_text(out / "config.json", json.dumps(_config(model, QUANTIZED_FORMAT, extra), indent=2) + "\n")
    return out


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a gmpq model directory, checked."""
    d = Path(directory)
    path = d / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except OSError:
        raise CheckpointError(f"{str(d)!r} is not a gmpq model directory (no readable config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or cfg.get("format") not in (FLOAT_FORMAT, QUANTIZED_FORMAT):
        raise CheckpointError(f"{str(path)!r} has an unknown format {cfg.get('format') if isinstance(cfg, dict) else cfg!r}; "
                              f"expected {FLOAT_FORMAT!r} or {QUANTIZED_FORMAT!r}")
    for key in ("arch", "num_classes"):
        if key not in cfg:
            raise CheckpointError(f"{str(path)!r} lacks the field {key!r}")
    return cfg


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{str(directory)!r} has no model.safetensors")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def load_model(directory: str | os.PathLike) -> nn.Module:
    """Rebuild the float or quantized model saved in ``directory``, in eval mode."""
    d = Path(directory)
    cfg = read_model_config(d)
    policy = d / "policy.json" if cfg["format"] == QUANTIZED_FORMAT else None
    if policy is not None and not policy.exists():
        raise CheckpointError(f"{str(d)!r} holds a quantized model but no policy.json")
    model = create_model(cfg["arch"], policy=policy, num_classes=int(cfg["num_classes"]))
    state = _read_weights(d)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {str(d)!r} do not fit {cfg['arch']}: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_float_model(directory: str | os.PathLike) -> nn.Module:
    """:func:`load_model` for a float model directory."""
    if read_model_config(directory)["format"] != FLOAT_FORMAT:
        raise CheckpointError(f"{str(directory)!r} holds a quantized model; use load_model() or load_quantized_model()")
    return load_model(directory)


def load_quantized_model(directory: str | os.PathLike) -> nn.Module:
    """:func:`load_model` for a quantized model directory."""
    if read_model_config(directory)["format"] != QUANTIZED_FORMAT:
        raise CheckpointError(f"{str(directory)!r} holds a float model; use load_model() or load_float_model()")
    return load_model(directory)


# ------------------------------------------------------------------------------------------------ initialisation
def resolve_model_dir(path: str | os.PathLike) -> Path | None:
    """The gmpq model directory at ``path``: itself, or ``<path>/model`` / ``<path>/pretrain/model`` of a run."""
    p = Path(path)
    for candidate in (p, p / "model", p / "pretrain" / "model"):
        if (candidate / "config.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    return None


def init_from_checkpoint(model: nn.Module, source: str) -> dict[str, list[str]]:
    """Copy float weights from ``source`` into ``model`` where names and shapes match; return what was skipped.

    ``source``: a gmpq model or run directory, a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state-dict file,
    or a Hub model id (``timm/resnet18.a1_in1k``, optionally prefixed ``hf-hub:``) whose ``model.safetensors`` is
    fetched (or read from the Hub cache). Weights with a different shape (e.g. a classifier with another class count
    or the 3x3 stem of a CIFAR variant) are skipped and reported; a source sharing no weight with the model raises
    :class:`CheckpointError`.
    """
    state = _state_dict_from(source)
    own = model.state_dict()
    loaded, skipped = {}, []
    for name, tensor in state.items():
        if name in own and own[name].shape == tensor.shape:
            loaded[name] = tensor
        elif name in own:
            skipped.append(name)
    if not loaded:
        raise CheckpointError(f"checkpoint {source!r} shares no weight with {getattr(model, 'gmpq_arch', 'the model')}"
                              f" (first keys: {list(state)[:3]}); is it for another architecture?")
    model.load_state_dict(loaded, strict=False)
    missing = [n for n in own if n not in loaded]
    return {"skipped_shape": skipped, "missing": missing}


def _state_dict_from(source: str) -> dict[str, torch.Tensor]:
    path = Path(source).expanduser()
    model_dir = resolve_model_dir(path) if path.is_dir() else None
    if model_dir is not None:
        return _read_weights(model_dir)
    if path.is_dir():
        raise CheckpointError(f"{source!r} is a directory without a gmpq model (config.json + model.safetensors)")
    if path.is_file():
        if path.suffix == ".safetensors":
            try:
                return load_file(str(path))
            except Exception as e:
                raise CheckpointError(f"{source!r} is not a readable safetensors file ({e})") from None
        if path.suffix in (".pth", ".pt", ".bin"):
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot read {source!r} as a weights-only torch file ({e})") from None
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                    obj = obj[key]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{source!r} does not hold a state dict")
            return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        raise CheckpointError(f"unsupported checkpoint file {source!r}; use .safetensors, .pth/.pt or a gmpq model dir")
    repo = source.removeprefix("hf-hub:")
    if repo.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint {source!r} is neither an existing file/directory nor a Hub id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        file = hf_hub_download(repo, "model.safetensors")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"checkpoint {source!r} is not a local path and the Hub model {repo!r} is neither "
                              f"reachable nor cached ({type(e).__name__}); download it once or give a local "
                              f".safetensors file in model.checkpoint") from None
    return load_file(file)
