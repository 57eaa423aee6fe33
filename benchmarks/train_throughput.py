"""Training throughput (patches per second) with data loading overlapped, versus a naive loader.

    python benchmarks/train_throughput.py [--cases 40] [--steps 20] [--workers 2]

Same model, loss, optimiser and training transforms as ``medseg train configs/hippocampus.yaml``
(UNet 16-128, batch 4 of 48x64x48 patches, Dice + cross-entropy, AdamW). Each mode runs
``--steps`` optimiser steps after two warm-up steps and counts patches per second, data loading
included:

* ``naive``: ``monai.data.Dataset`` (every case read from disk, reoriented, resampled and
  normalised at every step) and ``DataLoader(num_workers=0)``: loading and the model step take turns;
* ``cached``: ``CacheDataset`` (the deterministic preprocessing done once, as ``data.cache: true``
  does in medseg), no workers;
* ``cached+workers``: ``CacheDataset`` and ``--workers`` loader processes with persistent workers
  and prefetching, so random cropping and augmentation overlap the model step
  (``train.num_workers`` in a config).

The time to build the cache is reported on its own (paid once per training run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="train_throughput.json")
    args = ap.parse_args(argv)

    from monai.data import CacheDataset, DataLoader, Dataset

    from medseg.core.config import load_config
    from medseg.preprocessing.datasets import discover_msd
    from medseg.models.registry import build_model
    from medseg.training.trainer import _loss, supervised_loss
    from medseg.preprocessing.pipeline import train_transforms

    data = Path(args.data)
    if not data.is_dir():
        data = REPO / "tests" / "data" / "hippocampus"
    cfg = load_config(REPO / "configs" / "hippocampus.yaml", [f"data.root={data}"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    cases = [c.as_dict() for c in discover_msd(data)[: args.cases]]
    bs = cfg.train.batch_size

    def run(loader, steps: int) -> float:
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, cfg.num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        loss_fn = _loss(cfg)
        model.train()
        it, done, t0 = iter(loader), 0, None
        while done < steps + 2:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            if done == 2:
                t0 = time.perf_counter()  # after two warm-up steps
            opt.zero_grad(set_to_none=True)
            loss = supervised_loss(loss_fn, model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            done += 1
        return steps * bs / (time.perf_counter() - t0)

    res: dict = {"cases": len(cases), "batch": bs, "patch": cfg.patch.size, "steps": args.steps,
                 "threads": torch.get_num_threads()}
    tf = train_transforms(cfg)
    naive = DataLoader(Dataset(cases, transform=tf), batch_size=bs, shuffle=True, num_workers=0)
    res["naive_patches_per_s"] = round(run(naive, args.steps), 2)
    print(res, flush=True)
    t0 = time.perf_counter()
    cached_ds = CacheDataset(cases, transform=tf, cache_rate=1.0, num_workers=1, progress=False)
    res["cache_build_s"] = round(time.perf_counter() - t0, 1)
    cached = DataLoader(cached_ds, batch_size=bs, shuffle=True, num_workers=0)
    res["cached_patches_per_s"] = round(run(cached, args.steps), 2)
    print(res, flush=True)
    overlapped = DataLoader(cached_ds, batch_size=bs, shuffle=True, num_workers=args.workers,
                            persistent_workers=args.workers > 0, prefetch_factor=2 if args.workers else None)
    res["cached_workers_patches_per_s"] = round(run(overlapped, args.steps), 2)
    res["workers"] = args.workers
    res["speedup_vs_naive"] = round(res["cached_workers_patches_per_s"] / res["naive_patches_per_s"], 2)
    print(json.dumps(res, indent=1))
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
