"""Big torchvision teachers (ResNet-50, Inception-v3) as zoo models, optionally ImageNet-pretrained.

The student project behind lesson 1 fine-tunes an ImageNet-pretrained ResNet-50 or Inception-v3 on
CIFAR-10 and distils it into small CNNs. These builders wrap torchvision's networks as
:class:`~kdbook_utils.models.ZooModel` stages so that hooks, checkpoints and the training loop treat them
like every other zoo model:

``torchvision_resnet50``
    stages ``resize, stem, stage1 .. stage4, pool, classifier`` (feature points ``stem, stage1..stage4``).
    *From scratch* (``pretrained=False``, the default) it uses the CIFAR stem: a 3x3 stride-1 conv and no
    max-pool, so a 32x32 image keeps a 4x4 map at ``stage4`` (``resize`` is the identity).
    *Pretrained* it keeps the ImageNet stem (7x7 stride-2 conv + max-pool) whose filters were learned at
    ImageNet scale, and ``resize`` upsamples the input bilinearly to ``input_size`` (224 by default).
``torchvision_inception_v3``
    stages ``resize, stem, stage1 .. stage3, pool, classifier``; Inception-v3 needs at least 75x75 inputs,
    so ``resize`` always upsamples (299 by default, as ImageNet training did; 75 is the cheapest).
    The auxiliary classifier is dropped (a teacher only needs its main logits).

Pretrained weights are read from torch's hub cache (``torch.hub.get_dir()/checkpoints``). Nothing is
downloaded unless ``download=True``; when the file is missing (or the download fails) the builder raises
:class:`PretrainedWeightsUnavailable`, whose message says where to put the file, so a notebook can fall
back to a zoo teacher.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from kdbook_utils.errors import check_choice, check_int, must_be
from kdbook_utils.models import ZooModel, register_model


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights are neither in the local torch hub cache nor downloadable from here."""


def pretrained_weights_path(weights: tv_models.WeightsEnum) -> Path:
    """Where torch's hub cache keeps the file of ``weights`` (it may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_pretrained_state(weights: tv_models.WeightsEnum, download: bool) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``weights`` from the local cache, downloading it only if asked."""
    path = pretrained_weights_path(weights)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    if download:
        try:
            return weights.get_state_dict(progress=True)
        except Exception as error:  # URLError, SSL errors, HTTP errors: all mean "not reachable from here"
            raise PretrainedWeightsUnavailable(
                f"Could not download {weights.url} ({type(error).__name__}: {error}). "
                f"Copy the file to {path} on a machine with internet access, or use a zoo teacher."
            ) from error
    raise PretrainedWeightsUnavailable(
        f"ImageNet weights {path.name} are not in the local cache ({path}). Pass download=True where the "
        f"internet is reachable, or copy the file there; otherwise train a zoo teacher (e.g. resnet20)."
    )


def _resize_stage(input_size: int | None) -> nn.Module:
    if input_size is None:
        return nn.Identity()
    return nn.Upsample(size=(input_size, input_size), mode="bilinear", align_corners=False)


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of an RGB conv for ``in_channels`` inputs; grey inputs get the RGB filters summed."""
    if in_channels == conv.in_channels:
        return conv
    adapted = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            adapted.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
    return adapted


def _check_input_size(name: str, input_size: int | None, minimum: int) -> None:
    if input_size is not None:
        check_int(f"{name}'s input_size", input_size, minimum=minimum, fix="Or None for the default.")


@register_model("torchvision_resnet50")
def torchvision_resnet50(
    num_classes: int,
    in_channels: int = 3,
    *,
    pretrained: bool = False,
    download: bool = False,
    stem: str | None = None,
    input_size: int | None = None,
) -> ZooModel:
    """torchvision's ResNet-50 with a new ``num_classes`` classifier (see the module docstring).

    ``stem`` is ``"imagenet"`` (7x7 stride-2 conv + max-pool, the default when ``pretrained``) or
    ``"cifar"`` (3x3 stride-1 conv, the default otherwise); rebuild a fine-tuned pretrained model for its
    checkpoint with ``stem="imagenet"``. ``input_size`` defaults to 224 with the ImageNet stem (upsampled
    input) and to ``None`` (native resolution) with the CIFAR stem.
    """
    _check_input_size("torchvision_resnet50", input_size, 32)
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    stem_kind = ("imagenet" if pretrained else "cifar") if stem is None else stem
    check_choice("torchvision_resnet50's stem", stem_kind, ("imagenet", "cifar"), "None picks by pretrained.")
    if pretrained and stem_kind != "imagenet":
        raise ValueError(
            must_be(
                "torchvision_resnet50's stem with pretrained=True",
                "'imagenet' (the ImageNet weights were learned with it)",
                stem,
                "Pass stem='imagenet' or leave it out.",
            )
        )
    network = tv_models.resnet50(weights=None)
    if pretrained:
        network.load_state_dict(load_pretrained_state(tv_models.ResNet50_Weights.IMAGENET1K_V2, download))
    if stem_kind == "imagenet":
        stem_stage = nn.Sequential(
            OrderedDict(
                conv=_adapt_first_conv(network.conv1, in_channels),
                bn=network.bn1,
                relu=network.relu,
                maxpool=network.maxpool,
            )
        )
        resize = _resize_stage(224 if input_size is None else input_size)
    else:
        stem_conv = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(stem_conv.weight, mode="fan_out", nonlinearity="relu")
        stem_stage = nn.Sequential(OrderedDict(conv=stem_conv, bn=network.bn1, relu=network.relu))
        resize = _resize_stage(input_size)
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        resize=resize,
        stem=stem_stage,
        stage1=network.layer1,
        stage2=network.layer2,
        stage3=network.layer3,
        stage4=network.layer4,
        pool=nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())),
        classifier=nn.Linear(network.fc.in_features, num_classes),
    )
    # The CIFAR stem keeps the size and ``resize`` upsamples for the ImageNet stem: any size >= 1 passes.
    return ZooModel(stages, feature_points=("stem", "stage1", "stage2", "stage3", "stage4"), min_input_size=1)


@register_model("torchvision_inception_v3")
def torchvision_inception_v3(
    num_classes: int,
    in_channels: int = 3,
    *,
    pretrained: bool = False,
    download: bool = False,
    input_size: int = 299,
) -> ZooModel:
    """torchvision's Inception-v3 (no auxiliary head) with a new ``num_classes`` classifier.

    Inputs are upsampled to ``input_size`` (at least 75, the smallest the network accepts).
    """
    _check_input_size("torchvision_inception_v3", input_size, 75)
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    network = tv_models.inception_v3(weights=None, aux_logits=True, init_weights=not pretrained)
    if pretrained:
        network.load_state_dict(load_pretrained_state(tv_models.Inception_V3_Weights.IMAGENET1K_V1, download))
    first = network.Conv2d_1a_3x3
    first.conv = _adapt_first_conv(first.conv, in_channels)
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        resize=_resize_stage(input_size),
        stem=nn.Sequential(
            OrderedDict(
                conv1a=first,
                conv2a=network.Conv2d_2a_3x3,
                conv2b=network.Conv2d_2b_3x3,
                maxpool1=network.maxpool1,
                conv3b=network.Conv2d_3b_1x1,
                conv4a=network.Conv2d_4a_3x3,
                maxpool2=network.maxpool2,
            )
        ),
        stage1=nn.Sequential(
            OrderedDict(mixed5b=network.Mixed_5b, mixed5c=network.Mixed_5c, mixed5d=network.Mixed_5d)
        ),
        stage2=nn.Sequential(
            OrderedDict(
                mixed6a=network.Mixed_6a,
                mixed6b=network.Mixed_6b,
                mixed6c=network.Mixed_6c,
                mixed6d=network.Mixed_6d,
                mixed6e=network.Mixed_6e,
            )
        ),
        stage3=nn.Sequential(
            OrderedDict(mixed7a=network.Mixed_7a, mixed7b=network.Mixed_7b, mixed7c=network.Mixed_7c)
        ),
        pool=nn.Sequential(
            OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), dropout=nn.Dropout(p=0.5))
        ),
        classifier=nn.Linear(network.fc.in_features, num_classes),
    )
    # ``resize`` upsamples every input to input_size (>= 75), so any size >= 1 passes.
    return ZooModel(stages, feature_points=("stem", "stage1", "stage2", "stage3"), min_input_size=1)
