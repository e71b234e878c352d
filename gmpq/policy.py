"""The mixed-precision policy: per-layer weight/activation bits keyed by module path, with versioned JSON.

A policy is the contract between search, fine-tuning, export and the hub. It names every quantizable layer of a
model exactly once, either as a *searched* layer (weight bits from ``candidate_w_bits``, activation bits from
``candidate_a_bits``) or as a *kept* layer (the stem and the classifier by default, 2..8 bits or 32 = float). Applying
a policy to a model validates it: an unknown or missing layer, bits outside the candidates, a wrong type or an unknown
schema version raise :class:`PolicyError` naming the layer and the problem; a layer is never silently skipped.

Schema versions: version 1 holds one ``candidate_bits`` list for weights and activations; version 2 holds
``candidate_w_bits`` and ``candidate_a_bits``. Both are read; a policy is written in version 1 whenever its two lists
are equal (what every policy was before separate lists existed, readable by older gmpq), else in version 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmpq.errors import PolicyError
from gmpq.quant.functional import FLOAT_BITS, MAX_BITS, MIN_BITS

#: The schema version of policies whose weight and activation candidates differ (the newest).
SCHEMA_VERSION = 2
#: The schema version of policies with one candidate list for weights and activations.
SHARED_CANDIDATES_VERSION = 1
DEFAULT_CANDIDATE_BITS = (2, 3, 4, 6)
DEFAULT_KEPT_BITS = 8
#: The candidate fields of each readable schema version.
_CANDIDATE_FIELDS = {SHARED_CANDIDATES_VERSION: ("candidate_bits",),
                     SCHEMA_VERSION: ("candidate_w_bits", "candidate_a_bits")}


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer's weights and input activations (32 = float)."""

    w_bits: int
    a_bits: int

    def to_dict(self) -> dict[str, int]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}


@dataclass
class Policy:
    """A per-layer mixed-precision policy.

    Attributes:
        arch: the model architecture it was made for (a registered or timm name).
        input_size: the deployment input resolution its BOPs are counted at.
        candidate_w_bits / candidate_a_bits: the weight and activation bit widths a searched layer may take.
        layers: searched layers, ``{module path: LayerBits}``.
        kept: layers excluded from search (stem, classifier), ``{module path: LayerBits}``.
        bops_searched_g / bops_total_g: BOPs (in 1e9) of the searched layers and of all layers, if known.
        provenance: free-form facts about where the policy came from (strategy, dataset, seed, gmpq version, ...).
    """

    arch: str
    input_size: int
    layers: dict[str, LayerBits]
    kept: dict[str, LayerBits] = field(default_factory=dict)
    candidate_w_bits: tuple[int, ...] = DEFAULT_CANDIDATE_BITS
    candidate_a_bits: tuple[int, ...] = DEFAULT_CANDIDATE_BITS
    bops_searched_g: float | None = None
    bops_total_g: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- construction
    @classmethod
    def uniform(
        cls, arch: str, input_size: int, layer_names: Iterable[str], kept_names: Iterable[str], w_bits: int,
        a_bits: int, kept_bits: int = DEFAULT_KEPT_BITS, candidate_bits: Iterable[int] = DEFAULT_CANDIDATE_BITS,
    ) -> Policy:
        """Every searched layer at ``w_bits``/``a_bits``, every kept layer at ``kept_bits``/``kept_bits``; weights
        and activations share the candidates ``candidate_bits`` and both bit widths."""
        cands = tuple(sorted(set(candidate_bits) | {w_bits, a_bits}))
        return cls(
            arch=arch, input_size=input_size, candidate_w_bits=cands, candidate_a_bits=cands,
            layers={n: LayerBits(w_bits, a_bits) for n in layer_names},
            kept={n: LayerBits(kept_bits, kept_bits) for n in kept_names},
        )

    def all_layers(self) -> dict[str, LayerBits]:
        """Searched and kept layers together."""
        return {**self.layers, **self.kept}

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the policy, in the lowest schema version that expresses it (module docstring)."""
        if tuple(self.candidate_w_bits) == tuple(self.candidate_a_bits):
            version = SHARED_CANDIDATES_VERSION
            candidates: dict[str, Any] = {"candidate_bits": list(self.candidate_w_bits)}
        else:
            version = SCHEMA_VERSION
            candidates = {"candidate_w_bits": list(self.candidate_w_bits),
                          "candidate_a_bits": list(self.candidate_a_bits)}
        return {
            "schema_version": version,
            "arch": self.arch,
            "input_size": self.input_size,
            **candidates,
            "layers": {n: b.to_dict() for n, b in self.layers.items()},
            "kept": {n: b.to_dict() for n, b in self.kept.items()},
            "bops_searched_g": self.bops_searched_g,
            "bops_total_g": self.bops_total_g,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        """Parse and check a policy dict; any structural problem raises :class:`PolicyError`."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if type(version) is not int or version not in _CANDIDATE_FIELDS:
            raise PolicyError(
                f"policy schema_version {version!r} is not supported (this gmpq reads versions "
                f"{SHARED_CANDIDATES_VERSION} and {SCHEMA_VERSION}); re-export the policy with this gmpq version"
            )
        known = {"schema_version", "arch", "input_size", *_CANDIDATE_FIELDS[version], "layers", "kept",
                 "bops_searched_g", "bops_total_g", "provenance"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"policy has unknown field(s) {unknown}; allowed fields are {sorted(known)} (schema "
                              f"version {version})")
        arch = _typed(data, "arch", str)
        input_size = _typed(data, "input_size", int)
        if input_size <= 0:
            raise PolicyError(f"policy input_size must be positive, got {input_size}")
        if version == SHARED_CANDIDATES_VERSION:
            candidate_w_bits = candidate_a_bits = _candidates(data, "candidate_bits")
        else:
            candidate_w_bits, candidate_a_bits = (_candidates(data, "candidate_w_bits"),
                                                  _candidates(data, "candidate_a_bits"))
        layers = _parse_layers(data.get("layers"), "layers", allowed=(set(candidate_w_bits), set(candidate_a_bits)))
        kept = _parse_layers(data.get("kept", {}), "kept", allowed=None)
        both = sorted(set(layers) & set(kept))
        if both:
            raise PolicyError(f"layer {both[0]!r} is listed both as searched ('layers') and as kept ('kept')")
        provenance = data.get("provenance", {}) or {}
        if not isinstance(provenance, Mapping):
            raise PolicyError("policy provenance must be a JSON object")
        return cls(
            arch=arch, input_size=input_size, layers=layers, kept=kept, candidate_w_bits=candidate_w_bits,
            candidate_a_bits=candidate_a_bits,
            bops_searched_g=_optional_float(data, "bops_searched_g"), bops_total_g=_optional_float(data, "bops_total_g"),
            provenance=dict(provenance),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as indented JSON, atomically (temporary file + rename)."""
        from gmpq.utils import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read a policy JSON file; a missing, unreadable, non-UTF-8 or invalid file raises :class:`PolicyError`."""
        from gmpq.utils import read_user_text

        p = Path(path)
        text = read_user_text(p, "policy file", PolicyError)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy file {str(p)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            return cls.from_dict(data)
        except PolicyError as e:
            raise PolicyError(f"{p}: {e}") from None

    # ---------------------------------------------------------------- validation against a model
    def validate_layers(self, quantizable: Iterable[str]) -> None:
        """Check that the policy names exactly the quantizable layers ``quantizable`` of a model."""
        names = list(quantizable)
        present = set(names)
        for name in self.all_layers():
            if name not in present:
                hint = _closest(name, names)
                raise PolicyError(
                    f"policy layer {name!r} is not a quantizable layer (Conv2d/Linear) of the model"
                    + (f"; did you mean {hint!r}?" if hint else "")
                )
        listed = set(self.all_layers())
        for name in names:
            if name not in listed:
                raise PolicyError(
                    f"model layer {name!r} is missing from the policy; add it to 'layers' (searched) or 'kept'"
                )

    @property
    def mean_bits(self) -> tuple[float, float]:
        """Unweighted mean weight and activation bits over the searched layers."""
        if not self.layers:
            return (float("nan"), float("nan"))
        n = len(self.layers)
        return (sum(b.w_bits for b in self.layers.values()) / n, sum(b.a_bits for b in self.layers.values()) / n)


def as_policy(policy: Policy | Mapping[str, Any] | str | os.PathLike) -> Policy:
    """Accept a :class:`Policy`, a policy dict or a path to a policy JSON file."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(policy)
    if isinstance(policy, (str, os.PathLike)):
        return Policy.load(policy)
    raise PolicyError(f"expected a Policy, a dict or a path to a policy JSON file, got {type(policy).__name__}")


def describe_candidates(w_bits: Iterable[int], a_bits: Iterable[int]) -> str:
    """``candidate bits [2, 3, 4, 6]`` for one shared list, else ``candidate bits [2, 3, 4] (weights) and [3, 4]
    (activations)``: how messages and reports name a search's candidates."""
    w, a = list(w_bits), list(a_bits)
    return f"candidate bits {w}" if w == a else f"candidate bits {w} (weights) and {a} (activations)"


def _candidates(data: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The sorted, de-duplicated candidate list ``data[key]`` (default :data:`DEFAULT_CANDIDATE_BITS`), checked."""
    cands = data.get(key, list(DEFAULT_CANDIDATE_BITS))
    if not isinstance(cands, list) or not cands or not all(_is_bits(b) and b != FLOAT_BITS for b in cands):
        raise PolicyError(f"policy {key} must be a non-empty list of integers in {MIN_BITS}..{MAX_BITS}, "
                          f"got {cands!r}")
    return tuple(sorted(set(cands)))


def _is_bits(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (
        MIN_BITS <= value <= MAX_BITS or value == FLOAT_BITS)


def _typed(data: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise PolicyError(f"policy is missing the required field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PolicyError(f"policy field {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _optional_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PolicyError(f"policy field {key!r} must be a number or null, got {value!r}")
    return float(value)


def _parse_layers(raw: Any, section: str, allowed: tuple[set[int], set[int]] | None) -> dict[str, LayerBits]:
    """``{name: LayerBits}`` of a ``layers``/``kept`` object; ``allowed``: the (weight, activation) candidates, or
    ``None`` for any valid bits."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"policy field {section!r} must be an object mapping layer names to bits")
    out: dict[str, LayerBits] = {}
    for name, bits in raw.items():
        if not isinstance(bits, Mapping) or set(bits) != {"w_bits", "a_bits"}:
            raise PolicyError(f"{section} layer {name!r}: expected {{'w_bits': int, 'a_bits': int}}, got {bits!r}")
        for k, key in enumerate(("w_bits", "a_bits")):
            b = bits[key]
            if not _is_bits(b):
                raise PolicyError(f"{section} layer {name!r}: {key} must be an integer in {MIN_BITS}..{MAX_BITS} "
                                  f"or {FLOAT_BITS}, got {b!r}")
            if allowed is not None and b not in allowed[k]:
                raise PolicyError(f"{section} layer {name!r}: {key}={b} is not one of the candidate bits "
                                  f"{sorted(allowed[k])}")
        out[name] = LayerBits(bits["w_bits"], bits["a_bits"])
    return out


def _closest(name: str, options: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, options, n=1)
    return match[0] if match else None
