"""kdx: knowledge-distillation experiments with Hydra and PyTorch Lightning."""

__version__ = "0.1.0"
