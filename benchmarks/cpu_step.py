"""Training step time of the planner's CPU networks, for the cost model in medseg/planning.py.

    python benchmarks/cpu_step.py [--steps 6] [--threads 2] [--bf16]

Times one optimiser step (forward, Dice + cross-entropy over the deep-supervision heads where the
network has them, backward, AdamW) on random batches, for the residual UNet and the DynUNet with
channels 16..128, at the patches and batches below, each in a fresh process, and prints the median
seconds per step and the peak resident memory growth next to the planner's "units" (batch x sum
over levels of voxels x channels) and its estimates; then a linear fit per network. ``--bf16`` adds
a row per shape with the step under bf16 autocast (``train.amp_dtype: bf16``), whose speed depends
on the CPU having AMX or AVX-512 BF16 (printed first). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CHANNELS = [16, 32, 64, 128]
SHAPES = [((32, 32, 32), 2), ((40, 56, 40), 2), ((40, 56, 40), 4), ((48, 64, 48), 2), ((64, 64, 64), 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", action="append", default=[], help="unet3d and/or dynunet3d (default both)")
    ap.add_argument("--bf16", action="store_true", help="also time each step under bf16 autocast")
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "PATCH", "BATCH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        name, patch, batch, dtype = args.one
        print(json.dumps(one(name, tuple(int(v) for v in patch.split("x")), int(batch), args.steps, args.threads,
                             dtype)))
        return 0

    from medseg.core.runtime import cpu_has_fast_bf16
    from medseg.planning import estimate_cost, units_for

    if args.bf16:
        print(f"native bf16 (AMX or AVX-512 BF16) on this CPU: {cpu_has_fast_bf16()}", flush=True)
    rows = []
    for name in args.model or ["unet3d", "dynunet3d"]:
        for (patch, batch), dtype in [(s, d) for s in SHAPES for d in (["fp32", "bf16"] if args.bf16 else ["fp32"])]:
            out = subprocess.run([sys.executable, __file__, "--one", name, "x".join(map(str, patch)), str(batch),
                                  dtype, "--steps", str(args.steps), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            units = units_for(patch, [[2, 2, 2]] * (len(CHANNELS) - 1), CHANNELS, batch)
            step_s, mem_gb = estimate_cost("cpu", name, units)
            row.update(M_units=round(units / 1e6, 2), planner_s=round(step_s, 3), planner_gb=round(mem_gb, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name, dtype in sorted({(r["model"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if r["model"] == name and r["dtype"] == dtype]
        m = [r["M_units"] for r in sel]
        slope, icpt = np.polyfit(m, [r["s_per_step"] for r in sel], 1)
        mslope, micpt = np.polyfit(m, [r["rss_growth_gb"] for r in sel], 1)
        print(f"{name} {dtype}: step {icpt * 1000:.1f} ms + {slope * 1000:.1f} ms per M units ({args.threads} threads); "
              f"memory {micpt * 1000:.0f} MB + {mslope * 1000:.1f} MB per M units")
    return 0


def one(name: str, patch: tuple, batch: int, steps: int, threads: int, dtype: str = "fp32") -> dict:
    import resource

    from monai.losses import DiceCELoss

    from medseg.core.config import ModelConfig
    from medseg.core.runtime import autocast
    from medseg.models.registry import build_model
    from medseg.training.trainer import supervised_loss

    torch.set_num_threads(threads)
    dyn = name == "dynunet3d"
    cfg = ModelConfig(name=name, channels=CHANNELS, strides=[2, 2, 2], num_res_units=0 if dyn else 2,
                      deep_supervision=2 if dyn else 0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, 3, (batch, 1, *patch))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(cfg, 1, 3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), dtype == "bf16", "bf16"):
            loss = supervised_loss(loss_fn, model(x), y)
        loss.backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": name, "dtype": dtype, "patch": "x".join(map(str, patch)), "batch": batch,
            "s_per_step": round(statistics.median(times), 3), "rss_growth_gb": round((peak - base) / 2 ** 20, 3)}


if __name__ == "__main__":
    sys.exit(main())
