"""Regions: overlapping structures made of label values (nnU-Net's region-based training).

A brain tumour's labels are nested regions: whole tumour (every tumour label) contains the
tumour core, which contains the enhancing tumour. A region model has one sigmoid output per
region (``regions:`` in the config) and learns each as a whole, which scores better on nested
structures than one softmax over the labels. Its output is written back as an ordinary label
map: regions are painted in the listed order (largest first), each with its value
(:meth:`medseg.core.config.Config.region_values`), so a later, inner region overwrites the
outer one where both are present. A region whose labels all belong to an earlier region is
nested in it, and is kept only inside it (:func:`region_parents`): a voxel the network calls
enhancing but not tumour at all is not tumour, so the outer region is never grown by an inner
output's stray voxels.

Works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import Any


def _isin(labels: Any, values: list[int]) -> Any:
    import numpy as np

    if hasattr(labels, "new_tensor"):  # torch
        import torch

        return torch.isin(labels, labels.new_tensor(list(values)))
    return np.isin(labels, list(values))


def region_values(regions) -> list[int]:
    """The label value each region writes back: its ``value``, or the smallest of its labels that no later
    region lists (so regions listed from largest to smallest give back the labels they came from)."""
    out = []
    for i, r in enumerate(regions):
        if r.value is not None:
            out.append(int(r.value))
            continue
        later = {v for q in regions[i + 1:] for v in q.labels}
        own = sorted(set(r.labels) - later) or sorted(r.labels)
        out.append(int(own[0]))
    return out


def region_parents(regions) -> list[list[int]]:
    """For each region, the earlier regions that contain it (all its labels are theirs)."""
    return [[j for j in range(i) if set(r.labels) <= set(regions[j].labels)] for i, r in enumerate(regions)]


def region_masks(labels: Any, regions) -> list:
    """One boolean mask per region: the voxels whose label is one of the region's labels."""
    return [_isin(labels, r.labels) for r in regions]


def labels_to_regions(labels: Any, regions) -> Any:
    """Channel-first region targets: labels ``(1, ...)`` or ``(B, 1, ...)`` -> float ``(R, ...)`` / ``(B, R, ...)``."""
    import torch

    lab = labels.round().long() if labels.is_floating_point() else labels
    return torch.cat([_isin(lab, r.labels) for r in regions], dim=1 if lab.ndim == 5 else 0).float()


def regions_to_labels(masks: Any, values: list[int], dtype=None, parents: list[list[int]] | None = None) -> Any:
    """A label map from region masks (``(R, ...)``, boolean or probabilities > 0.5), painted in order; with
    ``parents`` (:func:`region_parents`) each region is first limited to the regions that contain it."""
    import numpy as np

    if hasattr(masks, "new_tensor"):
        import torch

        on = masks > 0.5 if masks.is_floating_point() else masks.bool()
        out = torch.zeros(masks.shape[1:], dtype=torch.uint8 if max(values, default=0) < 256 else torch.int32)
    else:
        on = masks > 0.5 if np.asarray(masks).dtype.kind == "f" else np.asarray(masks, bool)
        out = np.zeros(on.shape[1:], dtype=dtype or (np.uint8 if max(values, default=0) < 256 else np.int32))
    kept = []
    for r, v in enumerate(values):
        mask = on[r]
        for j in (parents[r] if parents else []):
            mask = mask & kept[j]
        kept.append(mask)
        out[mask] = int(v)
    return out
