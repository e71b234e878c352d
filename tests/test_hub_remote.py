"""Hugging Face Hub side of exports: loading from the HF cache (online layout, offline mode), clear errors when a
repo is neither local nor cached, and push_to_hub through a mocked HfApi."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

import gmpq
from gmpq.errors import CheckpointError
from gmpq.hub import format as F
from gmpq.policy import LayerBits

COMMIT = "0123456789abcdef0123456789abcdef01234567"



@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    policy = gmpq.uniform_policy(model, 4, 4)
    policy.layers = {n: LayerBits((2, 3, 4, 6)[i % 4], 4) for i, n in enumerate(policy.layers)}
    gmpq.quantize(model, policy)
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    out = tmp_path_factory.mktemp("remote") / "mbv2"
    gmpq.save_pretrained(model, out, card=False)
    return out


def fake_cache(cache: Path, repo_id: str, export: Path, commit: str = COMMIT) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(export, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_loads_from_the_hf_cache_by_repo_id_and_revision(export_dir: Path, tmp_path: Path) -> None:
    fake_cache(tmp_path / "cache", "someone/mbv2-w4", export_dir)
    x = torch.randn(2, 3, 32, 32)
    expected = gmpq.from_pretrained(export_dir)(x)
    for revision in (None, COMMIT):
        model = gmpq.from_pretrained("someone/mbv2-w4", revision=revision, local_files_only=True,
                                     cache_dir=tmp_path / "cache")
        assert torch.equal(model(x), expected)
    with pytest.raises(CheckpointError, match=r"cannot load 'someone/mbv2-w4' at revision 'v2'.*HF_HUB_OFFLINE"):
        gmpq.from_pretrained("someone/mbv2-w4", revision="v2", local_files_only=True, cache_dir=tmp_path / "cache")


def test_repo_ids_that_are_not_cached_or_invalid_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot load 'nobody/missing'.*not a local directory.*cache"):
        gmpq.from_pretrained("nobody/missing", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="neither a local export directory nor a valid Hugging Face repo id"):
        gmpq.from_pretrained("bad id!", local_files_only=True, cache_dir=tmp_path)


def test_offline_mode_and_hf_home_from_the_environment(export_dir: Path, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HOME are read by huggingface_hub at import: run in a fresh interpreter."""
    hf_home = tmp_path / "hf"
    fake_cache(hf_home / "hub", "someone/cached", export_dir)
    script = textwrap.dedent(f"""
        import torch, gmpq
        try:
            gmpq.from_pretrained("nobody/not-cached")
        except gmpq.CheckpointError as e:
            print("ERROR:", e)
        x = torch.randn(2, 3, 32, 32)
        same = torch.equal(gmpq.from_pretrained("someone/cached")(x), gmpq.from_pretrained({str(export_dir)!r})(x))
        print("CACHED-EQUAL:", same)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ERROR: cannot load 'nobody/not-cached'" in done.stdout
    assert str(hf_home / "hub") in done.stdout and "HF_HUB_OFFLINE=1" in done.stdout
    assert "CACHED-EQUAL: True" in done.stdout


class FakeHfApi:
    """Records create_repo / upload_folder and copies the uploaded folder to ``remote``."""

    remote: Path
    calls: list = []

    def __init__(self, token=None) -> None:
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, self.remote / repo_id)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeHfApi]:
    FakeHfApi.remote, FakeHfApi.calls = tmp_path / "remote", []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_uploads_a_verified_export_with_the_repo_id_on_its_card(
        export_dir: Path, fake_api: type[FakeHfApi]) -> None:
    url = gmpq.push_to_hub(export_dir, "someone/mbv2", token="t0k", private=True)
    assert url == f"https://huggingface.co/someone/mbv2/commit/{COMMIT}"
    kinds = [c[0] for c in fake_api.calls]
    assert kinds == ["init", "create_repo", "upload_folder"] and fake_api.calls[0][1] == "t0k"
    assert fake_api.calls[1][2]["exist_ok"] is True and fake_api.calls[1][2]["private"] is True
    assert fake_api.calls[1][2]["repo_type"] == "model"
    uploaded = fake_api.remote / "someone" / "mbv2"
    assert {p.name for p in uploaded.iterdir()} >= {F.WEIGHTS_FILE, F.POLICY_FILE, F.CONFIG_FILE, F.CARD_FILE}
    assert 'gmpq.from_pretrained("someone/mbv2")' in (uploaded / F.CARD_FILE).read_text()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(gmpq.from_pretrained(uploaded)(x), gmpq.from_pretrained(export_dir)(x))


def test_push_to_hub_exports_a_model_and_refuses_a_broken_export(
        export_dir: Path, fake_api: type[FakeHfApi], tmp_path: Path) -> None:
    model = gmpq.from_pretrained(export_dir)
    gmpq.push_to_hub(model, "someone/from-model", top1=12.5, dataset="cifar10_embedded")
    card = (fake_api.remote / "someone" / "from-model" / F.CARD_FILE).read_text()
    assert "12.50 %" in card and 'gmpq.from_pretrained("someone/from-model")' in card
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    config = json.loads((broken / F.CONFIG_FILE).read_text())
    config["format_version"] = 7
    (broken / F.CONFIG_FILE).write_text(json.dumps(config))
    calls = len(fake_api.calls)
    with pytest.raises(CheckpointError, match="format_version 7"):
        gmpq.push_to_hub(broken, "someone/broken")
    assert len(fake_api.calls) == calls   # nothing was uploaded
