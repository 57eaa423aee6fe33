"""Dataset fingerprint -> training plan (the idea of nnU-Net, sized for the device at hand).

:func:`fingerprint` reads every case once: spacing and shape in the training orientation
(no resampling), foreground intensity statistics from a bounded random sample per case,
class frequencies. :func:`make_plan` turns that into target spacing, patch size, network
depth/strides/channels, batch size and normalisation, each with a one-line reason, and
:func:`apply_plan` merges the plan into a config dict without touching keys the user set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from medseg.errors import ConfigError, DataError, InputNotFoundError

# Cost model. "Units" = batch * sum over levels of (voxels at that level * channels).
# CPU, measured here (torch 2.13 CPU, 2 threads, MONAI UNet, 2 residual units, instance norm,
# DiceCE + AdamW, fp32, batch 2; median of 4 steps):
#   patch 24x32x24 [16..128]  0.78 M units  0.020 s   |  64^3 [16..128] b4    22.3 M  0.41 s
#   patch 32^3     [16..128]  1.39 M        0.029 s   |  64^3 [32..256]       22.3 M  0.37 s
#   patch 40x56x40 [16..128]  3.81 M        0.056 s   |  80x96x80 [16..256]   26.2 M  0.44 s
#   patch 48x64x48 [16..128]  6.27 M        0.095 s   |  96^3 [16..128]       37.6 M  0.60 s
#                                                       |  128x128x64 [16..128] 44.6 M  0.74 s
# least squares: step ~ 0.004 s + 0.0164 s per M units; peak RSS growth ~ 50 MB + 23 MB per M units.
CPU_STEP_S = (0.004, 0.0164e-6)
CPU_BYTES_PER_UNIT, CPU_BASE_GB = 25.0, 0.1
# GPU: MONAI DynUNet, AMP (fp16), 2 deep-supervision heads; peak torch.cuda memory (see GPU_NOTE).
GPU_BYTES_PER_UNIT, GPU_BASE_GB = 14.0, 0.3
GPU_NOTE = "not yet calibrated on a GPU"
TIME_BUDGETS = {"cpu": 0.5, "fast": 0.2, "none": math.inf}
MIN_BOTTLENECK = 4


def _py(x):
    """numpy scalars/arrays -> plain Python (YAML safe)."""
    if isinstance(x, dict):
        return {_py(k): _py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_py(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


@dataclass
class Fingerprint:
    modality: str
    orientation: str
    cases: list[str]
    spacings: list[list[float]]
    shapes: list[list[int]]
    median_spacing: list[float]
    spacing_p10: list[float]
    spacing_p90: list[float]
    median_shape: list[float]
    shape_p10: list[float]
    shape_p90: list[float]
    intensity: dict
    """Foreground (label > 0) statistics: mean, std, p00_5, p99_5, min, max, samples."""
    class_frequency: dict[int, float]
    """Share of all voxels of the dataset with each label value."""
    class_case_share: dict[int, float]
    """Share of cases that contain each label value."""
    zero_background_share: float
    """Share of cases where at least a quarter of the image voxels are exactly zero."""

    def to_dict(self) -> dict:
        return _py(dataclasses.asdict(self))

    def summary(self) -> dict:
        d = self.to_dict()
        for key in ("cases", "spacings", "shapes"):
            d.pop(key)
        return {"n_cases": len(self.cases), **d}


def _ras_geometry(affine: np.ndarray, shape, orientation: str) -> tuple[list[float], list[int]]:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation)))
    out_sp, out_sh = [0.0] * 3, [0] * 3
    for i in range(3):
        out_sp[int(ornt[i, 0])], out_sh[int(ornt[i, 0])] = float(spacing[i]), int(shape[i])
    return out_sp, out_sh


def _label_counts(label: np.ndarray, slab_voxels: int = 1 << 22) -> np.ndarray:
    """Voxels per label value (negative values ignored), slab by slab to bound memory."""
    counts = np.zeros(1, np.int64)
    step = max(1, slab_voxels // max(1, label[..., 0].size))
    for z in range(0, label.shape[-1], step):
        block = label[..., z:z + step]
        block = block if np.issubdtype(block.dtype, np.integer) else np.rint(block)
        c = np.bincount(np.clip(block.astype(np.int64, copy=False).ravel(), 0, None))
        c[0] -= int(np.count_nonzero(block < 0))
        if c.size > counts.size:
            c[:counts.size] += counts
            counts = c
        else:
            counts[:c.size] += c
    return counts


def fingerprint(cases, *, modality: str, progress: bool = True, max_voxels_per_case: int = 10_000,
                orientation: str = "RAS", seed: int = 0) -> Fingerprint:
    """Fingerprint ``cases`` (:class:`~medseg.data.datasets.Case` list) reading each volume once."""
    from medseg.io.volume import load_volume
    from medseg.progress import progress_bar

    if not cases:
        raise DataError("no cases to fingerprint", fix="check data.root or data.datalist")
    rng = np.random.default_rng(seed)
    spacings, shapes, samples, zero_bg = [], [], [], 0
    voxels: dict[int, int] = {}
    present: dict[int, int] = {}
    with progress_bar("fingerprint", total=len(cases), enabled=progress) as advance:
        for case in cases:
            if case.label is None:
                raise DataError("fingerprinting needs a label for every case", path=case.image,
                                fix="add the label or leave the case out")
            img, lab = load_volume(case.image), load_volume(case.label)
            if img.shape != lab.shape:
                raise DataError("image and label shapes differ", path=case.label, expected=str(img.shape),
                                found=str(lab.shape), fix="re-export the label on the image grid")
            sp, sh = _ras_geometry(img.affine, img.shape, orientation)
            spacings.append(sp)
            shapes.append(sh)
            counts = _label_counts(np.asarray(lab.array))
            for value in np.flatnonzero(counts):
                voxels[int(value)] = voxels.get(int(value), 0) + int(counts[value])
                present[int(value)] = present.get(int(value), 0) + 1
            fg = np.flatnonzero(np.asarray(lab.array).ravel() >= 0.5)
            if fg.size > max_voxels_per_case:
                fg = rng.choice(fg, max_voxels_per_case, replace=False)
            image = np.asarray(img.array).ravel()
            samples.append(image[fg].astype(np.float64))
            zero_bg += int(np.count_nonzero(image == 0) >= 0.25 * image.size)
            advance(case.name)
    fg_values = np.concatenate(samples)
    if fg_values.size == 0:
        raise DataError("no foreground voxels (label > 0) in any case", fix="check the labels")
    sp_arr, sh_arr = np.asarray(spacings), np.asarray(shapes, dtype=float)
    total = sum(voxels.values())
    stats = {"mean": fg_values.mean(), "std": fg_values.std(), "p00_5": np.percentile(fg_values, 0.5),
             "p99_5": np.percentile(fg_values, 99.5), "min": fg_values.min(), "max": fg_values.max(),
             "samples": fg_values.size}
    return Fingerprint(**_py(dict(
        modality=modality, orientation=orientation, cases=[c.name for c in cases], spacings=spacings,
        shapes=shapes, median_spacing=np.median(sp_arr, 0), spacing_p10=np.percentile(sp_arr, 10, 0),
        spacing_p90=np.percentile(sp_arr, 90, 0), median_shape=np.median(sh_arr, 0),
        shape_p10=np.percentile(sh_arr, 10, 0), shape_p90=np.percentile(sh_arr, 90, 0), intensity=stats,
        class_frequency={k: voxels[k] / total for k in sorted(voxels)},
        class_case_share={k: present[k] / len(cases) for k in sorted(present)},
        zero_background_share=zero_bg / len(cases))))


# ---------------------------------------------------------------------------
# planning


def _strides_for(patch, spacing, max_pools: int) -> list[list[int]]:
    """nnU-Net rule: halve an axis while it keeps >= MIN_BOTTLENECK voxels and its spacing is
    at most twice the finest spacing among the axes still large enough to halve."""
    size, sp, out = np.asarray(patch, float), np.asarray(spacing, float), []
    while len(out) < max_pools:
        valid = size >= 2 * MIN_BOTTLENECK
        if not valid.any():
            break
        finest = sp[valid].min()
        s = [2 if valid[a] and sp[a] <= 2 * finest + 1e-6 else 1 for a in range(3)]
        out.append(s)
        size, sp = size / s, sp * s
    return out


def _divisor(strides) -> np.ndarray:
    return np.prod(np.asarray(strides, int).reshape(-1, 3), axis=0).astype(int)


def _units(patch, strides, channels) -> float:
    size, total = np.asarray(patch, float), 0.0
    for level, ch in enumerate(channels):
        if level:
            size = size / np.asarray(strides[level - 1])
        total += float(np.prod(size)) * ch
    return total


@dataclass
class Plan:
    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    model: str
    channels: list[int]
    strides: list[list[int]]
    """Per level, per axis (x, y, z after reorientation)."""
    num_res_units: int
    deep_supervision: int
    intensity: dict
    foreground_ratio: float = 0.33
    samples_per_volume: int = 1
    device: str = "cpu"
    estimates: dict = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    """Fingerprint summary (no per-case lists)."""

    def to_overrides(self) -> dict:
        """Nested dict to merge into a config dict. Strides are plain ints per level when every
        level is isotropic, else ``[x, y, z]`` per level."""
        iso = all(len(set(s)) == 1 for s in self.strides)
        return _py({
            "preprocess": {"spacing": self.spacing, "intensity": dict(self.intensity)},
            "patch": {"size": self.patch_size, "foreground_ratio": self.foreground_ratio,
                      "samples_per_volume": self.samples_per_volume},
            "model": {"name": self.model, "channels": self.channels,
                      "strides": [s[0] for s in self.strides] if iso else self.strides,
                      "num_res_units": self.num_res_units, "deep_supervision": self.deep_supervision},
            "train": {"batch_size": self.batch_size},
        })

    def save(self, path: str | Path) -> Path:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("reasons", "fingerprint")}
        doc = {"fingerprint": self.fingerprint, "plan": values, "reasons": self.reasons}
        path = Path(path)
        path.write_text("# dataset fingerprint and training plan (medseg.planning)\n"
                        + yaml.safe_dump(_py(doc), sort_keys=False, width=110))
        return path


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("plan file not found", path=path, expected="a YAML file written by Plan.save",
                                 fix="check the path")
    doc = yaml.safe_load(path.read_text()) or {}
    try:
        return Plan(**doc["plan"], reasons=doc.get("reasons") or {}, fingerprint=doc.get("fingerprint") or {})
    except (KeyError, TypeError) as exc:
        raise ConfigError("not a plan file", path=path, expected="sections 'plan', 'reasons', 'fingerprint'",
                          found=str(exc), fix="write the plan again with Plan.save") from None


def _budget_seconds(time_budget: str) -> float:
    if time_budget in TIME_BUDGETS:
        return TIME_BUDGETS[time_budget]
    try:
        return float(time_budget)
    except ValueError:
        raise ConfigError("unknown time budget", expected=" | ".join(TIME_BUDGETS) + " or seconds per step",
                          found=repr(time_budget), fix="e.g. time_budget='cpu'") from None


def make_plan(fp: Fingerprint, *, device: str = "cpu", memory_gb: float | None = None,
              time_budget: str = "cpu") -> Plan:
    """Choose spacing, patch, network, batch and normalisation for ``fp`` on ``device``.

    ``device`` is ``cpu`` or ``cuda``/``gpu``; ``memory_gb`` the activation budget (default
    4 on CPU, 8 on GPU, nnU-Net's reference card); ``time_budget`` bounds the estimated CPU
    step (``cpu`` 0.5 s, ``fast`` 0.2 s, ``none``, or seconds) and is not used on a GPU.
    """
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = not device.startswith("cpu")
    memory_gb = float(memory_gb if memory_gb is not None else (8.0 if gpu else 4.0))
    seconds = math.inf if gpu else _budget_seconds(time_budget)
    reasons: dict[str, str] = {}

    # target spacing
    median = np.asarray(fp.median_spacing, float)
    target = median.copy()
    coarse = int(np.argmax(median))
    if median.max() / median.min() > 3:
        p10 = float(np.percentile(np.asarray(fp.spacings)[:, coarse], 10))
        others = max(median[a] for a in range(3) if a != coarse)
        target[coarse] = max(p10, others)
        reasons["spacing"] = (f"anisotropic (median {_fmt(median)} mm, ratio {median.max() / median.min():.1f} > 3): "
                              f"median in-plane, 10th percentile {p10:.3g} mm along axis {coarse}")
    else:
        reasons["spacing"] = f"median spacing {_fmt(median)} mm (max/min ratio {median.max() / median.min():.2f} <= 3)"

    # patch, depth, channels
    sizes = np.asarray(fp.shapes, float) * np.asarray(fp.spacings, float) / target
    median_shape = np.median(sizes, axis=0)
    ch0, cap, max_pools = (32, 320, 5) if gpu else (16, 256, 4)
    per_unit, base = (GPU_BYTES_PER_UNIT, GPU_BASE_GB) if gpu else (CPU_BYTES_PER_UNIT, CPU_BASE_GB)

    def estimate(patch, strides, batch):
        channels = [min(ch0 * 2 ** i, cap) for i in range(len(strides) + 1)]
        units = batch * _units(patch, strides, channels)
        return channels, base + units * per_unit / 1e9, CPU_STEP_S[0] + units * CPU_STEP_S[1]

    def fits(patch, strides, batch):
        _, mem, step = estimate(patch, strides, batch)
        return mem <= memory_gb and step <= seconds

    patch = np.maximum(np.ceil(median_shape).astype(int), 1)
    for _ in range(3):  # round up to the divisor of the strides it allows (nnU-Net pads likewise)
        strides = _strides_for(patch, target, max_pools)
        patch = -(-patch // _divisor(strides)) * _divisor(strides)
    start = patch.copy()
    while not fits(patch, strides, 2):
        div = _divisor(strides)
        order = [a for a in np.argsort(-(patch * target), kind="stable") if patch[a] - div[a] >= 2 * MIN_BOTTLENECK]
        if not order:
            break
        patch[order[0]] -= div[order[0]]
        strides = _strides_for(patch, target, max_pools)
        patch = np.maximum(patch // _divisor(strides) * _divisor(strides), _divisor(strides))
    channels, mem, step = estimate(patch, strides, 2)
    limit = f"{memory_gb:g} GB" + ("" if gpu else f" and {seconds:g} s/step on 2 CPU cores")
    reasons["patch_size"] = (f"median shape at target spacing {_fmt(median_shape, 0)} rounded to {_fmt(start, 0)}"
                             + ("" if (patch == start).all() else f", largest axis shrunk to fit {limit}"))
    reasons["strides"] = (f"{len(strides)} downsamplings: an axis is halved while it keeps >= {MIN_BOTTLENECK} "
                          f"voxels and its spacing is <= 2x the finest (bottleneck {_fmt(patch / _divisor(strides), 0)})")
    reasons["channels"] = f"start {ch0} ({'GPU' if gpu else 'CPU'}), doubling per level, capped at {cap}"

    # batch: grow while the budget allows, at most 5% of the dataset's voxels per batch (nnU-Net)
    dataset_voxels = float(np.prod(sizes, axis=1).sum())
    batch_cap = max(2, int(0.05 * dataset_voxels / np.prod(patch)))
    batch = 2
    while batch < batch_cap and fits(patch, strides, batch + 1):
        batch += 1
    _, mem, step = estimate(patch, strides, batch)
    reasons["batch_size"] = (f"largest batch (>= 2) within {limit}, at most 5% of the dataset's voxels "
                             f"({batch_cap}) per batch")

    # normalisation
    it = fp.intensity
    if fp.modality.upper() == "CT":
        intensity = {"mode": "ct_fingerprint", "clip": [it["p00_5"], it["p99_5"]], "mean": it["mean"],
                     "std": it["std"]}
        reasons["intensity"] = (f"CT: clip to foreground 0.5/99.5 percentiles [{it['p00_5']:.4g}, {it['p99_5']:.4g}], "
                                f"z-score with foreground mean {it['mean']:.4g} / std {it['std']:.4g}")
    else:
        nonzero = fp.zero_background_share > 0.5
        intensity = {"mode": "zscore", "nonzero": nonzero}
        reasons["intensity"] = (f"{fp.modality}: per-image z-score, nonzero={nonzero} "
                                f"({fp.zero_background_share:.0%} of cases have a zero background)")

    model = "dynunet3d" if gpu else "unet3d"
    deep = min(2, len(strides) - 1) if gpu else 0
    reasons["model"] = ("GPU: nnU-Net-style DynUNet with deep supervision" if gpu
                        else "CPU: MONAI residual UNet (2 residual units), no deep supervision")
    reasons["foreground_ratio"] = "0.33 of patches centred on foreground (nnU-Net)"
    coverage = float(np.prod(patch) / np.prod(median_shape))
    samples = 1 if coverage >= 0.5 else 2
    reasons["samples_per_volume"] = f"patch covers {coverage:.0%} of the median image"
    return Plan(spacing=_py(target), patch_size=_py(patch), batch_size=batch, model=model, channels=channels,
                strides=_py(strides), num_res_units=0 if gpu else 2, deep_supervision=deep,
                intensity=_py(intensity), samples_per_volume=samples, device="cuda" if gpu else "cpu",
                estimates={"activation_gb": round(mem, 3), "cpu_step_s": None if gpu else round(step, 3)},
                reasons=reasons, fingerprint=fp.summary())


def _fmt(values, digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" if digits else f"{int(round(v))}" for v in np.asarray(values, float))


# ---------------------------------------------------------------------------
# merging into a config


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def explicit_keys(data: dict, overrides: list[str] | None = None) -> set[str]:
    """Dotted keys set in a YAML config dict (leaves) and by ``--set key=value`` overrides."""
    keys = set(_flatten(data))
    keys.update(item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item)
    return keys


def apply_plan(cfg_dict: dict, plan: Plan, *, keep: set[str] | frozenset[str] = frozenset()) -> dict:
    """A copy of ``cfg_dict`` with the plan's values, except keys in ``keep`` (dotted, e.g.
    ``patch.size``; a section such as ``model`` keeps everything under it).

    Coupled values stay consistent: if the user fixed ``model.channels`` or ``model.strides``
    neither is planned; if the user fixed another intensity mode, no intensity value is planned.
    """
    def kept(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keep)

    out = copy.deepcopy(cfg_dict)
    values = _flatten(plan.to_overrides())
    skip = set()
    if kept("model.channels") or kept("model.strides"):
        skip |= {"model.channels", "model.strides"}
        user_strides = (out.get("model") or {}).get("strides")
        if user_strides is not None:
            values["model.deep_supervision"] = min(values["model.deep_supervision"], max(0, len(user_strides) - 1))
    user_mode = ((out.get("preprocess") or {}).get("intensity") or {}).get("mode")
    if kept("preprocess.intensity.mode") and user_mode != plan.intensity.get("mode"):
        skip |= {k for k in values if k.startswith("preprocess.intensity.")}
    for key, value in values.items():
        if key in skip or kept(key):
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"cannot apply the plan: '{p}' is not a section", found=repr(node),
                                  fix="fix the config's structure")
        node[leaf] = copy.deepcopy(value)
    return out
