"""The training loop under torch.distributed, for real: two CPU processes over gloo, as torchrun
starts them (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT). DDP keeps replicas equal only if
every rank applies the same update, so the checks are exact equalities of the final weights."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _support import packed_crops

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ddp_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 -m upsr_core ARGS`` on a free loopback port;
    torchrun's scratch folders (torchelastic_*) go to ``tmp``, not the system's temp folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "upsr_core", *args]
    scratch = tmp / "torchrun_tmp"
    scratch.mkdir(exist_ok=True)
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)},
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def run_ranks(tmp_path: Path, mode: str, world: int = 2) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung (mode {mode}): a collective that only some ranks reached")
        outs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_ranks_stay_identical_under_a_time_budget(tmp_path):
    """cosine schedule under --max-minutes: the lr follows the clock, and rank 1 starts later, so
    its own clock would give it another lr at every step; rank 0's clock is used by all (and
    decides the stop). Two micro-batches per step (gradient accumulation under no_sync)."""
    r0, r1 = run_ranks(tmp_path, "skew")
    assert r0["summary"]["steps"] == r1["summary"]["steps"] > 3
    assert r0["summary"]["world_size"] == 2
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert r0["lrs"] == r1["lrs"] and len(set(r0["lrs"])) > 1
    assert r0["calls"] == r1["calls"] == 2 * r0["summary"]["steps"]
    # the logged terms are the mean over ranks too (each rank draws its own batch), not rank 0's:
    # both ranks log the same values, and mse (the loss itself here) equals the logged loss up to
    # the history's rounding to 6 decimals
    assert r0["terms"] == r1["terms"]
    assert all(abs(loss - mse) <= 2e-6 for loss, mse in r0["terms"])


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """The loss check sees the mean over ranks, so a NaN on rank 1 stops rank 0 too, at the same
    step, instead of leaving it waiting in the next all-reduce."""
    r0, r1 = run_ranks(tmp_path, "nan")
    assert "error" in r0 and "error" in r1, (r0.get("error"), r1.get("error"))
    assert "at step 3" in r0["error"] and "at step 3" in r1["error"]  # its third step, counted as the logs count


def test_torchrun_trains_both_stages_on_two_cpu_processes(tmp_path):
    """`torchrun --nproc-per-node 2 -m upsr_core train …` end to end (gloo on the CPU): both ranks
    finish, rank 0 alone writes the checkpoint, the export and the log, which records world size 2."""
    import json

    out = tmp_path / "run"
    common = ["--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out", str(out), "--log-every", "1",
              "--degradation", "bicubic", "--device", "cpu", "--steps", "2", "--amp", "off"]
    for stage in (["estimator"], ["denoiser", "--estimator", str(out / "estimator.safetensors"),
                                  "--export", str(tmp_path / "demo.safetensors")]):
        r = torchrun(tmp_path, "train", *stage, *common)
        assert r.returncode == 0, r.stdout + r.stderr
        log = json.loads((out / f"{stage[0]}_log.json").read_text())
        assert log["summary"]["world_size"] == 2 and log["summary"]["steps"] == 2
    assert (tmp_path / "demo.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []


def test_torchrun_training_that_diverges_ends_with_an_error_on_every_rank(tmp_path):
    """A run whose loss turns non-finite (lr 1e30) stops on both ranks with the error line and
    exit status 2, at the same step, and leaves no process behind (no hang, no abort at exit)."""
    r = torchrun(tmp_path, "train", "estimator", "--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out",
                 str(tmp_path / "run"), "--degradation", "bicubic", "--device", "cpu", "--steps", "20", "--amp", "off",
                 "--lr", "1e30", "--warmup", "0")
    text = r.stdout + r.stderr
    assert r.returncode != 0
    # one error line per rank (both ranks write at once, so the two may share a line), the same step
    errors = re.findall(r"error: loss became \S+ at step (\d+)", text)
    assert len(errors) == 2 and len(set(errors)) == 1, text
    assert "exitcode: 2" in text  # the CLI's error status, not a crash
    assert "terminate called" not in text and "SIGABRT" not in text, text


def test_resume_continues_rank_0_and_gives_other_ranks_new_draws(tmp_path):
    """The checkpoint holds rank 0's random streams: rank 0 continues exactly where it stopped;
    rank 1's are not stored, and it must not replay the first run's draws from its seed; the
    replicas stay equal through the resumed steps."""
    r0, r1 = run_ranks(tmp_path, "resume")
    assert r0["step"] == r1["step"] == 6
    assert r0["continues"] and not r1["replays"] and not r1["continues"]
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
