"""Training: the loop (resumable, CPU or GPU), cross-validation and distributed training."""

__all__ = ["train"]


def train(*args, **kwargs):
    from medseg.training.trainer import train as _train

    return _train(*args, **kwargs)
