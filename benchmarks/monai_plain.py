"""The plain MONAI script medseg is compared with: same network, same weights, same preprocessing.

    python benchmarks/monai_plain.py INPUT_DIR_OR_FILE OUTPUT_DIR [--overlap 0.5]

Loads the bundled hippocampus model's weights into the MONAI network its config names (``UNet``
or ``DynUNet``) with the same settings, then for every NIfTI input: LoadImaged, EnsureChannelFirstd,
Orientationd(RAS), Spacingd(1 mm, bilinear), NormalizeIntensityd(nonzero),
``sliding_window_inference`` (the model's patch, Gaussian, overlap 0.5, batch 4), softmax, ``Invertd`` back to the input grid, argmax, ``SaveImage`` (uint8). It is
what a MONAI tutorial would write; no medseg code runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build(model_path: Path):
    from monai.networks.nets import DynUNet, UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    ck = torch.load(model_path, map_location="cpu", weights_only=True)
    m = ck["config"]["model"]
    out_channels = len(ck["config"]["labels"])
    if m["name"] == "dynunet3d":  # deep-supervision heads are built so that the weights load; eval ignores them
        strides = [1, *m["strides"]]
        net = DynUNet(spatial_dims=3, in_channels=1, out_channels=out_channels,
                      kernel_size=m.get("kernel_sizes") or [3] * len(strides), strides=strides,
                      upsample_kernel_size=strides[1:], filters=m["channels"], dropout=m.get("dropout") or None,
                      norm_name=m.get("norm") or "instance", deep_supervision=m["deep_supervision"] > 0,
                      deep_supr_num=max(1, m["deep_supervision"]), res_block=m["num_res_units"] > 0)
    else:
        net = UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=m["channels"],
                   strides=m["strides"], num_res_units=m["num_res_units"], dropout=m.get("dropout", 0.0),
                   norm=m.get("norm") or "instance")
    net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
    net.eval()
    pre = Compose([
        LoadImaged("image", image_only=False),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=ck["config"]["preprocess"]["spacing"], mode="bilinear"),
        NormalizeIntensityd("image", nonzero=True),
    ])
    roi = ck["config"]["inference"].get("roi_size") or ck["config"]["patch"]["size"]
    return net, pre, roi


def make_predict(net, pre, roi, outdir: Path, overlap: float = 0.5, sw_batch_size: int = 4):
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImage

    post = Compose([
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted("pred", argmax=True),
    ])
    saver = SaveImage(output_dir=str(outdir), output_postfix="", output_ext=".nii.gz", resample=False,
                      separate_folder=False, output_dtype="uint8", print_log=False)

    @torch.no_grad()
    def predict(path: Path) -> None:
        data = pre({"image": str(path)})
        img = data["image"][None]
        logits = sliding_window_inference(img, roi, sw_batch_size, net, overlap=overlap, mode="gaussian")
        data["pred"] = torch.softmax(logits[0], 0)
        data["pred"].applied_operations = data["image"].applied_operations
        data["pred"].meta = data["image"].meta
        out = post(data)
        saver(out["pred"].to(torch.uint8), meta_data=out["pred"].meta)

    return predict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--model", default=str(REPO / "medseg" / "assets" / "models" / "hippocampus-fast.pt"))
    ap.add_argument("--overlap", type=float, default=0.5)
    args = ap.parse_args(argv)
    src = Path(args.input)
    files = sorted(src.glob("*.nii.gz")) if src.is_dir() else [src]
    net, pre, roi = build(Path(args.model))
    predict = make_predict(net, pre, roi, Path(args.output), overlap=args.overlap)
    t0 = time.perf_counter()
    for f in files:
        predict(f)
    print(f"{len(files)} volumes in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
