"""Training engine building blocks: scheduler, optimizer, evaluation, model files, checkpoints, run logs, KD loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gmpq
from gmpq.errors import CheckpointError, RecipeError
from gmpq.hub import load_model_dir, read_state_dict, write_model_dir
from gmpq.recipes import TrainConfig, load_recipe
from gmpq.stages import model_size_mb
from gmpq.train import (
    CheckpointManager,
    MetricsLogger,
    build_optimizer,
    build_scheduler,
    distillation_loss,
    evaluate,
    init_from_checkpoint,
    make_accelerator,
    prepare_output_dir,
    write_metrics_json,
    write_run_info,
)

ARCH = "test_resnet"  # timm's tiny test ResNet: 16 quantizable layers, ~4 M MACs at 32x32


def recipe(tmp_path, *overrides):
    return load_recipe(None, [f"model.arch={ARCH}", f"output_dir={tmp_path / 'run'}", *overrides])


def lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1, schedule="cosine")
    values = lrs(cfg, 10)
    assert values[0] == pytest.approx(0.01) and values[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert values[-1] < 0.01 and all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_step_schedule():
    values = lrs(TrainConfig(epochs=5, lr=1.0, schedule="step", step_size=2, gamma=0.1), 3)
    assert values[:6] == pytest.approx([1.0] * 6)
    assert values[6:12] == pytest.approx([0.1] * 6) and values[12:] == pytest.approx([0.01] * 3)


def test_optimizer_decays_only_weights():
    model = gmpq.create_model(ARCH, num_classes=10, policy=None)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="sgd", momentum=0.8))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    clips = {id(m.aq.clip) for m in model.modules() if isinstance(m, gmpq.quant.QuantMixin)}
    assert clips <= {id(p) for p in plain["params"]}
    assert opt.defaults["momentum"] == 0.8
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", momentum=0.85))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.85, 0.999)


class TableModel(nn.Module):
    """Returns row ``x`` of a fixed logits table (x is an index)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def test_evaluate_counts_exactly(tmp_path):
    torch.manual_seed(1)
    n, classes = 23, 7
    logits = torch.randn(n, classes)
    labels = torch.randint(0, classes, (n,))
    loader = DataLoader(TensorDataset(torch.arange(n), labels), batch_size=5)
    top5 = logits.topk(5, dim=1).indices
    expected = {"top1": 100 * (logits.argmax(1) == labels).float().mean().item(),
                "top5": 100 * (top5 == labels[:, None]).any(1).float().mean().item(),
                "loss": F.cross_entropy(logits, labels).item(), "num_samples": n}
    model = TableModel(logits)
    got = evaluate(model, loader)
    assert got == pytest.approx(expected)
    accelerator = make_accelerator(recipe(tmp_path))
    prepared_model, prepared_loader = accelerator.prepare(TableModel(logits), loader)
    assert evaluate(prepared_model, prepared_loader, accelerator) == pytest.approx(expected)
    assert model.training  # mode restored


def trained_like(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial statistics so that round trips are meaningful."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_float_model_round_trip(tmp_path):
    model = trained_like(gmpq.create_model(ARCH, num_classes=10))
    path = write_model_dir(model, tmp_path / "m", input_size=32, extra={"data": {"dataset": "cifar10_embedded"}})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "gmpq" and cfg["weights"] == "float" and cfg["arch"] == ARCH and cfg["num_classes"] == 10
    assert cfg["data"]["dataset"] == "cifar10_embedded" and cfg["input_size"] == [3, 32, 32]
    assert list(cfg["files"]) == ["model.safetensors"]  # no policy: a float model
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    loaded = gmpq.from_pretrained(path)
    assert torch.equal(torch.get_rng_state(), rng), "loading leaves the caller's random numbers alone"
    assert torch.equal(loaded(x), model(x)) and loaded.gmpq_input_size == 32
    assert getattr(loaded, "gmpq_policy", None) is None


def test_quantized_model_round_trip_keeps_the_training_state(tmp_path):
    model = trained_like(gmpq.create_model(ARCH, num_classes=10))
    gmpq.quantize(model, gmpq.uniform_policy(model, 3, 4))
    gmpq.calibrate(model, [torch.randn(8, 3, 32, 32)])
    path = write_model_dir(model, tmp_path / "q")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "policy.json"]
    loaded = load_model_dir(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.gmpq_policy.layers == model.gmpq_policy.layers
    stored = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())  # latent weights, as trained


def test_model_directory_errors(tmp_path):
    model = gmpq.create_model(ARCH, num_classes=10)
    path = write_model_dir(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a gmpq model directory"):
        load_model_dir(tmp_path)
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_dir(path)
    (path / "config.json").write_text(json.dumps({"format": "pickle", "arch": ARCH}))
    with pytest.raises(CheckpointError, match="not a gmpq model config"):
        load_model_dir(path)
    other = write_model_dir(gmpq.create_model(ARCH, num_classes=5), tmp_path / "o")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_kwargs": {"num_classes": 10, "in_chans": 3}}))
    with pytest.raises(CheckpointError, match=r"'fc\.(weight|bias)'.*shape \[5.*needs \[10"):
        load_model_dir(other)


def test_directories_of_gmpq_0_1_training_stages_still_load(tmp_path):
    """Format version 0: config 'gmpq-float' / 'gmpq-quantized', a plain state dict, no file hashes."""
    model = trained_like(gmpq.create_model(ARCH, num_classes=10))
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    gmpq.calibrate(model, [torch.randn(8, 3, 32, 32)])
    old = tmp_path / "finetune" / "model"
    old.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"),
              metadata={"format": "pt"})
    model.gmpq_policy.save(old / "policy.json")
    (old / "config.json").write_text(json.dumps({"schema_version": 1, "format": "gmpq-quantized", "arch": ARCH,
                                                 "num_classes": 10, "input_size": 32}))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_model_dir(old)(x), model.eval()(x))
    assert read_state_dict(old).keys() == model.state_dict().keys()


def test_init_from_checkpoint_sources(tmp_path):
    source = trained_like(gmpq.create_model(ARCH, num_classes=10))
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    write_model_dir(source, tmp_path / "run" / "pretrain" / "model")
    for src in (tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "run"):
        target = gmpq.create_model(ARCH, num_classes=10)
        report = init_from_checkpoint(target, str(src))
        assert report == {"skipped_shape": [], "missing": []}
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    other_head = gmpq.create_model(ARCH, num_classes=3)
    report = init_from_checkpoint(other_head, str(tmp_path / "w.safetensors"))
    assert sorted(report["skipped_shape"]) == ["fc.bias", "fc.weight"]
    with pytest.raises(CheckpointError, match="shares no weight"):
        init_from_checkpoint(nn.Sequential(nn.Linear(2, 2)), str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="neither an existing file/directory nor a Hub id"):
        init_from_checkpoint(other_head, str(tmp_path / "absent.safetensors"))


def test_checkpoint_manager_is_atomic_and_prunes(tmp_path):
    accelerator = make_accelerator(recipe(tmp_path))
    model = accelerator.prepare(nn.Linear(3, 2))
    manager = CheckpointManager(tmp_path / "ckpt", accelerator, keep=2)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        manager.save(epoch, {"epoch": epoch, "history": [{"epoch": epoch}]})
    assert manager.epochs() == [2, 3] and not list((tmp_path / "ckpt").glob(".tmp-*"))
    (tmp_path / "ckpt" / "epoch_0009").mkdir()  # an incomplete checkpoint (no trainer_state.json) is ignored
    with torch.no_grad():
        model.weight.zero_()
    state = manager.load_latest()
    assert state["epoch"] == 3 and torch.all(model.weight == 3)


def test_run_logs(tmp_path):
    history = [{"epoch": 1, "train_loss": 2.5, "eval_top1": 10.0}, {"epoch": 2, "train_loss": 1.25, "eval_top1": 30.0}]
    MetricsLogger(tmp_path).write(history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == history
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "epoch,train_loss,eval_top1" and csv_lines[2] == "2,1.25,30"
    write_metrics_json(tmp_path, {"top1": 1.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"top1": 1.5}
    r = recipe(tmp_path, "seed=4")
    write_run_info(tmp_path, r, make_accelerator(r))
    assert load_recipe(tmp_path / "recipe.yaml") == r
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__ and "device" in env


def test_output_dir_rules(tmp_path):
    out = tmp_path / "stage"
    assert prepare_output_dir(out, resume=False, force=False) is False and out.is_dir()
    (out / "checkpoints").mkdir()
    with pytest.raises(RecipeError, match="already holds a run; pass resume=true.*force=true"):
        prepare_output_dir(out, resume=False, force=False)
    assert prepare_output_dir(out, resume=True, force=False) is False  # unfinished: continue
    (out / "metrics.json").write_text("{}")
    assert prepare_output_dir(out, resume=True, force=False) is True  # finished: reuse
    assert prepare_output_dir(out, resume=False, force=True) is False and not any(out.iterdir())


def test_distillation_loss():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ce, _ = distillation_loss(teacher, 0.0)(student, x, y)
    assert ce.item() == pytest.approx(F.cross_entropy(student(x), y).item())
    kd, _ = distillation_loss(student, 1.0)(student, x, y)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)
    mixed, _ = distillation_loss(teacher, 0.5)(student, x, y)
    kl = F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True, reduction="batchmean")
    assert mixed.item() == pytest.approx(0.5 * ce.item() + 0.5 * kl.item(), rel=1e-5)


def test_model_size_counts_quantized_weights_at_their_bits():
    model = gmpq.create_model(ARCH, num_classes=10)
    float_mb = model_size_mb(model)
    assert float_mb == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 1e6)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4, kept_bits=32))
    layers = gmpq.quantizable_layers(model)
    kept = set(gmpq.kept_layer_names(model))
    saved_bits = sum(m.weight.numel() * (32 - 4) for n, m in layers.items() if n not in kept)
    assert model_size_mb(model) == pytest.approx(float_mb - saved_bits / 8 / 1e6)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    from gmpq.train import fit

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    weights = []
    for batch, accum in ((16, 1), (8, 2)):
        r = recipe(tmp_path, f"pretrain.grad_accum={accum}")
        cfg = TrainConfig(epochs=2, lr=0.5, momentum=0.0, weight_decay=0.0, grad_accum=accum)
        accelerator = make_accelerator(r, cfg)
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(0))
        result = fit(model, train, DataLoader(TensorDataset(x, y), batch_size=32), cfg, accelerator,
                     tmp_path / f"b{batch}")
        assert [row["epoch"] for row in result.history] == [1, 2] and result.final["num_samples"] == 64
        weights.append(accelerator.unwrap_model(model).weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def _fit_linear(tmp_path, name, **cfg_kwargs):
    from gmpq.train import fit

    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    cfg = TrainConfig(**{"epochs": 1, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, **cfg_kwargs})
    accelerator = make_accelerator(recipe(tmp_path), cfg)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True)
    fit(model, loader, DataLoader(TensorDataset(x, y), batch_size=16), cfg, accelerator, tmp_path / name)
    return start, accelerator.unwrap_model(model).state_dict()


def test_max_grad_norm_clips_the_update(tmp_path):
    start, free = _fit_linear(tmp_path, "free")
    _, clipped = _fit_linear(tmp_path, "clipped", max_grad_norm=1e-4)
    moved = lambda state: (state["3.weight"] - start["3.weight"]).abs().max().item()  # noqa: E731
    assert moved(clipped) <= 4 * 0.1 * 1e-4 + 1e-7 < moved(free)  # 4 steps of at most lr * max_norm


def test_freeze_bn_keeps_running_statistics(tmp_path):
    from gmpq.recipes import FinetuneConfig
    from gmpq.train import fit

    start, trained = _fit_linear(tmp_path, "bn")
    assert not torch.equal(trained["1.running_mean"], start["1.running_mean"])  # normally they move
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, freeze_bn=True)
    accelerator = make_accelerator(recipe(tmp_path), cfg)
    fit(model, DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True), DataLoader(TensorDataset(x, y)),
        cfg, accelerator, tmp_path / "frozen")
    after = accelerator.unwrap_model(model).state_dict()
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert torch.equal(after["1.running_var"], before["1.running_var"])
    assert not torch.equal(after["1.weight"], before["1.weight"])  # the affine parameters still train


def test_divergence_stops_with_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="training diverged.*lower the learning rate.*freeze_bn"):
        _fit_linear(tmp_path, "boom", lr=1e30, epochs=3)


def test_a_training_step_sees_every_optimizer_step_and_keeps_its_state_across_resume(tmp_path):
    """The step hook of the one loop: optimizers and schedules over the total step count, on_step_end after each
    optimizer step (not after accumulating batches), its state in every checkpoint, a named lr per optimizer."""
    from gmpq.train import Progress, ScheduledOptimizer, StepOutput, TrainingStep, fit, lr_factor

    class Recorder(TrainingStep):
        def __init__(self):
            self.seen: list[Progress] = []
            self.counter = 0

        def configure_optimizers(self, model, steps_per_epoch, total_steps):
            self.total = total_steps
            opt_a = torch.optim.SGD([model.weight], lr=0.1)
            opt_b = torch.optim.Adam([model.bias], lr=0.01)
            cosine = lr_factor("cosine", steps_per_epoch, total_steps)
            return [ScheduledOptimizer("w", opt_a, torch.optim.lr_scheduler.LambdaLR(opt_a, cosine)),
                    ScheduledOptimizer("b", opt_b, torch.optim.lr_scheduler.LambdaLR(opt_b, cosine))]

        def __call__(self, model, images, labels):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            return StepOutput(loss, logits, {"loss": loss})

        def on_step_end(self, out, progress):
            self.seen.append(progress)
            self.counter += 1

        def epoch_summary(self):
            return {"counter": self.counter}

        def state_dict(self):
            return {"counter": self.counter}

        def load_state_dict(self, state):
            self.counter = state["counter"]

    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    cfg = TrainConfig(epochs=2, grad_accum=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)
    step = Recorder()
    result = fit(nn.Linear(5, 3), loader, None, cfg, make_accelerator(recipe(tmp_path), cfg), tmp_path / "s",
                 step=step)
    assert step.total == 8 and [p.step for p in step.seen] == list(range(1, 9))  # 8 batches / 2 per step, 2 epochs
    assert [p.epoch for p in step.seen] == [0] * 4 + [1] * 4 and step.seen[-1].fraction == 1.0
    assert [r["counter"] for r in result.history] == [4, 8] and result.final == {}
    assert set(result.history[0]) == {"epoch", "loss", "train_top1", "lr_w", "lr_b", "steps", "counter", "epoch_s"}
    assert result.history[0]["lr_w"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    resumed = Recorder()
    cfg3 = TrainConfig(epochs=3, grad_accum=2)
    again = fit(nn.Linear(5, 3), loader, None, cfg3, make_accelerator(recipe(tmp_path), cfg3), tmp_path / "s",
                step=resumed, resume=True)
    assert again.resumed_from == 2 and resumed.counter == 12 and [p.step for p in resumed.seen] == [9, 10, 11, 12]
