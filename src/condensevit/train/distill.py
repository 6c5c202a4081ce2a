"""Knowledge distillation as DeiT does it, as a loss wrapper around the base criterion.

``soft``: KL divergence between the student's and the teacher's softened distributions
(temperature ``tau``), scaled by tau² as Hinton et al. and DeiT do. ``hard``: cross-entropy against
the teacher's top class. The total is ``(1 - alpha) * base + alpha * distillation``. A student
with a distillation head returning ``(logits, dist_logits)`` in training distils through the
second; one-head students (ours) distil through their only output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.factory import create_model, normalize_kwargs
from .checkpoint import fit_checkpoint, load_weights_file

__all__ = ["DistillationLoss", "build_teacher", "DISTILLATION_TYPES"]

DISTILLATION_TYPES = ("none", "soft", "hard")


class DistillationLoss(nn.Module):
    def __init__(self, base_criterion: nn.Module, teacher: nn.Module | None, distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0, teacher_input_size: tuple[int, int] | None = None):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation type {distillation_type!r} must be one of {', '.join(DISTILLATION_TYPES)}")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation type {distillation_type!r} needs a teacher; pass --teacher and "
                             "--teacher-checkpoint, or --distillation-type none")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha {alpha} must lie in [0, 1]")
        if tau <= 0:
            raise ValueError(f"distillation tau {tau} must be positive")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha, self.tau = alpha, tau
        self.teacher_input_size = tuple(teacher_input_size) if teacher_input_size else None

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.teacher_input_size and tuple(x.shape[-2:]) != self.teacher_input_size:
            # a teacher built for another resolution sees the same images, resized
            x = F.interpolate(x, size=self.teacher_input_size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            out = self.teacher(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs_kd = outputs
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        teacher_out = self.teacher_logits(inputs).float()
        outputs_kd = outputs_kd.float()
        if self.distillation_type == "soft":
            t = self.tau
            # as DeiT: sum over batch and classes, divided by their product, times tau²
            kd = F.kl_div(F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / outputs_kd.numel()
        else:
            kd = F.cross_entropy(outputs_kd, teacher_out.argmax(dim=1))
        return base_loss * (1 - self.alpha) + kd * self.alpha


def build_teacher(name: str, checkpoint: str, num_classes: int, *, model_kwargs: dict | None = None,
                  device: torch.device | str = "cpu", data_name: str | None = None) -> nn.Module:
    """A frozen teacher in eval mode: ``name`` built for ``num_classes`` and loaded exactly from
    ``checkpoint`` (a classifier for other classes is a clear error). When the checkpoint is one of
    ours, its recorded model kwargs are the defaults for ``model_kwargs``."""
    if not checkpoint:
        raise ValueError(f"teacher {name!r} needs --teacher-checkpoint FILE (its trained weights)")
    state_dict, meta = load_weights_file(checkpoint)
    kwargs = {**normalize_kwargs(meta.get("model_kwargs") or {}), **(model_kwargs or {})}
    teacher = create_model(name, num_classes=num_classes, model_kwargs=kwargs)
    fit_checkpoint(teacher, state_dict, source=f"teacher checkpoint {checkpoint!r}", meta=meta,
                   data_classes=num_classes, data_name=data_name)
    teacher.requires_grad_(False)
    return teacher.eval().to(device)
