"""The networks of Chou, Chiu, Liao (2021), as reconstructed for lesson 3 (see the book's appendix).

The paper's per-layer figures are images that could not be read, so these are documented choices:

* ``resnet32w`` / ``resnet8w``: the ResNet-32 -> ResNet-8 pair of the likely TensorFlow code base
  (sseung0703/KD_methods_with_TF): a 3x3 stem of 32 channels, three stages of 64/128/256 channels with
  5 (ResNet-32) or 1 (ResNet-8) basic blocks, 1x1 projection shortcuts. At ``width=1`` these are the
  same layouts as ``resnet32x4`` / ``resnet8x4``; ``width`` scales every channel count (``width=0.25``
  gives 8 / 16 / 32 / 64 channels, the small pair of the quick preset). Checkpoints: stem, stage1-3.
* ``vgg6``: 64-M-128-M-256-M-512-512, global average pool, one FC: exactly six weight layers. It is
  RepDistiller's ``vgg8`` (cfg S) under the paper's name; it pairs with ``vgg11`` (the same five block
  widths, so every checkpoint has matching channels).
* ``mobilenet16`` / ``mobilenet9``: MobileNet-v1 style (Howard et al. 2017) for ImageNet 64x64: a 3x3
  stem conv (32 channels, stride 1 at 64 px), then depthwise-separable blocks grouped by resolution, GAP
  and one FC. MobileNet-16 has the 13 standard blocks (conv + 13 + pool + FC = 16 "layers"),
  MobileNet-9 six (64, 128/s2, 256/s2, 512/s2, 1024/s2, 1024). Checkpoints: stem and stage1-5 (one per
  resolution), enough for "cross four layers" (the paper's Fig. 7).

The ResNet-50 / ResNet-18 / ResNet-10 of the chained experiment are in :mod:`kdbook_utils.models.resnetv2`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from kdbook_utils.errors import check_int, check_number
from kdbook_utils.models import ZooModel, register_model
from kdbook_utils.models.resnet import ResNetConfig, build_resnet, init_resnet_weights
from kdbook_utils.models.vgg import VGG_CONFIGS, build_vgg


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    check_number("width", width, above=0.0, fix="It multiplies every channel count; 1.0 is the full width.")
    return max(1, round(channels * width))


def wide_resnet_config(depth: int, width: float) -> ResNetConfig:
    """The TensorFlow KD code base's ResNet (stem 32, stages 64/128/256), every width times ``width``."""
    return ResNetConfig(depth, scaled(32, width), (scaled(64, width), scaled(128, width), scaled(256, width)))


@register_model("resnet32w")
def resnet32w(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ZooModel:
    """ResNet-32, the paper's teacher: stem 32, then 5 basic blocks each of 64/128/256 channels."""
    return build_resnet(wide_resnet_config(32, width), num_classes, in_channels)


@register_model("resnet8w")
def resnet8w(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ZooModel:
    """ResNet-8, the paper's student: stem 32, then one basic block each of 64/128/256 channels."""
    return build_resnet(wide_resnet_config(8, width), num_classes, in_channels)


@register_model("vgg6")
def vgg6(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ZooModel:
    """VGG-6, the paper's student of VGG-11: RepDistiller's ``vgg8`` layout."""
    return build_vgg(VGG_CONFIGS["vgg8"], num_classes, in_channels, image_size)


class DepthwiseSeparable(nn.Module):
    """MobileNet's block: 3x3 depthwise conv-BN-ReLU (carries the stride), then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.bn2(self.pointwise(self.relu1(self.bn1(self.depthwise(x))))))


#: Output channels of the blocks of each stage; the first block of stages 2-5 has stride 2.
MOBILENET_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "mobilenet16": ((64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024)),
    "mobilenet9": ((64,), (128,), (256,), (512,), (1024, 1024)),
}
MOBILENET_FEATURE_POINTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5")


def build_mobilenet(
    stages: Sequence[Sequence[int]],
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    stem_stride: int = 1,
) -> ZooModel:
    """A MobileNet-v1-style :class:`ZooModel`: ``stem, stage1, ..., stage5, pool, classifier``.

    ``stem_stride=1`` suits 32-64 px inputs (ImageNet's stride-2 stem would leave 2x2 maps at 64 px).
    """
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    check_int("stem_stride", stem_stride, minimum=1, maximum=2, fix="1 suits 32-64 px inputs, 2 larger ones.")
    stem_width = scaled(32, width)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, stem_width, 3, stride=stem_stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(stem_width),
                relu=nn.ReLU(),
            )
        )
    )
    channels = stem_width
    for index, widths in enumerate(stages, start=1):
        blocks = []
        for position, block_width in enumerate(widths):
            stride = 2 if index > 1 and position == 0 else 1
            blocks.append(DepthwiseSeparable(channels, scaled(block_width, width), stride))
            channels = scaled(block_width, width)
        layers[f"stage{index}"] = nn.Sequential(*blocks)
    layers["pool"] = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    layers["classifier"] = nn.Linear(channels, num_classes)
    # Padded 3x3 convs (strided or not) and 1x1 convs only: even a 1x1 image passes.
    model = ZooModel(layers, feature_points=MOBILENET_FEATURE_POINTS[: len(stages) + 1], min_input_size=1)
    init_resnet_weights(model)  # the same He-normal conv / unit-BN initialisation as the CIFAR ResNets
    return model


@register_model("mobilenet16")
def mobilenet16(num_classes: int, in_channels: int = 3, width: float = 1.0, stem_stride: int = 1) -> ZooModel:
    """MobileNet-16 (the paper's ImageNet-64 teacher): stem + the 13 standard depthwise-separable blocks."""
    return build_mobilenet(MOBILENET_STAGES["mobilenet16"], num_classes, in_channels, width, stem_stride)


@register_model("mobilenet9")
def mobilenet9(num_classes: int, in_channels: int = 3, width: float = 1.0, stem_stride: int = 1) -> ZooModel:
    """MobileNet-9 (the paper's ImageNet-64 student): stem + 6 depthwise-separable blocks."""
    return build_mobilenet(MOBILENET_STAGES["mobilenet9"], num_classes, in_channels, width, stem_stride)
