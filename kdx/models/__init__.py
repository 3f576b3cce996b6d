"""Model zoo: CIFAR ResNets, WRNs, VGG-BN, MobileNetV2, ShuffleNets, ResNet18/34/50 and timm."""
from .registry import create_model, default_taps, list_models

__all__ = ["create_model", "default_taps", "list_models"]
