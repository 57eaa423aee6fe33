"""Where medseg's time goes, and how it compares with the plain MONAI script a user would otherwise write.

    python benchmarks/speed.py                                   # every case below, JSON to speed.json
    python benchmarks/speed.py --cases hippo,stages,startup      # the quick ones (a few minutes on 2 cores)
    python benchmarks/speed.py --cases ct --ct-shape 512,512,600 # the CT-size volume (about 10 min on 2 cores)

Every comparison runs the tools alternately, A B then B A (then A B ...), and reports medians, so that a
busy machine slows both alike. Cases:

* ``hippo``: ``medseg predict FOLDER`` with no flags (the default model, whatever the machine) and with
  ``--model hippocampus`` (one network; ``--single``; one run when it is the default) on a folder of hippocampus volumes, as whole
  processes, against ``benchmarks/monai_plain.py`` on the same folder running (a) the tutorial network a user
  would write, MONAI's ``UNet`` 16-128 (the weights of the first bundled model, read from git history; random
  weights of that architecture where git is not at hand: the time does not depend on them), and (b) the
  single model's network and weights. Ratio = plain / medseg (above 1: medseg is faster). ``--onnx`` adds
  the single model through ONNX Runtime.
* ``kernels``: one 40x56x40 window through each network at batch 1 and 2, with PyTorch's choice of
  convolution kernel and with oneDNN forced (what medseg's torch backend does on the CPU).
* ``stages``: the default model in one process over the same volumes: seconds per volume for reading,
  preprocessing, the network, back to the input grid, writing (``Predictor.stage_seconds``).
* ``startup``: ``python -c "import torch, monai"`` against medseg's start-up before the first volume
  (importing the CLI and the run loop, loading and checking the default model), whole processes.
* ``ct``: a synthetic int16 CT volume (default 512x512x600 at 0.8x0.8x1.0 mm) through ``medseg predict`` with no
  flags, and through the plain MONAI script running the same network: seconds, seconds per million input
  voxels, peak RSS of each process.
* ``glioma``: ``medseg predict CASE_FOLDER --model glioma`` per BraTS case against a plain MONAI script running
  the same four networks (``benchmarks/glioma.py``); needs ``../shared/data/brats2015``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = REPO.parent / "shared" / "data" / "hippocampus" / "imagesTr"
FIRST_UNET = "c593fd8"  # the commit whose bundled hippocampus.pt was the UNet 16-128 of configs/hippocampus.yaml


def machine() -> str:
    import torch

    from medseg.core.runtime import cpu_has_fast_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, native bf16 {cpu_has_fast_bf16()}, "
            f"torch {torch.__version__}")


def inputs(n: int) -> list[Path]:
    src = SHARED if SHARED.is_dir() else REPO / "tests" / "data" / "hippocampus" / "imagesTr"
    files = sorted(src.glob("*.nii.gz"))
    return (files * (n // len(files) + 1))[:n]


def med(xs) -> float:
    return round(statistics.median(xs), 3)


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, 0.0


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of ``cmd`` run in a fresh child (getrusage of a one-child wrapper)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
               "s = time.perf_counter() - t; "
               "print(s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2); "
               "sys.exit(r.returncode and print(r.stderr[-2000:], file=sys.stderr) or r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s, gb = proc.stdout.split()
    return float(s), float(gb)


def alternate(cmds: dict, repeats: int, runner=run_timed) -> dict:
    """Each command ``repeats`` times, the order reversed every round (A B, B A, ...): name -> [(s, GB)]."""
    out = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(runner(cmds[name]))
            print(f"  {name}: {out[name][-1][0]:.2f} s", flush=True)
    return out


def first_unet(tmp: Path) -> tuple[Path, str]:
    """The tutorial UNet 16-128 as a checkpoint: trained weights from git history, else random ones."""
    target = tmp / "unet16.pt"
    proc = subprocess.run(["git", "show", f"{FIRST_UNET}:medseg/assets/models/hippocampus.pt"], cwd=REPO,
                          capture_output=True)
    if proc.returncode == 0 and proc.stdout:
        target.write_bytes(proc.stdout)
        return target, f"trained weights of commit {FIRST_UNET}"
    import torch

    from medseg.core.config import load_config
    from medseg.models.checkpoint import save_checkpoint
    from medseg.models.registry import build_model

    cfg = load_config(REPO / "configs" / "hippocampus.yaml")
    torch.manual_seed(0)
    save_checkpoint(target, model=build_model(cfg.model, 1, cfg.out_channels), cfg=cfg, epoch=0)
    return target, "random weights (git history not at hand)"


def case_hippo(args, tmp: Path, res: dict) -> None:
    from medseg.models.loading import resolve_model

    folder = tmp / "hippo_in"
    folder.mkdir()
    for i, f in enumerate(inputs(args.hippo)):
        shutil.copy(f, folder / f"case_{i:03d}.nii.gz")
    unet, unet_note = first_unet(tmp)
    py = sys.executable
    plain = [py, str(REPO / "benchmarks" / "monai_plain.py"), str(folder)]
    single = str(resolve_model(args.single))  # one network, which the plain script can run too
    medseg = [py, "-m", "medseg", "predict", str(folder), "-o"]
    cmds = {"medseg": medseg + [str(tmp / "o_medseg")],
            "medseg_single": medseg + [str(tmp / "o_single"), "--model", single],
            "monai_unet16": plain + [str(tmp / "o_unet"), "--model", str(unet)],
            "monai_single": plain + [str(tmp / "o_same"), "--model", single]}
    if resolve_model(None) == resolve_model(single):  # the default is that one network: one run serves both rows
        del cmds["medseg_single"]
    if args.onnx:
        cmds["medseg_single_onnx"] = medseg + [str(tmp / "o_onnx"), "--model", single, "--backend", "onnxruntime"]
        run_timed(cmds["medseg_single_onnx"])  # the export is made and cached once, untimed
    runs = alternate(cmds, args.repeats)
    row = {k: med([s for s, _ in v]) for k, v in runs.items()}
    row.setdefault("medseg_single", row["medseg"])
    row |= {"n": args.hippo, "single": args.single, "unet16_weights": unet_note,
            "default_vs_monai_unet16": round(row["monai_unet16"] / row["medseg"], 2),
            "single_vs_monai_unet16": round(row["monai_unet16"] / row["medseg_single"], 2),
            "single_vs_monai_single": round(row["monai_single"] / row["medseg_single"], 2)}
    if args.onnx:
        row["single_onnx_vs_torch"] = round(row["medseg_single"] / row["medseg_single_onnx"], 2)
    res["cases"]["hippocampus_folder_whole_process_s"] = row
    print("hippocampus folder:", row, flush=True)


def case_stages(args, tmp: Path, res: dict) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import load_volume, save_volume

    files = inputs(args.hippo)
    pred = Predictor(None, device="cpu")
    for f in files[:2]:  # warm-up
        pred.predict_volume(load_volume(f))
    pred.stage_seconds = dict.fromkeys(pred.stage_seconds, 0.0)
    read = write = 0.0
    for i, f in enumerate(files):
        t0 = time.perf_counter()
        vol = load_volume(f)
        t1 = time.perf_counter()
        labels = pred.predict_volume(vol)
        t2 = time.perf_counter()
        save_volume(labels, tmp / "stages" / f"{i:03d}.nii.gz", reference=vol)
        read, write = read + t1 - t0, write + time.perf_counter() - t2
    per = {"read": read, **pred.stage_seconds, "write": write}
    row = {k: round(1000 * v / len(files), 1) for k, v in per.items()} | {"total": round(1000 * sum(per.values()) / len(files), 1)}
    res["cases"]["hippocampus_stages_ms_per_volume"] = row | {"n": len(files), "tta": bool(pred.tta_axes),
                                                              "backend": pred.backend}
    print("stages (ms per volume):", row, flush=True)


STARTUP = ("import medseg.cli, medseg.apps.run; from medseg.inference.predictor import Predictor; "
           "Predictor(None, device='cpu')")


def case_startup(args, tmp: Path, res: dict) -> None:
    py = sys.executable
    runs = alternate({"import_torch_monai": [py, "-c", "import torch, monai"], "medseg_startup": [py, "-c", STARTUP]},
                     args.startup_repeats)
    row = {k: med([s for s, _ in v]) for k, v in runs.items()}
    row["medseg_minus_import"] = round(row["medseg_startup"] - row["import_torch_monai"], 3)
    res["cases"]["startup_s"] = row
    print("start-up:", row, flush=True)


def case_ct(args, tmp: Path, res: dict) -> None:
    from memory_ct import write_ct

    from medseg.models.loading import resolve_model

    shape = tuple(int(s) for s in args.ct_shape.split(","))
    ct = tmp / "ct" / "ct.nii.gz"
    ct.parent.mkdir()
    write_ct(ct, shape)
    py = sys.executable
    model = str(resolve_model(args.ct_model))
    overlap = args.ct_overlap
    if overlap is None:  # the model's own setting, given to both tools
        from medseg.models.loading import model_config

        overlap = model_config(model).inference.overlap
    cmds = {"medseg": [py, "-m", "medseg", "predict", str(ct), "-o", str(tmp / "ct_medseg"), "--model", model,
                       "--overlap", str(overlap)]}
    if args.ct_plain:
        cmds["monai_same_network"] = [py, str(REPO / "benchmarks" / "monai_plain.py"), str(ct), str(tmp / "ct_plain"),
                                      "--model", model, "--overlap", str(overlap)]
    runs = alternate(cmds, args.ct_repeats, runner=peak_rss_of)
    mvox = float(shape[0] * shape[1] * shape[2]) / 1e6
    row = {"shape": list(shape), "spacing_mm": [0.8, 0.8, 1.0], "model": args.ct_model or "hippocampus (default)",
           "overlap": overlap}
    for k, v in runs.items():
        s = med([x for x, _ in v])
        row[k] = {"s": s, "s_per_mvoxel": round(s / mvox, 3), "peak_rss_gb": round(max(g for _, g in v), 2)}
    if "monai_same_network" in row:
        row["ratio"] = round(row["monai_same_network"]["s"] / row["medseg"]["s"], 2)
    res["cases"]["ct_volume"] = row
    print("CT volume:", row, flush=True)


def case_glioma(args, tmp: Path, res: dict) -> None:
    import glioma

    if not glioma.DATA.is_dir():
        print("glioma: skipped (no ../shared/data/brats2015)", flush=True)
        return
    rows = glioma.timing("glioma", threads=len(os.sched_getaffinity(0)), repeats=args.repeats)
    res["cases"]["glioma_per_case_s"] = rows
    print("glioma:", json.dumps(rows), flush=True)


def case_kernels(args, tmp: Path, res: dict) -> None:
    """One window (batch 1, and batch 2 as mirror TTA runs it) through each bundled hippocampus network and the
    tutorial UNet: with PyTorch's own kernels, with oneDNN forced for the convolutions (``use_onednn_conv3d``), and
    through medseg's CPU runner (``TorchRunner``: every path of ``use_fast_cpu_kernels``, channels-last). The three
    variants of a network take turns, pass by pass, so that load from elsewhere slows them alike; medians of
    ``--kernel-passes``. The process keeps freed blocks as medseg's CPU runner does (``keep_freed_cpu_memory``):
    without it, page faults of fresh allocations outweigh the kernels."""
    import copy

    import torch

    from medseg.core.runtime import keep_freed_cpu_memory
    from medseg.inference.backends import TorchRunner, use_onednn_conv3d
    from medseg.models.loading import load_model

    keep_freed_cpu_memory()

    unet, _ = first_unet(tmp)
    nets = {"unet16 (tutorial)": load_model(str(unet)).nets[0],
            "dynunet16 (hippocampus, the default)": load_model("hippocampus").nets[0]}
    pair = load_model("hippocampus-ensemble").nets
    if len(pair) > 1:
        nets["dynunet24 (second member of hippocampus-ensemble)"] = pair[1]
    x1 = torch.randn(1, 1, 40, 56, 40)

    def timed(variants: dict, x) -> dict:
        ts = {k: [] for k in variants}
        with torch.inference_mode():
            for net in variants.values():
                net(x)
            for _ in range(args.kernel_passes):
                for k, net in variants.items():
                    t0 = time.perf_counter()
                    net(x)
                    ts[k].append(time.perf_counter() - t0)
        return {k: round(statistics.median(v) * 1000, 1) for k, v in ts.items()}

    row = {}
    for name, net in nets.items():
        net = net.eval()
        onednn = copy.deepcopy(net)
        use_onednn_conv3d(onednn)
        fast = TorchRunner([copy.deepcopy(net)], torch.device("cpu"), amp=False)
        variants = {"pytorch": net, "onednn": onednn, "medseg": fast}
        row[name] = {f"batch{n}_{k}_ms": v for n in (1, 2)
                     for k, v in timed(variants, x1.repeat(n, 1, 1, 1, 1)).items()}
        print(f"  {name}: {row[name]}", flush=True)
    res["cases"]["window_40x56x40_ms"] = row


CASES = {"kernels": case_kernels, "hippo": case_hippo, "stages": case_stages, "startup": case_startup, "ct": case_ct, "glioma": case_glioma}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="kernels,hippo,stages,startup,glioma,ct")
    ap.add_argument("--hippo", type=int, default=65, help="hippocampus volumes in the folder")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool (A B, then B A)")
    ap.add_argument("--startup-repeats", type=int, default=6)
    ap.add_argument("--kernel-passes", type=int, default=15, help="passes per variant in the kernels case")
    ap.add_argument("--onnx", action="store_true", help="also time --backend onnxruntime on the folder")
    ap.add_argument("--single", default="hippocampus",
                    help="a one-network model timed beside the default, in medseg and in the plain script")
    ap.add_argument("--ct-shape", default="512,512,600")
    ap.add_argument("--ct-model", default=None, help="model for the CT case (default: medseg's default)")
    ap.add_argument("--ct-repeats", type=int, default=1)
    ap.add_argument("--ct-overlap", type=float, default=None,
                    help="sliding-window overlap for both tools on the CT volume (default: the model's own)")
    ap.add_argument("--ct-plain", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the plain MONAI script on the CT volume (slow: float64 resampling)")
    ap.add_argument("--json", default="speed.json")
    args = ap.parse_args(argv)
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    print(res["machine"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            CASES[name](args, Path(tmp), res)
    print(json.dumps(res, indent=1))
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
