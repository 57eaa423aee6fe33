"""Training loop and checkpoints."""

from medseg.training.checkpoint import (
    config_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["config_from_checkpoint", "load_checkpoint", "save_checkpoint", "train"]


def train(*args, **kwargs):
    from medseg.training.trainer import train as _train

    return _train(*args, **kwargs)
