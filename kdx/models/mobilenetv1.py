"""MobileNetV1 for ImageNet: `MobileNetV1` (the student of the DKD/mdistiller ResNet50 → MobileNetV1 recipe).

Reference: Howard et al. 2017, as defined in mdistiller (`mdistiller/models/imagenet/mobilenetv1.py`): `model` =
a stem conv3×3 stride 2 (3→32)+BN+ReLU and 13 depthwise-separable blocks (depthwise conv3×3+BN+ReLU, pointwise
conv1×1+BN+ReLU; widths 64, 128, 128, 256, 256, 512 ×6, 1024, 1024; stride 2 at blocks 2, 4, 6 and 12), then
average pooling (`model.14`) and `fc` (1024 → classes). PyTorch default inits, as the reference. 4,231,976
parameters at 1000 classes, as the reference.

Deviations: the class count is an argument (the reference fixes 1000); non-inplace ReLU modules;
AdaptiveAvgPool(1) instead of AvgPool2d(7) (identical on the 7×7 map of 224-px input; any input size works).
Parameter names equal the reference's (`model.<i>.<j>`, `fc`), so mdistiller checkpoints load as they are.

Tap sets (the points mdistiller's model returns from `forward`): `feats` = the ReLU outputs of blocks 3, 5, 11
and 13 (the ends of the 56, 28, 14 and 7 px stages at 224 px); `preact_feats` = the BNs before those ReLUs;
`pooled_feat` = the input of `fc`; `final_map` = the map pooled before it; `blocks` = every block.
`bn_before_relu` (OFD) = those BNs, as mdistiller's `get_bn_before_relu()`.
"""
from __future__ import annotations

import torch.nn as nn

#: (output channels, stride) of the 13 depthwise-separable blocks
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
STAGE_ENDS = (3, 5, 11, 13)  # mdistiller's feat1..feat4


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def _conv_dw(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [_conv_bn(3, 32, 2)], 32
        for c_out, stride in BLOCKS:
            layers.append(_conv_dw(c_in, c_out, stride))
            c_in = c_out
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)
        self.default_taps = [f"model.{i}" for i in range(1, len(BLOCKS) + 1)]
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": [f"model.{i}.5" for i in STAGE_ENDS],
            "preact_feats": [f"model.{i}.4" for i in STAGE_ENDS],
            "pooled_feat": ["fc:in"],
            "final_map": [f"model.{len(BLOCKS) + 1}:in"],
        }
        self.bn_before_relu = [f"model.{i}.4" for i in STAGE_ENDS]

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.fc

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
