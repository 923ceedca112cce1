"""The AlexNet-style teacher and student of Li et al. (2019), "Layer-Level Knowledge Distillation for Deep
Neural Network Learning" (Appl. Sci. 9(10) 1966), Tables 1 and 2, adapted to 32x32 inputs.

The paper feeds the teacher 227x227 images and the student 57x57 copies of the same image. Here both see
the same 32x32 (or 64x64) image, so strides and pools are chosen to keep every map at least 4x4:

==========  ==============================  =================================  ============================
layer       paper teacher (Table 1, 227px)  ours, teacher (32px input)         ours, output at 32px
==========  ==============================  =================================  ============================
conv1       11x11 / 4, 96                   5x5 / 1 pad 2, 96                  96 x 32 x 32
pool1       max 3 / 2                       max 3 / 2 pad 1                    96 x 16 x 16
conv2       5x5 / 1, 256                    5x5 / 1 pad 2, 256                 256 x 16 x 16
pool2       max 3 / 2                       max 3 / 2 pad 1                    256 x 8 x 8
conv3-5     3x3 / 1, 384 / 384 / 256        3x3 / 1 pad 1, 384 / 384 / 256     ... 256 x 8 x 8
pool5       max 3 / 2                       max 3 / 2 pad 1, then avg to 4x4   4096 (= 256 x 4 x 4)
fc1, fc2    4096, 4096                      4096, 4096                         4096
classifier  (not listed)                    linear to the classes              num_classes
==========  ==============================  =================================  ============================

==========  ==============================  =================================  ============================
layer       paper student (Table 2, 57px)   ours, student (32px input)         ours, output at 32px
==========  ==============================  =================================  ============================
conv1       3x3 / 1, 96                     3x3 / 1 pad 1, 96                  96 x 32 x 32
pool1       max 3 / 2                       max 3 / 2 pad 1                    96 x 16 x 16
conv2       3x3 / 2, 384                    3x3 / 2 pad 1, 384                 384 x 8 x 8
conv3       3x3 / 1, 256                    3x3 / 1 pad 1, 256                 256 x 8 x 8
pool3       max 3 / 2                       max 3 / 2 pad 1, then avg to 4x4   4096 (= 256 x 4 x 4)
fc1, fc2    512, 512                        512, 512                           512
classifier  (not listed)                    linear to the classes              num_classes
==========  ==============================  =================================  ============================

Two further adaptations, both options:

* ``width`` scales every channel and FC width (default 1.0 = the paper's widths; the names ending in
  ``_half``, ``_quarter`` and ``_eighth`` are registered reduced-width variants). The widths above are
  heavy for a CPU, so the ``quick`` lesson uses a reduced width; the layer structure is unchanged.
* ``batch_norm`` (default True) puts batch normalisation between each convolution and its ReLU. It stands
  in for AlexNet's local response normalisation and lets these plain networks train in a few epochs.

Every conv and FC stage ends with its ReLU, so the named outputs ``conv1`` ... ``fc2`` are the
non-negative features the LSL paper's Gram matrices assume. ``model.feature_points`` lists the conv
feature maps (the zoo contract); ``model.paper_layers`` lists every layer the paper considers, FC
included, in forward order.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from kdbook_utils.errors import check_int, check_number
from kdbook_utils.models import ZooModel, register_model

TEACHER_CHANNELS = (96, 256, 384, 384, 256)
TEACHER_FC = 4096
STUDENT_CHANNELS = (96, 384, 256)
STUDENT_FC = 512
POOLED_SIZE = 4  # spatial size the last map is averaged to before the FC layers (AlexNet uses 6 at 227px)


def _scaled(channels: int, width: float) -> int:
    check_number("width", width, above=0.0, fix="It scales every channel count; 1.0 is the paper's width.")
    return max(1, round(channels * width))


def _check_options(in_channels: int, dropout: float) -> None:
    check_int("in_channels", in_channels, minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    check_number("dropout", dropout, minimum=0.0, maximum=1.0, fix="It is a probability; 0 switches it off.")


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """Convolution (+ batch norm) + ReLU: one named AlexNet layer whose output is post-ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _fc(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """(Dropout +) linear + ReLU: one named AlexNet FC layer whose output is post-ReLU."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    layers += [nn.Linear(in_features, out_features), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _max_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def _last_pool() -> nn.Sequential:
    """AlexNet's last max pool, then an average to a fixed 4x4 grid so the FC sizes do not depend on the
    input size (32x32 and 64x64 both work), then flatten."""
    return nn.Sequential(_max_pool(), nn.AdaptiveAvgPool2d(POOLED_SIZE), nn.Flatten())


class AlexNetLSL(ZooModel):
    """A ``ZooModel`` that also records the paper's candidate layers (``paper_layers``), FC included."""

    def __init__(
        self,
        stages: OrderedDict[str, nn.Module],
        feature_points: tuple[str, ...],
        paper_layers: tuple[str, ...],
    ) -> None:
        # Convs are padded to keep the size and the 3x3 / 2 max-pools are padded by 1, so any size >= 1
        # passes; the adaptive average pool then makes the FC input 4x4.
        super().__init__(stages, feature_points, min_input_size=1)
        self.paper_layers: tuple[str, ...] = paper_layers


@register_model("alexnet_lsl_teacher")
def alexnet_lsl_teacher(
    num_classes: int,
    in_channels: int = 3,
    *,
    width: float = 1.0,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> AlexNetLSL:
    """The LSL paper's teacher (Table 1): five convolutions and two FC layers, adapted to 32x32 inputs."""
    _check_options(in_channels, dropout)
    c1, c2, c3, c4, c5 = (_scaled(c, width) for c in TEACHER_CHANNELS)
    fc = _scaled(TEACHER_FC, width)
    stages = OrderedDict(
        conv1=_conv(in_channels, c1, 5, 1, batch_norm),
        pool1=_max_pool(),
        conv2=_conv(c1, c2, 5, 1, batch_norm),
        pool2=_max_pool(),
        conv3=_conv(c2, c3, 3, 1, batch_norm),
        conv4=_conv(c3, c4, 3, 1, batch_norm),
        conv5=_conv(c4, c5, 3, 1, batch_norm),
        pool5=_last_pool(),
        fc1=_fc(c5 * POOLED_SIZE * POOLED_SIZE, fc, dropout),
        fc2=_fc(fc, fc, dropout),
        classifier=nn.Linear(fc, num_classes),
    )
    conv_layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
    return AlexNetLSL(stages, conv_layers, conv_layers + ("fc1", "fc2"))


@register_model("alexnet_lsl_student")
def alexnet_lsl_student(
    num_classes: int,
    in_channels: int = 3,
    *,
    width: float = 1.0,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> AlexNetLSL:
    """The LSL paper's student (Table 2): three convolutions and two FC layers, adapted to 32x32 inputs."""
    _check_options(in_channels, dropout)
    c1, c2, c3 = (_scaled(c, width) for c in STUDENT_CHANNELS)
    fc = _scaled(STUDENT_FC, width)
    stages = OrderedDict(
        conv1=_conv(in_channels, c1, 3, 1, batch_norm),
        pool1=_max_pool(),
        conv2=_conv(c1, c2, 3, 2, batch_norm),
        conv3=_conv(c2, c3, 3, 1, batch_norm),
        pool3=_last_pool(),
        fc1=_fc(c3 * POOLED_SIZE * POOLED_SIZE, fc, dropout),
        fc2=_fc(fc, fc, dropout),
        classifier=nn.Linear(fc, num_classes),
    )
    conv_layers = ("conv1", "conv2", "conv3")
    return AlexNetLSL(stages, conv_layers, conv_layers + ("fc1", "fc2"))


# Named reduced-width variants, so that helpers which build a model from its name alone (the cached
# teachers of ``kdbook_utils.checkpoints``) can make them. The ``quick`` lesson uses the eighth-width pair.
@register_model("alexnet_lsl_teacher_half")
def alexnet_lsl_teacher_half(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_teacher` at half width (48 .. 192 channels, FC 2048)."""
    return alexnet_lsl_teacher(num_classes, in_channels, width=0.5, batch_norm=batch_norm, dropout=dropout)


@register_model("alexnet_lsl_student_half")
def alexnet_lsl_student_half(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_student` at half width (48 .. 192 channels, FC 256)."""
    return alexnet_lsl_student(num_classes, in_channels, width=0.5, batch_norm=batch_norm, dropout=dropout)


@register_model("alexnet_lsl_teacher_quarter")
def alexnet_lsl_teacher_quarter(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_teacher` at quarter width (24 .. 96 channels, FC 1024)."""
    return alexnet_lsl_teacher(num_classes, in_channels, width=0.25, batch_norm=batch_norm, dropout=dropout)


@register_model("alexnet_lsl_student_quarter")
def alexnet_lsl_student_quarter(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_student` at quarter width (24 .. 96 channels, FC 128)."""
    return alexnet_lsl_student(num_classes, in_channels, width=0.25, batch_norm=batch_norm, dropout=dropout)


@register_model("alexnet_lsl_teacher_eighth")
def alexnet_lsl_teacher_eighth(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_teacher` at an eighth of the width (12 .. 48 channels, FC 512)."""
    return alexnet_lsl_teacher(num_classes, in_channels, width=0.125, batch_norm=batch_norm, dropout=dropout)


@register_model("alexnet_lsl_student_eighth")
def alexnet_lsl_student_eighth(
    num_classes: int, in_channels: int = 3, *, batch_norm: bool = True, dropout: float = 0.0
) -> AlexNetLSL:
    """:func:`alexnet_lsl_student` at an eighth of the width (12 .. 48 channels, FC 64)."""
    return alexnet_lsl_student(num_classes, in_channels, width=0.125, batch_norm=batch_norm, dropout=dropout)
