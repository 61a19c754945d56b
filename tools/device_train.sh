#!/usr/bin/env bash
# Train (MODE=scratch) or fine-tune (MODE=finetune) the bundled demo model (UPSR "small":
# estimator + denoiser) on one GPU, then evaluate it on the A_val pairs.
#
#   bash tools/device_train.sh --prepare                 # dev machine: check what must be carried
#   MODE=finetune bash tools/device_train.sh --prepare
#   bash tools/device_train.sh                           # GPU, repo root: MODE=scratch (~7 min)
#   MODE=finetune bash tools/device_train.sh             # GPU, repo root: fine-tune, <= $TOTAL_MIN (9.5) min
#
# MODE=scratch (default; how the bundled demo was trained, with what changed since: fresh nets
# start with the official init, degraded pairs pass the official 160-pair pool (POOL=0: off, as
# the demo), the frozen estimator runs in fp32 inside the bf16 step): stage 1 trains the ATD
# estimator (L1) from random weights for $STAGE1_MIN (2.5) minutes, stage 2 the denoiser with
# the frozen stage-1 estimator for $STAGE2_MIN (4) minutes (uncertainty-weighted noise, MSE),
# on the 164 packed crops in $PACK; exports upsr_demo_x4.safetensors (fp32). Carry
# [".devcarry/train_pack", ".devcarry/niqe"] (34 MiB). The crops, once (4 per A_train photo):
#     python -m upsr_core.train.data --photos photos --group A_train --crop 256 --per-image 4 \
#         --min-texture 3 --out .devcarry/train_pack/A_train_256.npy
#
# MODE=finetune: both stages start from the bundled demo's nets ($INIT, train --init; the net
# config comes from that file) with a fresh AdamW, warm-up $WARMUP steps, cosine from a lower
# peak ($LR1 2e-4 estimator, $LR2 2e-4 denoiser; from scratch: 5e-4 / 4e-4) to 10 %, on the
# whole A_train photos in $PHOTOS (tools/pack_photos.py; a fresh random crop per step, crops
# flatter than $MIN_TEXTURE re-drawn, images decoded once onto the GPU: train --feed device).
# Stage 1: $STAGE1_MIN (2.5) min; 0 skips it (stage 2 keeps $INIT's estimator: with the true HR
# as g(y) the demo denoiser gains only ~0.5 dB, so the denoiser is what limits the demo; give it
# the time: STAGE1_MIN=0 STAGE2_MIN=8.3). Stage 2: $STAGE2_MIN (6) min, shortened so that everything
# ends within $TOTAL_MIN (9.5) min with $EVAL_RESERVE_S (45) s left for the export and the eval
# (it prints the minutes it gets; ~5.3 expected); the eval is cut at $HARD_S (585) s after the
# start. Export: fp16 (22.3 MB with the int64 index buffers), written to $RUN and copied to
# $OUT split into 15 MiB parts (the transfer limit is 16 MiB per file); join them with
#     cat upsr_demo_x4.safetensors.part-* > upsr_demo_x4.safetensors && sha256sum -c upsr_demo_x4.safetensors.sha256
# The eval computes PSNR/SSIM of all four methods but no NIQE ($EVAL_NIQE=1 adds it: it runs on
# the CPU, ~1 s per image and method, over 2 minutes for the 32 pairs). NIQE afterwards, on the
# dev machine (about 20 s per pair on 2 cores, 10 s with '--method upsr' for the model's row only):
#     python -m upsr_core eval --hr .devcarry/train_pack/A_val/hr256 --lr .devcarry/train_pack/A_val/lr256_realesrgan \
#         --model upsr_demo_x4.safetensors --niqe-params .devcarry/niqe/niqe_pris_params.npz --device cpu --out eval_ft
# If stage 1 fails, stage 2 goes on with the demo's estimator. Carry (ignored paths; 30 MiB):
#     [".devcarry/train_photos", ".devcarry/train_pack/A_val", ".devcarry/niqe"]
# (the 31 MiB packed crops .devcarry/train_pack/A_train_256.npy are not needed).
#
# Outputs in $OUT, at most the 8 files a device run returns: the export (whole, or parts + .sha256;
# it holds the estimator too), training_log.json (both stages' logs, per-step history),
# eval/{results.json,results.md,contact_sheet.png} and the console log train.log (the environment
# at its top); bench.json (optional, BENCH=1) is a ninth where the export is split: leave it off then.
# Everything it needs is torch + numpy + pillow + safetensors (all in the device image) and this
# repository. CPU dry run (proves the script end to end; minutes of CPU):
#   MODE=finetune DEVICE=cpu STAGE1_MIN=0.2 STAGE2_MIN=0.3 BATCH=1 EVAL_ARGS="--limit 2" OUT=/tmp/ft_out \
#       bash tools/device_train.sh
set -euo pipefail

MODE=${MODE:-scratch}
PACK=${PACK:-.devcarry/train_pack}
PHOTOS=${PHOTOS:-.devcarry/train_photos}
INIT=${INIT:-upsr_core/weights/upsr_demo_x4.safetensors}
EVAL_HR=${EVAL_HR:-$PACK/A_val/hr256}
EVAL_LR=${EVAL_LR:-$PACK/A_val/lr256_realesrgan}
NIQE_NPZ=${NIQE_NPZ:-.devcarry/niqe/niqe_pris_params.npz}
DEVICE=${DEVICE:-auto}
BENCH=${BENCH:-0}
PY=${PY:-${PYTHON:-python3}}  # PY as tools/device_bench.sh reads it (PYTHON too)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "$MODE" in
    scratch)
        STAGE1_MIN=${STAGE1_MIN:-2.5}; STAGE2_MIN=${STAGE2_MIN:-4}; CONFIG=${CONFIG:-small}
        EXPORT_DTYPE=${EXPORT_DTYPE:-fp32}; EVAL_NIQE=${EVAL_NIQE:-1}
        CARRY=("$PACK") ;;
    finetune)
        STAGE1_MIN=${STAGE1_MIN:-2.5}; STAGE2_MIN=${STAGE2_MIN:-6}; CONFIG=${CONFIG:-}
        TOTAL_MIN=${TOTAL_MIN:-9.5}; EVAL_RESERVE_S=${EVAL_RESERVE_S:-45}; EVAL_NIQE=${EVAL_NIQE:-0}
        LR1=${LR1:-2e-4}; LR2=${LR2:-2e-4}; WARMUP=${WARMUP:-100}; MIN_TEXTURE=${MIN_TEXTURE:-3}
        EXPORT_DTYPE=${EXPORT_DTYPE:-fp16}
        CARRY=("$PHOTOS" "$PACK/A_val") ;;
    *) echo "error: MODE must be scratch or finetune, got '$MODE'"; exit 2 ;;
esac

if [[ "${1:-}" == "--prepare" ]]; then   # dev-machine check of what must be carried
    for d in "$EVAL_HR" "$EVAL_LR"; do
        [[ -d "$d" ]] || { echo "error: the evaluation pairs $d are missing: make them once with"
                           echo "  python ../shared/data/get_photos.py --out photos"
                           echo "  python ../shared/data/make_pairs.py --photos photos --out pairs   # needs scipy"
                           echo "  python tools/val_pairs.py pairs --out $PACK/A_val   # the 32 A_val pairs (~3 MiB)"; exit 2; }
    done
    if [[ -f "$NIQE_NPZ" ]]; then CARRY+=("$(dirname "$NIQE_NPZ")")
    else echo "note: $NIQE_NPZ missing: the device eval will skip NIQE"; fi
    if [[ "$MODE" == scratch ]]; then
        ls "$PACK"/*.npy >/dev/null 2>&1 || { echo "error: no packed crops (.npy) in $PACK: make them once with"
            echo "  python -m upsr_core.train.data --photos photos --group A_train --crop 256 --per-image 4 \\"
            echo "      --min-texture 3 --out $PACK/A_train_256.npy"; exit 2; }
    else
        [[ -f "$INIT" ]] || { echo "error: --init file $INIT not found"; exit 2; }
        n=$(find "$PHOTOS" -maxdepth 1 -iname '*.jpg' | wc -l)
        [[ "$n" -gt 0 ]] || { echo "error: no photos in $PHOTOS: run python tools/pack_photos.py"; exit 2; }
        echo "$n training photos in $PHOTOS; init $INIT ($(du -h "$INIT" | cut -f1), tracked: travels with the tree)"
    fi
    du -shc "${CARRY[@]}"
    kib=$(du -sck "${CARRY[@]}" | tail -1 | cut -f1)
    printf 'carry: [%s]  (%d MiB; must stay under 64 MiB)\n' "$(printf '"%s", ' "${CARRY[@]}" | sed 's/, $//')" \
        $(( kib / 1024 ))
    (( kib < 60 * 1024 )) || { echo "error: the carry exceeds 60 MiB"; exit 1; }
    exit 0
fi

OUT=${OUT:-$PWD/out}
RUN=${RUN_DIR:-$PWD/.devrun/demo_run}   # checkpoints (optimiser state) and the whole export stay off $OUT; in the
# repository (ignored), not a fixed /tmp name another account could have made first
mkdir -p "$OUT" "$RUN"
exec > >(tee -a "$OUT/train.log") 2>&1
T0=$(date +%s)
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, numpy, PIL, safetensors; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__)"
    git rev-parse HEAD 2>/dev/null || true
    echo "MODE=$MODE STAGE1_MIN=$STAGE1_MIN STAGE2_MIN=$STAGE2_MIN CONFIG=${CONFIG:-from-init} DEVICE=$DEVICE" \
         "BATCH=${BATCH:-preset} CROP=${CROP:-preset} EXPORT_DTYPE=$EXPORT_DTYPE" \
         "KERNELS=${KERNELS:-realesrgan} POOL=${POOL:-default}" \
         "${TOTAL_MIN:+TOTAL_MIN=$TOTAL_MIN LR1=$LR1 LR2=$LR2 WARMUP=$WARMUP MIN_TEXTURE=$MIN_TEXTURE INIT=$INIT}"
}  # (into train.log, as everything printed)

# Preflight (seconds): the degradations with a generator on the GPU; fall back to a CPU generator.
DEG_RNG=device
"$PY" -c "
import torch
from upsr_core.train.degradations import degrade
dev = 'cuda' if torch.cuda.is_available() and '$DEVICE' != 'cpu' else 'cpu'
for s in range(3):
    degrade(torch.rand(4, 3, 256, 256, device=dev), torch.Generator(dev).manual_seed(s))
print('degradations on', dev, 'ok')
" || { DEG_RNG=cpu; echo "warning: device generator failed in degrade(): using --degrade-rng cpu"; }

# $KERNELS (realesrgan): the blur kernel sizes of Real-ESRGAN x4plus (7-21 px), those of the A_val
# pairs the demo is measured on (shared/data/make_pairs.py) and of the shipped demo's training;
# KERNELS=upsr trains with the official UPSR recipe's (3-19, then 3-13).
COMMON=(--out "$RUN" --steps 1000000 --schedule cosine --log-every 100 --ckpt-every 100000 --degrade-rng "$DEG_RNG"
        --device "$DEVICE" --kernels "${KERNELS:-realesrgan}")
[[ -n "${POOL:-}" ]] && COMMON+=(--pool "$POOL")   # default: 160 rounded down to a multiple of the batch
[[ -n "${CONFIG:-}" ]] && COMMON+=(--config "$CONFIG")
[[ -n "${BATCH:-}" ]] && COMMON+=(--batch "$BATCH")
[[ -n "${CROP:-}" ]] && COMMON+=(--crop "$CROP")
# RESUME=1: continue the checkpoints in $RUN (--max-minutes counts their earlier minutes: raise STAGE*_MIN)
[[ "${RESUME:-0}" == 1 ]] || COMMON+=(--fresh)
EXPORT="$RUN/upsr_demo_x4.safetensors"

if [[ "$MODE" == scratch ]]; then
    [[ -e "$PACK" ]] || { echo "error: training data $PACK not found (carry it; see --prepare)"; exit 2; }
    echo "== stage 1: estimator, ${STAGE1_MIN} min"
    "$PY" -m upsr_core train estimator --data "$PACK" "${COMMON[@]}" --max-minutes "$STAGE1_MIN"
    echo "== stage 2: denoiser, ${STAGE2_MIN} min (frozen stage-1 estimator)"
    "$PY" -m upsr_core train denoiser --data "$PACK" "${COMMON[@]}" --estimator "$RUN/estimator.safetensors" \
        --max-minutes "$STAGE2_MIN" --export "$EXPORT" --export-dtype "$EXPORT_DTYPE" \
        --data-note "packed HR crops from $PACK (photos group A_train), Real-ESRGAN degradation on the GPU"
else
    for f in "$PHOTOS" "$INIT"; do [[ -e "$f" ]] || { echo "error: $f not found (carry $PHOTOS; see --prepare)"; exit 2; }; done
    DATA=(--data "$PHOTOS" --feed device --min-texture "$MIN_TEXTURE" --init "$INIT" --warmup "$WARMUP")
    EST="$RUN/estimator.safetensors"
    if awk -v m="$STAGE1_MIN" 'BEGIN{exit !(m <= 0)}'; then
        echo "== stage 1 skipped (STAGE1_MIN=$STAGE1_MIN): stage 2 uses the estimator of $INIT"; EST="$INIT"
    else
        echo "== stage 1: estimator from $INIT, ${STAGE1_MIN} min, peak lr $LR1"
        if ! "$PY" -m upsr_core train estimator "${DATA[@]}" "${COMMON[@]}" --max-minutes "$STAGE1_MIN" --lr "$LR1"; then
            echo "warning: stage 1 failed: stage 2 uses the estimator of $INIT"; EST="$INIT"
        fi
    fi
    left_s=$(( T0 + $(awk -v m="$TOTAL_MIN" 'BEGIN{print int(m * 60)}') - $(date +%s) ))
    S2=$(awk -v want="$STAGE2_MIN" -v left="$left_s" -v res="$EVAL_RESERVE_S" \
        'BEGIN{m = (left - res - 25) / 60; if (m < 0.2) m = 0.2; if (m > want) m = want; printf "%.2f", m}')
    echo "== stage 2: denoiser from $INIT, $S2 min (asked $STAGE2_MIN; ${left_s} s of the $TOTAL_MIN min left), peak lr $LR2"
    "$PY" -m upsr_core train denoiser "${DATA[@]}" "${COMMON[@]}" --estimator "$EST" --max-minutes "$S2" \
        --lr "$LR2" --export "$EXPORT" --export-dtype "$EXPORT_DTYPE" \
        --data-note "fine-tuned from $(basename "$INIT") on random crops of the 41 A_train photos ($PHOTOS, JPEG q95, min texture $MIN_TEXTURE), Real-ESRGAN degradation on the GPU"
fi
"$PY" - "$RUN" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
log = {s: json.loads((run / f"{s}_log.json").read_text()) for s in ("estimator", "denoiser")
       if (run / f"{s}_log.json").is_file()}
(out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
print({s: v["summary"] for s, v in log.items()})
PYEOF
# The export back to $OUT: whole when it fits the 16 MiB transfer limit, else in 15 MiB parts.
NAME=$(basename "$EXPORT")
ls -la "$EXPORT"
if (( $(stat -c %s "$EXPORT") > ${SPLIT_MIB:-15} * 1048576 )); then
    (cd "$RUN" && sha256sum "$NAME") > "$OUT/$NAME.sha256"
    split -b "${SPLIT_MIB:-15}M" "$EXPORT" "$OUT/$NAME.part-"
    echo "export split into $(ls "$OUT/$NAME".part-* | wc -l) parts; join: cat $NAME.part-* > $NAME && sha256sum -c $NAME.sha256"
else
    cp "$EXPORT" "$OUT/"
fi
echo "training wall time: $(( $(date +%s) - T0 )) s"

if [[ -d "$EVAL_HR" && -d "$EVAL_LR" ]]; then
    echo "== eval on $EVAL_HR / $EVAL_LR"
    EVAL_CMD=("$PY" -m upsr_core eval --hr "$EVAL_HR" --lr "$EVAL_LR" --model "$EXPORT" --out "$OUT/eval"
              --device "${EVAL_DEVICE:-$DEVICE}" --sheet 6)
    if [[ "$EVAL_NIQE" == 1 ]]; then
        [[ -f "$NIQE_NPZ" ]] && export UPSR_NIQE_PARAMS="$NIQE_NPZ"
    else
        EVAL_CMD+=(--niqe-params off)   # NIQE runs on the CPU (~1 s per image and method): afterwards, see above
    fi
    if [[ "$MODE" == finetune ]]; then   # end before the 10-minute command limit, whatever happens
        left_s=$(( T0 + ${HARD_S:-585} - $(date +%s) ))
        EVAL_CMD=(timeout $(( left_s > 5 ? left_s : 5 )) "${EVAL_CMD[@]}")
    fi
    "${EVAL_CMD[@]}" ${EVAL_ARGS:-} || echo "eval failed or ran out of time (weights are kept)"
fi
if [[ "$BENCH" == "1" ]]; then
    echo "== bench (full config, batch 16)"
    "$PY" -m upsr_core train bench --config full --batch 16 --json "$OUT/bench.json" || echo "bench failed"
fi
echo "total wall time: $(( $(date +%s) - T0 )) s"
