"""VGG with BatchNorm for 32x32 images (Simonyan & Zisserman, ICLR 2015), as RepDistiller defines it.

RepDistiller (Tian et al., ICLR 2020) keeps VGG's five blocks of 3x3 convolutions but drops the three
large fully connected layers: a global average pool and one ``Linear(512, num_classes)`` replace them.
Each convolution is followed by BatchNorm and ReLU. Max-pools halve the resolution between blocks, but
at 32 px the pool between blocks 4 and 5 is skipped (four halvings would leave 2x2 maps), so block 5
works on 4x4 maps; for 64 px inputs RepDistiller keeps that pool, and so do we with ``image_size=64``.

Configurations (number = output channels of a 3x3 conv; one list per block):

=======  ================  =====================================================  =============
model    RepDistiller cfg  blocks                                                 weight layers
=======  ================  =====================================================  =============
vgg8     S                 [64] [128] [256] [512] [512]                           5 conv + 1 FC
vgg11    A                 [64] [128] [256, 256] [512, 512] [512, 512]             8 conv + 1 FC
vgg13    B                 [64, 64] [128, 128] [256, 256] [512, 512] [512, 512]    10 conv + 1 FC
=======  ================  =====================================================  =============

(RepDistiller's ``vgg8`` has six weight layers; lesson 3 calls the same network VGG-6, the name in Chou et al.)

Stages of ``vgg11`` at 32x32 (``layer_table`` shows every module):

===========  ===================================  ==============  ==============
stage        what it does                         output (C,H,W)  feature point?
===========  ===================================  ==============  ==============
block1       conv(64)-BN-ReLU                     64 x 32 x 32    yes
pool1        2x2 max-pool                         64 x 16 x 16    no
block2       conv(128)-BN-ReLU                    128 x 16 x 16   yes
pool2        2x2 max-pool                         128 x 8 x 8     no
block3       2 x conv(256)-BN-ReLU                256 x 8 x 8     yes
pool3        2x2 max-pool                         256 x 4 x 4     no
block4       2 x conv(512)-BN-ReLU                512 x 4 x 4     yes
(pool4)      2x2 max-pool, only if image_size=64  (512 x 4 x 4)   no
block5       2 x conv(512)-BN-ReLU                512 x 4 x 4     yes
pool         global average pool + flatten        512             no
classifier   Linear(512, num_classes)             num_classes     no
===========  ===================================  ==============  ==============

Feature points are the blocks' outputs: post-ReLU, before the max-pool. ReLUs are non-inplace so a
hooked BatchNorm output is never overwritten.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from kdbook_utils.errors import check_int
from kdbook_utils.metrics import count_flops, count_parameters
from kdbook_utils.models import ZooModel, register_model

VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def make_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """Consecutive 3x3 conv-BN-ReLU layers named ``conv1, bn1, relu1, conv2, ...``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, width in enumerate(widths, start=1):
        # The convolutions keep their bias, as in RepDistiller (redundant before BN, but it is their layout).
        layers[f"conv{index}"] = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers[f"bn{index}"] = nn.BatchNorm2d(width)
        layers[f"relu{index}"] = nn.ReLU()
        in_channels = width
    return nn.Sequential(layers)


def init_vgg_weights(model: nn.Module) -> None:
    """RepDistiller's VGG initialisation.

    Convs: Kaiming normal with fan-out (std ``sqrt(2 / (k*k*out_channels))``), bias 0.
    BatchNorm: weight 1, bias 0. Classifier: normal with std 0.01, bias 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)


def build_vgg(
    blocks: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3, image_size: int = 32
) -> ZooModel:
    """Assemble a VGG as a :class:`ZooModel`: ``block1, pool1, block2, ..., blockN, pool, classifier``.

    A 2x2 max-pool follows every block but the last; the one before the last block is left out unless
    ``image_size >= 64`` (RepDistiller's rule, which keeps the last block's maps at 4x4 for 32 and 64 px).
    The model runs at any input size either way: the global average pool makes the head size-independent.
    """
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    check_int(
        "image_size", image_size, minimum=1, fix="It is the input's height and width in pixels, e.g. 32."
    )
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    last = len(blocks)
    for index, widths in enumerate(blocks, start=1):
        stages[f"block{index}"] = make_block(in_channels, widths)
        in_channels = widths[-1]
        keep_pool = index < last - 1 or (index == last - 1 and image_size >= 64)
        if keep_pool:
            stages[f"pool{index}"] = nn.MaxPool2d(kernel_size=2, stride=2)
    stages["pool"] = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    stages["classifier"] = nn.Linear(in_channels, num_classes)
    # Each 2x2 max-pool halves the map (rounding down), so k of them need at least 2**k pixels.
    pools = sum(isinstance(stage, nn.MaxPool2d) for stage in stages.values())
    model = ZooModel(
        stages, feature_points=[f"block{index}" for index in range(1, last + 1)], min_input_size=2**pools
    )
    init_vgg_weights(model)
    return model


@register_model("vgg8")
def vgg8(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ZooModel:
    """VGG-8 with BN (RepDistiller cfg S, VGG-6 in lesson 3): one conv per block, 5 conv + 1 FC."""
    return build_vgg(VGG_CONFIGS["vgg8"], num_classes, in_channels, image_size)


@register_model("vgg11")
def vgg11(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ZooModel:
    """VGG-11 with BN (cfg A): 8 conv + 1 FC."""
    return build_vgg(VGG_CONFIGS["vgg11"], num_classes, in_channels, image_size)


@register_model("vgg13")
def vgg13(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ZooModel:
    """VGG-13 with BN (cfg B): two convs in every block, 10 conv + 1 FC."""
    return build_vgg(VGG_CONFIGS["vgg13"], num_classes, in_channels, image_size)


def describe(num_classes: int = 100, image_size: int = 32) -> pd.DataFrame:
    """The VGG family as a table: block widths, weight layers, parameters and MACs per image.

    ``params`` counts every parameter (BatchNorm included); ``params_without_bn`` counts convolutions
    and the classifier only, the convention of most papers' tables (VGG-11 9.27 M, VGG-6 = vgg8 3.96 M).
    """
    rows = []
    for name, blocks in VGG_CONFIGS.items():
        with torch.device("meta"):  # shapes only: nothing is allocated or computed
            model = build_vgg(blocks, num_classes, image_size=image_size)
        rows.append(
            {
                "model": name,
                "blocks": " ".join(str(list(widths)) for widths in blocks),
                "weight_layers": sum(len(widths) for widths in blocks) + 1,
                "params": count_parameters(model),
                "params_without_bn": count_parameters(model, include_batchnorm=False),
                "macs": count_flops(model, (1, 3, image_size, image_size)).macs,
            }
        )
    return pd.DataFrame(rows).set_index("model")
