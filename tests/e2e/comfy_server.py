"""Start and stop a throw-away ComfyUI server with this pack, for the e2e tests and tools/e2e_comfy.sh.

The server runs from the checkout named by ``COMFYUI_DIR`` under ``COMFYUI_PYTHON`` (default: this
interpreter), listens on 127.0.0.1 at a free port, and keeps everything it writes in a temp base
directory (``--base-directory``: custom_nodes, input, output, temp, user). The pack is symlinked
into its custom_nodes. Models come through an extra_model_paths.yaml naming a temp ``upsr``
folder that holds ``upsr_demo_x4.safetensors``: a tiny random-weight model made here, or the file
named by ``UPSR_E2E_MODEL`` (e.g. the real demo model). It is stopped by its PID.

Run alone (``python tests/e2e/comfy_server.py [--keep]``) it starts a server and prints its URL as
JSON; with ``--keep`` it serves until SIGTERM/SIGINT, then stops the server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = "upsr_demo_x4.safetensors"
PACK_DIR_NAME = "upsr"  # the folder name in custom_nodes: the Templates entry and node badge
NODE_IDS = ("LoadUPSRModel", "EstimateUncertainty", "WeightNoise", "UPSRSample", "UPSRUpscale")


def comfyui_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d) if d else None


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def shared_tools() -> Path:
    """Where comfy_e2e.py lives: $UPSR_SHARED/tools, else shared/tools beside the clone."""
    return Path(os.environ.get("UPSR_SHARED", REPO.parent / "shared")) / "tools"


def make_tiny_model(path: Path) -> None:
    """A random-weight converted model with the demo model's layout rules (LR padded to 64), small
    enough for CPU runs; deterministic (seeded)."""
    import torch

    from upsr_core.checkpoint import save_converted
    from upsr_core.config import ATDConfig, DenoiserConfig
    from upsr_core.nets import ATD, UPSRDenoiser

    torch.manual_seed(20250611)
    den = UPSRDenoiser(DenoiserConfig(model_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=(1, 1, 1, 1),
                                      swin_levels=(8,), middle_swin=False, image_size=64, swin_embed_dim=32,
                                      swin_num_heads=1, window_size=8, num_feat=8))
    atd = ATD(ATDConfig(embed_dim=16, depths=(1,), num_heads=(2,), window_size=8, category_size=16, num_tokens=8,
                        reducted_dim=4, convffn_kernel_size=3))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_converted(path, den.eval(), atd.eval(), extra_metadata={"note": "UPSR e2e test model, random weights"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    base: Path
    model_file: Path
    log: Path

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate the server by its PID (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def start(base: Path | None = None, *, copy_inputs: bool = True, timeout: float = 240.0) -> Server:
    comfy = comfyui_dir()
    if comfy is None or not (comfy / "main.py").is_file():
        raise RuntimeError(f"COMFYUI_DIR must name a ComfyUI checkout (with main.py), got {comfy}")
    base = Path(base or tempfile.mkdtemp(prefix="upsr-e2e-"))
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    model_file = base / "extra_models" / "upsr" / DEMO
    if os.environ.get("UPSR_E2E_MODEL"):
        model_file.parent.mkdir(parents=True)
        model_file.symlink_to(Path(os.environ["UPSR_E2E_MODEL"]).resolve())
    else:
        make_tiny_model(model_file)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"upsr_e2e:\n    base_path: {base / 'extra_models'}\n    upsr: upsr\n")
    if copy_inputs:  # what the workflows' LoadImage nodes name
        (base / "input").mkdir(exist_ok=True)
        for f in sorted((REPO / "example_workflows").glob("upsr_example_*")):
            shutil.copyfile(f, base / "input" / f.name)
    port = free_port()
    log = base / "server.log"
    cmd = [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", str(base), "--extra-model-paths-config", str(yaml),
           "--database-url", "sqlite:///:memory:",
           "--preview-method", "auto"]  # previews on, as many users run it: the sampling nodes send x̂0 per step
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(proc, f"http://127.0.0.1:{port}", base, model_file, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            _get(server.url + "/system_stats")
            break
        except OSError:
            time.sleep(1.0)
    else:
        server.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{server.log_tail()}")
    missing = [n for n in NODE_IDS if n not in _get(server.url + "/object_info", timeout=120)]
    if missing:
        server.stop()
        raise RuntimeError(f"the UPSR pack did not load (missing {missing}):\n{server.log_tail()}")
    return server


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    # a background job of a script starts with SIGINT ignored: stop on SIGTERM or SIGINT alike
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    srv = start()
    print(json.dumps({"url": srv.url, "pid": srv.proc.pid, "base": str(srv.base), "log": str(srv.log)}), flush=True)
    if "--keep" in sys.argv:
        try:
            srv.proc.wait()
        except KeyboardInterrupt:
            pass
    srv.stop()
