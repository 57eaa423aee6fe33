"""Class probabilities kept on disk, so models trained at different times can be ensembled later.

``medseg train --folds K --save-probabilities`` writes, next to each out-of-fold prediction,
the probabilities it was the argmax of: on the processed grid (after reorientation and
resampling, where a packed ensemble averages its members), foreground classes only, as
8-bit fractions of one, cropped to the box where any foreground class reaches 1/255: about
5 KB per hippocampus case. Averaging the stored probabilities of several runs over the same
folds, then mapping the argmax back to each case's grid, is what packing those runs' fold
models into one ensemble would predict, to within that rounding and the float16 weights a
packed file keeps. The rounding moved the argmax of 17 of 2.3 million voxels on the 39
held-out cases of a trained hippocampus fold (16-bit storage took 18 times the space); an
untrained network, whose classes are near-ties everywhere, loses more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg.core.errors import DataError, InputNotFoundError
from medseg.io.volume import atomic_write

SUFFIX = ".probs.npz"
SCALE = 255  # stored value of probability one (the file records the scale it was written with)


def save_probabilities(path: str | Path, probs, affine) -> Path:
    """Write channel-first probabilities ``(C, X, Y, Z)`` on the grid ``affine`` (channel 0 background)."""
    p = np.asarray(probs.as_tensor() if hasattr(probs, "as_tensor") else probs, dtype=np.float32)
    fg = np.rint(np.clip(p[1:], 0.0, 1.0) * SCALE).astype(np.uint8)
    hit = np.argwhere(fg.max(axis=0) > 0)
    lo = hit.min(axis=0) if len(hit) else np.zeros(3, dtype=np.int64)
    hi = hit.max(axis=0) + 1 if len(hit) else np.zeros(3, dtype=np.int64)
    box = fg[(slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))]

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, foreground=box, offset=lo.astype(np.int64), shape=np.asarray(p.shape[1:]),
                                affine=np.asarray(affine, dtype=np.float64), scale=np.asarray(SCALE))

    return atomic_write(path, write)


def load_probabilities(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """``(probs, affine)``: float32 probabilities ``(C, X, Y, Z)`` (background = one minus the rest) and their grid."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("stored probabilities not found", path=path,
                                 expected=f"a {SUFFIX} file written by 'medseg train --folds K --save-probabilities'",
                                 fix="train the folds with --save-probabilities, or ensemble their weights instead")
    with np.load(path) as z:
        box, lo, shape, affine = z["foreground"], z["offset"], tuple(int(s) for s in z["shape"]), z["affine"]
        scale = np.float32(z["scale"])
    fg = np.zeros((box.shape[0], *shape), dtype=np.float32)
    fg[(slice(None), *(slice(int(a), int(a) + n) for a, n in zip(lo, box.shape[1:])))] = box / scale
    bg = np.clip(1.0 - fg.sum(axis=0, keepdims=True), 0.0, 1.0)
    return torch.from_numpy(np.concatenate([bg, fg])), affine


def ensemble_labels(paths: list[str | Path], source_affine, source_shape, dtype=np.uint8) -> np.ndarray:
    """Labels on a case's own grid from the mean of several stored probabilities of it (same processed grid)."""
    from medseg.inference.engine import labels_on_source_grid

    total, affine = None, None
    for p in paths:
        probs, aff = load_probabilities(p)
        if total is None:
            total, affine = probs, aff
        elif probs.shape != total.shape or not np.allclose(aff, affine, atol=1e-4):
            raise DataError("stored probabilities lie on different grids", path=p,
                            expected=f"shape {tuple(total.shape)} on the grid of {paths[0]}",
                            found=f"shape {tuple(probs.shape)}",
                            fix="ensemble only runs that preprocess the same way (spacing, orientation)")
        else:
            total += probs
    return labels_on_source_grid(total / len(paths), affine, source_affine, source_shape, dtype=dtype)
