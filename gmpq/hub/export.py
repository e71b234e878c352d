"""Writing gmpq model directories (:mod:`gmpq.hub.format`): :func:`write_model_dir` saves a float or fake-quant
model as a training stage holds it; :func:`save_pretrained` publishes a quantized model (packed codes by default,
measured size and BOPs, model card); :func:`push_to_hub` uploads one.

The integer codes written for a quantized layer are those its forward pass uses: with ``W_q = Q_w(W)`` the
fake-quantized weight and ``s`` the per-channel step, ``q = round(W_q / s)`` (exact, since ``W_q`` is an integer
multiple of the step). A loaded model sets ``W = s * q``, which the same forward quantizes back to exactly ``W_q``,
so exported and loaded models compute the same logits.

Size. The file holds ``P`` bytes of packed codes, ``E`` bytes of everything else (float32 steps, clips, BN, biases,
float layers, flags) and a safetensors header ``H``; ``overhead = (P + E + H) / (P + E)``. It is compared with the
safetensors file of the same network in FP32 (its float state dict without quantizer state).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from gmpq.complexity import count_bops
from gmpq.errors import ModelError
from gmpq.hub import format as F
from gmpq.hub.index import INDEX_FILE, update_index
from gmpq.hub.packing import pack_codes
from gmpq.models import default_input_size, model_signature, quantizable_layers
from gmpq.policy import Policy
from gmpq.quant import ActQuantizer, QuantMixin, WeightQuantizer
from gmpq.quant import functional as QF
from gmpq.utils import atomic_write, atomic_write_text, ensure_directory
from gmpq.version import __version__


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and measured.

    Attributes:
        path: the export directory.
        layout: ``packed`` or ``float``.
        file_bytes: size of model.safetensors.
        packed_bytes: bytes of packed weight codes (0 for the float layout).
        extras_bytes: bytes of every other tensor.
        fp32_bytes: size of the same network's FP32 safetensors file.
        bops_searched_g / bops_total_g: BOPs (1e9) at ``bops_input_size``.
    """

    path: Path
    layout: str
    file_bytes: int
    packed_bytes: int
    extras_bytes: int
    fp32_bytes: int
    bops_input_size: int
    bops_searched_g: float
    bops_total_g: float

    @property
    def overhead(self) -> float:
        """file bytes / (packed codes + extras): the cost of the header (the size bound is 1.05)."""
        return self.file_bytes / max(1, self.packed_bytes + self.extras_bytes)

    @property
    def ratio_fp32(self) -> float:
        """file bytes / FP32 safetensors bytes."""
        return self.file_bytes / self.fp32_bytes

    def summary(self) -> str:
        """One line for the command line."""
        return (f"{self.path / F.WEIGHTS_FILE}: {self.file_bytes:,} bytes ({self.layout}; codes {self.packed_bytes:,} "
                f"+ extras {self.extras_bytes:,}, overhead x{self.overhead:.4f}) | FP32 safetensors "
                f"{self.fp32_bytes:,} bytes | ratio {self.ratio_fp32:.4f} ({1 / self.ratio_fp32:.2f}x smaller)")


@torch.no_grad()
def weight_codes(layer: QuantMixin) -> torch.Tensor:
    """The int8 codes ``q`` in ``[-Q_p, Q_p]`` of the weight ``layer`` uses in its forward pass (``W_q = s * q``)."""
    return QF.weight_codes(layer.quantized_weight().float(), layer.wq.scale.float(), layer.w_bits)


def _check_exportable(model: nn.Module) -> Policy:
    policy = getattr(model, "gmpq_policy", None)
    if not isinstance(policy, Policy):
        raise ModelError("save_pretrained needs a model quantized by gmpq (gmpq.create_model(arch, policy=...) or "
                         "gmpq.quantize(model, policy)); this model has no gmpq_policy")
    _check_quantized_layers(model)
    return policy


def _check_quantized_layers(model: nn.Module) -> None:
    layers = quantizable_layers(model)
    for name, m in layers.items():
        if not isinstance(m, QuantMixin):
            raise ModelError(f"layer {name!r} is a {type(m).__name__}, not a fixed-bit quantized layer; export a "
                             "model quantized with its policy (gmpq.quantize), not a float model or a search supernet")
    check_calibrated(layers)


def check_calibrated(layers: Mapping[str, QuantMixin]) -> None:
    """Raise a :class:`ModelError` naming the first layer whose weight steps or activation clip were never set."""
    for name, m in layers.items():
        if not m.wq.is_float and not bool(m.wq.initialized):
            raise ModelError(f"layer {name!r} has no weight steps yet; run gmpq.calibrate(model, batches) (or train "
                             "it) before exporting")
        if not m.aq.is_float and not bool(m.aq.calibrated):
            raise ModelError(f"layer {name!r} has an uncalibrated activation quantizer; run "
                             "gmpq.calibrate(model, batches) (or train it) before exporting")


def _quantizer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantizer submodules (absent from an FP32 model)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            keys.update(f"{name}.{k}" for k in m.state_dict())
    return keys


def _layer_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.w_bits, m.a_bits) for name, m in quantizable_layers(model).items() if isinstance(m, QuantMixin)}


def _packed_tensors(state: Mapping[str, torch.Tensor], layers: Mapping[str, QuantMixin]
                    ) -> tuple[dict[str, torch.Tensor], list[F.Entry], int]:
    """The four streams of the packed layout, the index entries and the packed-code bytes."""
    weight_keys = {f"{name}.weight": m for name, m in layers.items()}
    parts: dict[str, list[torch.Tensor]] = {tag: [] for tag in F.STREAMS}
    entries = []
    for key, tensor in state.items():
        layer = weight_keys.get(key)
        if layer is not None:
            unsigned = weight_codes(layer).to(torch.int16) + QF.weight_qmax(layer.w_bits)
            parts["c"].append(pack_codes(unsigned, layer.w_bits))
            entries.append(F.Entry(key, "c", tuple(tensor.shape)))
        else:
            tag = F.stream_tag(tensor)
            parts[tag].append(tensor.detach().cpu().reshape(-1).to(F.STREAMS[tag][1]))
            entries.append(F.Entry(key, tag, tuple(tensor.shape)))
    tensors = {name: torch.cat(parts[tag]) if parts[tag] else torch.empty(0, dtype=dtype)
               for tag, (name, dtype) in F.STREAMS.items()}
    return tensors, entries, tensors["codes"].numel()


def _float_tensors(state: Mapping[str, torch.Tensor], layers: Mapping[str, QuantMixin]) -> dict[str, torch.Tensor]:
    """The float layout: every tensor as is (floating ones in float32), the weights of ``layers`` dequantized."""
    weight_keys = {f"{name}.weight": m for name, m in layers.items()}
    out = {}
    for key, tensor in state.items():
        layer = weight_keys.get(key)
        if layer is not None:
            out[key] = F.dequantize(weight_codes(layer), layer.wq.scale.detach()).cpu()
        else:
            t = tensor.detach().cpu()
            out[key] = (t.float() if t.is_floating_point() else t).contiguous()
    return out


@dataclass(frozen=True)
class _Written:
    """The tensor files of a model directory, before its config.json."""

    weights: Path
    policy: Path | None
    packed_bytes: int
    extras_bytes: int

    def files(self) -> dict[str, dict[str, Any]]:
        """config.json's ``files`` record: SHA-256 and size of every file the loader needs."""
        paths = [self.weights] if self.policy is None else [self.weights, self.policy]
        return {p.name: {"sha256": F.sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def _write_tensors(model: nn.Module, out: Path, layout: str, dequantize: bool) -> _Written:
    """model.safetensors in ``layout`` and, for a quantized model, policy.json. With ``dequantize`` (an export) the
    quantized weights are dequantized in the float layout and weight transforms are folded in
    (:func:`gmpq.hub.format.deployment_state`); without it (a stage) the state dict is written as it is."""
    policy = getattr(model, "gmpq_policy", None)
    layers = F.coded_layers(model) if policy is not None else {}
    state = F.deployment_state(model) if dequantize else model.state_dict()
    metadata = {"format": F.FORMAT_NAME, "format_version": str(F.FORMAT_VERSION), "weights": layout,
                "bits": F.encode_bits(_layer_bits(model))}
    if dequantize:
        metadata[F.TRANSFORMS_KEY] = "folded"
    if layout == "packed":
        tensors, entries, packed_bytes = _packed_tensors(state, layers)
        metadata["index"] = F.encode_index(entries)
    else:
        tensors, packed_bytes = _float_tensors(state, layers if dequantize else {}), 0
    extras_bytes = sum(t.numel() * t.element_size() for t in tensors.values()) - packed_bytes
    ensure_directory(out)
    weights = atomic_write(out / F.WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return _Written(weights, None if policy is None else policy.save(out / F.POLICY_FILE), packed_bytes, extras_bytes)


def write_model_dir(model: nn.Module, directory: str | os.PathLike, *, input_size: int | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a float or quantized (fake-quant) ``model`` as a gmpq model directory in the float layout: its state
    dict as it is (latent weights and quantizer state), policy.json when quantized, and config.json last.

    This is how a training stage saves its model; :func:`gmpq.hub.load.load_model_dir` reads it back, and
    :func:`save_pretrained` publishes a quantized model (packed codes, card). ``input_size`` is the resolution the
    model was trained at (default: its native one); ``extra`` adds fields to config.json (e.g. the training
    ``data`` section, which ``gmpq evaluate`` reads).
    """
    if getattr(model, "gmpq_policy", None) is not None:
        _check_quantized_layers(model)
    out = Path(directory)
    written = _write_tensors(model, out, "float", dequantize=False)
    config = {**model_config(model, input_size), **(extra or {}), "files": written.files()}
    atomic_write_text(out / F.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def _check_figures(figures: Mapping[str, str | os.PathLike]) -> None:
    """Refuse extra card figures that do not exist or would overwrite the export's own files (before writing)."""
    for caption, path in figures.items():
        src = Path(path)
        if not src.is_file():
            raise ModelError(f"figure {caption!r} not found at {src}; plot it first or leave it out")
        if src.name in (F.FIGURE_FILE, F.CARD_FILE, F.WEIGHTS_FILE, F.POLICY_FILE, F.CONFIG_FILE):
            raise ModelError(f"figure {src} would overwrite the export's own {src.name}; rename it")


def _copy_figures(figures: Mapping[str, str | os.PathLike], out: Path) -> dict[str, str]:
    """Copy the card's extra figures into ``out``; return file name -> caption."""
    copied: dict[str, str] = {}
    for caption, path in figures.items():
        src = Path(path)
        target = out / src.name
        if src.resolve() != target.resolve():
            atomic_write(target, lambda tmp, src=src: tmp.write_bytes(src.read_bytes()))
        copied[src.name] = caption
    return copied


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Size of the safetensors file of ``model``'s network in FP32: its float state dict without quantizer state."""
    skip = _quantizer_keys(model)
    state = {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items() if k not in skip}
    return len(safetensors_bytes(state))


def model_config(model: nn.Module, input_size: int | None = None) -> dict[str, Any]:
    """The part of config.json that rebuilds the network and feeds it: arch, model kwargs, input size (default: the
    model's native one), normalisation, and the format's name and versions."""
    sig = model_signature(model)
    size = input_size or sig.input_size
    return {
        "format": F.FORMAT_NAME, "format_version": F.FORMAT_VERSION, "gmpq_version": __version__, "weights": "float",
        "arch": sig.arch,
        "model_kwargs": {"num_classes": sig.num_classes, "in_chans": sig.in_chans},
        "num_classes": sig.num_classes,
        "input_size": [sig.in_chans, size, size],
        "mean": list(sig.mean),
        "std": list(sig.std),
    }


def save_pretrained(
    model: nn.Module, save_dir: str | os.PathLike, *, format: str = "packed", name: str | None = None,
    dataset: str | None = None, top1: float | None = None, eval_split: str | None = None,
    eval_samples: int | None = None, bops_input_size: int | None = None, description: str | None = None,
    repo_id: str | None = None, card: bool = True, figures: Mapping[str, str | os.PathLike] | None = None,
    comparison: Sequence[Mapping[str, Any]] = (), data: Mapping[str, Any] | None = None,
    weights_license: Mapping[str, Any] | None = None, command: str | None = None,
) -> ExportReport:
    """Export a quantized ``model`` to ``save_dir``; return what was written and measured.

    Args:
        model: a model quantized by gmpq (it carries ``gmpq_policy``) whose quantizers are calibrated.
        save_dir: the export directory (created; gmpq's files in it are replaced atomically, one by one, and
            config.json — which records the other files' SHA-256 — last).
        format: ``"packed"`` (integer codes packed to their bit width) or ``"float"`` (dequantized float weights).
        name: model name for the card (default: the directory name).
        dataset, top1, eval_split, eval_samples: the measured top-1 accuracy (percent) of this model, the dataset
            and split it was measured on and how many images. Left out, the card says "not measured".
        bops_input_size: resolution at which BOPs are counted (default: the model's native resolution).
        description: a paragraph for the card (how the model was made).
        repo_id: the id the card's loading snippet uses (default: ``save_dir`` as given).
        card: write README.md and policy.png.
        figures: more PNG figures for the card, caption -> file (copied into ``save_dir``), e.g. the search's
            trajectory.
        comparison: rows of a table on the card comparing this model with others measured the same way, each
            ``{"model", "top1", "bops_searched_g", "mean_w_bits", "mean_a_bits"}`` (e.g. the best uniform policy under
            the budget, with its share of it).
        data: the training data section (dataset, path, splits, input size), recorded so that ``gmpq evaluate``
            finds the data the model was made for.
        weights_license: the license of the float weights the model was made from (``{"license", "source",
            "notice"}``, :func:`gmpq.train.checkpoint.checkpoint_license`; default: what a loaded model directory
            recorded): the card's license, with the notice those weights require.
        command: the command that made the model, for the card's "Reproduce" section.
    """
    if format not in F.LAYOUTS:
        raise ModelError(f"unknown export format {format!r}; choose one of {', '.join(F.LAYOUTS)}")
    if top1 is not None and not (isinstance(top1, (int, float)) and 0.0 <= top1 <= 100.0):
        raise ModelError(f"top1 is a percentage in [0, 100], got {top1!r}")
    policy = _check_exportable(model)
    _check_figures(figures or {})
    out = Path(save_dir)
    config = model_config(model)
    written = _write_tensors(model, out, format, dequantize=True)

    size = bops_input_size or default_input_size(model)
    bops = count_bops(model, size)
    report = ExportReport(out, format, written.weights.stat().st_size, written.packed_bytes, written.extras_bytes,
                          fp32_safetensors_bytes(model), size, bops.bops_searched_g, bops.bops_total_g)
    w_mean, a_mean = policy.mean_bits
    float_bops = {kept: sum(layer.macs for layer in bops.layers if kept or not layer.kept) * QF.FLOAT_BITS ** 2 / 1e9
                  for kept in (False, True)}
    if weights_license is None:
        weights_license = (getattr(model, "gmpq_config", None) or {}).get("weights_license")
    config.update({
        "weights": format, "name": name or out.resolve().name,
        **({"data": dict(data)} if data is not None else {}),
        "metrics": {
            "dataset": dataset, "top1": top1, "eval_split": eval_split, "eval_samples": eval_samples,
            "bops_input_size": size, "bops_searched_g": bops.bops_searched_g, "bops_total_g": bops.bops_total_g,
            "mean_w_bits": None if math.isnan(w_mean) else w_mean,
            "mean_a_bits": None if math.isnan(a_mean) else a_mean,
            "file_bytes": report.file_bytes, "packed_bytes": written.packed_bytes,
            "extras_bytes": written.extras_bytes, "fp32_bytes": report.fp32_bytes, "ratio_fp32": report.ratio_fp32,
            "overhead": report.overhead,
            "float_bops_searched_g": float_bops[False], "float_bops_total_g": float_bops[True],
        },
        "description": description,
        **({"weights_license": dict(weights_license)} if weights_license else {}),
        **({"command": command} if command else {}),
        "comparison": [dict(row) for row in comparison],
        "figures": _copy_figures(figures or {}, out),
        "provenance": policy.provenance,
        "files": written.files(),
    })
    if card:
        from gmpq.hub.card import write_card

        write_card(out, config, policy, repo_id=repo_id or os.fspath(save_dir))
    atomic_write_text(out / F.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if (out.parent / INDEX_FILE).is_file():
        update_index(out.parent)
    return report


def export_report_dict(report: ExportReport) -> dict[str, Any]:
    """``report`` as JSON-ready data (for ``gmpq export --json``)."""
    data = asdict(report)
    data.update(path=str(report.path), overhead=report.overhead, ratio_fp32=report.ratio_fp32)
    return data


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
    private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
    create_pr: bool = False, **export_kwargs: Any,
) -> str:
    """Publish a model to the Hugging Face Hub repo ``repo_id``; return the commit URL.

    ``model_or_dir`` is a quantized model (exported first with ``save_pretrained(model, ..., **export_kwargs)``) or
    an export directory, which is loaded and verified first so that a broken export is never published. The card's
    loading snippet names ``repo_id``. Uploads through ``HfApi.create_repo`` and ``HfApi.upload_folder``.
    """
    from gmpq.hub.card import write_card
    from gmpq.hub.load import load_model_dir
    from gmpq.hub.remote import upload_export

    with tempfile.TemporaryDirectory(prefix="gmpq-push-") as tmp:
        staged = Path(tmp) / repo_id.rsplit("/", 1)[-1]
        if isinstance(model_or_dir, nn.Module):
            save_pretrained(model_or_dir, staged, repo_id=repo_id, **export_kwargs)
        else:
            if export_kwargs:
                raise ModelError(f"export options {sorted(export_kwargs)} apply to a model, not to an export "
                                 f"directory ({model_or_dir})")
            source = Path(model_or_dir)
            model = load_model_dir(source)
            if getattr(model, "gmpq_policy", None) is None:
                raise ModelError(f"{source} holds a float model; push_to_hub publishes quantized models")
            staged.mkdir()
            for name in (F.CONFIG_FILE, F.POLICY_FILE, F.WEIGHTS_FILE, F.FIGURE_FILE):
                if (source / name).is_file():
                    shutil.copy2(source / name, staged / name)
            write_card(staged, F.read_config(staged), Policy.load(staged / F.POLICY_FILE), repo_id=repo_id,
                       figure=False)
        return upload_export(staged, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, create_pr=create_pr)
