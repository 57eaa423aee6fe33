"""Images per second of each 2D image model on the CPU at 512x512 (batch 1, eval mode, no grad).

    python benchmarks/bench_2d.py [--size 512] [--runs 10] [--threads N]

Each model is built with its registry defaults (random weights: speed does not depend on
them), run twice to warm up, then timed over ``--runs`` forward passes; the median time per
image is reported. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from medseg.core.config import ModelConfig
from medseg.models.registry import build_model

MODELS = [
    ("segnet", {}, "widths 16-32-64-128"),
    ("unet2d", {}, "MONAI UNet 16-128, 2 residual units"),
    ("fcn_resnet", {}, "resnet18, FCN-8s"),
    ("deeplabv3plus_mobilenetv3", {}, "mobilenetv3_large, output stride 16"),
    ("deeplabv3plus_mobilenetv3", {"backbone": "mobilenetv3_small"}, "mobilenetv3_small, output stride 16"),
    ("flexunet2d", {}, "efficientnet-b0"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--classes", type=int, default=21)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at start")
    print(f"# input 1x3x{args.size}x{args.size}, eval(), torch.no_grad(), median of {args.runs} runs after 2 warm-up runs")
    print("| model | setting | parameters | ms / image | images / s |")
    print("|---|---|---|---|---|")
    x = torch.rand(1, 3, args.size, args.size)
    for name, extra, note in MODELS:
        torch.manual_seed(0)
        net = build_model(ModelConfig(name=name, **extra), 3, args.classes).eval()
        params = sum(p.numel() for p in net.parameters())
        times = []
        with torch.no_grad():
            for i in range(args.runs + 2):
                t0 = time.perf_counter()
                out = net(x)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        if out.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(f"{name}: output {tuple(out.shape)} for input {tuple(x.shape)}")
        med = statistics.median(times)
        print(f"| `{name}` | {note} | {params / 1e6:.2f} M | {1000 * med:.0f} | {1 / med:.2f} |", flush=True)


if __name__ == "__main__":
    main()
