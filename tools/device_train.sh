#!/usr/bin/env bash
# Train the bundled demo model (UPSR "small": estimator + denoiser) on one GPU, in ~7 minutes.
#
#   bash tools/device_train.sh --prepare   # on the dev machine: check what must be carried
#   bash tools/device_train.sh             # on the GPU machine, repo root, with .devcarry carried
#
# GPU run: stage 1 trains the ATD estimator (L1) for $STAGE1_MIN minutes, stage 2 trains the
# denoiser with the frozen stage-1 estimator for $STAGE2_MIN minutes (uncertainty-weighted
# noise, MSE), then exports $OUT/upsr_demo_x4.safetensors (both nets, EMA, fp32, training record
# in the metadata) and evaluates it on the A_val pairs in $PACK/A_val when present. Everything it needs
# is torch + numpy + pillow + safetensors (all in the device image) and this repository.
# Outputs in $OUT: upsr_demo_x4.safetensors, training_log.json (both stages, per-step history),
# estimator_log.json, denoiser_log.json, eval/{results.json,results.md,contact_sheet.png},
# bench.json (optional, BENCH=1), env.txt, and the console log train.log.
set -euo pipefail

PACK=${PACK:-.devcarry/train_pack}
EVAL_HR=${EVAL_HR:-$PACK/A_val/hr256}
EVAL_LR=${EVAL_LR:-$PACK/A_val/lr256_realesrgan}
NIQE_NPZ=${NIQE_NPZ:-.devcarry/niqe/niqe_pris_params.npz}
STAGE1_MIN=${STAGE1_MIN:-2.5}
STAGE2_MIN=${STAGE2_MIN:-4}
CONFIG=${CONFIG:-small}
BENCH=${BENCH:-0}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--prepare" ]]; then   # dev-machine check of what must be carried
    ls "$PACK"/*.npy "$EVAL_HR" "$EVAL_LR" >/dev/null
    [[ -f "$NIQE_NPZ" ]] || echo "note: $NIQE_NPZ missing: the device eval will skip NIQE"
    du -sh .devcarry
    echo "carry: [\".devcarry\"] (must stay under 64 MiB)"
    exit 0
fi

OUT=${OUT:-$PWD/out}
RUN=${RUN_DIR:-/tmp/upsr_demo_run}   # checkpoints (optimiser state) stay off $OUT
mkdir -p "$OUT" "$RUN"
exec > >(tee -a "$OUT/train.log") 2>&1
T0=$(date +%s)
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, numpy, PIL, safetensors; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__)"
    git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"
[[ -e "$PACK" ]] || { echo "error: training data $PACK not found (carry .devcarry)"; exit 2; }

# Preflight (seconds): the degradations with a generator on the GPU; fall back to a CPU generator.
DEG_RNG=device
"$PY" -c "
import torch
from upsr_core.train.degradations import degrade
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
for s in range(3):
    degrade(torch.rand(4, 3, 256, 256, device=dev), torch.Generator(dev).manual_seed(s))
print('degradations on', dev, 'ok')
" || { DEG_RNG=cpu; echo "warning: device generator failed in degrade(): using --degrade-rng cpu"; }

echo "== stage 1: estimator, ${STAGE1_MIN} min"
"$PY" -m upsr_core train estimator --data "$PACK" --config "$CONFIG" --out "$RUN" --fresh \
    --steps 1000000 --max-minutes "$STAGE1_MIN" --schedule cosine --log-every 100 --ckpt-every 100000 --degrade-rng "$DEG_RNG"
echo "== stage 2: denoiser, ${STAGE2_MIN} min (frozen stage-1 estimator)"
"$PY" -m upsr_core train denoiser --data "$PACK" --config "$CONFIG" --out "$RUN" --fresh \
    --estimator "$RUN/estimator.safetensors" --steps 1000000 --max-minutes "$STAGE2_MIN" --schedule cosine \
    --log-every 100 --ckpt-every 100000 --degrade-rng "$DEG_RNG" --export "$OUT/upsr_demo_x4.safetensors" \
    --data-note "packed HR crops from $PACK (photos group A_train), Real-ESRGAN degradation on the GPU"
cp "$RUN/estimator_log.json" "$RUN/denoiser_log.json" "$OUT/"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
log = {s: json.loads((out / f"{s}_log.json").read_text()) for s in ("estimator", "denoiser")}
(out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
print({s: v["summary"] for s, v in log.items()})
PYEOF
ls -la "$OUT/upsr_demo_x4.safetensors"
echo "training wall time: $(( $(date +%s) - T0 )) s"

if [[ -d "$EVAL_HR" && -d "$EVAL_LR" ]]; then
    echo "== eval on $EVAL_HR / $EVAL_LR"
    [[ -f "$NIQE_NPZ" ]] && export UPSR_NIQE_PARAMS="$NIQE_NPZ"
    "$PY" -m upsr_core eval --hr "$EVAL_HR" --lr "$EVAL_LR" --model "$OUT/upsr_demo_x4.safetensors" \
        --out "$OUT/eval" --device "${EVAL_DEVICE:-cuda}" --sheet 6 ${EVAL_ARGS:-} || echo "eval failed (weights are kept)"
fi
if [[ "$BENCH" == "1" ]]; then
    echo "== bench (full config, batch 16)"
    "$PY" -m upsr_core train bench --config full --batch 16 --json "$OUT/bench.json" || echo "bench failed"
fi
echo "total wall time: $(( $(date +%s) - T0 )) s"
