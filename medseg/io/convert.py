"""``medseg convert``: one series or volume in, one NIfTI or NRRD volume out, geometry kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.core.errors import InputNotFoundError, OutputError, UnsupportedInputError
from medseg.io.rules import load_rules
from medseg.io.sources import discover
from medseg.io.volume import Volume, check_writable_folder, save_volume, volume_suffix


def load_single(source: str | Path, *, rules: str | Path | None = None, uneven: str = "resample",
                tilt: str = "resample", philips: str = "precise") -> Volume:
    """Load the one volume that ``source`` (file, DICOM series or study + rules) stands for."""
    items, skipped = discover([source], load_rules(rules), recursive=False)
    if not items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise InputNotFoundError("no series passed the selection rules", path=source, found=reasons or "nothing",
                                 fix="check the rules ('medseg inspect PATH' shows every decision)")
    if len(items) > 1:
        shown = "; ".join(it.series.describe() if it.series is not None else str(it.path) for it in items[:8])
        raise UnsupportedInputError(f"holds {len(items)} volumes, expected one", path=source, found=shown,
                                    fix="point at one series folder, or pass --rules that select one series")
    it = items[0]
    return it.load(uneven=uneven, tilt=tilt, philips=philips) if it.kind == "dicom" else it.load()


def convert(source: str | Path, output: str | Path, *, rules: str | Path | None = None,
            uneven: str = "resample", tilt: str = "resample", philips: str = "precise") -> tuple[Path, Volume]:
    output = Path(output)
    if volume_suffix(output) not in (".nii.gz", ".nii", ".nrrd"):
        raise OutputError("unknown output format", path=output, expected="a name ending in .nii.gz, .nii or .nrrd",
                          found=repr(output.name), fix="e.g. OUT.nii.gz")
    src = Path(source)
    if src.exists() and (output.resolve() == src.resolve() or output.resolve().is_relative_to(src.resolve())):
        raise OutputError("output would be written into the input", path=output,
                          fix="write outside the input folder; inputs are never modified")
    check_writable_folder(output.parent)
    vol = load_single(source, rules=rules, uneven=uneven, tilt=tilt, philips=philips)
    if vol.array.dtype.kind in "fc" and not np.all(np.isfinite(vol.array)):
        bad = int((~np.isfinite(vol.array)).sum())
        raise UnsupportedInputError("image contains NaN or Inf voxels", path=vol.source or source,
                                    expected="finite intensities", found=f"{bad} non-finite voxels",
                                    fix="repair or mask the image; medseg does not write NaN or Inf voxels")
    return save_volume(vol, output), vol
