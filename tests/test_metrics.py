"""Parameter and FLOP counting, the comparison table, and the accuracy helpers."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from torch import nn

from kdbook_utils.metrics import (
    FlopCount,
    accuracy,
    compare_models,
    confusion_matrix,
    count_flops,
    count_parameters,
    per_class_accuracy,
)
from kdbook_utils.models import create_model


def small_cnn() -> nn.Sequential:
    # conv 3*8*3*3 + 8 = 224, BatchNorm 2*8 = 16, linear 8*2 + 2 = 18: 258 parameters, 242 without BN.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def test_count_parameters_conventions() -> None:
    model = small_cnn()
    assert count_parameters(model) == 258
    assert count_parameters(model, include_batchnorm=False) == 242
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 16 + 18
    assert count_parameters(model, trainable_only=True, include_batchnorm=False) == 18
    shared = nn.Linear(5, 5)  # 30 parameters, used twice: counted once
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 30


def test_flops_of_a_convolution_by_hand() -> None:
    # 3 -> 8 channels, 3x3 kernel, stride 2 on 32x32 with padding 1: output 8 x 16 x 16.
    # MACs = C_in * k * k * C_out * H_out * W_out = 3 * 9 * 8 * 256 = 55,296; FLOPs = 2 * MACs.
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert count_flops(conv, (3, 32, 32)) == FlopCount(macs=55_296, flops=110_592)
    # Grouped: 8 -> 16 channels in 4 groups, each output sees 8 / 4 = 2 inputs; 10x10 unpadded -> 8x8.
    grouped = nn.Conv2d(8, 16, 3, groups=4, bias=False)
    assert count_flops(grouped, (8, 10, 10)).macs == 2 * 9 * 16 * 64


def test_flops_of_a_linear_layer_and_what_is_not_counted() -> None:
    linear_model = nn.Sequential(nn.Flatten(), nn.Linear(20, 5))
    assert count_flops(linear_model, (1, 4, 5)).macs == 20 * 5
    # BatchNorm, ReLU, pooling and biases add nothing; the count is per image whatever the batch size.
    conv_only = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    expected = 3 * 9 * 8 * 32 * 32
    assert count_flops(conv_only, (3, 32, 32)).macs == expected
    assert count_flops(small_cnn(), (4, 3, 32, 32)).macs == expected + 8 * 2


def test_count_flops_restores_the_training_mode() -> None:
    model = small_cnn().train()
    running_mean = model[1].running_mean.clone()
    count_flops(model, (2, 3, 32, 32))
    assert model.training and torch.equal(model[1].running_mean, running_mean)


@pytest.mark.parametrize(
    ("name", "macs"),
    [
        # resnet8: stem 432 * 32*32 = 442,368; stage1 2 * 2,304 * 1,024 = 4,718,592;
        # stage2 (4,608 + 9,216 + 512) * 16*16 = 3,670,016; stage3 (18,432 + 36,864 + 2,048) * 8*8 = 3,670,016;
        # classifier 64 * 100 = 6,400. Total 12,507,392 (spec §1.4: 12.5 M).
        ("resnet8", 12_507_392),
        # resnet32 (spec: 69.1 M): resnet8 + 8 more 16-channel convs at 32x32 (8 * 2,304 * 1,024 = 18,874,368)
        # + 8 more 32-channel convs at 16x16 (8 * 9,216 * 256) + 8 more 64-channel convs at 8x8 (8 * 36,864 * 64),
        # each 18,874,368: 12,507,392 + 3 * 18,874,368 = 69,130,496.
        ("resnet32", 69_130_496),
        # vgg8: 1,728*1,024 + 73,728*256 + 294,912*64 + 1,179,648*16 + 2,359,296*16 + 51,200 = 96,192,512
        # (spec: 96.2 M; conv biases are not counted).
        ("vgg8", 96_192_512),
        # vgg11: vgg8 + a 256->256 conv at 8x8 (589,824*64 = 37,748,736) + a 512->512 conv at 4x4 in block4
        # and block5 (2 * 2,359,296*16 = 75,497,472) = 209,438,720 (spec: 209.4 M).
        ("vgg11", 209_438_720),
    ],
)
def test_zoo_macs_match_the_spec(name: str, macs: int) -> None:
    cost = count_flops(create_model(name, 100), (1, 3, 32, 32))
    assert cost.macs == macs and cost.flops == 2 * macs


def test_compare_models_ratios() -> None:
    # teacher: conv 3->16 (432 + 16 bias = 448 params; 432 * 64 = 27,648 MACs at 8x8) + linear 16->4 (68; 64)
    # student: conv 3->4 (108 + 4 = 112; 108 * 64 = 6,912 MACs) + linear 4->4 (20; 16)
    def net(width: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)
        )

    models = {"teacher": net(16), "student": net(4)}
    table = compare_models(models, (3, 8, 8))
    assert list(table.index) == ["teacher", "student"]
    assert list(table.columns) == ["params", "macs", "flops", "compression_ratio", "computation_ratio"]
    assert table.loc["teacher", "params"] == 516 and table.loc["student", "params"] == 132
    assert table.loc["teacher", "macs"] == 27_712 and table.loc["student", "macs"] == 6_928
    assert table.loc["student", "flops"] == 2 * 6_928
    assert table.loc["teacher", "compression_ratio"] == 1.0
    assert table.loc["student", "compression_ratio"] == pytest.approx(516 / 132)
    assert table.loc["student", "computation_ratio"] == pytest.approx(27_712 / 6_928)
    # Relative to the student instead, the teacher's ratios are the reciprocals.
    flipped = compare_models(models, (3, 8, 8), reference="student")
    assert flipped.loc["teacher", "compression_ratio"] == pytest.approx(132 / 516)
    with pytest.raises(ValueError, match="'assistant' is not one of the models: teacher, student"):
        compare_models(models, (3, 8, 8), reference="assistant")


def test_compare_models_on_the_spec_pair() -> None:
    # spec §1.4: resnet32 / resnet8 with projection shortcuts, 470,292 vs 83,220 params (5.65x).
    models = {"resnet32": create_model("resnet32", 100), "resnet8": create_model("resnet8", 100)}
    table = compare_models(models, (1, 3, 32, 32), include_batchnorm=False)
    assert round(table.loc["resnet8", "compression_ratio"], 2) == 5.65
    assert round(table.loc["resnet8", "computation_ratio"], 2) == 5.53


def test_accuracy_is_in_percent() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.5, 0.1, 0.2], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 2])
    # argmax = [0, 2, 0, 1]: rows 0 and 2 are right, 2 of 4 = 50 %.
    assert accuracy(logits, labels) == 50.0
    assert accuracy(logits.argmax(dim=1), labels) == 50.0
    # top-2: row 1's second best is class 1 (right), row 3's is class 2 (right).
    assert accuracy(logits, labels, top_k=2) == 100.0
    assert accuracy(logits[:3], labels[:3]) == pytest.approx(200 / 3)  # 2 of 3
    assert accuracy(logits.double(), labels.int()) == 50.0  # any float logits, any integer labels
    with pytest.raises(
        ValueError, match=r"labels must be of shape \(4,\), one per prediction; got shape \(3,\)"
    ):
        accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="top_k must be an integer from 1 to 3; got 4"):
        accuracy(logits, labels, top_k=4)


def test_accuracy_refuses_labels_the_model_cannot_predict() -> None:
    # A label 12 on a 10-class model is an error, as in confusion_matrix, not a silent miss.
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match=r"class index in \[0, 9\]; got 12 .*num_classes=10"):
        accuracy(logits, torch.tensor([1, 12, 3]))
    with pytest.raises(ValueError, match="got -1"):
        accuracy(logits, torch.tensor([1, -1, 3]))
    predictions = torch.tensor([1, 2, 3])
    assert accuracy(predictions, torch.tensor([1, 12, 3])) == pytest.approx(200 / 3)  # no class count known
    with pytest.raises(ValueError, match="got 12"):
        accuracy(predictions, torch.tensor([1, 12, 3]), num_classes=10)


def test_confusion_matrix_and_per_class_accuracy() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(predictions, labels, num_classes=4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(matrix, expected)
    per_class = per_class_accuracy(predictions, labels, num_classes=4)
    assert per_class[:3].tolist() == pytest.approx([50.0, 100.0, 200 / 3])  # percent
    assert math.isnan(per_class[3].item())  # no sample of class 3
    logits = nn.functional.one_hot(predictions, 4).float()
    assert torch.equal(confusion_matrix(logits, labels, 4), expected)
    with pytest.raises(ValueError, match=r"labels must be a class index in \[0, 1\]; got 2"):
        confusion_matrix(predictions, labels, num_classes=2)
    with pytest.raises(
        ValueError, match=r"class count for num_classes=3 must be 3; got logits of shape \(6, 4\)"
    ):
        confusion_matrix(logits, labels, num_classes=3)


def test_confusion_matrix_agrees_with_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    logits = torch.randn(200, 5, generator=generator)
    ours = confusion_matrix(logits, labels, 5)
    theirs = sklearn_confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=range(5))
    assert ours.tolist() == theirs.tolist()
    assert 100 * ours.trace().item() / 200 == pytest.approx(accuracy(logits, labels))
