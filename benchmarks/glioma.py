"""Glioma benchmark: leave-one-out cross-validation figures per region, and whole-process time per case
beside a plain MONAI script running the same networks on the same cases.

    python benchmarks/glioma.py --cv runs/glioma_cv            # after: medseg train configs/glioma.yaml --folds 4
    python benchmarks/glioma.py --cv runs/glioma_cv --time     # also time medseg and the plain script per case

Cross-validation: each fold's held-out case, predicted afresh by the fold's final weights
(``fold_I/best.pt`` under ``train.keep: last``), is scored per region (whole tumour, tumour core,
enhancing tumour): Dice,
HD95, volumes, BraTS 2023 lesion-wise Dice and HD95. Timing: ``medseg predict CASE_FOLDER --model
MODEL`` as a whole process (imports, model load, reading both sequences, prediction, writing), one run
per case, against ``plain_monai`` below (LoadImage, Orientation, Spacing, NormalizeIntensity per channel
over non-zero voxels, CropForeground, sliding_window_inference with the same DynUNet weights, sigmoid,
Invertd, SaveImage), also a whole process per case. Prints a table and one JSON line; the figures go
into docs/benchmarks.md by hand, with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "brats2015"

PLAIN_MONAI = r'''
import sys, torch
from monai.data import decollate_batch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from monai.transforms import (Compose, ConcatItemsd, CropForegroundd, EnsureChannelFirstd, Invertd, LoadImaged,
                              NormalizeIntensityd, Orientationd, SaveImage, Spacingd)

flair, t1c, model_path, out_dir = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))
ck = torch.load(model_path, map_location="cpu", weights_only=True)
m = ck["config"]["model"]
nets = []
scales = [ck.get("quant_scales") or {}, *(ck.get("ensemble_quant_scales") or [{}] * len(ck.get("ensemble", [])))]
for state, sc in zip([ck["state_dict"], *ck.get("ensemble", [])], scales):
    net = DynUNet(3, 2, 3, kernel_size=[3] * len(m["channels"]), strides=[1, *m["strides"]],
                  upsample_kernel_size=m["strides"], filters=m["channels"], norm_name="instance", res_block=False)
    # int8 weights (pack-model --int8) carry one float scale per output channel
    net.load_state_dict({k: v.float() * sc[k].float().view(-1, *[1] * (v.dim() - 1)) if k in sc else v.float()
                         for k, v in state.items()})
    nets.append(net.eval())
pre = Compose([LoadImaged(["flair", "t1c"]), EnsureChannelFirstd(["flair", "t1c"]),
               ConcatItemsd(["flair", "t1c"], "image"), Orientationd("image", axcodes="RAS"),
               Spacingd("image", pixdim=[2.0, 2.0, 2.0], mode="bilinear"),
               NormalizeIntensityd("image", nonzero=True, channel_wise=True),
               CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0)])
data = pre({"flair": flair, "t1c": t1c})
with torch.inference_mode():
    x = data["image"][None]
    probs = sum(torch.sigmoid(sliding_window_inference(x, [64, 64, 64], 2, net, overlap=0.5, mode="gaussian"))
                for net in nets) / len(nets)
data["pred"] = probs[0]
inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
p = inv["pred"]
labels = torch.zeros(p.shape[1:], dtype=torch.uint8)
for r, v in enumerate([2, 1, 4]):
    labels[p[r] > 0.5] = v
SaveImage(output_dir=out_dir, output_postfix="", separate_folder=False, print_log=False)(
    labels[None], meta_data=p.meta if hasattr(p, "meta") else None)
'''


def cv_scores(cv_dir: Path, config: Path) -> dict:
    """Each fold's held-out cases predicted afresh (this code; the fold's ``best.pt``, its final weights under
    ``train.keep: last``, as the packed model holds them) and scored per region."""
    from medseg.apps.run import predict
    from medseg.core.config import load_config
    from medseg.evaluation.metrics import evaluate

    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        preds, refs = Path(tmp) / "pred", Path(tmp) / "ref"
        refs.mkdir()
        for fold in sorted(cv_dir.glob("fold_*")):
            held_out = json.loads((fold / "split.json").read_text())["validation"]
            predict([DATA / name for name in held_out], preds, model=fold / "best.pt", device="cpu", progress=False)
            for name in held_out:
                label = next((DATA / name).glob("OTMultiClass*"))
                (refs / f"{name}.nii.gz").symlink_to(label.resolve())
        out = {"raw": _region_table(evaluate(preds, refs, names=dict(cfg.labels), regions=cfg.regions, progress=False))}
        chosen = cv_dir / "postprocess.json"
        if chosen.is_file():  # the postprocessing the cross-validation chose (and the packed model applies)
            from medseg.inference.postprocess import apply_postprocessing
            from medseg.io.volume import load_volume, save_volume

            steps = json.loads(chosen.read_text())
            post = Path(tmp) / "post"
            for f in sorted(preds.glob("*.nii.gz")):
                vol = load_volume(f)
                save_volume(vol.with_array(apply_postprocessing(vol.array, steps)), post / f.name)
            out["postprocessed"] = _region_table(evaluate(post, refs, names=dict(cfg.labels), regions=cfg.regions,
                                                          progress=False))
            out["postprocess"] = steps
    return out


def _region_table(res) -> dict:
    out = {}
    for r in res.classes:
        out[r] = {"cases": {cs.case: {"dice": round(cs.value("dice", r), 4), "hd95_mm": round(cs.value("hd95", r), 2),
                                      "lesionwise_dice": round(cs.value("lesionwise_dice", r), 4),
                                      "pred_ml": round(cs.pred_volume_ml[r], 2), "ref_ml": round(cs.ref_volume_ml[r], 2)}
                            for cs in res.cases},
                  "mean_dice": round(res.mean("dice", r), 4), "mean_hd95_mm": round(res.mean("hd95", r), 2),
                  "mean_lesionwise_dice": round(res.mean("lesionwise_dice", r), 4),
                  "mean_lesionwise_hd95_mm": round(res.mean("lesionwise_hd95", r), 2)}
    return out


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def timing(model: str, threads: int, repeats: int = 1) -> dict:
    """Whole-process seconds per case, medseg and the plain script alternating (A B, then B A, ...); medians."""
    import statistics

    from medseg.models.loading import resolve_model

    model_path = resolve_model(model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain_monai.py"
        script.write_text(PLAIN_MONAI)
        for case in sorted(p for p in DATA.iterdir() if p.is_dir()):
            flair, t1c = next(case.glob("Flair*")), next(case.glob("T1c*"))
            cmds = {"medseg": [sys.executable, "-m", "medseg", "predict", str(case), "-o", f"{tmp}/medseg",
                               "--model", str(model_path), "--device", "cpu", "--threads", str(threads)],
                    "plain": [sys.executable, str(script), str(flair), str(t1c), str(model_path), f"{tmp}/plain",
                              str(threads)]}
            times: dict = {"medseg": [], "plain": []}
            for r in range(repeats):
                for name in (["medseg", "plain"] if r % 2 == 0 else ["plain", "medseg"]):
                    times[name].append(timed(cmds[name]))
            t_medseg, t_plain = statistics.median(times["medseg"]), statistics.median(times["plain"])
            rows[case.name] = {"medseg_s": round(t_medseg, 2), "plain_monai_s": round(t_plain, 2),
                               "ratio": round(t_plain / t_medseg, 3)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cv", type=Path, help="output folder of 'medseg train configs/glioma.yaml --folds 4'")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "glioma.yaml")
    ap.add_argument("--time", action="store_true", help="time medseg and the plain MONAI script per case")
    ap.add_argument("--model", default="glioma", help="model to time (bundled name or .pt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tool and case (A B, then B A, ...)")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"no BraTS data at {DATA} (set MEDSEG_DATA)")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "threads": args.threads}
    if args.cv:
        result["cv"] = cv_scores(args.cv, args.config)
        for kind in ("raw", "postprocessed"):
            for region, d in result["cv"].get(kind, {}).items():
                print(f"{kind:13s} {region:18s} Dice {d['mean_dice']:.4f}  HD95 {d['mean_hd95_mm']:6.2f} mm  "
                      f"lesion-wise Dice {d['mean_lesionwise_dice']:.4f}  per case: "
                      + ", ".join(f"{c[-6:]} {v['dice']:.3f}" for c, v in d["cases"].items()))
    if args.time:
        result["time"] = timing(args.model, args.threads, args.repeats)
        for case, row in result["time"].items():
            print(f"{case}: medseg {row['medseg_s']:.1f} s, plain MONAI {row['plain_monai_s']:.1f} s "
                  f"(plain/medseg {row['ratio']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
