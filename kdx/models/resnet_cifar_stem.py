"""ImageNet-style ResNet18/34/50 with a CIFAR stem: `ResNet18`, `ResNet34`, `ResNet50`.

Reference: kuangliu/pytorch-cifar, as defined in CRD (`models/resnetv2.py`) and mdistiller
(`mdistiller/models/cifar/resnetv2.py`): 3×3 stride-1 stem conv (3→64)+BN+ReLU, no max-pool;
four stages of width 64/128/256/512 at strides 1/2/2/2 (32/16/8/4 px); BasicBlock [2,2,2,2] /
[3,4,6,3] or Bottleneck (×4) [3,4,6,3]; AdaptiveAvgPool(1); FC (`linear`). Init as in the
reference: Kaiming-normal (fan_out) convs, BN 1/0, default Linear; zero_init_residual off.

Deviations: logits only; non-inplace ReLU modules (`relu` after the add in every block, so a
forward pre-hook on `<block>.relu` yields the pre-activation). Parameter names equal the
reference's (`shortcut`, `linear`), so CRD/mdistiller checkpoints load as they are.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = stem ReLU
and each stage's output; `preact_feats` = stem ReLU and each stage's last block sum before its
ReLU (`<block>.relu:in`); `pooled_feat` = the input of `linear`. `bn_before_relu` (OFD) = the
last BN (`bn2` / `bn3`) of each stage's last block, as mdistiller's `get_bn_before_relu()`.
"""
from __future__ import annotations

import torch.nn as nn


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """1×1 conv + BN when the shape changes, else identity (an empty Sequential, as in the reference)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.shortcut = _shortcut(in_ch, ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1-BN-ReLU, 3×3(stride)-BN-ReLU, 1×1(×4)-BN + shortcut, ReLU after add."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(ch, ch * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch * 4)
        self.shortcut = _shortcut(in_ch, ch * 4, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNetCifarStem(nn.Module):
    def __init__(self, block, num_blocks, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        c_in = 64
        for s, (ch, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(block(c_in, ch, stride if i == 0 else 1))
                c_in = ch * block.expansion
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        self.default_taps = [f"layer{s}.{i}" for s, n in enumerate(num_blocks, start=1) for i in range(n)]
        last = [f"layer{s}.{n - 1}" for s, n in enumerate(num_blocks, start=1)]
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": ["relu", "layer1", "layer2", "layer3", "layer4"],
            "preact_feats": ["relu"] + [f"{b}.relu:in" for b in last],
            "pooled_feat": ["linear:in"],
            "final_map": ["avgpool:in"],
        }
        self.bn_before_relu = [f"{b}.{'bn3' if block is Bottleneck else 'bn2'}" for b in last]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.linear

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 100) -> ResNetCifarStem:
    return ResNetCifarStem(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 100) -> ResNetCifarStem:
    return ResNetCifarStem(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 100) -> ResNetCifarStem:
    return ResNetCifarStem(Bottleneck, (3, 4, 6, 3), num_classes)
