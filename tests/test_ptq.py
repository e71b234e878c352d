"""Post-training quantization (gmpq.ptq): learned rounding fitted block by block, on a tiny CIFAR ResNet-20 with a
few dozen 16x16 images and a few dozen iterations per block (seconds per test), and the ``gmpq ptq`` stage."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gmpq
from gmpq.cli import main
from gmpq.errors import ModelError, PolicyError
from gmpq.hub import write_model_dir
from gmpq.ptq import block_errors, fold_batchnorm, reconstruction_blocks
from gmpq.ptq import reconstruct as R
from gmpq.quant import QuantMixin
from gmpq.quant.rounding import LearnedRounding
from gmpq.recipes import PtqConfig, load_recipe

FAST = {"num_images": 64, "iters": 120, "batch_size": 16, "calibration_batch_size": 64, "qdrop": 0.0}


def float_model() -> nn.Module:
    """A ResNet-20 with random weights and BatchNorm statistics of a few random batches (not the identity)."""
    torch.manual_seed(0)
    model = gmpq.create_model("resnet20_cifar")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def fp() -> nn.Module:
    return float_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def w3a3(fp, images):
    policy = gmpq.uniform_policy(fp, 3, 3, kept_bits=4)  # every block low-bit (at 8 bits nearest is near-lossless)
    learned = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), progress=False)
    nearest = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), rounding="nearest", progress=False)
    return policy, learned, nearest


def test_reconstruction_lowers_every_block_error_on_held_out_images(fp, w3a3):
    _, learned, nearest = w3a3
    held_out = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before, after = block_errors(fp, nearest, held_out), block_errors(fp, learned, held_out)
    assert list(before) == [b.name for b in learned.gmpq_ptq.blocks]
    assert list(before)[:2] == ["conv1", "layer1.0"] and list(before)[-1] == "linear"
    for name in before:
        assert after[name] < before[name], name
    for block in learned.gmpq_ptq.blocks:  # on the fitting images too, as the report says
        assert block.iters == 120 and block.learned_error < block.nearest_error, block.name
    assert nearest.gmpq_ptq.blocks == [] and nearest.gmpq_ptq.rounding == "nearest"


def test_learned_rounding_moves_each_weight_at_most_one_step_from_its_floor(fp, w3a3):
    _, learned, nearest = w3a3
    float_layers = dict(fp.named_modules())
    moved = 0
    for name, layer in learned.named_modules():
        if isinstance(layer, QuantMixin):
            s = layer.wq.scale.detach().view(-1, *([1] * (layer.weight.dim() - 1)))
            q = 2 ** (layer.w_bits - 1) - 1
            codes = layer.weight.detach() / s
            assert torch.equal(codes, torch.round(codes).clamp(-q, q)) or torch.allclose(codes, torch.round(codes),
                                                                                         atol=1e-4)
            codes = torch.round(codes)
            floor = torch.floor(float_layers[name].weight.detach() / s)
            up = codes - floor
            inside = (floor >= -q) & (floor + 1 <= q)
            assert bool(((up == 0) | (up == 1))[inside].all()), name
            assert bool((codes.abs() <= q).all())
            nearest_codes = torch.round(float_layers[name].weight.detach() / s).clamp(-q, q)
            moved += int((codes != nearest_codes).sum())
    assert moved > 0  # the rounding did learn something other than round-to-nearest
    # the layers' own quantizers compute exactly these weights (what the export packs)
    layer = learned.get_submodule("layer2.0.conv1")
    assert torch.allclose(layer.quantized_weight(), layer.weight, rtol=0, atol=1e-6)


def test_at_32_bits_the_post_training_model_is_the_float_model(fp, images):
    policy = gmpq.uniform_policy(fp, 32, 32, kept_bits=32)
    q = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), progress=False)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), fp(x))
    assert all(b.iters == 0 for b in q.gmpq_ptq.blocks)


@pytest.mark.slow
def test_same_seed_same_model_bit_for_bit(fp, images, w3a3):
    policy, learned, _ = w3a3
    again = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), progress=False)
    other = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), seed=1, progress=False)
    a, b, c = learned.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_killed_reconstruction_resumes_at_the_block_it_stopped_in(fp, images, w3a3, tmp_path, monkeypatch):
    policy, learned, _ = w3a3
    fit = R._fit_block
    calls = []

    def dying(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(R, "_fit_block", dying)
    with pytest.raises(KeyboardInterrupt):
        gmpq.ptq(fp, policy, images, PtqConfig(**FAST), progress=False, state_dir=tmp_path)
    monkeypatch.setattr(R, "_fit_block", fit)
    resumed = gmpq.ptq(fp, policy, images, PtqConfig(**FAST), progress=False, state_dir=tmp_path)
    assert resumed.gmpq_ptq.resumed_at_block == 4 and len(resumed.gmpq_ptq.blocks) == 11
    a, b = learned.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same model as the uninterrupted run
    # other settings do not resume from that state: they start again cleanly
    fresh = gmpq.ptq(fp, policy, images, PtqConfig(**{**FAST, "iters": 5}), progress=False, state_dir=tmp_path)
    assert fresh.gmpq_ptq.resumed_at_block is None


def test_one_line_errors(fp, images):
    policy = gmpq.uniform_policy(fp, 4, 4)
    with pytest.raises(ModelError, match="asked for 64 calibration images but got 10") as e:
        gmpq.ptq(fp, policy, images[:10], PtqConfig(**FAST))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="nothing to quantize"):
        gmpq.ptq(nn.Sequential(nn.ReLU()), policy, images, PtqConfig(**FAST))
    other = gmpq.uniform_policy(gmpq.create_model("resnet32_cifar"), 4, 4, arch="resnet32_cifar")
    with pytest.raises(PolicyError, match="made for 'resnet32_cifar', not for 'resnet20_cifar'") as e:
        gmpq.ptq(fp, other, images, PtqConfig(**FAST))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="already quantized"):
        gmpq.ptq(gmpq.create_model("resnet20_cifar", policy=policy), policy, images, PtqConfig(**FAST))


def test_learned_rounding_starts_at_the_float_weight_and_anneals_to_codes():
    w = torch.randn(4, 3, 3, 3)
    s = w.abs().amax(dim=(1, 2, 3)) / 3
    r = LearnedRounding(w, s, 3)
    assert torch.allclose(r(), w, atol=1e-5)  # inside the clipping range, h(V) = frac(W / s)
    assert float(r.regulariser(2.0)) > 0
    codes = r.codes() - torch.floor(w / s.view(-1, 1, 1, 1))
    assert set(codes.unique().tolist()) <= {0.0, 1.0}
    r.hard = True
    assert torch.equal(r(), r.hard_weight())


def test_batchnorm_folding_keeps_the_function_and_the_state_dict_keys(fp, images):
    model = float_model()
    keys = set(model.state_dict())
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    pairs = fold_batchnorm(model, convs, images[:4])
    assert ("conv1", "bn1") in pairs and ("layer1.0.conv2", "layer1.0.bn2") in pairs and len(pairs) == 19
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model(images), fp(images), atol=1e-4, rtol=1e-4)
    q = gmpq.ptq(fp, gmpq.uniform_policy(fp, 4, 4), images, PtqConfig(**{**FAST, "iters": 5}), batchnorm="fold",
                 progress=False)
    assert len(q.gmpq_ptq.batchnorm_folded) == 19


def test_blocks_of_a_timm_mobilenet():
    model = gmpq.create_model("mobilenetv2_050", policy=None)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    blocks = reconstruction_blocks(model, torch.randn(1, 3, 64, 64))
    names = [b.name for b in blocks]
    assert names[0] == "conv_stem" and names[1] == "blocks.0.0" and names[-2:] == ["conv_head", "classifier"]
    assert [b.chained for b in blocks[:4]] == [False, False, True, True]
    assert sum(len(b.layers) for b in blocks) == len(gmpq.quantizable_layers(model))


def test_the_ptq_stage_and_verb_deploy_a_policy(tmp_path, capsys):
    from gmpq.stages import evaluate, finetune

    out = tmp_path / "run"
    write_model_dir(float_model(), tmp_path / "float", input_size=16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {{arch: resnet20_cifar, checkpoint: {tmp_path / 'float'}, deploy_input_size: 32}}
data: {{input_size: 16, batch_size: 16, max_train_samples: 96, max_eval_samples: 40}}
finetune: {{policy: w4a4}}
ptq: {{num_images: 48, iters: 5}}
output_dir: {out}
""")
    assert main(["ptq", str(recipe), "ptq.num_images=500"]) == 2
    assert "asked for 500 calibration images but got 96" in capsys.readouterr().err
    assert main(["ptq", str(recipe), "force=true"]) == 0
    metrics = finetune(load_recipe(recipe, ["finetune.mode=ptq", "force=true"]))
    assert metrics["mode"] == "ptq" and metrics["epochs"] == 0 and metrics["ptq_images"] == 48
    assert len(metrics["ptq_blocks"]) == 11 and (out / "finetune" / "ptq.png").stat().st_size > 0
    again = evaluate(out)
    assert again["top1"] == metrics["top1"] and again["precision"] == "quantized"
    card = tmp_path / "export"
    from gmpq.pipeline import export_run

    export_run(out, card)
    text = (card / "README.md").read_text()
    assert "Post-training quantization by `gmpq ptq`" in text and "48 calibration images" in text
    assert json.loads((out / "finetune" / "metrics.json").read_text())["ptq_rounding"] == "learned"
