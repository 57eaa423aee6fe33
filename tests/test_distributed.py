"""Multi-process training with torchrun on CPU (gloo): two processes, one model, rank-0 outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from medseg.models.checkpoint import load_checkpoint
from medseg.training.distributed import DistContext

GLOO_EXIT_RACE = "terminate called without an active exception"

TINY = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1", "patch.size=[16,16,16]",
        "train.epochs=2", "train.val_every=1", "train.batch_size=1", "inference.sw_batch_size=2",
        "data.cache=false", "augment.enabled=false", "train.threads=1"]


def test_context_from_torchrun_environment(monkeypatch):
    assert not DistContext.from_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = DistContext.from_env()
    assert ctx.enabled and not ctx.is_main and ctx.rank == 2


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(tmp_path, hippo_data):
    out = tmp_path / "ddp"
    sets = []
    for it in [f"data.root={hippo_data}", f"train.output_dir={out}", *TINY]:
        sets += ["--set", it]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "medseg", "train", str(REPO / "configs" / "hippocampus.yaml"), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if proc.returncode and GLOO_EXIT_RACE in proc.stderr and "epoch 2/2" in proc.stderr:
        # gloo can abort a process in its own teardown after the run is complete (upstream: its worker
        # threads outliving destroy_process_group on a loaded machine); seen once in ~20 runs. One retry;
        # any other failure, or this one twice, still fails the test.
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr
    assert proc.stdout.count("best mean validation Dice") == 1  # rank 0 reports once
    assert proc.stderr.count("training / ") == 1                # and logs once
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    # DDP wrappers are not saved: the checkpoint loads into a plain model
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    assert (out / "best.pt").is_file() and all(torch.isfinite(v).all() for v in ck["state_dict"].values()
                                               if v.is_floating_point())
