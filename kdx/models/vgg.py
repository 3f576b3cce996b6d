"""VGG with BatchNorm for 32×32 input: `vgg8`, `vgg11`, `vgg13`, `vgg16`, `vgg19`.

Reference: CRD (`models/vgg.py`) / mdistiller (`mdistiller/models/cifar/vgg.py`), the `*_bn`
variants (CRD's model dict maps `vgg13` → `vgg13_bn` etc.). Five blocks of conv3×3(+bias)-BN-ReLU;
MaxPool2 after blocks 0, 1, 2; then block 3 and block 4; AdaptiveAvgPool(1); FC(512→C).
As in the reference, `pool3` (between blocks 3 and 4) is applied only for 64-px input, so on
32-px input blocks 3 and 4 both run at 4×4. Init as in the reference: conv N(0, 2/(k·k·out)),
bias 0; BN 1/0; Linear N(0, 0.01), bias 0.

Deviations: logits only; every ReLU is its own non-inplace module inside its block (the
reference leaves the last ReLU of each block to the forward), so a block's output is post-ReLU
and the BN before it can be hooked for pre-activations.
Parameter names (`block{i}.{j}`, `classifier`) equal the reference's, so CRD/mdistiller
checkpoints load as they are.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = each
block's output (post-ReLU); `preact_feats` = `block0`'s output (post-ReLU, as in mdistiller),
then the last BN of blocks 1-4; `pooled_feat` = the input of `classifier`. `bn_before_relu` (OFD)
= the last BN of blocks 1-4 (mdistiller's `block{i}[-1]`, which is kdx's `block{i}[-2]`).
"""
from __future__ import annotations

import math

import torch.nn as nn

CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(in_ch: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        in_chs = [3] + [c[-1] for c in cfg[:-1]]
        for i, (c_in, widths) in enumerate(zip(in_chs, cfg)):
            setattr(self, f"block{i}", _block(c_in, widths))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self.default_taps = [f"block{i}" for i in range(5)]
        self.bn_before_relu = [f"block{i}.{3 * len(cfg[i]) - 2}" for i in range(1, 5)]
        self.tap_sets = {
            "blocks": list(self.default_taps),
            "feats": list(self.default_taps),
            "preact_feats": ["block0"] + self.bn_before_relu,
            "pooled_feat": ["classifier:in"],
            "final_map": ["pool4:in"],
        }

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
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
        h = x.shape[2]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if h == 64:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.pool4(x).flatten(1))


def vgg(name: str, num_classes: int = 100) -> VGG:
    return VGG(CFGS[name], num_classes)
