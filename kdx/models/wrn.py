"""Wide ResNets WRN-d-k (`wrn_16_1`, `wrn_16_2`, `wrn_40_1`, `wrn_40_2`) for 32×32 input.

Reference: Zagoruyko & Komodakis 2016, as defined in CRD (`models/wrn.py`) and mdistiller
(`mdistiller/models/cifar/wrn.py`): conv3×3(3→16); three groups of n = (d-4)/6 pre-activation
blocks (BN-ReLU-conv3×3-BN-ReLU-conv3×3) of width 16k/32k/64k at strides 1/2/2; final BN-ReLU,
AvgPool(8), FC. As in the reference, when a block changes the channel count its 1×1 shortcut
conv is applied to the pre-activated input (relu1 output), otherwise the identity takes the raw
input. Init as in the reference: conv weights N(0, 2/(k·k·out)), BN 1/0, Linear bias 0.

Deviations: logits only; non-inplace ReLUs; no dropout (dropRate 0 in the zoo). Parameter
names equal the reference's, so CRD/mdistiller checkpoints load as they are.
Tap names: `block{g}.layer.{i}.relu1` (BN-ReLU of a block's input) and the final `relu`.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = stem conv
and each group's output (no ReLU: pre-activation blocks); `preact_feats` = stem conv, then
mdistiller's `block2.layer[0].bn1(f1)`, `block3.layer[0].bn1(f2)`, `bn1(f3)`: these BNs run once in
the forward on exactly those inputs, so their outputs are tapped (mdistiller calls them a second
time after the forward, which in training mode updates their running statistics twice per step;
hooks do not repeat that). `pooled_feat` = the input of `fc`. `bn_before_relu` (OFD) = those
three BNs, as mdistiller's `get_bn_before_relu()`.
"""
from __future__ import annotations

import math

import torch.nn as nn


class WRNBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.equal_in_out = in_ch == out_ch
        assert stride == 1 or not self.equal_in_out, "stride-2 blocks must change width"
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + (x if self.convShortcut is None else self.convShortcut(o))


class WRNGroup(nn.Module):
    """A group of n blocks, kept as `.layer` so module names match the reference."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WRNBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = WRNGroup(n, w[0], w[1], 1)  # 32 px
        self.block2 = WRNGroup(n, w[1], w[2], 2)  # 16 px
        self.block3 = WRNGroup(n, w[2], w[3], 2)  # 8 px
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(w[3], num_classes)
        # relu1 of every block except the network's first (its input is the raw stem conv), + final relu
        taps = [f"block{g}.layer.{i}.relu1" for g in (1, 2, 3) for i in range(n)]
        self.default_taps = taps[1:] + ["relu"]
        self.bn_before_relu = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": ["conv1", "block1", "block2", "block3"],
            "preact_feats": ["conv1"] + self.bn_before_relu,
            "pooled_feat": ["fc:in"],
            "final_map": ["avgpool:in"],
        }

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.fc

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn(depth: int, widen: int, num_classes: int = 100) -> WideResNet:
    return WideResNet(depth, widen, num_classes)
