"""medseg's sliding window against MONAI's ``sliding_window_inference`` on one CT-size volume.

    python benchmarks/sliding_window.py                      # 410x410x300, bundled hippocampus (two networks)
    python benchmarks/sliding_window.py --model hippocampus-fast --shape 256 256 200

Both run the same networks on the same preprocessed-size float32 volume with the model's window,
overlap and Gaussian blending, and end with the class probabilities of the whole volume (what
``predict`` maps back to the source grid). Each variant runs in a fresh child process, which
reports its wall time and peak resident memory (``ru_maxrss``) including the input volume:

* ``medseg``: :func:`medseg.inference.engine.sliding_window_probs` (slab-bounded blending,
  ensemble members' softmax averaged per slab, float16 output above 256 MB);
* ``monai``: ``sliding_window_inference`` over all members at once (their logits concatenated),
  then the per-member softmax and the mean;
* ``monai-buffered``: the same with ``buffer_steps=1, buffer_dim=-1`` (MONAI's slab-bounded mode).

The labels (argmax) of each MONAI variant are compared with medseg's.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def child(variant: str, model: str, shape: list[int]) -> dict:
    import resource

    import numpy as np
    import torch

    from medseg.inference.engine import channel_argmax, sliding_window_probs, window_size
    from medseg.inference.predictor import Predictor

    pred = Predictor(model, device="cpu")
    cfg, runner = pred.cfg, pred.runner
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, *shape)).astype(np.float32))
    roi = window_size(cfg, shape, pred.spec.dims)
    c, g = cfg.num_classes, runner.groups
    t0 = time.perf_counter()
    if variant == "medseg":
        probs = sliding_window_probs(runner, x, roi, num_classes=c, overlap=cfg.inference.overlap,
                                     blend=cfg.inference.blend, sw_batch_size=cfg.inference.sw_batch_size, groups=g,
                                     out_dtype=torch.float16 if c * x.numel() * 4 > 256 * 1024 ** 2 else torch.float32)
    else:
        from monai.inferers import sliding_window_inference

        extra = {"buffer_steps": 1, "buffer_dim": -1} if variant == "monai-buffered" else {}
        with torch.inference_mode():  # the runner returns inference tensors
            logits = sliding_window_inference(x[None], roi, cfg.inference.sw_batch_size, runner,
                                              overlap=cfg.inference.overlap, mode=cfg.inference.blend, **extra)[0]
        probs = torch.softmax(logits.view(g, c, *shape), dim=1).mean(0)
        del logits
    seconds = time.perf_counter() - t0
    labels = channel_argmax(probs).numpy()
    np.save(f"/tmp/medseg_sw_{variant}.npy", labels)
    return {"variant": variant, "seconds": round(seconds, 2), "members": g, "window": roi,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hippocampus")
    ap.add_argument("--shape", type=int, nargs=3, default=[410, 410, 300])
    ap.add_argument("--variants", nargs="+", default=["medseg", "monai-buffered", "monai"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.shape)))
        return 0
    import numpy as np

    print(f"{platform.processor() or platform.machine()}, {args.model}, volume {args.shape}", flush=True)
    rows = []
    for v in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", v, "--model", args.model, "--shape",
                              *map(str, args.shape)], capture_output=True, text=True)
        if out.returncode:
            print(f"{v}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if v != "medseg" and "medseg" in args.variants:
            a, b = np.load("/tmp/medseg_sw_medseg.npy"), np.load(f"/tmp/medseg_sw_{v}.npy")
            row["labels_differing_from_medseg"] = int((a != b).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | seconds | peak RSS (GB) | labels differing from medseg |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']} | {r['peak_rss_gb']} | {r.get('labels_differing_from_medseg', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
