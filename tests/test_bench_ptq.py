"""tools/bench_ptq.py on a tiny configuration: one record per block with the ratios tools/bench_record.py reads,
a bad block recorded as an error while the others still run, and the blocks' quantizers put back afterwards."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str):
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def test_records_each_block_and_an_error_for_a_bad_one(tmp_path):
    out = tmp_path / "ptq.json"
    cmd = [sys.executable, str(TOOLS / "bench_ptq.py"), "--arch", "resnet20_cifar", "--blocks", "layer1.0", "nope",
           "--images", "8", "--batch", "4", "--size", "16", "--repeats", "1", "--warmup", "1", "--threads", "1",
           "--quiet", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            cwd=TOOLS.parent)  # conftest's GMPQ_FUSED_BACKEND=eager reaches the child
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["step"]: r for r in json.loads(out.read_text())["results"]}
    block = records["layer1.0"]
    assert "error" not in block, block
    assert block["time_ratio"] > 0 and block["memory_ratio"] > 0 and block["step_s"] > 0 and block["batch"] == 4
    assert "nope" in records["nope"]["error"]


def test_the_reconstruction_iteration_is_the_block_fit_and_restores_the_quantizers():
    import gmpq
    from gmpq.ptq.blocks import capture
    from gmpq.quant import calibrate
    from gmpq.recipes import PtqConfig

    bench = _tool("bench_ptq")
    torch.manual_seed(0)
    model = gmpq.create_model("resnet20_cifar", num_classes=10).eval()
    x = torch.randn(8, 3, 16, 16)
    q = gmpq.quantize(model, gmpq.uniform_policy(model, 3, 3)).eval()
    calibrate(q, [x])
    q.requires_grad_(False)
    layer = q.get_submodule("layer1.0.conv1")
    wq, aq = layer.wq, layer.aq
    cfg = PtqConfig(batch_size=4)
    inputs = capture(q, "layer1.0", x, 8, "input")
    step, objects, fit = bench.reconstruction_iteration(q, "layer1.0", inputs, torch.zeros(8, 16, 16, 16), cfg, 0)
    assert layer.wq is not wq and layer.aq is not aq  # learned rounding and QDrop in place while it is fitted
    before = fit.rounding[0][1].v.detach().clone()
    step()
    assert not torch.equal(fit.rounding[0][1].v, before)  # Adam moved the rounding variables
    fit.close()
    assert layer.wq is wq and layer.aq is aq
