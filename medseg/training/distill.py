"""Knowledge distillation: train one network on a teacher's probabilities as well as the manual labels.

A teacher (typically an ensemble with mirror TTA, as the bundled ``hippocampus`` pair once was) costs
several forward passes per window; a student of one network trained to reproduce its probabilities
keeps most of its accuracy at a single network's cost. With ``train.teacher`` set, every training
case gets the teacher's class probabilities on the preprocessed grid once (cached with the data, so
a teacher pass per case, not per step); they travel through patch sampling and augmentation with the
image (``soft``), and the loss becomes

    (1 - distill) * loss(student, labels) + distill * (soft Dice + cross-entropy)(student, teacher)

Only the foreground classes' probabilities are stored: padding a patch with zeros then means
background certain, as it does for the label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medseg.core.config import Config, to_dict
from medseg.core.errors import ConfigError


def load_teacher(cfg: Config, device: torch.device):
    """The teacher of ``cfg.train.teacher`` as a Predictor (its own TTA setting), after checking that it
    predicts the student's labels from the student's preprocessing."""
    from medseg.inference.predictor import Predictor

    teacher = Predictor(cfg.train.teacher, device=str(device), plan_memory=False)
    tcfg = teacher.cfg
    if dict(tcfg.labels) != dict(cfg.labels) or tcfg.regions:
        raise ConfigError("the teacher predicts other labels than the student learns", path=teacher.model_path,
                          expected=str(dict(cfg.labels)), found=str(dict(tcfg.labels)),
                          fix="choose a teacher trained on the same labels (train.teacher)")
    if to_dict(tcfg.preprocess) != to_dict(cfg.preprocess) or tcfg.channel_names != cfg.channel_names:
        raise ConfigError("the teacher's preprocessing differs from the student's", path=teacher.model_path,
                          expected=str(to_dict(cfg.preprocess)), found=str(to_dict(tcfg.preprocess)),
                          fix="give the student the teacher's preprocess section (and data.channels)")
    return teacher


class TeacherProbsd(MapTransform):
    """Adds ``soft``: the teacher's probabilities of the foreground classes ``(C-1, …)`` for the preprocessed
    ``image``, on its grid (a deterministic step: CacheDataset keeps the result)."""

    def __init__(self, teacher) -> None:
        super().__init__(["image"])
        self.teacher = teacher

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d["image"]
        with torch.inference_mode():
            probs = self.teacher.model_grid_probabilities(image)
        soft = probs[1:].float().clone()
        if isinstance(image, MetaTensor):  # same grid and metadata as the image (MONAI's crops and flips need them)
            soft = MetaTensor(soft, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        d["soft"] = soft
        return d


def soft_targets(soft: torch.Tensor) -> torch.Tensor:
    """All classes' probabilities ``(B, C, …)`` from the foreground ones ``(B, C-1, …)``: background is the rest."""
    soft = soft.clamp(0, 1)
    return torch.cat([(1 - soft.sum(1, keepdim=True)).clamp(0, 1), soft], dim=1)


class DistillLoss(torch.nn.Module):
    """``(1 - weight) * base(logits, label) + weight * (soft Dice + soft cross-entropy)``.

    The target is the label ``(B, 1, …)`` and the teacher's foreground probabilities ``(B, C-1, …)``
    concatenated on dim 1, so deep supervision and the training step pass it on as one tensor."""

    def __init__(self, base: torch.nn.Module, weight: float, batch: bool = False) -> None:
        from monai.losses import DiceLoss

        super().__init__()
        self.base = base
        self.weight = float(weight)
        self.dice = DiceLoss(softmax=True, include_background=False, batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        label, soft = target[:, :1], soft_targets(target[:, 1:].float())
        log_p = torch.log_softmax(logits.float(), dim=1)
        soft_ce = -(soft * log_p).sum(1).mean()
        soft_loss = self.dice(logits, soft) + soft_ce
        return (1 - self.weight) * self.base(logits, label) + self.weight * soft_loss
