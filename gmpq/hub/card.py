"""The model card (README.md) of an export: Hub metadata, the measured metrics, the policy figure, how to load.

Every number on the card comes from the export's config.json — what save_pretrained measured on the model (BOPs,
sizes) or was given as measured (top-1, with its dataset and split). A metric nobody measured reads "not measured".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gmpq.hub import format as F
from gmpq.policy import Policy
from gmpq.quant.functional import FLOAT_BITS
from gmpq.utils import atomic_write_text


def write_card(out: Path, config: Mapping[str, Any], policy: Policy, repo_id: str, figure: bool = True) -> Path:
    """Write ``README.md`` (and, with ``figure``, ``policy.png``) into the export directory ``out``."""
    if figure:
        write_policy_figure(policy, out / F.FIGURE_FILE, title=f"{config.get('name')}: per-layer bits")
    return atomic_write_text(out / F.CARD_FILE, render_card(config, policy, repo_id, (out / F.FIGURE_FILE).is_file()))


def write_policy_figure(policy: Policy, path: Path, title: str | None = None) -> Path:
    """The per-layer weight/activation bit bars of ``policy`` (gmpq.viz.plot_policies)."""
    from gmpq.viz import plot_policies

    return plot_policies(policy, path, title=title)


def _bits(bits: int) -> str:
    return "fp32" if bits == FLOAT_BITS else str(bits)


def _num(value: Any, fmt: str, unit: str = "") -> str:
    return "not measured" if value is None else f"{value:{fmt}}{unit}"


def render_card(config: Mapping[str, Any], policy: Policy, repo_id: str, has_figure: bool) -> str:
    """The card's Markdown text."""
    m = config.get("metrics") or {}
    name = config.get("name") or repo_id
    size = m.get("bops_input_size")
    dataset = m.get("dataset")
    if m.get("top1") is not None:
        where = ", ".join(str(x) for x in (dataset, m.get("eval_split"),
                                           f"{m['eval_samples']:,} images" if m.get("eval_samples") else None) if x)
        top1_row = f"| top-1 accuracy ({where or 'dataset not recorded'}) | {m['top1']:.2f} % |"
    else:
        top1_row = "| top-1 accuracy | not measured |"
    searched = Counter((b.w_bits, b.a_bits) for b in policy.layers.values())
    mix = ", ".join(f"{n} x W{w}/A{a}" for (w, a), n in sorted(searched.items()))
    kept = ", ".join(f"`{n}` W{_bits(b.w_bits)}/A{_bits(b.a_bits)}" for n, b in policy.kept.items()) or "none"
    prov = config.get("provenance") or {}
    provenance = "\n".join(f"- {k}: {_value(v)}" for k, v in prov.items() if v is not None) or "- not recorded"
    tags = ["gmpq", "quantization", "mixed-precision", "timm", "image-classification"]
    license_id, license_lines = license_section(config)
    front = ["---", "library_name: gmpq", f"license: {license_id}", "pipeline_tag: image-classification",
             "tags:", *[f"- {t}" for t in tags]]
    if dataset:
        front += ["datasets:", f"- {dataset}"]
    front.append("---")
    layout = ("integer weight codes packed to their bit width" if config.get("weights") == "packed"
              else "dequantized float weights")
    lines = [
        *front, "",
        f"# {name}", "",
        f"`{config['arch']}` ({config.get('num_classes')} classes, {size}x{size} input) with a mixed-precision "
        f"weight/activation policy, made with gmpq (GMPQ: generalizable "
        "mixed-precision quantization, Wang et al., ICCV 2021).",
    ]
    if config.get("description"):
        lines += ["", str(config["description"])]
    lines += [
        "", "## Metrics", "",
        "| metric | value |", "|---|---|",
        top1_row,
        f"| BOPs, searched layers ({size}x{size}) | {_num(m.get('bops_searched_g'), '.4f', ' G')} |",
        f"| BOPs, all layers ({size}x{size}) | {_num(m.get('bops_total_g'), '.4f', ' G')} |",
        *([f"| BOPs of the float network (W32/A32), searched / all layers | {m['float_bops_searched_g']:.2f} G / "
           f"{m['float_bops_total_g']:.2f} G (this model: {m['bops_total_g'] / m['float_bops_total_g']:.4f} of it) |"]
          if m.get("float_bops_total_g") and m.get("bops_total_g") is not None else []),
        f"| mean bits of searched layers, W / A | {_num(m.get('mean_w_bits'), '.2f')} / "
        f"{_num(m.get('mean_a_bits'), '.2f')} |",
        f"| {F.WEIGHTS_FILE} | {m['file_bytes']:,} bytes ({layout}) |",
        f"| FP32 safetensors of the same network | {m['fp32_bytes']:,} bytes "
        f"(this file is {m['ratio_fp32']:.3f} of it, {1 / m['ratio_fp32']:.1f}x smaller) |",
    ]
    lines += _comparison_lines(config.get("comparison") or [], m)
    lines += ["", "## Policy", ""]
    if has_figure:
        lines += [f"![per-layer weight and activation bits]({F.FIGURE_FILE})", ""]
    lines += [
        f"Searched layers ({len(policy.layers)}): {mix or 'none'}. Kept layers (not searched): {kept}. "
        f"The full policy is in [`{F.POLICY_FILE}`]({F.POLICY_FILE}).", "",
        "Provenance:", "", provenance, "",
        *[line for file, caption in (config.get("figures") or {}).items()
          for line in (f"![{caption}]({file})", "", f"*{caption}*", "")],
        *(["## Reproduce", "", "Made with (gmpq checkout, the data where the recipe points):", "", "```bash",
            str(config["command"]), f"gmpq evaluate {repo_id}   # measures the top-1 above again", "```", ""]
          if config.get("command") else []),
        "## Usage", "",
        "```python",
        "import torch, gmpq",
        f'model = gmpq.from_pretrained("{repo_id}")   # eval mode, quantized as above',
        f"x = torch.randn(1, {', '.join(str(d) for d in config['input_size'])})   # normalised input",
        "logits = model(x)",
        "```", "",
        f"Inputs are normalised with mean {_tuple(config.get('mean'))} and std {_tuple(config.get('std'))}. "
        "Loading reads safetensors and JSON only (nothing is unpickled) and checks the files' SHA-256.", "",
        "## Files", "",
        f"- `{F.WEIGHTS_FILE}`: {layout}, per-channel weight steps, activation clips and sign modes, and the other "
        f"tensors (BN, biases) in float32 (gmpq export format {config['format_version']}).",
        f"- `{F.POLICY_FILE}`: per-layer weight/activation bits.",
        f"- `{F.CONFIG_FILE}`: architecture, model arguments, input size, normalisation, metrics, file hashes.",
        "", *license_lines,
    ]
    return "\n".join(lines)


def license_section(config: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The card's license id and its "License" section: the license of the float weights the model was made from
    (with the notice they require, which must travel with every copy), else gmpq's Apache-2.0."""
    lic = config.get("weights_license") or {}
    if not lic.get("license"):
        return "apache-2.0", []
    lines = ["## License", "",
             f"The weights are derived from `{lic.get('source')}`, licensed {lic['license']}; the notice below "
             "travels with every copy of them (gmpq itself is Apache-2.0).", ""]
    if lic.get("notice"):
        lines += ["```", str(lic["notice"]).strip(), "```", ""]
    return str(lic["license"]), lines


def _comparison_lines(rows: list[Mapping[str, Any]], m: Mapping[str, Any]) -> list[str]:
    """A table of this model beside the others it was compared with (same data, split and fine-tuning)."""
    if not rows:
        return []
    this = {"model": "this model", "top1": m.get("top1"), "bops_searched_g": m.get("bops_searched_g"),
            "mean_w_bits": m.get("mean_w_bits"), "mean_a_bits": m.get("mean_a_bits")}
    lines = ["", "Compared on the same evaluation images after the same fine-tuning:", "",
             "| model | top-1 | BOPs, searched layers | mean bits W / A |", "|---|---|---|---|"]
    for row in (this, *rows):
        lines.append(f"| {row.get('model')} | {_num(row.get('top1'), '.2f', ' %')} | "
                     f"{_num(row.get('bops_searched_g'), '.4f', ' G')} | {_num(row.get('mean_w_bits'), '.2f')} / "
                     f"{_num(row.get('mean_a_bits'), '.2f')} |")
    return lines


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tuple(values: Any) -> str:
    return "not recorded" if not values else "(" + ", ".join(f"{v:g}" for v in values) + ")"

