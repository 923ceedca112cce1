"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, BMVC 2016), RepDistiller's layout.

A WRN-d-k has a 3x3 stem convolution (16 channels), then three groups of ``n = (d - 4) / 6``
*pre-activation* basic blocks of widths ``16k, 32k, 64k`` (the 2nd and 3rd groups start at stride 2), a
final BN-ReLU (pre-activation blocks leave their output un-normalised), global average pooling and a
linear classifier. The MSKD paper's pair WRN-40-2 -> WRN-16-2 uses ``n = 6`` and ``n = 2``.

===========  =========================================  ==============  ==============
stage        what it does                               output (C,H,W)  feature point?
===========  =========================================  ==============  ==============
stem         3x3 conv (16)                              16 x 32 x 32    yes
stage1       n pre-activation blocks, 16k channels      16k x 32 x 32   yes
stage2       n blocks, 32k channels, first stride 2     32k x 16 x 16   yes
stage3       n blocks, 64k channels, first stride 2     64k x 8 x 8     yes
final_norm   BN - ReLU                                  64k x 8 x 8     no
pool         global average pool + flatten              64k             no
classifier   Linear(64k, num_classes)                   num_classes     no
===========  =========================================  ==============  ==============

Feature points are the groups' outputs (pre-activation, as RepDistiller's ``feat[1..3]``). A multi-exit
WRN therefore has 3 exits: after ``stage1``, after ``stage2`` and the network's own classifier.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from kdbook_utils.errors import check_int, check_number, must_be
from kdbook_utils.models import ZooModel, register_model

WRN_FEATURE_POINTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3")


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    When the shape changes, the shortcut is a strided 1x1 convolution of the *activated* input
    ``relu(bn1(x))`` (the WRN paper's and RepDistiller's choice); otherwise it is ``x`` itself.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        residual = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(activated)))))
        shortcut = x if self.projection is None else self.projection(activated)
        return shortcut + residual


def build_wrn(
    depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
) -> ZooModel:
    """Assemble a WRN-``depth``-``widen_factor`` as named stages (see the module docstring)."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(must_be("The depth of a WRN", "6n + 4 (10, 16, 22, 28, 40, ...)", depth))
    check_int("widen_factor", widen_factor, minimum=1, fix="WRN-40-2 has widen_factor 2.")
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    check_number("dropout", dropout, minimum=0.0, maximum=1.0, fix="It is a probability; 0 switches it off.")
    blocks_per_group = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
    channels = 16
    for index, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
        blocks = [PreActBlock(channels, width, stride, dropout)]
        blocks += [PreActBlock(width, width, 1, dropout) for _ in range(blocks_per_group - 1)]
        stages[f"stage{index}"] = nn.Sequential(*blocks)
        channels = width
    stages["final_norm"] = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(channels), relu=nn.ReLU()))
    stages["pool"] = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    stages["classifier"] = nn.Linear(channels, num_classes)
    model = ZooModel(stages, feature_points=WRN_FEATURE_POINTS, min_input_size=1)  # padded 3x3 convs only
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


@register_model("wrn16_2")
def wrn16_2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ZooModel:
    """WRN-16-2: 2 blocks per group, widths 32/64/128 (MSKD's WRN student)."""
    return build_wrn(16, 2, num_classes, in_channels, dropout)


@register_model("wrn40_2")
def wrn40_2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ZooModel:
    """WRN-40-2: 6 blocks per group, widths 32/64/128 (MSKD's WRN teacher)."""
    return build_wrn(40, 2, num_classes, in_channels, dropout)
