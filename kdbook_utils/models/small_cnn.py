"""A family of small plain CNNs: the students of the Hinton KD lesson's architecture sweep.

The student project behind lesson 1 distils a large teacher into "small CNNs" and tries several of them.
This family has three knobs, so a sweep can trade size for accuracy one knob at a time:

* ``blocks``: how many conv blocks (each 3x3 conv - BN - ReLU, then a 2x2 max-pool halving the map);
* ``width``: the channels of the first block; each later block doubles them;
* ``fc_layers``: how many fully connected layers at the end (``fc_layers - 1`` hidden ``Linear - ReLU``
  layers of ``hidden`` units in the stage ``head``, then the final ``classifier``).

Layout of ``create_model("small_cnn", 10, blocks=2, width=16, fc_layers=2)`` at 32x32:

===========  =================================================  ==============  ==============
stage        what it does                                       output          feature point?
===========  =================================================  ==============  ==============
block1       3x3 conv (16) - BN - ReLU                          16 x 32 x 32    yes
down1        2x2 max-pool                                       16 x 16 x 16    no
block2       3x3 conv (32) - BN - ReLU                          32 x 16 x 16    yes
down2        2x2 max-pool                                       32 x 8 x 8      no
pool         global average pool + flatten                      32              no
head         Linear(32, hidden) - ReLU (one per extra FC layer)  hidden          no
classifier   Linear(hidden, num_classes)                        num_classes     no
===========  =================================================  ==============  ==============

``SMALL_CNN_FAMILY`` names a few members (from about 300 to 95,000 parameters) for the lesson's sweep.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from kdbook_utils.errors import check_int
from kdbook_utils.models import ZooModel, register_model

SMALL_CNN_FAMILY: dict[str, dict[str, int]] = {
    "cnn-1x8": {"blocks": 1, "width": 8, "fc_layers": 1},
    "cnn-2x8": {"blocks": 2, "width": 8, "fc_layers": 1},
    "cnn-2x16": {"blocks": 2, "width": 16, "fc_layers": 1},
    "cnn-3x16": {"blocks": 3, "width": 16, "fc_layers": 1},
    "cnn-3x16-fc2": {"blocks": 3, "width": 16, "fc_layers": 2},
    "cnn-3x32": {"blocks": 3, "width": 32, "fc_layers": 1},
}
"""Named members of the family, smallest first: ``create_model("small_cnn", 10, **SMALL_CNN_FAMILY[name])``."""


@register_model("small_cnn")
def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    *,
    blocks: int = 2,
    width: int = 16,
    fc_layers: int = 1,
    hidden: int = 64,
) -> ZooModel:
    """A plain CNN of ``blocks`` conv blocks (widths ``width * 2**i``) and ``fc_layers`` linear layers.

    Each block halves the feature map with a 2x2 max-pool, so at most 5 blocks fit a 32x32 input.
    """
    check_int(
        "small_cnn's blocks",
        blocks,
        minimum=1,
        maximum=5,
        fix="Each block halves the map with a 2x2 max-pool, so more than 5 would pool 32x32 below 1x1.",
    )
    check_int("small_cnn's width", width, minimum=1, fix="It is the channel count of the first conv block.")
    check_int("small_cnn's fc_layers", fc_layers, minimum=1, fix="1 means the classifier alone.")
    check_int("small_cnn's hidden", hidden, minimum=1, fix="It is the width of each hidden FC layer.")
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")

    stages: OrderedDict[str, nn.Module] = OrderedDict()
    channels_in = in_channels
    for index in range(1, blocks + 1):
        channels_out = width * 2 ** (index - 1)
        stages[f"block{index}"] = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, bias=False),
                bn=nn.BatchNorm2d(channels_out),
                relu=nn.ReLU(),
            )
        )
        stages[f"down{index}"] = nn.MaxPool2d(2)
        channels_in = channels_out
    stages["pool"] = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    features = channels_in
    if fc_layers > 1:
        head: OrderedDict[str, nn.Module] = OrderedDict()
        for index in range(1, fc_layers):
            head[f"fc{index}"] = nn.Linear(features, hidden)
            head[f"relu{index}"] = nn.ReLU()
            features = hidden
        stages["head"] = nn.Sequential(head)
    stages["classifier"] = nn.Linear(features, num_classes)

    # Each block's 2x2 max-pool halves the map (rounding down): ``blocks`` of them need 2**blocks pixels.
    model = ZooModel(
        stages,
        feature_points=tuple(f"block{index}" for index in range(1, blocks + 1)),
        min_input_size=2**blocks,
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    model.config = {"blocks": blocks, "width": width, "fc_layers": fc_layers, "hidden": hidden}
    return model
