"""Starting weights for a DynUNet with flat kernels, from a trained one with 3x3x3 kernels.

    python benchmarks/flatten_kernels.py runs/distill_w16c/last.pt runs/distill_flat/init.pt \
        --kernels 3,1,3 3,1,3 3,3,3 3,3,3

Writes a checkpoint of the same network with ``model.kernel_sizes`` set to ``--kernels`` (one ``x,y,z`` per
level). Every convolution whose kernel shrinks along an axis gets the source kernel summed along that axis: for
features that do not vary along it the flat kernel computes exactly what the full one did, so training starts close
to the source network (mean Dice 0.8591 on the 39 unseen hippocampus cases before any training, from the 3x3x3
network's 0.8902) rather than from random weights. Used by ``benchmarks/configs/hippocampus_distill_flat.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def flatten(source: Path, output: Path, kernels: list[list[int]]) -> dict:
    from medseg.models.checkpoint import config_from_checkpoint, load_checkpoint, predict_states, save_checkpoint
    from medseg.models.registry import build_model

    ck = load_checkpoint(source)
    cfg = config_from_checkpoint(ck, str(source))
    if cfg.model.name != "dynunet3d":
        raise SystemExit(f"{source}: a dynunet3d model is needed, found {cfg.model.name}")
    state = predict_states(ck)[0]
    cfg.model.kernel_sizes = kernels
    net = build_model(cfg.model, cfg.in_channels, cfg.out_channels)
    new, changed = net.state_dict(), {}
    for name, target in new.items():
        weights = state[name].float()
        if weights.shape != target.shape:
            if weights.dim() != 5 or weights.shape[:2] != target.shape[:2]:
                raise SystemExit(f"{name}: cannot map {tuple(weights.shape)} onto {tuple(target.shape)}")
            for axis in range(3):
                if target.shape[2 + axis] == 1 and weights.shape[2 + axis] > 1:
                    weights = weights.sum(2 + axis, keepdim=True)
            changed[name] = (tuple(state[name].shape), tuple(weights.shape))
        new[name] = weights
    net.load_state_dict(new)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(output, model=net, cfg=cfg, epoch=0)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a checkpoint or model file of a dynunet3d")
    ap.add_argument("output", type=Path, help="the checkpoint to write")
    ap.add_argument("--kernels", nargs="+", required=True, help="one x,y,z kernel per level")
    args = ap.parse_args(argv)
    kernels = [[int(v) for v in k.split(",")] for k in args.kernels]
    for name, (a, b) in flatten(args.source, args.output, kernels).items():
        print(f"{name}: {a} -> {b}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
