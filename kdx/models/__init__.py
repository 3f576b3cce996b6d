"""Model zoo: CIFAR ResNets, WRNs, VGG-BN, MobileNetV2, ShuffleNets, ResNet18/34/50 and timm."""
from kdx.labels import model_name

from .registry import create_model, default_taps, list_models, user_model

__all__ = ["create_model", "default_taps", "list_models", "model_name", "user_model"]
