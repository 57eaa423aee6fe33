"""Several MRI sequences of one case: finding their files and reading them onto one grid.

A brain tumour study holds several co-registered sequences per case (FLAIR, T1, T1 with
contrast, T2). medseg reads them into one :class:`~medseg.io.volume.Volume` whose array is
``(X, Y, Z, C)``, the sequences in the model's order on the grid of a *reference* sequence:

* a sequence on another grid (another series of the same DICOM study, another resolution or
  orientation) is resampled onto the reference grid in physical space (trilinear; outside its
  own extent it reads as its background value);
* a sequence that covers less than half of the reference, one from another DICOM study, a
  missing sequence and one file claimed by two sequences are errors that name the case and the
  sequence.

Files are found three ways: nnU-Net names (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``: the
number is the sequence's position), case folders whose files match each sequence's patterns
(``data.channels[].patterns``, shell style, ignoring case), or one 4D image (MSD layout).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError, GeometryError
from medseg.io.volume import Volume, background_value, case_name, load_volume, same_grid, volume_suffix

#: Below this fraction of the reference grid covered by a sequence, the two do not overlap enough.
MIN_OVERLAP = 0.5
_NNUNET = re.compile(r"^(?P<key>.+)_(?P<index>\d{4})$")


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a file name matches one of the shell-style ``patterns``, ignoring case."""
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def nnunet_key(path: str | Path) -> tuple[str, int] | None:
    """``case_0001.nii.gz`` -> ``("case", 1)``; None for a name without a four-digit sequence number."""
    m = _NNUNET.match(case_name(path))
    return (m.group("key"), int(m.group("index"))) if m else None


def volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and volume_suffix(p) and volume_suffix(p) != ".seg.nrrd")


def match_case_folder(folder: str | Path, channels, label_patterns: list[str] | None = None, *,
                      need_label: bool = False) -> tuple[dict[str, Path], Path | None]:
    """The file of every sequence in a case folder (by ``channels``' patterns), and its label file (or None).

    The label file (``label_patterns``) is never taken as a sequence. A sequence matching no file or
    several, and one file matching two sequences, are errors naming the case folder."""
    folder = Path(folder)
    files = volume_files(folder)
    labels = [f for f in files if label_patterns and matches(f.name, label_patterns)]
    images = [f for f in files if f not in labels]
    found: dict[str, Path] = {}
    owner: dict[Path, str] = {}
    for ch in channels:
        hits = [f for f in images if matches(f.name, ch.file_patterns())]
        if not hits:
            raise DataError(f"case {folder.name} has no {ch.name} sequence", path=folder,
                            expected=f"one file matching {' or '.join(ch.file_patterns())}",
                            found=", ".join(f.name for f in images) or "no image files",
                            fix=f"add the {ch.name} file, or set its patterns under data.channels")
        if len(hits) > 1:
            raise DataError(f"case {folder.name}: several files match sequence {ch.name}", path=folder,
                            expected=f"one file matching {' or '.join(ch.file_patterns())}",
                            found=", ".join(f.name for f in hits),
                            fix=f"make the patterns of {ch.name} more specific (data.channels)")
        if hits[0] in owner:
            raise DataError(f"case {folder.name}: one file matches sequences {owner[hits[0]]} and {ch.name}",
                            path=hits[0], expected="one file per sequence",
                            fix="make the sequences' patterns tell the files apart (data.channels)")
        owner[hits[0]] = ch.name
        found[ch.name] = hits[0]
    if len(labels) > 1:
        raise DataError(f"case {folder.name}: several files match the label patterns", path=folder,
                        expected=f"one file matching {' or '.join(label_patterns or [])}",
                        found=", ".join(f.name for f in labels), fix="set data.label_patterns to pick one")
    if need_label and not labels:
        raise DataError(f"case {folder.name} has no label file", path=folder,
                        expected=f"a file matching {' or '.join(label_patterns or [])}",
                        found=", ".join(f.name for f in files), fix="add the label, or set data.label_patterns")
    return found, (labels[0] if labels else None)


def group_nnunet(files: list[Path]) -> tuple[dict[str, dict[int, Path]], list[Path]]:
    """nnU-Net-named files grouped by case (``{case: {sequence number: file}}``), and the other files."""
    groups: dict[str, dict[int, Path]] = {}
    rest = []
    for f in files:
        k = nnunet_key(f)
        if k is None:
            rest.append(f)
            continue
        if k[1] in groups.setdefault(k[0], {}):
            raise DataError(f"case {k[0]} has two files for sequence {k[1]:04d}", path=f,
                            found=f"{groups[k[0]][k[1]].name} and {f.name}", fix="keep one of them")
        groups[k[0]][k[1]] = f
    return groups, rest


def ordered_group(case: str, group: dict[int, Path], names: list[str], where: Path | None = None) -> list[Path]:
    """The files of one nnU-Net case in sequence order; every number ``0000`` .. ``C-1`` must be there."""
    expected = list(range(len(names)))
    if sorted(group) != expected:
        missing = [f"{i:04d} ({names[i]})" for i in expected if i not in group]
        extra = [f"{i:04d}" for i in sorted(group) if i not in expected]
        raise DataError(f"case {case} " + (f"misses sequence {', '.join(missing)}" if missing
                                           else f"has sequences the config does not name: {', '.join(extra)}"),
                        path=where or next(iter(group.values())).parent,
                        expected=f"{len(names)} file(s) {case}_0000 .. {case}_{len(names) - 1:04d} ({', '.join(names)})",
                        found=", ".join(p.name for _, p in sorted(group.items())),
                        fix="add the missing file" if missing else "name every sequence under data.channels")
    return [group[i] for i in expected]


def resample_onto(vol: Volume, ref: Volume, fill: float | None = None) -> np.ndarray:
    """``vol``'s array resampled onto ``ref``'s grid in physical space (trilinear), ``fill`` outside it
    (default: ``vol``'s background value)."""
    from scipy import ndimage

    m = np.linalg.inv(vol.affine) @ ref.affine  # reference index -> vol index
    fill = background_value(vol.array) if fill is None else fill
    return ndimage.affine_transform(np.asarray(vol.array, dtype=np.float32), m[:3, :3], offset=m[:3, 3],
                                    output_shape=ref.shape, order=1, mode="constant", cval=float(fill))


def coverage(vol: Volume, ref: Volume, step: int = 4) -> float:
    """Fraction of ``ref``'s voxel centres (every ``step``-th along each axis) that lie inside ``vol``."""
    grids = np.meshgrid(*[np.arange(0, n, step) for n in ref.shape], indexing="ij")
    ijk = np.stack([g.ravel() for g in grids] + [np.ones(grids[0].size)])
    inside = np.linalg.inv(vol.affine) @ ref.affine @ ijk
    ok = np.all((inside[:3] > -0.5) & (inside[:3] < np.asarray(vol.shape)[:, None] - 0.5), axis=0)
    return float(ok.mean())


def load_sequences(sources: dict, reference: str, case: str) -> Volume:
    """Read the sequences ``{name: file or Volume}`` (in the model's order) onto ``reference``'s grid.

    Returns a Volume with array ``(X, Y, Z, C)`` on the reference's grid, its source and header (so
    outputs are written on exactly that grid), and ``meta["channels"]`` the names in order."""
    if reference not in sources:
        raise DataError(f"case {case} has no {reference} sequence (the reference grid)",
                        expected=", ".join(sources), found="none", fix="add it, or set data.reference")
    vols = {}
    for name, src in sources.items():
        if src is None:
            raise DataError(f"case {case} has no {name} sequence", expected=f"one file per sequence: {', '.join(sources)}",
                            found="none", fix=f"add the {name} file")
        vol = src if isinstance(src, Volume) else load_volume(src)
        if vol.channels != 1:
            raise DataError(f"case {case}: sequence {name} has {vol.channels} channels", path=vol.source,
                            expected="one 3D volume per sequence", fix="split it into one file per sequence")
        vols[name] = vol
    ref = vols[reference]
    arrays, resampled = [], []
    for name, vol in vols.items():
        if same_grid(vol, ref, atol=1e-3):
            arrays.append(np.asarray(vol.array, dtype=np.float32))
            continue
        resampled.append(name)
        check_same_study(vol, ref, case, name, reference)
        cov = coverage(vol, ref)
        if cov < MIN_OVERLAP:
            raise GeometryError(f"case {case}: sequence {name} does not overlap the {reference} grid", path=vol.source,
                                expected=f"at least {MIN_OVERLAP:.0%} of the {reference} volume covered "
                                         "(co-registered sequences)",
                                found=f"{cov:.0%} covered", fix="register the sequences to each other first, "
                                "or check that the files belong to the same case")
        arrays.append(resample_onto(vol, ref))
    meta = {**ref.meta, "channels": list(vols), "resampled": resampled}
    return Volume(np.stack(arrays, axis=-1), ref.affine.copy(), source=ref.source, header=ref.header, meta=meta)


def check_same_study(vol: Volume, ref: Volume, case: str, name: str, reference: str) -> None:
    """DICOM sequences must come from one study (one patient position, one frame of reference)."""
    a, b = vol.meta.get("study_uid"), ref.meta.get("study_uid")
    if a and b and a != b:
        raise GeometryError(f"case {case}: sequence {name} is from another DICOM study than {reference}",
                            path=vol.source, expected="series of one study", found="two StudyInstanceUIDs",
                            fix="pick the sequences of one study (their grids are only comparable within one)")


def split_channels(vol: Volume, names: list[str], case: str) -> Volume:
    """A 4D image (MSD layout, sequences on the last axis) checked against the model's sequences."""
    if vol.channels != len(names):
        raise DataError(f"case {case} has {vol.channels} sequence(s), the model takes {len(names)}", path=vol.source,
                        expected=f"{len(names)} ({', '.join(names)})", found=f"{vol.channels} on the fourth axis",
                        fix="give the model's sequences (a case folder, nnU-Net-named files, or --channel NAME=FILE "
                            "for each), or name a 4D image's sequences under data.channels in the order stored")
    vol.meta["channels"] = list(names)
    if vol.array.dtype != np.float32:
        vol.array = np.asarray(vol.array, dtype=np.float32)
    return vol

