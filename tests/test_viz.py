"""Figures: policy bars, search-run curves and heatmaps, run comparison table and scatter, and their CLI verbs."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest

import gmpq
from gmpq.cli import main
from gmpq.errors import PolicyError, RunError
from gmpq.models.structure import layer_roles
from gmpq.policy import LayerBits, Policy
from gmpq.viz import (
    compare_runs,
    format_compare_table,
    plot_compare,
    plot_policies,
    plot_search,
    policy_layers,
    read_search_log,
    search_trace,
)
from gmpq.viz.policy import policy_title

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BITS = [2, 3, 4, 6]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    return struct.unpack(">II", data[16:24])


def random_policy(arch: str, seed: int, proxy: str = "cifar10", kept_bits: int = 8,
                  bops_searched_g: float | None = None) -> Policy:
    base = gmpq.uniform_policy(gmpq.create_model(arch), 4, 4, kept_bits=kept_bits)
    rng = random.Random(seed)
    layers = {n: LayerBits(rng.choice(BITS), rng.choice(BITS)) for n in base.layers}
    return Policy(arch=base.arch, input_size=base.input_size, layers=layers, kept=base.kept,
                  bops_searched_g=bops_searched_g,
                  provenance={"proxy_dataset": proxy, "strategy": "gmpq", "budget_g": 15.3})


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ layer roles
def test_layer_roles_resnet18_shortcuts_are_the_papers_layers_7_12_17():
    roles = layer_roles(gmpq.create_model("resnet18"))
    assert [i for i, r in enumerate(roles) if r.shortcut] == [7, 12, 17]
    assert roles[7].name == "layer2.0.downsample.0" and roles[7].block == "layer2.0"
    assert all(r.skip for r in roles[1:-1]) and not roles[0].skip and roles[0].block is None
    assert {r.kind for r in roles} == {"conv", "linear"}


def test_layer_roles_mobilenetv2_depthwise_and_skip_blocks():
    model = gmpq.create_model("mobilenetv2_100")
    roles = {r.name: r for r in layer_roles(model)}
    assert len(roles) == 53
    modules = dict(model.named_modules())
    for name, role in roles.items():
        m = modules[name]
        is_dw = getattr(m, "groups", 1) > 1 and m.groups == m.in_channels
        assert (role.kind == "dwconv") == is_dw, name
    assert not roles["blocks.1.0.conv_pw"].skip and roles["blocks.1.1.conv_pw"].skip  # stride-2 vs repeat block
    assert not any(r.shortcut for r in roles.values())


# ------------------------------------------------------------------------------------------------ policy figure
def test_plot_policies_three_archs_50_plus_layers(tmp_path):
    policies = [random_policy("mobilenetv2_100", 1, bops_searched_g=7.3),
                random_policy("resnet18", 2, kept_bits=32, bops_searched_g=15.2),
                random_policy("resnet50", 3, bops_searched_g=30.1)]
    out = plot_policies(policies, tmp_path / "archs.png")
    assert out == tmp_path / "archs.png"
    width, height = png_size(out)
    assert width >= 0.19 * 54 * 150  # widens with the 54 layers of resnet50 (150 dpi)
    assert no_temp_files(tmp_path)


def test_plot_policies_same_arch_panels_mirror_style_and_paths(tmp_path):
    paths = []
    for i, proxy in enumerate(["cifar10", "cars", "flowers"]):
        paths.append(random_policy("resnet18", i, proxy=proxy, bops_searched_g=15.0).save(tmp_path / f"{proxy}.json"))
    one = png_size(plot_policies(paths[:1], tmp_path / "one.png"))
    three = png_size(plot_policies(paths, tmp_path / "three.png", style="mirror", title="three proxies"))
    assert three[1] > 2 * one[1]  # one panel per policy
    svg = plot_policies(paths[0], tmp_path / "one.svg", labels=["custom"])
    assert svg.read_text().lstrip().startswith("<?xml")


def test_policy_layers_order_kept_and_title_bops():
    policy = random_policy("resnet18_cifar", 5)  # 32x32: MACs traced in milliseconds
    layers = policy_layers(policy)
    assert [p.role.name for p in layers][0] == "conv1" and layers[-1].role.name == "fc"
    assert layers[0].kept and layers[-1].kept and not any(p.kept for p in layers[1:-1])
    assert all((p.w_bits, p.a_bits) == (policy.layers[p.role.name].w_bits, policy.layers[p.role.name].a_bits)
               for p in layers[1:-1])
    # BOPs missing from the policy are computed from the model's MACs, as count_bops does
    expected = gmpq.count_bops(gmpq.create_model("resnet18_cifar", policy=policy)).bops_searched_g
    title = policy_title(policy)
    assert f"BOPs searched {expected:.2f} G" in title and "cifar10" in title and "budget 15.3 G" in title
    policy.bops_searched_g, policy.bops_total_g = 14.9, 16.2  # the policy's own figures win
    assert "BOPs searched 14.90 G / total 16.20 G" in policy_title(policy)


def test_plot_policies_rejects_a_policy_of_another_arch(tmp_path):
    policy = random_policy("resnet18", 0)
    policy.arch = "resnet50"
    with pytest.raises(PolicyError, match="missing from the policy|not a quantizable layer"):
        plot_policies(policy, tmp_path / "bad.png")


def test_plot_policies_unbuildable_arch_falls_back_to_names(tmp_path):
    policy = random_policy("resnet18", 0)
    policy.arch = "no_such_arch_for_gmpq"
    with pytest.warns(UserWarning, match="from their names only"):
        layers = policy_layers(policy)
    assert [p.index for p in layers if p.role.shortcut] == [7, 12, 17]
    assert layers[0].role.name == "conv1" and layers[-1].role.name == "fc"
    with pytest.warns(UserWarning):
        png_size(plot_policies(policy, tmp_path / "names.png"))


def test_plot_bad_suffix(tmp_path):
    with pytest.raises(RunError, match=r"\.png"):
        plot_policies(random_policy("resnet18", 0), tmp_path / "fig.jpeg")


# ------------------------------------------------------------------------------------------------ search figure
def write_search_log(path: Path, layers: list[str], epochs: int, budget: float = 7.4, seed: int = 0,
                     w_bits: tuple[int, ...] = BITS, a_bits: tuple[int, ...] = BITS, legacy: bool = False) -> Path:
    """A log in the search loop's format: one JSON object per epoch, probabilities sharpening towards a target
    (``legacy``: the format before separate candidates, one ``bits`` list for both)."""
    rng = random.Random(seed)
    candidates = {"w": w_bits, "a": a_bits}
    target = {n: (rng.randrange(len(w_bits)), rng.randrange(len(a_bits))) for n in layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in range(epochs):
            t = e / max(1, epochs - 1)
            probs = {}
            for n in layers:
                entry = {}
                for k, key in enumerate("wa"):
                    logits = [4 * t * (i == target[n][k]) + rng.gauss(0, 0.1) for i in range(len(candidates[key]))]
                    z = sum(math.exp(v) for v in logits)
                    entry[key] = [math.exp(v) / z for v in logits]
                probs[n] = entry
            policy = {n: [w_bits[max(range(len(w_bits)), key=probs[n]["w"].__getitem__)],
                          a_bits[max(range(len(a_bits)), key=probs[n]["a"].__getitem__)]] for n in layers}
            record = dict(epoch=e, loss=2.0 - t, loss_ce=1.5 - t, loss_attr=0.4 * (1 - t), loss_complexity=0.1 * (1 - t),
                          expected_bops_g=budget * (1.5 - 0.5 * t), budget_g=budget, decoded_bops_g=0.98 * budget,
                          alpha_entropy=1.38 * (1 - t), p=3.0, lr_w=0.1, lr_alpha=0.01, train_top1=20 + 60 * t,
                          policy=policy, probs=probs, **({"bits": BITS} if legacy else {"w_bits": w_bits,
                                                                                         "a_bits": a_bits}))
            f.write(json.dumps(record) + "\n")
    return path


def test_plot_search_from_stage_and_pipeline_dirs(tmp_path):
    searched = gmpq.searchable_layer_names(gmpq.create_model("mobilenetv2_100"))
    write_search_log(tmp_path / "stage" / "search_log.jsonl", searched, epochs=6)
    width, height = png_size(plot_search(tmp_path / "stage", tmp_path / "search.png"))
    assert height > 0.13 * len(searched) * 150  # one heatmap row per layer
    write_search_log(tmp_path / "pipe" / "search" / "search_log.jsonl", ["a.conv", "b.conv"], epochs=1)
    png_size(plot_search(tmp_path / "pipe", tmp_path / "pipe.png"))


def test_search_trace_expected_bits_and_resume_duplicates(tmp_path):
    log = write_search_log(tmp_path / "search_log.jsonl", ["l1", "l2"], epochs=3)
    lines = log.read_text().splitlines()
    one_hot = json.loads(lines[1])
    one_hot["probs"]["l1"] = {"w": [0, 0, 0, 1], "a": [0.5, 0.5, 0, 0]}
    log.write_text("\n".join(lines + [json.dumps(one_hot)]) + "\n")  # a resumed run re-logs epoch 1
    records = read_search_log(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    trace = search_trace(records)
    assert trace.expected_w[0][1] == pytest.approx(6.0) and trace.expected_a[0][1] == pytest.approx(2.5)
    assert trace.layers == ["l1", "l2"] and trace.series["budget_g"] == [7.4] * 3
    assert set(trace.decoded) == {"l1", "l2"}


def test_search_trace_reads_separate_candidates_and_older_logs(tmp_path):
    log = write_search_log(tmp_path / "new" / "search_log.jsonl", ["l1"], epochs=2, w_bits=(2, 3, 4), a_bits=(3, 8))
    lines = log.read_text().splitlines()
    record = json.loads(lines[1])
    record["probs"]["l1"] = {"w": [0, 0, 1], "a": [0.5, 0.5]}
    log.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    trace = search_trace(read_search_log(log))
    assert (trace.w_bits, trace.a_bits) == ([2, 3, 4], [3, 8])
    assert trace.expected_w[0][1] == pytest.approx(4.0) and trace.expected_a[0][1] == pytest.approx(5.5)
    png_size(plot_search(log, tmp_path / "new.png"))
    old = write_search_log(tmp_path / "old" / "search_log.jsonl", ["l1"], epochs=2, legacy=True)
    assert "w_bits" not in old.read_text()
    trace = search_trace(read_search_log(old))
    assert trace.w_bits == trace.a_bits == list(BITS)
    record["a_bits"] = [3, 4]  # a record whose candidates differ from the first epoch's
    log.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    with pytest.raises(RunError, match=r"epoch 1: candidate bits \[2, 3, 4\] \(weights\) and \[3, 4\]"):
        search_trace(read_search_log(log))
    del record["a_bits"]
    log.write_text(json.dumps(record) + "\n")
    with pytest.raises(RunError, match="lacks 'w_bits' and 'a_bits'"):
        search_trace(read_search_log(log))


def test_search_log_errors(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        plot_search(tmp_path / "missing", tmp_path / "x.png")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RunError, match="no search_log.jsonl"):
        plot_search(tmp_path / "empty_dir", tmp_path / "x.png")
    log = write_search_log(tmp_path / "run" / "search_log.jsonl", ["l1"], epochs=3)
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    with pytest.raises(RunError, match=r"search_log.jsonl:2 is not valid JSON"):
        read_search_log(log)
    log.write_text("\n".join([lines[0], lines[1], lines[2][:40]]) + "\n")  # killed while writing the last line
    with pytest.warns(UserWarning, match="truncated last record"):
        assert len(read_search_log(log)) == 2
    bad = json.loads(lines[0])
    del bad["budget_g"]
    log.write_text(json.dumps(bad) + "\n")
    with pytest.raises(RunError, match="lacks 'budget_g'"):
        read_search_log(log)
    bad = json.loads(lines[0])
    bad["probs"]["l1"]["w"] = [1.0]
    log.write_text(json.dumps(bad) + "\n")
    with pytest.raises(RunError, match="expected 4 probabilities"):
        search_trace(read_search_log(log))


# ------------------------------------------------------------------------------------------------ compare
def make_run(root: Path, name: str, policy_in: str | None = "search", **metrics) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    if policy_in is not None:
        policy = gmpq.uniform_policy(gmpq.create_model("resnet18"), 3, 4)
        policy.provenance = {"strategy": "gmpq", "proxy_dataset": "cars"}
        policy.save(run / policy_in / "policy.json" if policy_in else run / "policy.json")
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        make_run(tmp_path, "gmpq-cifar", top1=69.91, top5=89.1, bops_searched_g=15.2, bops_total_g=16.5,
                 size_bytes=4_200_000, strategy="gmpq", proxy_dataset="cifar10", target_dataset="imagenet"),
        make_run(tmp_path, "edmips-cifar", policy_in=None, top1=68.5, bops_searched_g=15.0, strategy="edmips",
                 proxy_dataset="cifar10"),
        make_run(tmp_path, "from-policy", policy_in="", top1=67.25),
    ]


def test_compare_table_fills_from_policy_and_dashes_missing(runs):
    summaries = compare_runs(runs)
    table = format_compare_table(summaries).splitlines()
    assert table[0].split()[:5] == ["run", "arch", "strategy", "proxy", "target"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["gmpq-cifar"][1:] == ["resnet18", "gmpq", "cifar10", "imagenet", "69.91", "89.10", "15.20", "16.50",
                                      "4.20", "3.00", "4.00"]
    assert rows["edmips-cifar"][1:] == ["-", "edmips", "cifar10", "-", "68.50", "-", "15.00", "-", "-", "-", "-"]
    # strategy and proxy come from the policy's provenance when metrics.json lacks them
    assert rows["from-policy"][1:5] == ["resnet18", "gmpq", "cars", "-"] and rows["from-policy"][5] == "67.25"


def test_a_pipeline_run_brings_its_uniform_baseline_read_from_its_stages(tmp_path):
    run = make_run(tmp_path, "quick", top1=34.0, bops_searched_g=0.45, strategy="gmpq", proxy_dataset="c10")
    baseline = run / "uniform"
    for stage, metrics in (("search", {"strategy": "uniform", "bops_searched_g": 0.44, "decoded_top1": 9.0}),
                           ("finetune", {"bops_searched_g": 0.4402, "top1": 30.0}),
                           ("evaluate", {"top1": 31.8, "top5": 86.6, "dataset": "c10"})):
        (baseline / stage).mkdir(parents=True)
        (baseline / stage / "metrics.json").write_text(json.dumps(metrics))
    rows = [(r.run, r.strategy, r.top1, r.bops_searched_g, r.target_dataset) for r in compare_runs([run])]
    assert rows == [("quick", "gmpq", 34.0, 0.45, None), ("quick/uniform", "uniform", 31.8, 0.4402, "c10")]
    # named on the command line too, it is listed once
    assert [r.run for r in compare_runs([run, baseline])] == ["quick", "uniform"]


def test_compare_errors(tmp_path, runs):
    with pytest.raises(RunError, match="does not exist"):
        compare_runs([tmp_path / "nope"])
    (tmp_path / "no_metrics").mkdir()
    with pytest.raises(RunError, match="has no metrics.json"):
        compare_runs([tmp_path / "no_metrics"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{top1: 3")
    with pytest.raises(RunError, match="not valid JSON"):
        compare_runs([tmp_path / "bad"])
    (tmp_path / "bad" / "metrics.json").write_text('{"top1": "high"}')
    with pytest.raises(RunError, match="'top1' must be a number"):
        compare_runs([tmp_path / "bad"])
    with pytest.raises(RunError, match="nothing to plot"):
        plot_compare([runs[2]], tmp_path / "none.png")


def test_plot_compare_png(tmp_path, runs):
    png_size(plot_compare(runs, tmp_path / "cmp.png"))
    png_size(plot_compare(compare_runs(runs), tmp_path / "cmp_total.png", bops="total"))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_plot_exit_codes(tmp_path, capsys):
    good = random_policy("resnet18", 0).save(tmp_path / "p.json")
    assert main(["plot", str(good), str(good), "-o", str(tmp_path / "p.png")]) == 0
    png_size(tmp_path / "p.png")
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["plot", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.png")]) == 2
    assert main(["plot", "-o", str(tmp_path / "x.png")]) == 2
    assert main(["plot", "--search", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    write_search_log(tmp_path / "run" / "search_log.jsonl", ["l1", "l2"], epochs=2)
    assert main(["plot", "--search", str(tmp_path / "run"), "-o", str(tmp_path / "s.png")]) == 0
    png_size(tmp_path / "s.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_compare(tmp_path, runs, capsys):
    assert main(["compare", *map(str, runs), "-o", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "gmpq-cifar" in out and "69.91" in out and "edmips" in out
    png_size(tmp_path / "c.png")
    assert main(["compare", *map(str, runs), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["run"] for d in data] == ["gmpq-cifar", "edmips-cifar", "from-policy"]
    assert data[1]["top5"] is None and data[0]["size_bytes"] == 4_200_000
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
