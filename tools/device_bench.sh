#!/usr/bin/env bash
# GPU benchmark of the fast path, self-contained: run from the repository root on the
# device machine (any CUDA box with torch). Random full-size weights (no checkpoint).
#   OUT=/some/dir tools/device_bench.sh [extra bench args, e.g. --sizes 64,256]
# Writes $OUT/bench.txt (the table, also printed as rows finish), $OUT/bench.json and
# $OUT/env.txt. Needs only torch: a stub stands in for safetensors if it is missing
# (the bench never reads a checkpoint unless --model is given).
# Wall time: bench stops starting rows after BUDGET s (default 140); the whole run is
# killed after LIMIT s (default 170); rows already printed stay in bench.txt/bench.json; BENCH=0 skips it.
# Then tests/e2e/gpu_check.py (the nodes on this GPU) for at most NODES_LIMIT s (default 120):
# $OUT/gpu_check.json and gpu_check.txt; then the training-step bench for at most TRAIN_LIMIT s
# (default 360): $OUT/train_bench.jsonl. Before the nodes, tools/precision_probe.py on the demo model
# (<= 60 s): $OUT/precision_probe.txt. PROBE_LIMIT / NODES_LIMIT / TRAIN_LIMIT = 0 skip a part. The
# defaults sum to over 10 min: skip what was measured (H100, 2026-11-26: all but the compile rows;
# 2026-11-27: --variants nchw,nhwc-norm,triton-norm,no-graphs and compiled LR 64/256, bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
PY=${PY:-python3}  # the device machine's Python with torch
BUDGET=${BUDGET:-140}
LIMIT=${LIMIT:-170}
mkdir -p "$OUT"
STUBS=$(mktemp -d)
if ! "$PY" -c "import safetensors.torch" 2>/dev/null; then
  mkdir -p "$STUBS/safetensors"
  cat > "$STUBS/safetensors/__init__.py" <<'PYEOF'
"""Stub used by tools/device_bench.sh where safetensors is not installed (random weights only)."""
class SafetensorError(Exception):
    pass
def safe_open(*args, **kwargs):
    raise ImportError("safetensors is not installed on this machine")
PYEOF
  cat > "$STUBS/safetensors/torch.py" <<'PYEOF'
def save_file(*args, **kwargs):
    raise ImportError("safetensors is not installed on this machine")
def load_file(*args, **kwargs):
    raise ImportError("safetensors is not installed on this machine")
PYEOF
  echo "safetensors missing: using a stub" | tee -a "$OUT/env.txt"
fi
export PYTHONPATH="$PWD:$STUBS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "cudnn", torch.backends.cudnn.version())
print("missing:", [m for m in ("numpy", "safetensors", "einops", "triton", "PIL") if importlib.util.find_spec(m) is None])
PYEOF
DEV=${DEV:-cuda}
DEFAULTS=${DEFAULTS:---sizes 64,128,256 --batches 1,8 --dtypes fp32,bf16,fp16 --tiled 1024 --tiled-dtypes bf16,fp16}
rc=0
if [ "${BENCH:-1}" != 0 ]; then  # BENCH=0 skips the inference bench (e.g. a training-only call)
  timeout -k 10 "$LIMIT" "$PY" -m upsr_core.bench --device "$DEV" --budget-s "$BUDGET" \
    --json "$OUT/bench.json" $DEFAULTS "$@" 2>&1 | tee "$OUT/bench.txt"
  rc=${PIPESTATUS[0]}
  echo "bench exit code $rc (124 = killed at LIMIT=${LIMIT}s; finished rows are kept)" | tee -a "$OUT/bench.txt"
fi
rm -rf "$STUBS"
# bf16/fp16 error of the trained demo denoiser on this GPU (the bench's rows use random weights), ~30 s
PROBE_LIMIT=${PROBE_LIMIT:-60}   # 0 skips it
if [ "$DEV" = cuda ] && [ "$PROBE_LIMIT" -gt 0 ]; then
  timeout -k 10 "$PROBE_LIMIT" "$PY" tools/precision_probe.py --device cuda --fp16 --crops 4 > "$OUT/precision_probe.txt" 2>&1
  echo "precision_probe exit code $?" | tee -a "$OUT/precision_probe.txt"
fi
# The ComfyUI nodes on this GPU (stub ComfyUI, tiny model; needs numpy, PIL, safetensors): precisions,
# chain = CLI for both implementations, OOM retry, Cancel, offload/reload, node seconds. NODES_LIMIT=0 skips it.
NODES_LIMIT=${NODES_LIMIT:-120}
if [ "$DEV" = cuda ] && [ "$NODES_LIMIT" -gt 0 ]; then
  timeout -k 10 "$NODES_LIMIT" "$PY" tests/e2e/gpu_check.py "$OUT/gpu_check.json" > "$OUT/gpu_check.txt" 2>&1
  echo "gpu_check exit code $? (124 = killed at NODES_LIMIT=${NODES_LIMIT}s)" | tee -a "$OUT/gpu_check.txt"
fi
# Training step (issue 5's 0.13 s/iter target): full config, batch 16, HR 256, bf16; one run per
# "|"-separated flag set of TRAIN_RUNS (default: channels-last with PyTorch's GroupNorm (0.191 s/iter on
# an H100, 2026-11-27), channels-last with the Triton norm and its backward (--triton-norm auto), the
# same with torch.compile in reduce-overhead mode (forward and backward as CUDA graphs); add e.g.
# "--profile 20" to a set for its op table); one JSON line each in $OUT/train_bench.jsonl.
# TRAIN_LIMIT=0 skips it.
TRAIN_LIMIT=${TRAIN_LIMIT:-360}   # ~25 s each eager; compile: still compiling after ~130 s on an H100 (last, so the eager rows land first)
TRAIN_RUNS=${TRAIN_RUNS:-"--channels-last --triton-norm off|--channels-last|--channels-last --compile --compile-mode reduce-overhead"}
if [ "$DEV" = cuda ] && [ "$TRAIN_LIMIT" -gt 0 ]; then
  TB_JSON=$(mktemp "${TMPDIR:-/tmp}/upsr_tb.XXXXXX.json")   # a fresh file of ours, not a fixed /tmp name
  timeout -k 10 "$TRAIN_LIMIT" bash -c '
    IFS="|" read -r -a runs <<< "$2"
    for flags in "${runs[@]}"; do
      "$0" -m upsr_core train bench --config full --batch 16 $flags --json "$3" && cat "$3" >> "$1/train_bench.jsonl"
    done' "$PY" "$OUT" "$TRAIN_RUNS" "$TB_JSON" > "$OUT/train_bench.txt" 2>&1
  echo "train bench exit code $? (124 = killed at TRAIN_LIMIT=${TRAIN_LIMIT}s; finished lines are kept)" | tee -a "$OUT/train_bench.txt"
  rm -f "$TB_JSON"
fi
exit "$rc"
