"""Dataset fingerprint -> training plan (nnU-Net's idea, sized for the device at hand): spacing, patch, network,
batch and normalisation, each with a one-line reason, merged into a config without touching the user's keys."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from medseg.core.config import Config, dataclass_from_dict, explicit_keys, from_dict, read_config
from medseg.core.errors import ConfigError, DataError, InputNotFoundError
from medseg.io.volume import load_volume
from medseg.core.progress import progress_bar

# Cost model; "units" = batch * sum over levels of (voxels at the level * channels); per (device, network): step
# seconds = a + b * M units, training memory GB = base + bytes per unit * units. CPU: this project's 2-core machine,
# torch 2.13, 2 threads, channels 16..128, fp32, DiceCE + AdamW (benchmarks/cpu_step.py measures and fits both
# networks). UNet (2 residual units), batch 2; patch: M units, median s/step, peak RSS growth: 24x32x24: 0.78,
#   0.020 | 32^3: 1.39, 0.029 | 40x56x40: 3.81, 0.056 | 48x64x48: 6.27, 0.095, 180 MB | 64^3 b4: 22.3, 0.41, 554 MB |
#   96^3: 37.6, 0.60, 942 MB | 128x128x64: 44.6, 0.74, 1057 MB -> 4 ms + 16.4 ms per M units; 50 MB + 23 MB per M.
# DynUNet (2 deep-supervision heads), 2026-11 (benchmarks/cpu_step.py): 32^3 b2: 1.39, 0.095, 215 MB | 40x56x40 b2:
#   3.81, 0.238, 434 MB | b4: 7.62, 0.567, 677 MB | 48x64x48 b2: 6.27, 0.465, 555 MB | 64^3 b2: 11.1, 1.35, 788 MB ->
#   5 ms + 74 ms per M units up to 8 M units (beyond, it grows faster: 64^3 is 1.6x the estimate); 180 MB + 58.6 MB
#   per M units. About 4.5x the UNet's step: the full-resolution first level and the second convolution per level.
# GPU: one H200, torch 2.11+cu130, MONAI DynUNet (channels 32.. capped at 320, 2 deep-supervision heads), fp16 autocast,
# batch 2; patch: M units, peak torch.cuda.max_memory_allocated, s/step: 40x56x40: 7.6, 0.29 GB, 0.017 | b24: 91,
#   2.71 GB, 0.029 | 96^3: 75, 2.42 GB, 0.036 | 128^3: 179, 5.56 GB, 0.077 | b4: 357, 10.6 GB, 0.116 | 160x160x48 at
#   0.8x0.8x5 mm: 143, 4.59 GB  ->  0.15 GB + 29 B per unit (within 0.5 GB) + 0.85 GB for the CUDA context;
#   step 12 ms + 0.3 ms per M units.
COSTS = {  # (device, network): (step s at 0 units, step s per unit, bytes per unit, base GB)
    ("cpu", "unet3d"): (0.004, 16.4e-9, 25.0, 0.1),
    ("cpu", "dynunet3d"): (0.005, 74e-9, 58.6, 0.18),
    ("gpu", "dynunet3d"): (0.012, 0.3e-9, 29.0, 1.0),
}
# bf16 autocast on a CPU with AMX (train.amp_dtype: bf16): training steps of the DynUNet 16-128 took 0.50x (32^3 b2
# 0.71x, 40x56x40 b2 0.39x, b4 0.50x, 48x64x48 b2 0.44x, 64^3 b2 0.48x) of their fp32 time on a 2-core Xeon, 2026-11
# (benchmarks/cpu_step.py --bf16); the UNet gains less and is costed as fp32. Memory is costed as fp32 (bf16 used less).
CPU_BF16_STEP = {"dynunet3d": 0.5, "unet3d": 1.0}
PRECISIONS = ("fp32", "bf16", "auto")
CPU_MODEL = "dynunet3d"  # the network planned for CPUs (see docs/training.md, "The recipes")
PLANNED_NETWORKS = ("dynunet3d", "unet3d")  # on a GPU both are costed as the DynUNet (the UNet is lighter)
TIME_BUDGETS = {"cpu": 0.5, "fast": 0.2, "none": math.inf}
MIN_BOTTLENECK = 4


def _py(x):
    """numpy scalars/arrays -> plain Python (YAML safe)."""
    if isinstance(x, dict):
        return {_py(k): _py(v) for k, v in x.items()}
    return [_py(v) for v in x] if isinstance(x, (list, tuple, np.ndarray)) else (
        x.item() if isinstance(x, np.generic) else x)


@dataclass
class Fingerprint:
    modality: str
    orientation: str
    cases: list[str]
    spacings: list[list[float]]  # per case, mm, in ``orientation``
    shapes: list[list[int]]  # per case, voxels, in ``orientation``
    median_spacing: list[float]
    spacing_p10: list[float]
    spacing_p90: list[float]
    median_shape: list[float]
    shape_p10: list[float]
    shape_p90: list[float]
    intensity: dict  # foreground (label > 0): mean, std, p00_5, p99_5, min, max, samples
    class_frequency: dict[int, float]  # share of the dataset's voxels per label value
    class_case_share: dict[int, float]  # share of cases containing each label value
    zero_background_share: float  # share of cases with >= 25% of image voxels exactly 0

    def to_dict(self) -> dict:
        return _py(dataclasses.asdict(self))

    def summary(self) -> dict:  # without the per-case lists
        d = {k: v for k, v in self.to_dict().items() if k not in ("cases", "spacings", "shapes")}
        return {"n_cases": len(self.cases), **d}


def _oriented(affine: np.ndarray, shape, orientation: str) -> tuple[list[float], list[int]]:
    """Spacing and shape after reorientation to ``orientation`` (an axis permutation, no resampling)."""
    axes = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation)))[:, 0].astype(int)
    sp, sh = np.zeros(3), np.zeros(3, int)
    sp[axes], sh[axes] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)), shape[:3]
    return sp.tolist(), sh.tolist()


def fingerprint(cases, *, modality: str, progress: bool = True, max_voxels_per_case: int = 10_000,
                orientation: str = "RAS", seed: int = 0) -> Fingerprint:
    """Fingerprint a list of :class:`~medseg.preprocessing.datasets.Case`, reading each volume once."""
    if not cases:
        raise DataError("no cases to fingerprint", fix="check data.root or data.datalist")
    rng = np.random.default_rng(seed)
    spacings, shapes, samples, zero_bg, voxels, present = [], [], [], 0, Counter(), Counter()
    with progress_bar("fingerprint", total=len(cases), enabled=progress) as advance:
        for case in cases:
            if case.label is None:
                raise DataError("fingerprinting needs a label for every case", path=case.files[0], fix="add one")
            # the first file: the (first) sequence's grid, which the others are resampled onto
            img, lab = load_volume(case.files[0], channels=True), load_volume(case.label)
            if img.shape != lab.shape:
                raise DataError("image and label shapes differ", path=case.label, expected=str(img.shape),
                                found=str(lab.shape), fix="re-export the label on the image grid")
            sp, sh = _oriented(img.affine, img.shape, orientation)
            spacings.append(sp)
            shapes.append(sh)
            labels = np.asarray(lab.array)
            values, counts = np.unique(labels if labels.dtype.kind in "biu" else np.rint(labels), return_counts=True)
            voxels.update(dict(zip(values.astype(int).tolist(), counts.tolist())))
            present.update(values.astype(int).tolist())
            first = np.asarray(img.array)[..., 0] if img.channels > 1 else np.asarray(img.array)
            fg, image = np.flatnonzero(labels.ravel() >= 0.5), first.ravel()
            samples.append(image[rng.choice(fg, min(fg.size, max_voxels_per_case), replace=False)].astype(float))
            zero_bg += int(np.count_nonzero(image == 0) >= 0.25 * image.size)
            advance(case.name)
    fg_values = np.concatenate(samples)
    if fg_values.size == 0:
        raise DataError("no foreground voxels (label > 0) in any case", fix="check the labels")
    sp_arr, sh_arr, total = np.asarray(spacings), np.asarray(shapes, float), sum(voxels.values())
    stats = {"mean": fg_values.mean(), "std": fg_values.std(), "p00_5": np.percentile(fg_values, 0.5),
             "p99_5": np.percentile(fg_values, 99.5), "min": fg_values.min(), "max": fg_values.max(),
             "samples": fg_values.size}
    return Fingerprint(**_py({
        "modality": modality, "orientation": orientation, "cases": [c.name for c in cases], "spacings": spacings,
        "shapes": shapes, "median_spacing": np.median(sp_arr, 0), "spacing_p10": np.percentile(sp_arr, 10, 0),
        "spacing_p90": np.percentile(sp_arr, 90, 0), "median_shape": np.median(sh_arr, 0),
        "shape_p10": np.percentile(sh_arr, 10, 0), "shape_p90": np.percentile(sh_arr, 90, 0), "intensity": stats,
        "class_frequency": {k: voxels[k] / total for k in sorted(voxels)},
        "class_case_share": {k: present[k] / len(cases) for k in sorted(present)},
        "zero_background_share": zero_bg / len(cases)}))


@dataclass
class Plan:
    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    model: str
    channels: list[int]
    strides: list[list[int]]  # per level, per axis (axes after reorientation)
    num_res_units: int
    deep_supervision: int
    intensity: dict  # IntensityConfig values: mode, nonzero or clip/mean/std
    foreground_ratio: float = 0.33
    samples_per_volume: int = 1
    device: str = "cpu"
    amp_dtype: str | None = None  # "bf16": planned for bf16 training on the CPU
    kernel_sizes: list[list[int]] | None = None  # dynunet3d: per level, per axis
    estimates: dict = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)  # Fingerprint.summary()

    def to_overrides(self) -> dict:
        """Nested dict for a config; strides are one int per level if all are isotropic, else ``[x, y, z]``."""
        iso = all(len(set(s)) == 1 for s in self.strides)
        return _py({
            "preprocess": {"spacing": self.spacing, "intensity": dict(self.intensity)},
            "patch": {"size": self.patch_size, "foreground_ratio": self.foreground_ratio,
                      "samples_per_volume": self.samples_per_volume},
            "model": {"name": self.model, "channels": self.channels,
                      "strides": [s[0] for s in self.strides] if iso else self.strides,
                      "num_res_units": self.num_res_units, "deep_supervision": self.deep_supervision,
                      **({"kernel_sizes": self.kernel_sizes} if self.kernel_sizes else {})},
            "train": {"batch_size": self.batch_size, **({"amp_dtype": self.amp_dtype} if self.amp_dtype else {})}})

    def save(self, path: str | Path) -> Path:
        """Readable YAML: fingerprint summary, plan values, one reason per choice."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("reasons", "fingerprint")}
        text = yaml.safe_dump(_py({"fingerprint": self.fingerprint, "plan": values}), sort_keys=False,
                              default_flow_style=None)  # short lists on one line
        text += yaml.safe_dump({"reasons": self.reasons}, sort_keys=False, width=1000)
        from medseg.io.volume import atomic_write

        text = "# dataset fingerprint and training plan (medseg.planning)\n" + text
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("plan file not found", path=path, fix="check the path")
    doc = yaml.safe_load(path.read_text())
    known = {f.name for f in dataclasses.fields(Plan)[:-2]}
    required = {f.name for f in dataclasses.fields(Plan) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    if not isinstance(doc, dict) or not required <= set(doc.get("plan") or {}) <= known:
        raise ConfigError("not a plan file", path=path, expected="sections 'fingerprint', 'plan' and 'reasons'",
                          found=", ".join(map(str, doc)) if isinstance(doc, dict) else repr(doc)[:80])
    return Plan(**doc["plan"], reasons=doc.get("reasons") or {}, fingerprint=doc.get("fingerprint") or {})


def _strides_for(patch, spacing, max_pools: int) -> list[list[int]]:
    """nnU-Net: halve an axis while it keeps >= 4 voxels and its spacing is <= 2x the finest of such axes."""
    size, sp, out = np.asarray(patch, float), np.asarray(spacing, float), []
    while len(out) < max_pools and (size >= 2 * MIN_BOTTLENECK).any():
        valid = size >= 2 * MIN_BOTTLENECK
        s = [2 if valid[a] and sp[a] <= 2 * sp[valid].min() + 1e-6 else 1 for a in range(3)]
        out.append(s)
        size, sp = size / s, sp * s
    return out


def _kernels_for(spacing, strides) -> list[list[int]]:
    """nnU-Net: a kernel of 1 along axes whose spacing at that level is over 2x the finest, else 3."""
    sp, out = np.asarray(spacing, float), []
    for s in [[1, 1, 1], *strides]:
        sp = sp * np.asarray(s, float)
        out.append([3 if sp[a] <= 2 * sp.min() + 1e-6 else 1 for a in range(3)])
    return out


def _divisor(strides) -> np.ndarray:
    return np.prod(np.asarray(strides, int).reshape(-1, 3), axis=0)


def _fmt(values, digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" if digits else f"{round(v)}" for v in np.asarray(values, float).tolist())


def units_for(patch, strides, channels, batch: int) -> float:
    """The cost models' size measure: batch * sum over levels of (voxels at the level * channels)."""
    patch = np.asarray(patch, float)
    return batch * sum(float(np.prod(patch / _divisor(strides[:i]))) * c for i, c in enumerate(channels))


def estimate_cost(device: str, network: str, units: float) -> tuple[float, float]:
    """Estimated seconds per training step and training memory (GB) of ``network`` on ``device`` (``cpu``/``gpu``)
    for ``units`` (batch * sum over levels of voxels * channels)."""
    a, b, bytes_per_unit, base_gb = COSTS[(device, network)]
    return a + b * units, base_gb + units * bytes_per_unit / 1e9


def make_plan(fp: Fingerprint, *, device: str = "cpu", memory_gb: float | None = None,
              time_budget: str = "cpu", network: str | None = None, precision: str = "fp32") -> Plan:
    """Spacing, patch, network, batch and normalisation for ``fp`` on ``device`` (``cpu``, or ``cuda``/``gpu``).
    ``memory_gb``: estimated training memory allowed (default 4 on CPU, 8 on GPU as nnU-Net); ``time_budget``:
    the estimated CPU step limit, ``cpu`` (0.5 s), ``fast`` (0.2 s), ``none`` or seconds (ignored on GPU);
    ``network``: ``dynunet3d`` (the default) or ``unet3d``, planned with its own cost model; ``precision`` (CPU):
    ``fp32``, ``bf16`` (steps costed at the measured bf16 speed, and the plan sets ``train.amp_dtype: bf16``) or
    ``auto`` (bf16 where this CPU has AMX or AVX-512 BF16)."""
    gpu = not device.startswith("cpu")
    network = network or ("dynunet3d" if gpu else CPU_MODEL)
    if network not in PLANNED_NETWORKS:
        raise ConfigError("cannot plan for this network", expected=" | ".join(PLANNED_NETWORKS), found=repr(network),
                          fix="plan with one of those, or drop 'plan:' and set patch, batch and channels yourself")
    if precision not in PRECISIONS:
        raise ConfigError("unknown training precision for the plan", expected=" | ".join(PRECISIONS),
                          found=repr(precision), fix="plan with fp32, bf16 or auto")
    if precision == "auto":
        from medseg.core.runtime import cpu_has_fast_bf16

        precision = "bf16" if (not gpu and cpu_has_fast_bf16()) else "fp32"
    bf16 = precision == "bf16" and not gpu  # on a GPU, train.amp already runs mixed precision
    dyn = network == "dynunet3d"
    cost_key = ("gpu", "dynunet3d") if gpu else ("cpu", network)
    memory_gb = float(memory_gb if memory_gb is not None else (8.0 if gpu else 4.0))
    try:
        seconds = math.inf if gpu else float(TIME_BUDGETS.get(time_budget, time_budget))
    except ValueError:
        raise ConfigError("unknown time budget", expected=" | ".join(TIME_BUDGETS) + " or seconds per step",
                          found=repr(time_budget), fix="e.g. time_budget='cpu'") from None
    median = np.asarray(fp.median_spacing, float)
    target, coarse, ratio = median.copy(), int(np.argmax(median)), median.max() / median.min()
    reasons = {"spacing": f"median spacing {_fmt(median)} mm (max/min ratio {ratio:.2f} <= 3)"}
    if ratio > 3:  # nnU-Net: 10th percentile along the coarse axis, never finer than the other axes
        p10 = float(np.percentile(np.asarray(fp.spacings)[:, coarse], 10))
        target[coarse] = max(p10, max(median[a] for a in range(3) if a != coarse))
        reasons["spacing"] = (f"anisotropic (median {_fmt(median)} mm, ratio {ratio:.1f} > 3): median in-plane, "
                              f"{target[coarse]:.3g} mm (10th percentile) along axis {coarse}")
    sizes = np.asarray(fp.shapes, float) * np.asarray(fp.spacings, float) / target  # voxels at target
    median_shape = np.median(sizes, axis=0)
    ch0, cap, max_pools = (32, 320, 5) if gpu else (16, 256, 4)

    def estimate(patch, strides, batch):  # -> channels, memory (GB), step (s), whether both fit the budget
        channels = [min(ch0 * 2 ** i, cap) for i in range(len(strides) + 1)]
        step, mem = estimate_cost(*cost_key, units_for(patch, strides, channels, batch))
        step *= CPU_BF16_STEP[network] if bf16 else 1.0
        return channels, mem, step, mem <= memory_gb and step <= seconds

    patch = np.maximum(np.ceil(median_shape).astype(int), 1)
    for _ in range(3):  # round up to a multiple of the total stride per axis (as nnU-Net pads)
        strides = _strides_for(patch, target, max_pools)
        patch = -(-patch // _divisor(strides)) * _divisor(strides)
    start = patch.copy()
    while not estimate(patch, strides, 2)[3]:  # shrink the physically largest axis by one stride multiple
        div = _divisor(strides)
        axes = [a for a in np.argsort(-(patch * target), kind="stable") if patch[a] - div[a] >= 2 * MIN_BOTTLENECK]
        if not axes:
            break
        patch[axes[0]] -= div[axes[0]]  # then round down to what the new strides need
        strides = _strides_for(patch, target, max_pools)
        patch = np.maximum(patch // _divisor(strides), 1) * _divisor(strides)
    limit = f"{memory_gb:g} GB" + ("" if gpu else f" and {seconds:g} s/step on 2 CPU cores" + (" in bf16" if bf16 else ""))
    reasons["patch_size"] = (f"median shape at target spacing {_fmt(median_shape, 0)} rounded up to {_fmt(start, 0)}"
                             + ("" if (patch == start).all() else f", largest axis shrunk to fit {limit}")
                             + ("" if estimate(patch, strides, 2)[3] else f" (still over {limit}: cannot shrink)"))
    reasons["strides"] = (f"{len(strides)} downsamplings: an axis is halved while it keeps >= {MIN_BOTTLENECK} voxels "
                          f"and its spacing is <= 2x the finest (bottleneck {_fmt(patch / _divisor(strides), 0)})")
    reasons["channels"] = f"{ch0} on {'GPU' if gpu else 'CPU'}, doubling per level, capped at {cap}"
    batch_cap, batch = max(2, int(0.05 * np.prod(sizes, axis=1).sum() / np.prod(patch))), 2
    while batch < batch_cap and estimate(patch, strides, batch + 1)[3]:
        batch += 1
    channels, mem, step, _ = estimate(patch, strides, batch)
    reasons["batch_size"] = f"largest batch >= 2 within {limit} and 5% of the dataset's voxels ({batch_cap})"
    it = dict(fp.intensity, std=fp.intensity["std"] or 1.0)
    it["p99_5"] = max(it["p99_5"], it["p00_5"] + 1e-3)  # a constant foreground still gives a valid clip
    if fp.modality.upper() == "CT":
        intensity = {"mode": "ct_fingerprint", "clip": [it["p00_5"], it["p99_5"]], "mean": it["mean"], "std": it["std"]}
        reasons["intensity"] = (f"CT: clip to foreground 0.5/99.5 percentiles [{it['p00_5']:.4g}, {it['p99_5']:.4g}], "
                                f"z-score with foreground mean {it['mean']:.4g} and std {it['std']:.4g}")
    else:
        intensity = {"mode": "zscore", "nonzero": fp.zero_background_share > 0.5}
        reasons["intensity"] = (f"{fp.modality}: per-image z-score, nonzero={intensity['nonzero']} "
                                f"({fp.zero_background_share:.0%} of cases have a zero background)")
    kernels = _kernels_for(target, strides) if dyn else None
    if kernels and any(3 not in k or 1 in k for k in kernels):
        reasons["kernel_sizes"] = "kernel 1 along axes whose spacing at a level is over 2x the finest (nnU-Net)"
    elif kernels:
        kernels = None  # isotropic: 3x3x3 everywhere, the model default
    coverage = float(np.prod(patch) / np.prod(median_shape))
    where = "GPU" if gpu else "CPU"
    reasons.update(model=(f"{where}: nnU-Net-style DynUNet with deep supervision" + (
                       "" if gpu else " (the best cross-validated CPU recipe)") if dyn else
                       f"{where}: MONAI residual UNet (2 residual units), no deep supervision"),
                   foreground_ratio="a third of the patches centred on foreground (nnU-Net)",
                   samples_per_volume=f"patch covers {coverage:.0%} of the median image")
    if not gpu:
        reasons["precision"] = ("bf16 autocast (train.amp_dtype: bf16): steps costed at "
                                f"{CPU_BF16_STEP[network]:g}x their fp32 time, as measured on a CPU with AMX" if bf16 else
                                "fp32 (plan with precision bf16 or auto on a CPU with AMX or AVX-512 BF16)")
    return Plan(spacing=_py(target), patch_size=_py(patch), batch_size=batch, model=network,
                channels=channels, strides=_py(strides), num_res_units=0 if dyn else 2,
                deep_supervision=max(0, min(2, len(strides) - 1)) if dyn else 0, intensity=_py(intensity),
                samples_per_volume=1 if coverage >= 0.5 else 2, device="cuda" if gpu else "cpu",
                amp_dtype="bf16" if bf16 else None,
                kernel_sizes=kernels,
                estimates={"memory_gb": round(mem, 3), "step_s": round(step, 3)},  # GPU: step on an H200
                reasons=reasons, fingerprint=fp.summary())


def _flatten(d: dict, prefix: str = "") -> dict:
    return {k2: v2 for k, v in d.items() for k2, v2 in (
        _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}).items()}


def apply_plan(cfg_dict: dict, plan: Plan, *, keep=frozenset()) -> dict:
    """A copy of ``cfg_dict`` with the plan's values except for the dotted keys in ``keep`` (a section such as
    ``model`` keeps all under it). If the user fixed ``model.channels`` or ``model.strides`` neither is planned;
    if the user fixed another intensity mode, no intensity value is planned."""
    def kept(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keep)

    out, values = copy.deepcopy(cfg_dict), _flatten(plan.to_overrides())
    if kept("model.channels") or kept("model.strides"):
        values.pop("model.channels"), values.pop("model.strides")
        depth = len((out.get("model") or {}).get("strides") or [2, 2, 2])  # the user's (or the default) strides
        values["model.deep_supervision"] = min(values["model.deep_supervision"], max(0, depth - 1))
    if kept("preprocess.intensity.mode") and (
            ((out.get("preprocess") or {}).get("intensity") or {}).get("mode") != plan.intensity.get("mode")):
        values = {k: v for k, v in values.items() if not k.startswith("preprocess.intensity.")}
    for key, value in values.items():
        if kept(key):
            continue
        node, (*parents, leaf) = out, key.split(".")
        for p in parents:
            node[p] = node[p] if isinstance(node.get(p), dict) else {}  # a missing or null section
            node = node[p]
        node[leaf] = copy.deepcopy(value)
    return out


def plan_for_config(cfg, *, device: str | None = None, memory_gb: float | None = None,
                    progress: bool = True, network: str | None = None) -> Plan:
    """Fingerprint the config's dataset and plan for its training device (``train.device``) and ``network``
    (default: the device's planned network)."""
    from medseg.preprocessing.datasets import dataset_cases

    cases = dataset_cases(cfg.data)
    fp = fingerprint(cases, modality=cfg.modality, progress=progress)
    if device is None:
        import torch

        device = "cuda" if cfg.train.device.startswith("cuda") or (
            cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"
    # the config's precision: a config training in bf16 on the CPU is planned with bf16 step costs
    return make_plan(fp, device=device, memory_gb=memory_gb, network=network,
                     precision="bf16" if (cfg.train.amp and cfg.train.amp_dtype == "bf16") else "fp32")


def resolve_plan(data: dict, source: str = "config") -> dict:
    """Fill in a ``plan: auto`` (or ``plan: FILE``) config; keys the user set stay as they are."""
    ref = str(data["plan"])
    keep = explicit_keys({k: v for k, v in data.items() if k != "plan"})
    if ref == "auto":
        cfg = dataclass_from_dict(Config, {k: v for k, v in data.items() if k != "plan"}, source)
        plan = plan_for_config(cfg, network=cfg.model.name if "model.name" in keep else None)
    else:
        plan_path = Path(ref)
        if not plan_path.is_file():
            raise InputNotFoundError("plan file not found", path=plan_path, expected="a YAML file from 'medseg plan'",
                                     fix="run 'medseg plan DATASET -o plan.yaml' or use 'plan: auto'")
        plan = load_plan(plan_path)
    return apply_plan(data, plan, keep=keep)


def load_planned_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A config file as training uses it: loaded (:func:`medseg.core.config.read_config`), then, when it says
    ``plan: auto`` or ``plan: FILE``, filled in by the planner (keys the user set stay as they are)."""
    data = read_config(path, overrides)
    if data.get("plan"):
        data = resolve_plan(data, source=str(path))
    return from_dict(data, source=str(path))
