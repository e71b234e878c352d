"""Policy: JSON round trip and every validation error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gmpq
from gmpq import Policy, PolicyError


@pytest.fixture(scope="module")
def resnet18():
    return gmpq.create_model("resnet18_cifar", num_classes=10)


def _policy(model) -> Policy:
    policy = gmpq.uniform_policy(model, 4, 3)
    policy.layers["layer1.0.conv1"] = gmpq.LayerBits(2, 6)
    policy.provenance = {"dataset": "cifar10", "seed": 0, "gmpq_version": gmpq.__version__}
    policy.bops_searched_g, policy.bops_total_g = 1.5, 2.5
    return policy


def test_json_round_trip(tmp_path, resnet18) -> None:
    policy = _policy(resnet18)
    path = policy.save(tmp_path / "p.json")
    loaded = Policy.load(path)
    assert loaded == policy
    assert json.loads(path.read_text())["schema_version"] == 1
    assert loaded.kept == {"conv1": gmpq.LayerBits(8, 8), "fc": gmpq.LayerBits(8, 8)}


def test_separate_candidates_round_trip_as_schema_version_2(tmp_path, resnet18) -> None:
    """A policy whose weight and activation candidates differ is written in version 2 with both lists; equal lists
    keep version 1's single ``candidate_bits`` (what older gmpq reads)."""
    policy = _policy(resnet18)
    policy.candidate_w_bits, policy.candidate_a_bits = (2, 3, 4, 6), (3, 4, 6)
    policy.layers = {n: gmpq.LayerBits(2, 3) for n in policy.layers}
    data = json.loads(policy.save(tmp_path / "p.json").read_text())
    assert data["schema_version"] == 2 and "candidate_bits" not in data
    assert (data["candidate_w_bits"], data["candidate_a_bits"]) == ([2, 3, 4, 6], [3, 4, 6])
    assert Policy.load(tmp_path / "p.json") == policy
    policy.candidate_a_bits = policy.candidate_w_bits
    assert policy.to_dict()["schema_version"] == 1 and policy.to_dict()["candidate_bits"] == [2, 3, 4, 6]
    data["layers"]["layer1.0.conv1"] = {"w_bits": 3, "a_bits": 2}  # 2 is a weight candidate, not an activation one
    with pytest.raises(PolicyError, match=r"'layer1.0.conv1': a_bits=2 is not one of the candidate bits \[3, 4, 6\]"):
        Policy.from_dict(data)
    data["candidate_bits"] = [2, 3, 4, 6]  # version 1's field in a version 2 file
    with pytest.raises(PolicyError, match=r"unknown field\(s\) \['candidate_bits'\].*schema version 2"):
        Policy.from_dict(data)


def test_policy_files_of_schema_version_1_still_load() -> None:
    """A policy written before separate candidates existed (a published hub model's): one list for both."""
    path = Path(__file__).resolve().parents[1] / "hub" / "resnet20_cifar-gmpq-0.28g" / "policy.json"
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and "candidate_w_bits" not in data
    policy = Policy.load(path)
    assert policy.candidate_w_bits == policy.candidate_a_bits == tuple(data["candidate_bits"])
    assert policy.to_dict() == data  # written back exactly as it was read


def test_apply_policy_sets_bits_per_layer(resnet18) -> None:
    policy = _policy(resnet18)
    model = gmpq.create_model("resnet18_cifar", num_classes=10, policy=policy)
    layers = gmpq.quantizable_layers(model)
    assert (layers["layer1.0.conv1"].w_bits, layers["layer1.0.conv1"].a_bits) == (2, 6)
    assert (layers["layer2.0.conv2"].w_bits, layers["layer2.0.conv2"].a_bits) == (4, 3)
    assert (layers["fc"].w_bits, layers["conv1"].a_bits) == (8, 8)
    assert model.gmpq_policy is policy


def test_policy_transfers_between_cifar_variant_and_base_arch(resnet18) -> None:
    model = gmpq.create_model("resnet18", num_classes=10, policy=_policy(resnet18))
    assert gmpq.quantizable_layers(model)["layer1.0.conv1"].w_bits == 2


def test_kept_bits_override_allows_float_kept_layers(resnet18) -> None:
    model = gmpq.create_model("resnet18_cifar", num_classes=10, policy=_policy(resnet18), kept_bits=32)
    assert gmpq.quantizable_layers(model)["fc"].w_bits == 32


def _mutated(model, mutate) -> dict:
    data = _policy(model).to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["layers"].__setitem__("layer9.0.conv1", {"w_bits": 4, "a_bits": 4}), "'layer9.0.conv1' is not a"),
        (lambda d: d["layers"].pop("layer3.1.conv2"), "'layer3.1.conv2' is missing"),
        (lambda d: d["layers"].__setitem__("layer1.0.conv1", {"w_bits": 5, "a_bits": 4}), "not one of the candidate"),
        (lambda d: d["layers"].__setitem__("layer1.0.conv1", {"w_bits": "4", "a_bits": 4}), "w_bits must be an integer"),
        (lambda d: d["layers"].__setitem__("layer1.0.conv1", {"w_bits": 4}), "expected {'w_bits'"),
        (lambda d: d["kept"].__setitem__("fc", {"w_bits": 1, "a_bits": 8}), "kept layer 'fc'"),
        (lambda d: d.__setitem__("schema_version", 99), "schema_version 99 is not supported"),
        (lambda d: d.__setitem__("input_size", "224"), "'input_size' must be int"),
        (lambda d: d.pop("arch"), "missing the required field 'arch'"),
        (lambda d: d.__setitem__("colour", "red"), "unknown field"),
        (lambda d: d["kept"].__setitem__("layer1.0.conv1", {"w_bits": 8, "a_bits": 8}), "both as searched"),
        (lambda d: d.__setitem__("candidate_bits", [2, 32]), "candidate_bits"),
    ],
    ids=["unknown-layer", "missing-layer", "bits-not-candidate", "wrong-type", "bad-entry", "bad-kept-bits",
         "schema-version", "input-size-type", "missing-arch", "unknown-field", "searched-and-kept", "bad-candidates"],
)
def test_validation_errors_name_the_layer_and_problem(resnet18, mutate, message) -> None:
    data = _mutated(resnet18, mutate)
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace("{", r"\{")):
        gmpq.quantize(gmpq.create_model("resnet18_cifar", num_classes=10), data)


def test_unknown_layer_error_suggests_the_closest_name(resnet18) -> None:
    data = _mutated(resnet18, lambda d: d["layers"].__setitem__("layer1.0.conv1x", d["layers"].pop("layer1.0.conv1")))
    with pytest.raises(PolicyError, match="did you mean 'layer1.0.conv1'"):
        gmpq.quantize(gmpq.create_model("resnet18_cifar", num_classes=10), data)


def test_load_reports_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(bad)


def test_quantizing_twice_is_refused(resnet18) -> None:
    model = gmpq.create_model("resnet18_cifar", num_classes=10, policy=_policy(resnet18))
    with pytest.raises(gmpq.ModelError, match="layer 'conv1' is already quantized"):
        gmpq.quantize(model, _policy(resnet18))


def test_saved_files_get_the_default_permissions(tmp_path) -> None:
    """Text and safetensors files (safetensors re-creates its output file) are world-readable like open()'s."""
    import os

    import torch
    from safetensors.torch import save_file

    from gmpq.utils import atomic_write, atomic_write_text

    mask = os.umask(0o022)
    try:
        paths = [atomic_write_text(tmp_path / "x.json", "{}"),
                 atomic_write(tmp_path / "m.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))]
    finally:
        os.umask(mask)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o644, 0o644]
