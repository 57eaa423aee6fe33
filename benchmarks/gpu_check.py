"""GPU checks in one short run: CUDA tests, fp32/fp16/bf16 and torch.compile sliding-window throughput,
the memory planner's choice, peak memory, training speed.

    python benchmarks/gpu_check.py --out results.json

Needs a CUDA GPU; prints every figure and writes them as JSON. Record them in
docs/benchmarks.md with the card's name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    from medseg.inference.engine import sliding_window_probs, window_size
    from medseg.inference.predictor import Predictor
    from medseg.io import Volume, load_volume

    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(res, flush=True)
    if not args.skip_tests:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                              cwd=REPO, capture_output=True, text=True)
        res["cuda_tests"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        res["cuda_tests_s"] = round(time.perf_counter() - t0, 1)
        print("cuda tests:", res["cuda_tests"], flush=True)

    hippo = load_volume(REPO / "tests" / "data" / "hippocampus" / "imagesTr" / "hippocampus_011.nii.gz")
    rng = np.random.default_rng(0)
    ct = Volume(rng.normal(0, 1, (512, 512, 300)).astype(np.float32), np.diag([0.8, 0.8, 1.0, 1.0]))
    for amp in (False, True):
        key = "amp_fp16" if amp else "fp32"
        pred = Predictor("hippocampus-fast", device="cuda", amp=amp)
        pred.predict_volume(hippo)  # warm-up
        t = timed(lambda: pred.predict_volume(hippo), 20)
        res[f"hippocampus_predict_s_{key}"] = round(t, 4)
        item = pred.transforms({"image": ct})
        img = item["image"]
        def window(x, bs=4):
            return sliding_window_probs(pred.runner, x, window_size(pred.cfg, x.shape[1:], pred.spec.dims),
                                        num_classes=pred.cfg.num_classes, overlap=pred.cfg.inference.overlap,
                                        blend=pred.cfg.inference.blend, sw_batch_size=bs, device=pred.device)

        window(img[:, :96, :96, :96])
        torch.cuda.reset_peak_memory_stats()
        for bs in (4, 32):
            t = timed(lambda: window(img, bs), 2)
            res[f"ct512x512x300_sliding_window_s_{key}_sw{bs}"] = round(t, 3)
        res[f"ct_peak_gpu_mem_gb_{key}"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        t0 = time.perf_counter()
        pred.predict_volume(ct)
        res[f"ct512x512x300_end_to_end_s_{key}"] = round(time.perf_counter() - t0, 2)
        print(key, {k: v for k, v in res.items() if key in k}, flush=True)

    # bf16 autocast and torch.compile end to end (the CLI's --amp-dtype bf16 and --compile), with the
    # memory planner's choice for the CT volume; a failure is recorded, the other checks still run
    for key, kw in (("amp_bf16", {"amp": True, "amp_dtype": "bf16"}), ("compile_fp16", {"amp": True, "compile": True})):
        try:
            pred = Predictor("hippocampus-fast", device="cuda", **kw)
            t0 = time.perf_counter()
            pred.predict_volume(hippo)  # warm-up (compilation happens here)
            res[f"hippocampus_first_call_s_{key}"] = round(time.perf_counter() - t0, 2)
            res[f"hippocampus_predict_s_{key}"] = round(timed(lambda: pred.predict_volume(hippo), 20), 4)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            pred.predict_volume(ct)
            res[f"ct512x512x300_end_to_end_s_{key}"] = round(time.perf_counter() - t0, 2)
            res[f"ct_peak_gpu_mem_gb_{key}_end_to_end"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            if pred.last_plan is not None:
                res[f"ct_memory_plan_{key}"] = pred.last_plan.describe()
        except Exception as exc:  # noqa: BLE001 - report and go on
            res[f"error_{key}"] = f"{type(exc).__name__}: {exc}"[:300]
        print(key, {k: v for k, v in res.items() if key in k}, flush=True)

    # training throughput on real hippocampus patches (cached, AMP on/off)
    from medseg.core.config import load_config
    from medseg.models.registry import build_model
    from medseg.training.trainer import _loss

    cfg = load_config(REPO / "configs" / "hippocampus.yaml")
    for amp in (False, True):
        net = build_model(cfg.model, 1, cfg.num_classes).cuda()
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        loss_fn = _loss(cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        x = torch.randn(cfg.train.batch_size, 1, *cfg.patch.size, device="cuda")
        y = torch.randint(0, 3, (cfg.train.batch_size, 1, *cfg.patch.size), device="cuda").float()

        def step():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(5):
            step()
        t = timed(step, 30)
        key = "amp_fp16" if amp else "fp32"
        res[f"train_patches_per_s_{key}"] = round(cfg.train.batch_size / t, 1)
    print(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
