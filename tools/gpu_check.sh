#!/usr/bin/env bash
# One-shot GPU check of the fused quantization kernels (issue 14), for a CUDA machine, from the repository root:
#
#     PYTHONPATH=. bash tools/gpu_check.sh          # results under $OUT if set, else /tmp/gmpq-gpu-check
#
# 1. environment: GPU, driver, torch / triton / timm versions, and that gmpq imports (names any missing package);
# 2. the CUDA tests of the quantized layers (tests/test_fused_kernels.py -k cuda: Triton kernels against the eager
#    reference in fp32 and bf16, channels_last, many blocks, layers under autocast, no host-device synchronisation);
# 3. tools/bench_search_step.py on CUDA, fp32 then bf16: the GMPQ search step and the W4A4 QAT step against the float
#    step on resnet18_cifar b256 32x32, resnet18 b64 224x224 and mobilenetv2_100 b64 224x224 (each record is written
#    as soon as it is measured, so a stage cut by its time limit keeps what it measured);
# 4. tools/bench_kernels.py --sweep: each Triton kernel's time and bandwidth against a torch op moving the same
#    bytes, and the activation kernels at other block sizes / warp counts (kernels.json);
# 5. a table of the ratios, printed last (summary.txt); "host ms" is the time until a step had queued its work (near
#    the step's time: bound by Python and launches, not by the GPU).
# Every stage has its own time limit (the whole script stays under 4 minutes) and a failing stage does not stop the
# next ones. Files: gpu_check.log (everything printed), tests.log, bench_fp32.json, bench_bf16.json, kernels.json,
# summary.txt.
# GMPQ_GPU_BASELINE=1 also times the torch.compile kernels of before (resnet18_cifar only; up to 90 s more).
# A dry run of the plumbing on a CPU: GMPQ_CHECK_DEVICE=cpu GMPQ_CHECK_BENCH_ARGS="--arch mobilenetv2_050_cifar
# --batch 4 --repeats 1 --warmup 1 --backend eager" bash tools/gpu_check.sh
set -u
OUT_DIR="${OUT:-/tmp/gmpq-gpu-check}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-.}" PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
DEVICE="${GMPQ_CHECK_DEVICE:-cuda}"
read -r -a BENCH_ARGS <<< "${GMPQ_CHECK_BENCH_ARGS:-}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stage() { echo; echo "=== [$(elapsed) s] $*"; }
# run LIMIT CMD...: the command under a time limit; reports a timeout or a failure and always carries on
run() {
    local limit=$1; shift
    timeout -k 5 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "!!! stopped at its time limit of ${limit} s"
    [ $rc -ne 0 ] && echo "!!! exit code $rc: $*"
    return 0
}

stage "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
run 30 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version())
for name in ("torch", "triton", "timm", "accelerate", "safetensors", "huggingface_hub", "yaml", "scipy", "numpy",
             "tqdm", "matplotlib", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import gmpq, gmpq.search
    from gmpq.quant import fused, triton_kernels
    print("gmpq imports ok; backend for cuda:", fused.get_backend("cuda"), "; datasets loaded:", "datasets" in sys.modules)
except Exception:
    import traceback
    traceback.print_exc()
EOF

stage "CUDA tests of the fused kernels"
run 60 "$PY" -m pytest tests/test_fused_kernels.py -k cuda -q -rfEs -p no:cacheprovider --durations=5 --tb=short \
    2>&1 | tee "$OUT_DIR/tests.log"

stage "benchmark fp32: GMPQ search step and W4A4 QAT step against the float step"
run 65 "$PY" tools/bench_search_step.py --device "$DEVICE" --step gmpq qat --repeats 8 --quiet \
    --out "$OUT_DIR/bench_fp32.json" "${BENCH_ARGS[@]}"

stage "benchmark bf16"
run 55 "$PY" tools/bench_search_step.py --device "$DEVICE" --step gmpq qat --repeats 8 --bf16 --quiet \
    --out "$OUT_DIR/bench_bf16.json" "${BENCH_ARGS[@]}"

if [ "$DEVICE" = "cuda" ]; then
    stage "kernel micro-benchmark (tools/bench_kernels.py --sweep)"
    run 25 "$PY" tools/bench_kernels.py --sweep --reps 10 --quiet --out "$OUT_DIR/kernels.json"
fi

if [ "${GMPQ_GPU_BASELINE:-0}" = "1" ]; then
    stage "baseline: the torch.compile kernels of before, resnet18_cifar b256 fp32"
    run 90 "$PY" tools/bench_search_step.py --device cuda --step gmpq --backend compile --arch resnet18_cifar \
        --batch 256 --size 32 --repeats 6 --quiet --out "$OUT_DIR/bench_baseline.json"
fi

stage "summary"
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
tests = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
counts = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|deselected|error).*?) in [\d.]+s", tests, re.M)
print("CUDA tests:", counts[-1] if counts else "no pytest summary line (see tests.log)")
print(f"{'prec':5} {'step':5} {'arch':18} {'batch':>5} {'size':>4} {'float ms':>9} {'step ms':>8} {'time x':>7} "
      f"{'target':>6} {'mem x':>6} {'float MB':>9} {'step MB':>8} {'host ms f/s':>12}")
for name in ("bench_fp32.json", "bench_bf16.json", "bench_baseline.json"):
    path = out / name
    if not path.exists():
        if name != "bench_baseline.json":  # that one only with GMPQ_GPU_BASELINE=1
            print(f"{name}: not written (see gpu_check.log)")
        continue
    data = json.loads(path.read_text())
    for r in data["results"]:
        if "error" in r:
            print(f"{r['precision']:5} {r['step']:5} {r['arch']:18} ERROR {r['error'][:200]}")
            continue
        print(f"{r['precision']:5} {r['step']:5} {r['arch']:18} {r['batch']:>5} {r['input_size']:>4} "
              f"{1e3 * r['float_step_s']:>9.2f} {1e3 * r['step_s']:>8.2f} {r['time_ratio']:>7.2f} "
              f"{r['targets'].get('time_ratio', float('nan')):>6.1f} {r.get('memory_ratio', float('nan')):>6.2f} "
              f"{r.get('float_peak_mb', float('nan')):>9.0f} {r.get('peak_mb', float('nan')):>8.0f} "
              f"{1e3 * r['float_host_s']:>5.1f}/{1e3 * r['host_s']:<6.1f}")
    env = data["environment"]
    print(f"  ^ {name}: backend {env.get('backend')}, {env.get('gpu')}, torch {env.get('torch')}, "
          f"triton {env.get('triton')}, {len(data['results'])} records")
if (out / "kernels.json").exists():
    kernels = json.loads((out / "kernels.json").read_text())
    print("kernels (us, GB/s, x a torch op moving the same bytes):",
          "; ".join(f"{k['kernel']} {k['us']:.0f} {k['gb_per_s']:.0f} {k['vs_torch']:.2f}x" for k in kernels["kernels"]))
    print("sweep (block/warps: fwd/bwd us):", "; ".join(
        f"{s['block']}/{s['num_warps']}: {s['act_forward_us']:.0f}/{s['act_backward_us']:.0f}" for s in kernels["sweep"]))
EOF
echo "total $(elapsed) s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
