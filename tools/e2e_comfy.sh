#!/usr/bin/env bash
# Run the ComfyUI end-to-end suite, or refresh the example workflows' pictures, against a local ComfyUI.
#
#   tools/e2e_comfy.sh [pytest args]      run tests/e2e (a throw-away server on 127.0.0.1, CPU)
#   tools/e2e_comfy.sh --workflows        rebuild example_workflows/*.json in the frontend
#   tools/e2e_comfy.sh --screenshots      docs/workflow_*.png + example_workflows/*.jpg thumbnails
#
# Environment: COMFYUI_DIR (default /work/comfyui), COMFYUI_PYTHON (default /work/comfy_venv/bin/python),
# PYTHON for the tests (default /work/venv/bin/python, needs upsr_core + pytest), UPSR_E2E_MODEL to use a
# real model file instead of the tiny random one, PLAYWRIGHT_CORE_DIR / CHROMIUM_PATH for the browser.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMFYUI_DIR="${COMFYUI_DIR:-/work/comfyui}"
export COMFYUI_PYTHON="${COMFYUI_PYTHON:-/work/comfy_venv/bin/python}"
PYTHON="${PYTHON:-/work/venv/bin/python}"

with_server() {  # with_server CMD...: start a server, run CMD with $URL set, stop the server by its PID
  local info pid
  info="$(mktemp)"
  "$PYTHON" tests/e2e/comfy_server.py --keep >"$info" &
  pid=$!
  for _ in $(seq 1 300); do [ -s "$info" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if [ ! -s "$info" ]; then echo "server did not start" >&2; kill "$pid" 2>/dev/null || true; return 1; fi
  URL="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$info")"
  export URL
  local rc=0
  "$@" || rc=$?
  kill -TERM "$pid"; wait "$pid" || true
  rm -f "$info"
  return $rc
}

screenshots() {
  for wf in example_workflows/*.json; do
    name="$(basename "$wf" .json)"
    node tools/screenshot_workflow.mjs --url "$URL" --workflow "$wf" --out "docs/workflow_${name#upsr_}.png" \
      --width 1800 --height 1000 --wait 2000 >/dev/null
    "$PYTHON" - "docs/workflow_${name#upsr_}.png" "example_workflows/$name.jpg" <<'PY'
import sys
from PIL import Image
shot, thumb = sys.argv[1:]
im = Image.open(shot).convert("RGB")
canvas = im.crop((66, 78, im.width, im.height))  # without the sidebar and the menu bar
canvas.thumbnail((640, 640), Image.LANCZOS)
canvas.save(thumb, quality=85, optimize=True)
im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(shot, optimize=True)
PY
    echo "docs/workflow_${name#upsr_}.png example_workflows/$name.jpg"
  done
}

case "${1:-}" in
  --workflows) with_server sh -c 'node tests/e2e/build_workflows.mjs --url "$URL"' ;;
  --screenshots) with_server screenshots ;;
  *) exec "$PYTHON" -m pytest -q -s -p no:cacheprovider tests/e2e "$@" ;;
esac
