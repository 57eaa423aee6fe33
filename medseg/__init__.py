"""medseg: medical image segmentation on MONAI.

The Python API mirrors the CLI::

    from medseg import load_volume, Predictor
    pred = Predictor()                      # bundled hippocampus model
    labels = pred.predict_volume(load_volume("case.nii.gz"))
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MedsegError": "medseg.core.errors",
    "Volume": "medseg.io.volume",
    "load_volume": "medseg.io.volume",
    "save_volume": "medseg.io.volume",
    "load_config": "medseg.core.config",
    "load_model": "medseg.models.loading",
    "Config": "medseg.core.config",
    "Predictor": "medseg.inference.predictor",
    "predict": "medseg.apps.run",
    "train": "medseg.training",
    "evaluate": "medseg.evaluation.metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
