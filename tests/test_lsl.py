"""Tests of Layer Selectivity Learning (kdbook_utils.methods.lsl) and its AlexNet-style models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdbook_utils.features import FeatureExtractor
from kdbook_utils.methods import lsl
from kdbook_utils.models import create_model

NUM_CLASSES = 4


def relu_features(*shape: int, seed: int = 0) -> torch.Tensor:
    """Non-negative features with some exact zeros, as after a ReLU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=generator))


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return create_model("alexnet_lsl_teacher", NUM_CLASSES, width=0.125).eval()


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(1)
    return create_model("alexnet_lsl_student", NUM_CLASSES, width=0.125).eval()


@pytest.fixture(scope="module")
def images_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(37, 3, 32, 32, generator=generator)
    labels = torch.arange(37) % NUM_CLASSES
    return images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


# ----------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_alexnet_models_name_the_paper_layers_and_run(size: int) -> None:
    teacher = create_model("alexnet_lsl_teacher", 10, width=0.25)
    student = create_model("alexnet_lsl_student", 10, in_channels=1, width=0.25)
    assert teacher.paper_layers == ("conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2")
    assert student.paper_layers == ("conv1", "conv2", "conv3", "fc1", "fc2")
    assert isinstance(teacher.classifier, nn.Linear) and isinstance(student.classifier, nn.Linear)
    with FeatureExtractor(teacher, teacher.paper_layers) as extractor:
        logits, features = extractor.forward_with_features(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    scale = size // 32
    assert features["conv1"].shape == (2, 24, 32 * scale, 32 * scale)
    assert features["conv2"].shape == (2, 64, 16 * scale, 16 * scale)
    assert features["conv5"].shape == (2, 64, 8 * scale, 8 * scale)
    assert features["fc1"].shape == features["fc2"].shape == (2, 1024)
    assert all(bool((value >= 0).all()) for value in features.values())  # every named layer is post-ReLU
    with FeatureExtractor(student, student.paper_layers) as extractor:
        logits, features = extractor.forward_with_features(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 10)
    assert features["conv2"].shape == (2, 96, 8 * scale, 8 * scale)
    assert features["conv3"].shape == (2, 64, 8 * scale, 8 * scale)
    assert features["fc1"].shape == (2, 128)


def test_full_width_matches_the_paper_channel_counts() -> None:
    teacher = create_model("alexnet_lsl_teacher", 24)
    student = create_model("alexnet_lsl_student", 24)
    conv_out = [teacher.get_submodule(f"conv{i}")[0].out_channels for i in range(1, 6)]
    assert conv_out == [96, 256, 384, 384, 256]
    assert teacher.fc1[-2].out_features == teacher.fc2[-2].out_features == 4096
    assert [student.get_submodule(f"conv{i}")[0].out_channels for i in range(1, 4)] == [96, 384, 256]
    assert student.fc1[-2].out_features == 512


# ----------------------------------------------------------------------------------------------------
# Gram matrices
# ----------------------------------------------------------------------------------------------------


def test_padded_cosine_equals_cosine_of_explicitly_zero_padded_vectors() -> None:
    a, b = torch.randn(3, 5, 12), torch.randn(3, 4, 7)
    padded_b = torch.nn.functional.pad(b, (0, 5))
    expected = torch.nn.functional.cosine_similarity(a.unsqueeze(2), padded_b.unsqueeze(1), dim=-1)
    torch.testing.assert_close(lsl.padded_cosine(a, b), expected)
    torch.testing.assert_close(lsl.padded_cosine(b, a), expected.transpose(1, 2))


def test_hand_computed_two_class_three_channel_example() -> None:
    # Layer l-1: one image, 2 channels of 2 positions; layer l: 3 channels of 1 position (padded to 2).
    prev = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
    cur = torch.tensor([[[[2.0]], [[0.0]], [[3.0]]]])  # (1, 3, 1, 1); channel 2 is dead
    r = 1 / math.sqrt(2)
    expected_g = torch.tensor([[1.0, 0.0, 1.0], [r, 0.0, r]])
    gram = lsl.inter_layer_gram(prev, cur)
    torch.testing.assert_close(gram, expected_g)
    assert lsl.g_diversity(gram) == pytest.approx((2 + 2 * r) / 6)

    # Layer l over 4 images of 2 classes, 3 channels of 1x1: class means (1, 1, 0) and (0, 1, 1).
    features = torch.tensor([[1.0, 0, 0], [1, 2, 0], [0, 1, 1], [0, 1, 1]]).reshape(4, 3, 1, 1)
    labels = torch.tensor([0, 0, 1, 1])
    inter_class = lsl.inter_class_gram(features, labels, num_classes=2)
    torch.testing.assert_close(inter_class, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert lsl.h_class(inter_class) == pytest.approx(0.5)


def test_h_class_is_the_mean_of_the_strict_upper_triangle() -> None:
    gram = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.9], [0.4, 0.9, 1.0]])
    assert lsl.h_class(gram) == pytest.approx((0.2 + 0.4 + 0.9) / 3)


@pytest.mark.parametrize("align", ["pad", "pool"])
def test_grams_of_relu_features_lie_in_unit_interval_with_unit_diagonal(align: str) -> None:
    prev, cur = relu_features(6, 5, 8, 8), relu_features(6, 7, 4, 4, seed=1)
    for gram in (
        lsl.inter_layer_gram(prev, cur, align=align),
        lsl.inter_layer_gram(cur.mean(dim=(2, 3)), relu_features(6, 9, seed=2), align=align),
        lsl.inter_layer_gram(prev, relu_features(6, 9, seed=3), align=align),
    ):
        assert float(gram.min()) >= 0.0 and float(gram.max()) <= 1.0 + 1e-6
    same = lsl.inter_layer_gram(prev, prev, align=align)  # a layer against itself: symmetric, unit diagonal
    torch.testing.assert_close(same, same.T)
    torch.testing.assert_close(same.diagonal(), torch.ones(5))

    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    inter_class = lsl.inter_class_gram(cur, labels, num_classes=3)
    torch.testing.assert_close(inter_class, inter_class.T)
    torch.testing.assert_close(inter_class.diagonal(), torch.ones(3))
    assert float(inter_class.min()) >= 0.0 and float(inter_class.max()) <= 1.0 + 1e-6


def test_dead_channels_and_empty_classes_give_zero_similarity() -> None:
    prev = relu_features(3, 4, 5, 5)
    prev[:, 1] = 0.0
    gram = lsl.inter_layer_gram(prev, relu_features(3, 2, 5, 5, seed=1))
    assert torch.equal(gram[1], torch.zeros(2))
    inter_class = lsl.inter_class_gram(relu_features(4, 6), torch.tensor([0, 0, 2, 2]), num_classes=3)
    assert torch.equal(inter_class[1], torch.zeros(3)) and torch.equal(inter_class[:, 1], torch.zeros(3))


def test_grams_are_invariant_to_the_order_of_images() -> None:
    prev, cur = relu_features(8, 3, 6, 6), relu_features(8, 5, 3, 3, seed=1)
    fc_prev, fc_cur = relu_features(8, 6, seed=2), relu_features(8, 4, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    for align in ("pad", "pool"):
        torch.testing.assert_close(
            lsl.inter_layer_gram(prev[order], cur[order], align=align),
            lsl.inter_layer_gram(prev, cur, align=align),
        )
    # FC pairs use vectors over the images: permuting the images permutes both vectors' entries alike.
    torch.testing.assert_close(
        lsl.inter_layer_gram(fc_prev[order], fc_cur[order]), lsl.inter_layer_gram(fc_prev, fc_cur)
    )
    torch.testing.assert_close(
        lsl.inter_layer_gram(prev[order], fc_cur[order], align="pool"),
        lsl.inter_layer_gram(prev, fc_cur, align="pool"),
    )
    torch.testing.assert_close(
        lsl.inter_class_gram(cur[order], labels[order], 3), lsl.inter_class_gram(cur, labels, 3)
    )


def test_fc_pairs_build_channel_vectors_over_the_batch() -> None:
    conv, fc = relu_features(4, 3, 2, 2), relu_features(4, 5, seed=1)
    rows_conv = conv.transpose(0, 1).reshape(3, 16)  # image-major (image x position) per channel
    rows_fc = fc.T  # (5, 4): one value per image
    expected = lsl.padded_cosine(rows_conv, rows_fc)
    torch.testing.assert_close(lsl.inter_layer_gram(conv, fc), expected)
    pooled = lsl.padded_cosine(conv.mean(dim=(2, 3)).T, rows_fc)
    torch.testing.assert_close(lsl.inter_layer_gram(conv, fc, align="pool"), pooled)
    # groups of 2 images: the weighted mean of the two group matrices
    groups = (lsl.inter_layer_gram(conv[:2], fc[:2]) + lsl.inter_layer_gram(conv[2:], fc[2:])) / 2
    torch.testing.assert_close(lsl.inter_layer_gram(conv, fc, group_size=2), groups)


def test_bad_features_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="same images"):
        lsl.inter_layer_gram(relu_features(3, 2, 4, 4), relu_features(4, 2, 4, 4))
    with pytest.raises(ValueError, match="align"):
        lsl.inter_layer_gram(relu_features(3, 2, 4, 4), relu_features(3, 2, 4, 4), align="resize")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        lsl.inter_layer_gram(relu_features(3, 2, 4), relu_features(3, 2, 4))
    with pytest.raises(ValueError, match="Labels must lie"):
        lsl.inter_class_gram(relu_features(3, 4), torch.tensor([0, 1, 5]), num_classes=3)


# ----------------------------------------------------------------------------------------------------
# LSP scores, streamed
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["pad", "pool"])
def test_streaming_scores_equal_a_one_shot_computation(teacher, images_and_labels, align: str) -> None:
    images, labels = images_and_labels
    with FeatureExtractor(teacher, teacher.paper_layers, detach=True) as extractor, torch.no_grad():
        features = extractor(images)
    streamed = {
        size: lsl.layer_grams(teacher, batches(images, labels, size), align=align, group_size=8)
        for size in (5, 16)
    }
    layers = teacher.paper_layers
    for previous, layer in zip(layers, layers[1:]):
        one_shot_g = lsl.inter_layer_gram(features[previous], features[layer], align=align, group_size=8)
        one_shot_h = lsl.inter_class_gram(features[layer], labels, NUM_CLASSES)
        for result in streamed.values():
            assert result[layer].previous == previous
            torch.testing.assert_close(result[layer].inter_layer, one_shot_g, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(result[layer].inter_class, one_shot_h, atol=1e-5, rtol=1e-5)
    table = lsl.lsp_scores(teacher, batches(images, labels, 5), align=align, group_size=8)
    assert list(table.index) == list(layers[1:])
    g = lsl.g_diversity(lsl.inter_layer_gram(features["conv4"], features["conv5"], align=align))
    h = lsl.h_class(lsl.inter_class_gram(features["conv5"], labels, NUM_CLASSES))
    assert table.loc["conv5", "LSP"] == pytest.approx(g + h, rel=1e-5)
    assert table.loc["conv5", "G_diversity"] == pytest.approx(g, rel=1e-5)
    assert sorted(table["rank"]) == list(range(1, len(table) + 1))
    assert table["LSP"].idxmin() == table.index[table["rank"] == 1][0]


def test_max_images_limits_the_stream(student, images_and_labels) -> None:
    images, labels = images_and_labels
    limited = lsl.lsp_scores(student, batches(images, labels, 7), max_images=20)
    direct = lsl.lsp_scores(student, batches(images[:20], labels[:20], 20))
    assert limited["LSP"].tolist() == pytest.approx(direct["LSP"].tolist(), rel=1e-5)


def test_lsp_layer_errors_name_the_valid_layers(student, images_and_labels) -> None:
    images, labels = images_and_labels
    with pytest.raises(ValueError, match="conv3"):
        lsl.lsp_scores(student, batches(images, labels, 16), ["conv7"])
    with pytest.raises(ValueError, match="first candidate"):
        lsl.lsp_scores(student, batches(images, labels, 16), ["conv1"])
    with pytest.raises(ValueError, match="no image"):
        lsl.lsp_scores(student, [(images[:4], torch.zeros(4, dtype=torch.long))])


def test_select_layers_takes_the_lowest_scores_in_forward_order() -> None:
    import pandas as pd

    table = pd.DataFrame({"LSP": [0.9, 0.1, 0.5, 0.3]}, index=["conv2", "conv3", "fc1", "fc2"])
    assert lsl.select_layers(table, 2) == ["conv3", "fc2"]
    with pytest.raises(ValueError, match="between 1 and 4"):
        lsl.select_layers(table, 5)


def test_zoo_resnet_and_vgg_are_scored_on_their_feature_points(images_and_labels) -> None:
    images, labels = images_and_labels
    for arch in ("resnet8", "vgg8"):
        model = create_model(arch, NUM_CLASSES).eval()
        table = lsl.lsp_scores(model, batches(images, labels, 16))
        assert list(table.index) == list(model.feature_points[1:])
        assert table["LSP"].between(0, 2 + 1e-6).all()


# ----------------------------------------------------------------------------------------------------
# ASL training
# ----------------------------------------------------------------------------------------------------


def test_alignment_loss_is_the_batch_mean_squared_distance() -> None:
    a, b = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert float(lsl.alignment_loss(a, b)) == pytest.approx((5 + 25) / 2)


def test_asl_losses_and_which_parameters_train(teacher, student, images_and_labels) -> None:
    images, labels = images_and_labels
    original_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = lsl.ASLDistiller(student, teacher, lsl.PAPER_BINDINGS, projection_dim=32)
    logits, losses = method(images[:8], labels[:8])
    assert logits.shape == (8, NUM_CLASSES)
    assert set(losses) == {
        "align[conv4->conv2]",
        "align[conv5->conv3]",
        "align[fc1->fc1]",
        "ce_teacher",
        "ce",
    }
    assert len(method.alignments) == 3 and method.alignments[0].teacher_projection.out_features == 32

    trainable = {id(p) for p in method.trainable_parameters()}
    frozen_teacher = [f"conv{i}" for i in range(1, 6)]
    assert not any(
        id(p) in trainable for name in frozen_teacher for p in method.teacher.get_submodule(name).parameters()
    )
    for name in ("fc1", "fc2", "classifier"):
        assert all(id(p) in trainable for p in method.teacher.get_submodule(name).parameters())
    assert all(id(p) in trainable for p in method.student.parameters())
    assert all(id(p) in trainable for p in method.alignments.parameters())

    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
    method.train()
    for _ in range(2):
        _, losses = method(images[:8], labels[:8])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert method.teacher.training is False  # frozen batch-norm statistics
    assert torch.equal(method.teacher.conv4[0].weight, original_teacher["conv4.0.weight"])
    assert not torch.equal(method.teacher.fc1[-2].weight, teacher.fc1[-2].weight)
    for key, value in teacher.state_dict().items():  # the caller's teacher is left unchanged
        assert torch.equal(value, original_teacher[key])


def test_alignment_gradient_reaches_the_student_below_the_bound_layer(teacher, images_and_labels) -> None:
    images, labels = images_and_labels
    student = create_model("alexnet_lsl_student", NUM_CLASSES, width=0.125)
    method = lsl.ASLDistiller(student, teacher, [("conv5", "conv2")], projection_dim=16)
    _, losses = method(images[:4], labels[:4])
    losses["align[conv5->conv2]"].backward()
    assert (
        method.student.conv1[0].weight.grad is not None
        and method.student.conv1[0].weight.grad.abs().sum() > 0
    )
    assert method.student.conv3[0].weight.grad is None  # above the bound layer: no alignment gradient


def test_binding_an_unknown_layer_lists_the_valid_ones(teacher, student) -> None:
    with pytest.raises(ValueError, match=r"conv9(.|\n)*conv5"):
        lsl.ASLDistiller(student, teacher, [("conv9", "conv3")], projection_dim=8)
    with pytest.raises(ValueError, match=r"Unknown layer 'fc3'(.|\n)*fc2"):
        lsl.ASLDistiller(student, teacher, [("conv5", "fc3")], projection_dim=8)
    with pytest.raises(ValueError, match="pair"):
        lsl.ASLDistiller(student, teacher, ["conv5"], projection_dim=8)


def test_bindings_whose_shapes_make_the_projection_impossible_say_why(teacher, student) -> None:
    with pytest.raises(ValueError, match=r"conv1(.|\n)*weights, over the limit"):
        lsl.ASLDistiller(student, teacher, [("conv1", "conv1")], max_projection_weights=1_000_000)
    method = lsl.ASLDistiller(
        student, teacher, [("conv5", "conv3")], projection_dim=8, input_shape=(3, 32, 32)
    )
    with pytest.raises(ValueError, match=r"conv5(.|\n)*8,192 values(.|\n)*built for 2,048(.|\n)*input_shape"):
        method(torch.randn(2, 3, 64, 64), torch.zeros(2, dtype=torch.long))

    class TupleStage(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class TupleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = TupleStage()
            self.head = nn.Linear(3, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pair(x)[0].mean(dim=(2, 3)))

    with pytest.raises(TypeError, match="does not output one feature tensor"):
        lsl.ASLDistiller(TupleNet(), teacher, [("conv5", "pair")], projection_dim=8)


def test_mean_reduction_divides_the_alignment_by_the_projection_size() -> None:
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(lsl.alignment_loss(a, b, "mean"), lsl.alignment_loss(a, b) / 8)
    with pytest.raises(ValueError, match="reduction"):
        lsl.alignment_loss(a, b, "max")
