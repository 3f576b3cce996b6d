"""ShuffleNetV1 (`ShuffleV1`) and ShuffleNetV2 1× (`ShuffleV2`) for 32×32 input.

Reference: Zhang et al. 2018 / Ma et al. 2018, as defined in CRD (`models/ShuffleNetv1.py`,
`models/ShuffleNetv2.py`) and mdistiller (`mdistiller/models/cifar/ShuffleNetv{1,2}.py`), which
follow kuangliu/pytorch-cifar: 1×1 stem conv 3→24 + BN + ReLU, no max-pool, three stages at
16/8/4 px, average pool, FC. PyTorch default init, as in the reference.

V1: groups 3, stage outputs 240/480/960, 4/8/4 bottlenecks; the first 1×1 group conv uses g=1
when its input has 24 channels; a stride-2 block concatenates a 3×3 avg-pool shortcut (its
branch produces out − in channels). V2: stages 116/232/464, each a DownBlock then 3/7/3
BasicBlocks (channel split 0.5, shuffle g=2); conv1×1 → 1024 + BN + ReLU.

Deviations: logits only; ReLUs are non-inplace modules; AdaptiveAvgPool(1) instead of
avg_pool2d(4) (identical on 32-px input). Parameter names equal the reference's, so
CRD/mdistiller checkpoints load as they are.

Tap sets (`tap_sets`, the points mdistiller's model returns from `forward`): `feats` = stem ReLU
and each stage's output; `preact_feats` = stem ReLU and the input of the final ReLU of each
stage's last block (`<block>.relu:in`); `pooled_feat` = the input of `linear`. For V2 that
pre-activation is, as in mdistiller, the concatenation [x1, BN3 output] BEFORE the channel
shuffle, so `feats[i] == channel_shuffle(relu(preact_feats[i]), 2)`. To make it a module input, the
V2 unit applies its ReLU to the whole concatenation: x1 is a post-ReLU map in this network (every
unit's output is a shuffle of ReLU outputs), so the output is bitwise unchanged and the gradients
are unchanged up to float rounding (~1e-6 relative: BN3's backward now gets a strided gradient).
`bn_before_relu` is None: mdistiller's ShuffleNets raise NotImplementedError there (no OFD teacher).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _tap_sets(blocks: list[str], last: list[int]) -> dict[str, list[str]]:
    """mdistiller's feats / preact_feats / pooled_feat points; `last[s]`: index of stage s+1's last unit."""
    return {
        "blocks": list(blocks),
        "feats": ["relu", "layer1", "layer2", "layer3"],
        "preact_feats": ["relu"] + [f"layer{s}.{i}.relu:in" for s, i in enumerate(last, start=1)],
        "pooled_feat": ["linear:in"],
        "final_map": ["avgpool:in"],
    }


class ShuffleV1Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        self.g1 = 1 if c_in == 24 else groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        out = channel_shuffle(self.relu1(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for s, (c_out, n) in enumerate(zip(out_planes, num_blocks), start=1):
            # first block: stride 2, its branch makes c_out - c_in channels, concatenated with the pooled input
            blocks = [ShuffleV1Block(c_in, c_out - c_in, 2, groups)]
            blocks += [ShuffleV1Block(c_out, c_out, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[-1], num_classes)
        self.default_taps = [f"layer{s}.{i}" for s, n in enumerate(num_blocks, start=1) for i in range(n)]
        self.tap_sets = _tap_sets(self.default_taps, [n - 1 for n in num_blocks])
        self.bn_before_relu = None

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.linear

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Block(nn.Module):
    """Stride-1 unit: split channels in half, transform one half, concat, shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.c_keep = int(channels * split_ratio)
        c = channels - self.c_keep
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        x1, x2 = x[:, : self.c_keep], x[:, self.c_keep :]
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))))
        # = cat([x1, relu(out)]) as x1 >= 0 in the network; the ReLU's input is mdistiller's `preact`
        return channel_shuffle(self.relu(torch.cat([x1, out], 1)), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: left dw3×3-BN, 1×1-BN-ReLU; right 1×1-BN-ReLU, dw3×3-BN, 1×1-BN-ReLU; concat, shuffle."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)  # left
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)  # right
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()

    def forward(self, x):
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for s, (c_out, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            blocks = [ShuffleV2DownBlock(c_in, c_out)] + [ShuffleV2Block(c_out) for _ in range(n)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            c_in = c_out
        self.conv2 = nn.Conv2d(c_in, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.default_taps = [f"layer{s}.{i}" for s, n in enumerate(num_blocks, start=1) for i in range(n + 1)]
        self.tap_sets = _tap_sets(self.default_taps, list(num_blocks))
        self.bn_before_relu = None

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's interface): what turns the pooled feature into logits."""
        return self.linear

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


def shuffle_v1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)


def shuffle_v2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
