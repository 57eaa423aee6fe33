"""Training step time of the planner's CPU networks, for the cost model in medseg/planning.py.

    python benchmarks/cpu_step.py [--steps 6] [--threads 2]

Times one optimiser step (forward, Dice + cross-entropy over the deep-supervision heads where the
network has them, backward, AdamW) on random batches, for the residual UNet and the DynUNet with
channels 16..128, at the patches and batches below, each in a fresh process, and prints the median
seconds per step and the peak resident memory growth next to the planner's "units" (batch x sum
over levels of voxels x channels) and its estimates; then a linear fit per network. Run it on an
otherwise idle machine.
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
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "PATCH", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        name, patch, batch = args.one
        print(json.dumps(one(name, tuple(int(v) for v in patch.split("x")), int(batch), args.steps, args.threads)))
        return 0

    from medseg.planning import estimate_cost, units_for

    rows = []
    for name in args.model or ["unet3d", "dynunet3d"]:
        for patch, batch in SHAPES:
            out = subprocess.run([sys.executable, __file__, "--one", name, "x".join(map(str, patch)), str(batch),
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            units = units_for(patch, [[2, 2, 2]] * (len(CHANNELS) - 1), CHANNELS, batch)
            step_s, mem_gb = estimate_cost("cpu", name, units)
            row.update(M_units=round(units / 1e6, 2), planner_s=round(step_s, 3), planner_gb=round(mem_gb, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in {r["model"] for r in rows}:
        m = [r["M_units"] for r in rows if r["model"] == name]
        slope, icpt = np.polyfit(m, [r["s_per_step"] for r in rows if r["model"] == name], 1)
        mslope, micpt = np.polyfit(m, [r["rss_growth_gb"] for r in rows if r["model"] == name], 1)
        print(f"{name}: step {icpt * 1000:.1f} ms + {slope * 1000:.1f} ms per M units ({args.threads} threads); "
              f"memory {micpt * 1000:.0f} MB + {mslope * 1000:.1f} MB per M units")
    return 0


def one(name: str, patch: tuple, batch: int, steps: int, threads: int) -> dict:
    import resource

    from monai.losses import DiceCELoss

    from medseg.config import ModelConfig
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
        supervised_loss(loss_fn, model(x), y).backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": name, "patch": "x".join(map(str, patch)), "batch": batch,
            "s_per_step": round(statistics.median(times), 3), "rss_growth_gb": round((peak - base) / 2 ** 20, 3)}


if __name__ == "__main__":
    sys.exit(main())
