"""MobileNetV2 for 32×32 input: `mobile_half` (alias `MobileNetV2`).

Reference: Sandler et al. 2018, as defined in CRD (`models/mobilenetv2.py`, `mobile_half` =
`mobilenetv2_T_w(T=6, W=0.5)`) and mdistiller (`mdistiller/models/cifar/mobilenetv2.py`):
stem conv3×3 stride 2 (3→16)+BN+ReLU; seven stages of inverted residuals (expand 1×1, depthwise
3×3, linear 1×1; residual when stride 1 and in == out); conv1×1 → 1280 + BN + ReLU; average
pool; FC. Channel widths below are the reference's ×0.5 values. Init as in the reference:
conv N(0, 2/(k·k·out)), BN 1/0, Linear N(0, 0.01), bias 0.

Deviations: logits only; non-inplace ReLUs; AdaptiveAvgPool(1) instead of AvgPool(2,
ceil_mode) (identical on the 2×2 final map of 32-px input). Parameter names equal the
reference's (`classifier.0` is the FC), so CRD/mdistiller checkpoints load as they are.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = stem and
the outputs of stages 1, 2, 4, 6 (linear bottlenecks: no ReLU); `pooled_feat` = the input of
`classifier`. mdistiller's MobileNetV2 returns no `preact_feats`, so there is none here (its
OFD or ReviewKD with `STU_PREACT` on a MobileNetV2 student would stop with a KeyError).
`bn_before_relu` (OFD) = the projection BN (`conv.7`) of the last block of stages 1, 2, 4, 6, as
mdistiller's `get_bn_before_relu()` (that BN is followed by a residual add, not by a ReLU).
"""
from __future__ import annotations

import math

import torch.nn as nn


def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t: int):
        super().__init__()
        hidden = c_in * t
        self.use_res = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *_conv_bn_relu(c_in, hidden, 1),  # expand
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False),  # linear projection
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, first stride s); widths already × 0.5
MOBILE_HALF = [(1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, setting=MOBILE_HALF, stem: int = 16, last: int = 1280, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, stem, 3, 2))  # 32 → 16 px
        blocks, c_in = [], stem
        for t, c, n, s in setting:
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.ModuleList(blocks)
        self.conv2 = nn.Sequential(*_conv_bn_relu(c_in, last, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.default_taps = [f"blocks.{i}" for i in range(len(blocks))]
        stages = (1, 2, 4, 6)  # mdistiller's f1..f4
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": ["conv1"] + [f"blocks.{i}" for i in stages],
            "pooled_feat": ["classifier:in"],
            "final_map": ["avgpool:in"],
        }
        self.bn_before_relu = [f"blocks.{i}.{len(blocks[i]) - 1}.conv.7" for i in stages]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.classifier

    def forward(self, x):
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(self.avgpool(x).flatten(1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(MOBILE_HALF, 16, 1280, num_classes)
