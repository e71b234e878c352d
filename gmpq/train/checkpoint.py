"""Checkpoints: per-epoch training state (accelerate) and initialisation from saved weights (never pickle).

* :class:`CheckpointManager` wraps ``accelerator.save_state`` / ``load_state``. Epoch ``e`` is written by every
  process into ``checkpoints/.tmp-epoch_000e`` together with ``trainer_state.json`` (epoch, metrics history, the
  training step's own state), then renamed to ``checkpoints/epoch_000e`` by the main process: a kill at any moment
  leaves either the complete previous checkpoint or the complete new one. Only the newest ``keep`` are kept.
* :func:`init_from_checkpoint` initialises a model from a gmpq model directory (:mod:`gmpq.hub.format`) or a run
  holding one, a ``.safetensors`` / ``.pth`` state dict (read with ``weights_only=True``), a Hugging Face Hub /
  timm model id, or ``timm:<name>[.<tag>]``: the weights timm's registry configures for that name (e.g. the
  JPEG-adapted ``timm:resnet20_cifar.jpeg_ft`` shipped in the package). A stage's final model is a gmpq model directory, written by :func:`gmpq.hub.write_model_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from gmpq.errors import CheckpointError
from gmpq.faults import fault_point
from gmpq.hub import check_finite, is_model_dir, read_state_dict
from gmpq.hub.format import is_quantized, read_config
from gmpq.rundir import RunDir, StageDir
from gmpq.utils import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

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
        fault_point("checkpoint")
        return final

    def load_latest(self, before_restore: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Restore the newest checkpoint into the prepared objects; return its trainer state (None if none).

        ``before_restore`` receives the trainer state before any weight is restored, and may refuse the checkpoint by
        raising (a training step that cannot continue it says why, rather than the weights' shape mismatch)."""
        latest = self.latest()
        if latest is None:
            return None
        try:
            state = json.loads((latest / "trainer_state.json").read_text())
        except (OSError, ValueError) as e:
            raise _unusable(latest, e) from None
        if before_restore is not None:
            before_restore(state)
        try:
            self.accelerator.load_state(str(latest))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise _unusable(latest, e) from None
        return state


def _unusable(checkpoint: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot resume from {str(checkpoint)!r}: {error}; delete it to resume from the one before, "
                           f"or pass force=true to start over")


# ------------------------------------------------------------------------------------------------ initialisation
def find_model_dir(path: str | os.PathLike, quantized: bool | None = None) -> Path | None:
    """The gmpq model directory ``path`` means: itself, a stage directory's model, or a run's model (the fine-tuned
    one, then the float one) — the first of those that exists and, unless ``quantized`` is None, is quantized or
    float as asked. None when there is none."""
    p = Path(path)
    for candidate in (p, StageDir.of(p).model, *RunDir(p).trained_models):
        if is_model_dir(candidate) and quantized in (None, is_quantized(read_config(candidate))):
            return candidate
    return None


def init_from_checkpoint(model: nn.Module, source: str) -> dict[str, list[str]]:
    """Copy float weights from ``source`` into ``model`` where names and shapes match; return what was skipped.

    ``source``: a float gmpq model directory (or a run or stage holding one), a ``.safetensors`` / ``.pth`` / ``.pt`` /
    ``.bin`` state-dict file, a Hub model id (``timm/resnet18.a1_in1k``, optionally prefixed ``hf-hub:``) whose
    ``model.safetensors`` is fetched (or read from the Hub cache), or ``timm:<name>[.<tag>]``, the pretrained weights
    timm's registry configures for a model name (a local file for gmpq's shipped weights). Weights with a different shape (e.g. a classifier
    with another class count or the 3x3 stem of a CIFAR variant) are skipped and reported; a source sharing no weight
    with the model raises :class:`CheckpointError`.
    """
    state = _state_dict_from(source, getattr(model, "gmpq_arch", None))
    check_finite(state, source)
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


def checkpoint_license(source: str | None) -> dict[str, Any] | None:
    """The license of the weights ``source`` (as :func:`init_from_checkpoint` takes it) holds, for the model cards of
    everything made from them: ``{"license", "source", "notice"}`` (the notice text to carry along, or None).

    ``timm:<name>`` and Hub ids of timm's registry (``timm/<name>``) give their pretrained configuration's license
    (and the notice gmpq ships beside its own weights); a gmpq model directory gives what its config.json recorded
    (the license of the weights it was trained from). Anything else: None (not known).
    """
    if not source:
        return None
    if source.startswith(("timm:", "timm/", "hf-hub:timm/")):
        import timm

        from gmpq.models.cifar import WEIGHT_NOTICES

        name = source.removeprefix("hf-hub:").removeprefix("timm:").removeprefix("timm/")
        cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
        if cfg is None or not cfg.license:
            return None
        full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name
        notice = WEIGHT_NOTICES.get(full)
        return {"license": cfg.license, "source": source, "notice": notice.read_text() if notice else None}
    path = Path(source).expanduser()
    model_dir = find_model_dir(path) if path.is_dir() else None
    return read_config(model_dir).get("weights_license") if model_dir is not None else None


def _state_dict_from(source: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The float state dict ``source`` names; a gmpq model directory of another backbone than ``arch`` (compared
    without pretrained tags and CIFAR variants: ``resnet18`` initialises ``resnet18_cifar``) is refused."""
    if source.startswith("timm:"):
        return _timm_pretrained_state(source.removeprefix("timm:"))
    path = Path(source).expanduser()
    model_dir = find_model_dir(path, quantized=False) if path.is_dir() else None
    if model_dir is not None:
        from gmpq.models import base_arch

        theirs = str(read_config(model_dir).get("arch") or "")
        if arch is not None and theirs and base_arch(theirs.split(".")[0]) != base_arch(arch.split(".")[0]):
            raise CheckpointError(f"checkpoint {source!r} holds a {theirs!r} model, not {arch!r}; give a checkpoint of "
                                  f"{arch!r} in model.checkpoint (or set model.arch={theirs})")
        return read_state_dict(model_dir)
    if path.is_dir():
        raise CheckpointError(f"{source!r} is a directory without a float gmpq model (a model directory, or a run or "
                              "stage holding one)")
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


def _timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of ``timm.create_model(name, pretrained=True)``: whatever its pretrained configuration names."""
    import timm

    from gmpq.errors import ModelError

    if not timm.is_model(name):
        raise CheckpointError(f"checkpoint 'timm:{name}': {name!r} is not a timm model name (with an optional .tag)")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except ModelError as e:
        raise CheckpointError(f"checkpoint 'timm:{name}': {e}") from None
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint 'timm:{name}': timm could not load its pretrained weights "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
