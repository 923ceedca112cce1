"""CIFAR ResNets (He et al., CVPR 2016, §4.2) with the widths and shortcuts RepDistiller uses.

He et al. build their CIFAR networks from three stages of ``n`` *basic blocks* each, so the depth is
``6n + 2`` (a stem conv, ``2n`` convs per stage, the classifier). RepDistiller (Tian et al., ICLR 2020),
the codebase most KD papers report against, defines the variants below; we follow its layout and its
choice of **1x1 conv + BN projection shortcuts** wherever a block changes the stride or the width
(identity shortcuts everywhere else).

Layout of ``resnet8`` at 32x32 (``create_model("resnet8", 100)``; ``layer_table`` shows every module):

===========  ==========================================  ==============  ===================
stage        what it does                                output (C,H,W)  feature point?
===========  ==========================================  ==============  ===================
stem         3x3 conv (16) - BN - ReLU                    16 x 32 x 32    yes
stage1       n basic blocks, 16 channels, stride 1        16 x 32 x 32    yes
stage2       n basic blocks, 32 channels, first stride 2  32 x 16 x 16    yes
stage3       n basic blocks, 64 channels, first stride 2  64 x 8 x 8      yes
pool         global average pool + flatten                64              no
classifier   Linear(64, num_classes)                      num_classes     no
===========  ==========================================  ==============  ===================

The ``x4`` variants (``resnet8x4``, ``resnet32x4``) have a 32-channel stem and stages of 64/128/256
channels, so their first block also needs a projection shortcut. They are exactly lesson 3's reconstruction of
Chou et al.'s ResNet-8 / ResNet-32 (1,230,788 / 7,423,940 parameters without BatchNorm, 177.1 M / 1,083.0 M MACs at
32 px for 100 classes). ``describe()`` tabulates the family.

A basic block computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. Every ReLU is its own,
non-inplace module so that a forward hook on any module sees a tensor no later layer overwrites.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from kdbook_utils.errors import check_int, must_be
from kdbook_utils.metrics import count_flops, count_parameters
from kdbook_utils.models import ZooModel, register_model

RESNET_FEATURE_POINTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3")


@dataclass(frozen=True)
class ResNetConfig:
    """One CIFAR ResNet: its depth (``6n + 2``), stem width and the width of each of its three stages."""

    depth: int
    stem_width: int
    stage_widths: tuple[int, int, int]

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


RESNET_CONFIGS: dict[str, ResNetConfig] = {
    "resnet8": ResNetConfig(8, 16, (16, 32, 64)),
    "resnet20": ResNetConfig(20, 16, (16, 32, 64)),
    "resnet32": ResNetConfig(32, 16, (16, 32, 64)),
    "resnet56": ResNetConfig(56, 16, (16, 32, 64)),
    "resnet110": ResNetConfig(110, 16, (16, 32, 64)),
    "resnet8x4": ResNetConfig(8, 32, (64, 128, 256)),
    "resnet32x4": ResNetConfig(32, 32, (64, 128, 256)),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the BatchNorm after it has one)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when input and output have the same shape, otherwise a 1x1 conv + BN
    projection with the block's stride (He et al.'s option B, as RepDistiller uses).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(residual + self.shortcut(x))


def make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` basic blocks; only the first changes the stride (and possibly the width)."""
    blocks = [BasicBlock(in_channels, out_channels, stride)]
    blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def init_resnet_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, ReLU gain), BatchNorm weight 1 and bias 0, as RepDistiller does.

    The classifier keeps PyTorch's default ``nn.Linear`` initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_resnet(config: ResNetConfig, num_classes: int, in_channels: int = 3) -> ZooModel:
    """Assemble a CIFAR ResNet as a :class:`ZooModel` of named stages (see the module docstring)."""
    if (config.depth - 2) % 6 != 0 or config.depth < 8:
        raise ValueError(
            must_be("The depth of a CIFAR ResNet of basic blocks", "6n + 2 (8, 14, 20, ...)", config.depth)
        )
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    n = config.blocks_per_stage
    width1, width2, width3 = config.stage_widths
    stem = nn.Sequential(
        OrderedDict(
            conv=conv3x3(in_channels, config.stem_width),
            bn=nn.BatchNorm2d(config.stem_width),
            relu=nn.ReLU(),
        )
    )
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        stem=stem,
        stage1=make_stage(config.stem_width, width1, n, stride=1),
        stage2=make_stage(width1, width2, n, stride=2),
        stage3=make_stage(width2, width3, n, stride=2),
        pool=nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())),
        classifier=nn.Linear(width3, num_classes),
    )
    # Every conv is 3x3 with padding 1 (or 1x1): even a 1x1 image passes through the strided ones.
    model = ZooModel(stages, feature_points=RESNET_FEATURE_POINTS, min_input_size=1)
    init_resnet_weights(model)
    return model


@register_model("resnet8")
def resnet8(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-8: one basic block per stage, 16/32/64 channels (the usual CIFAR student)."""
    return build_resnet(RESNET_CONFIGS["resnet8"], num_classes, in_channels)


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-20: three basic blocks per stage, 16/32/64 channels."""
    return build_resnet(RESNET_CONFIGS["resnet20"], num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-32: five basic blocks per stage, 16/32/64 channels."""
    return build_resnet(RESNET_CONFIGS["resnet32"], num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-56: nine basic blocks per stage, 16/32/64 channels (a common CIFAR teacher)."""
    return build_resnet(RESNET_CONFIGS["resnet56"], num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-110: eighteen basic blocks per stage, 16/32/64 channels (a common CIFAR teacher)."""
    return build_resnet(RESNET_CONFIGS["resnet110"], num_classes, in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-8x4: one basic block per stage, stem 32 and 64/128/256 channels (a wide student)."""
    return build_resnet(RESNET_CONFIGS["resnet8x4"], num_classes, in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int, in_channels: int = 3) -> ZooModel:
    """ResNet-32x4: five basic blocks per stage, stem 32 and 64/128/256 channels (a wide teacher)."""
    return build_resnet(RESNET_CONFIGS["resnet32x4"], num_classes, in_channels)


def describe(num_classes: int = 100, image_size: int = 32) -> pd.DataFrame:
    """The ResNet family as a table: depth, blocks per stage, widths, parameters and MACs per image.

    ``params`` counts every parameter (BatchNorm included); ``params_without_bn`` counts convolutions
    and the classifier only, the convention of most papers' tables.
    """
    rows = []
    for name, config in RESNET_CONFIGS.items():
        with torch.device("meta"):  # shapes only: nothing is allocated or computed
            model = build_resnet(config, num_classes)
        rows.append(
            {
                "model": name,
                "depth": config.depth,
                "blocks_per_stage": config.blocks_per_stage,
                "stem_width": config.stem_width,
                "stage_widths": config.stage_widths,
                "params": count_parameters(model),
                "params_without_bn": count_parameters(model, include_batchnorm=False),
                "macs": count_flops(model, (1, 3, image_size, image_size)).macs,
            }
        )
    return pd.DataFrame(rows).set_index("model")
