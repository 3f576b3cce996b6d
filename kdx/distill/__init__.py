"""Distillation strategies and their loss functions."""
from kdx.distill.base import Batch, ModelOutput, Strategy, warmup_factor

__all__ = ["Batch", "ModelOutput", "Strategy", "warmup_factor"]
