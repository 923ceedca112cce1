"""ImageNet-style ResNets with a CIFAR stem: ResNet-10/18/34/50/152 (He et al., CVPR 2016).

These are the ResNets of the MSKD paper's CIFAR-100 and Tiny ImageNet tables (the RepDistiller
``resnetv2`` family): the ImageNet block layout, widths 64-128-256-512 (x4 for bottleneck blocks), but a
*CIFAR stem*: one 3x3 convolution at stride 1 and no max-pool, so a 32x32 image reaches the last stage at
4x4 (a 64x64 image at 8x8).

========  ==========  ==============  =================
name      block       blocks/stage    final width
========  ==========  ==============  =================
ResNet10  basic       1, 1, 1, 1      512
ResNet18  basic       2, 2, 2, 2      512
ResNet34  basic       3, 4, 6, 3      512
ResNet50  bottleneck  3, 4, 6, 3      2048
ResNet152 bottleneck  3, 8, 36, 3     2048
========  ==========  ==============  =================

ResNet-10 is not in RepDistiller; it is the same template with one block per stage (our choice: MSKD's tables name it, but no public code defines it).
Each model is a :class:`~kdbook_utils.models.ZooModel` with the stages
``stem, stage1, stage2, stage3, stage4, pool, classifier`` and the feature points
``("stem", "stage1", "stage2", "stage3", "stage4")``. ReLUs are non-inplace modules, so a
hooked BatchNorm output is never overwritten. ``base_width`` (default 64) scales every width,
so ``create_model("resnet10_cifar", 10, base_width=16)`` is a CPU-sized ResNet-10 for the quick preset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from kdbook_utils.errors import check_int, must_be
from kdbook_utils.models import ZooModel, register_model
from kdbook_utils.models.resnet import init_resnet_weights

STAGE_STRIDES: tuple[int, ...] = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(residual + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus a shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + self.shortcut(x))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 convolution + BN (He et al.'s option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


def build_resnetv2(
    block: type[BasicBlock | Bottleneck],
    blocks_per_stage: Sequence[int],
    num_classes: int,
    in_channels: int = 3,
    base_width: int = 64,
) -> ZooModel:
    """Assemble a CIFAR-stem ResNet as named stages ``stem, stage1..stage4, pool, classifier``."""
    if len(blocks_per_stage) != len(STAGE_STRIDES):
        raise ValueError(
            must_be("blocks_per_stage", f"{len(STAGE_STRIDES)} stage lengths", list(blocks_per_stage))
        )
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    check_int("base_width", base_width, minimum=1, fix="64 is the paper's width; 16 suits a CPU.")
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False),
            bn=nn.BatchNorm2d(base_width),
            relu=nn.ReLU(),
        )
    )
    channels = base_width
    for index, (num_blocks, stride) in enumerate(zip(blocks_per_stage, STAGE_STRIDES), start=1):
        width = base_width * 2 ** (index - 1)
        blocks = []
        for block_index in range(num_blocks):
            blocks.append(block(channels, width, stride if block_index == 0 else 1))
            channels = width * block.expansion
        stages[f"stage{index}"] = nn.Sequential(*blocks)
    stages["pool"] = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    stages["classifier"] = nn.Linear(channels, num_classes)
    # CIFAR stem and padded 3x3 / 1x1 convs only: even a 1x1 image passes through the strided ones.
    model = ZooModel(
        stages, feature_points=("stem", "stage1", "stage2", "stage3", "stage4"), min_input_size=1
    )
    init_resnet_weights(model)
    return model


@register_model("resnet10_cifar")
def resnet10_cifar(num_classes: int, in_channels: int = 3, base_width: int = 64) -> ZooModel:
    """ResNet-10: basic blocks [1, 1, 1, 1] (MSKD's smallest student)."""
    return build_resnetv2(BasicBlock, (1, 1, 1, 1), num_classes, in_channels, base_width)


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_channels: int = 3, base_width: int = 64) -> ZooModel:
    """ResNet-18: basic blocks [2, 2, 2, 2]."""
    return build_resnetv2(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, base_width)


@register_model("resnet34_cifar")
def resnet34_cifar(num_classes: int, in_channels: int = 3, base_width: int = 64) -> ZooModel:
    """ResNet-34: basic blocks [3, 4, 6, 3]."""
    return build_resnetv2(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, base_width)


@register_model("resnet50_cifar")
def resnet50_cifar(num_classes: int, in_channels: int = 3, base_width: int = 64) -> ZooModel:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3], final width 2048."""
    return build_resnetv2(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, base_width)


@register_model("resnet152_cifar")
def resnet152_cifar(num_classes: int, in_channels: int = 3, base_width: int = 64) -> ZooModel:
    """ResNet-152: bottleneck blocks [3, 8, 36, 3], final width 2048."""
    return build_resnetv2(Bottleneck, (3, 8, 36, 3), num_classes, in_channels, base_width)
