"""medseg versus nnU-Net v2's own predictor (``nnUNetv2_predict``) on hippocampus volumes.

nnU-Net pulls its own torch, so it lives in a throw-away environment outside the repository:

    python3 -m venv /tmp/nnunet-venv
    /tmp/nnunet-venv/bin/pip install torch==2.13.0      # the CPU build, first
    /tmp/nnunet-venv/bin/pip install nnunetv2

    /tmp/nnunet-venv/bin/python benchmarks/nnunet_predict.py setup --work /tmp/nnunet-work
    .venv/bin/python benchmarks/nnunet_predict.py compare --work /tmp/nnunet-work --nnunet-venv /tmp/nnunet-venv

``setup`` (run with nnU-Net's python) writes Task04 in nnU-Net's raw format (links to
``../shared/data/hippocampus``), runs nnU-Net's own fingerprint and experiment planning, and builds
a model folder for the planned ``3d_fullres`` configuration whose network (nnU-Net's
PlainConvUNet from its plan) has **randomly initialised weights** in nnU-Net's checkpoint format:
training nnU-Net on 2 CPU cores takes about half an hour per epoch, and prediction time does not
depend on the weights' values. ``compare`` times, as whole processes on the same N volumes and
alternating: nnU-Net without TTA (``--disable_tta``), nnU-Net with its mirror TTA (default),
``medseg predict`` (torch and onnxruntime) and the plain MONAI script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hippocampus"
DATASET = "Dataset004_Hippocampus"


def env_for(work: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1"}


def setup(work: Path) -> None:
    raw = work / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name for p in (DATA / "labelsTr").glob("*.nii.gz"))
    for name in cases:
        stem = name[: -len(".nii.gz")]
        for src, dst in ((DATA / "imagesTr" / name, raw / "imagesTr" / f"{stem}_0000.nii.gz"),
                         (DATA / "labelsTr" / name, raw / "labelsTr" / name)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}, indent=1))
    env = env_for(work)
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "nnUNetv2_extract_fingerprint"), "-d", "4", "-np", "2"], env=env, check=True)
    subprocess.run([str(bindir / "nnUNetv2_plan_experiment"), "-d", "4"], env=env, check=True)

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    model_dir = work / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy(plans_file, model_dir / "plans.json")
    shutil.copy(raw / "dataset.json", model_dir / "dataset.json")
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": json.loads((raw / "dataset.json").read_text())},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
               model_dir / "fold_0" / "checkpoint_final.pth")
    print(json.dumps({"patch_size": cm.patch_size, "spacing": cm.spacing, "network": cm.network_arch_class_name,
                      "parameters": sum(p.numel() for p in net.parameters())}))


def compare(work: Path, venv: Path, n: int, repeats: int, tta_repeats: int, out_json: str) -> int:
    names = sorted((DATA / "imagesTr").glob("*.nii.gz"))[:n]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, nn_in = tmp / "in", tmp / "nn_in"
        plain.mkdir()
        nn_in.mkdir()
        for f in names:
            (plain / f.name).symlink_to(f.resolve())
            (nn_in / f.name.replace(".nii.gz", "_0000.nii.gz")).symlink_to(f.resolve())
        py = sys.executable
        from medseg.inference.export import export_model

        onnx_path = export_model("hippocampus-fast", tmp / "hippocampus.onnx", "onnx")
        nn = [str(venv / "bin" / "nnUNetv2_predict"), "-i", str(nn_in), "-d", "4", "-c", "3d_fullres", "-f", "0",
              "-device", "cpu", "-npp", "1", "-nps", "1", "-o"]
        cmds = {
            "medseg": [py, "-m", "medseg", "predict", str(plain), "--device", "cpu", "-o"],
            "medseg_onnx": [py, "-m", "medseg", "predict", str(plain), "--device", "cpu", "--model", str(onnx_path), "-o"],
            "monai_plain": [py, str(REPO / "benchmarks" / "monai_plain.py"), str(plain)],
            "nnunet_no_tta": nn[:-1] + ["--disable_tta", "-o"],
            "nnunet_tta": nn,
        }
        times: dict = {k: [] for k in cmds}
        order = list(cmds)
        for r in range(max(repeats, tta_repeats)):
            for name in (order if r % 2 == 0 else order[::-1]):
                if name == "nnunet_tta" and r >= tta_repeats or name != "nnunet_tta" and r >= repeats:
                    continue
                out = tmp / f"out_{name}_{r}"
                t0 = time.perf_counter()
                proc = subprocess.run(cmds[name] + [str(out)], env=env_for(work), capture_output=True, text=True,
                                      cwd=REPO)
                times[name].append(round(time.perf_counter() - t0, 1))
                if proc.returncode != 0:
                    print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                print(name, times[name][-1], "s", flush=True)
    res = {"volumes": len(names), "whole_process_s": {k: statistics.median(v) for k, v in times.items() if v},
           "runs": times}
    res["ratio_to_medseg"] = {k: round(v / res["whole_process_s"]["medseg"], 2) for k, v in res["whole_process_s"].items()}
    print(json.dumps(res, indent=1))
    Path(out_json).write_text(json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["setup", "compare"])
    ap.add_argument("--work", default="/tmp/nnunet-work")
    ap.add_argument("--nnunet-venv", default="/tmp/nnunet-venv")
    ap.add_argument("-n", type=int, default=65, help="volumes to predict")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tta-repeats", type=int, default=1)
    ap.add_argument("--json", default="nnunet_compare.json")
    args = ap.parse_args(argv)
    if args.step == "setup":
        setup(Path(args.work))
        return 0
    return compare(Path(args.work), Path(args.nnunet_venv), args.n, args.repeats, args.tta_repeats, args.json)


if __name__ == "__main__":
    sys.exit(main())
