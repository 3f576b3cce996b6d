"""CIFAR ResNets `resnet{8,14,20,32,44,56,110}`, `resnet8x4`, `resnet32x4`.

Reference: He et al. 2016 (CIFAR variant), as defined in CRD (HobbitLong/RepDistiller
`models/resnet.py`) and mdistiller (`mdistiller/models/cifar/resnet.py`): 3×3 stem conv+BN+ReLU,
three stages of n = (depth-2)/6 BasicBlocks at 32/16/8 px, AvgPool(8), FC.
Init as in the reference: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, default Linear.

Deviations: `forward` returns logits only (features are taken with forward hooks); each block
has separate, non-inplace ReLU modules (`relu1` inside the branch, `relu` after the add), so a
forward pre-hook on `<block>.relu` yields the pre-activation sum.
Parameter names equal the reference's, so CRD/mdistiller checkpoints load as they are.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = stem ReLU
and each stage's output; `preact_feats` = stem ReLU and each stage's last block sum before its
ReLU (`<block>.relu:in`); `pooled_feat` = the input of `fc`. `bn_before_relu` (OFD) = `bn2` of
each stage's last block, as mdistiller's `get_bn_before_relu()`.
"""
from __future__ import annotations

import torch.nn as nn


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut (1×1 conv+BN when the shape changes), ReLU after add."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = None
        if stride != 1 or in_ch != ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, ch, 1, stride, bias=False), nn.BatchNorm2d(ch)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def make_stage(block, in_ch: int, ch: int, n: int, stride: int) -> nn.Sequential:
    """n blocks; the first one carries the stride and the channel change."""
    layers = [block(in_ch, ch, stride)]
    layers += [block(ch * block.expansion, ch, 1) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = make_stage(BasicBlock, widths[0], widths[1], n, 1)  # 32 px
        self.layer2 = make_stage(BasicBlock, widths[1], widths[2], n, 2)  # 16 px
        self.layer3 = make_stage(BasicBlock, widths[2], widths[3], n, 2)  # 8 px
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)
        # every residual block (its output is post-ReLU)
        self.default_taps = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(n)]
        last = [f"layer{s}.{n - 1}" for s in (1, 2, 3)]
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": ["relu", "layer1", "layer2", "layer3"],
            "preact_feats": ["relu"] + [f"{b}.relu:in" for b in last],
            "pooled_feat": ["fc:in"],
            "final_map": ["avgpool:in"],
        }
        self.bn_before_relu = [f"{b}.bn2" for b in last]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.fc

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet(depth: int, num_classes: int = 100) -> CifarResNet:
    """`resnet{depth}`: widths 16/16/32/64."""
    return CifarResNet(depth, (16, 16, 32, 64), num_classes)


def resnet_x4(depth: int, num_classes: int = 100) -> CifarResNet:
    """`resnet{depth}x4`: widths 32/64/128/256."""
    return CifarResNet(depth, (32, 64, 128, 256), num_classes)
