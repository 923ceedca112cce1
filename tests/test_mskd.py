"""Lesson 4: multi-exit students and Multiple-Stage KD (Xu et al. 2022), plus the ResNet-v2 and WRN zoo."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdbook_utils.lessons.mskd import plot_exit_accuracies
from kdbook_utils.methods.hinton import kd_loss
from kdbook_utils.methods.mskd import (
    MSKD,
    ExitHeadsCrossEntropy,
    MultiExitCrossEntropy,
    OtO,
    early_exit,
    ensemble_probabilities,
    exit_accuracies,
    exit_loss,
    mskd_loss,
    threshold_sweep,
)
from kdbook_utils.metrics import count_flops, count_parameters
from kdbook_utils.models import create_model
from kdbook_utils.models.multi_exit import FINAL_EXIT, MultiExit, default_exit_points, exit_costs
from kdbook_utils.train import fit

# ---------------------------------------------------------------------------------------------------------
# The zoo models this lesson adds
# ---------------------------------------------------------------------------------------------------------

# Parameter counts at 100 classes as RepDistiller's models report them (millions, rounded to 0.01 M).
PUBLISHED_PARAMS_M = {"resnet18_cifar": 11.22, "resnet50_cifar": 23.71, "wrn16_2": 0.70, "wrn40_2": 2.26}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_counts_match_the_reference_models(name: str) -> None:
    params = count_parameters(create_model(name, 100)) / 1e6
    assert params == pytest.approx(PUBLISHED_PARAMS_M[name], abs=0.006)


@pytest.mark.parametrize(
    ("name", "stage_channels"),
    [
        ("resnet10_cifar", (64, 64, 128, 256, 512)),
        ("resnet50_cifar", (64, 256, 512, 1024, 2048)),
        ("wrn16_2", (16, 32, 64, 128)),
    ],
)
def test_stage_shapes_follow_the_cifar_layout(name: str, stage_channels: tuple[int, ...]) -> None:
    model = create_model(name, 10).eval()
    x = torch.zeros(1, 3, 32, 32)
    shapes = []
    with torch.no_grad():
        for stage_name, stage in model.named_children():
            x = stage(x)
            if stage_name in model.feature_points:
                shapes.append(tuple(x.shape[1:]))
    sizes = (32, 32, 16, 8, 4) if name.startswith("resnet") else (32, 32, 16, 8)  # CIFAR stem: no max-pool
    assert shapes == [(c, s, s) for c, s in zip(stage_channels, sizes)]


@pytest.mark.parametrize(
    "name", ["resnet10_cifar", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "wrn16_2"]
)
@pytest.mark.parametrize(("in_channels", "size"), [(1, 32), (3, 64)])
def test_grey_and_64px_inputs(name: str, in_channels: int, size: int) -> None:
    options = {"base_width": 4} if name.endswith("_cifar") else {}
    model = create_model(name, 7, in_channels=in_channels, **options).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_base_width_scales_resnetv2() -> None:
    small = create_model("resnet10_cifar", 10, base_width=16)
    assert small.classifier.in_features == 128
    assert count_parameters(small) < count_parameters(create_model("resnet10_cifar", 10)) / 10


# ---------------------------------------------------------------------------------------------------------
# MultiExit
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options", "exit_names"),
    [
        ("resnet18_cifar", {"base_width": 8}, ("stage1", "stage2", "stage3", FINAL_EXIT)),
        ("vgg8", {}, ("block1", "block2", "block3", FINAL_EXIT)),
        ("resnet8", {}, ("stage1", "stage2", FINAL_EXIT)),
        ("wrn16_2", {}, ("stage1", "stage2", FINAL_EXIT)),
    ],
)
@pytest.mark.parametrize("heads", ["copy", "light"])
def test_exit_count_and_shapes(arch: str, options: dict, exit_names: tuple[str, ...], heads: str) -> None:
    network = MultiExit(create_model(arch, 7, **options), heads=heads)
    assert network.exit_names == exit_names and network.num_exits == len(exit_names)
    outputs = network(torch.randn(3, 3, 32, 32))
    assert isinstance(outputs, list) and len(outputs) == len(exit_names)
    assert all(output.shape == (3, 7) for output in outputs)


def test_last_exit_is_the_model_itself_and_heads_branch_off_their_stage() -> None:
    torch.manual_seed(0)
    model = create_model("resnet10_cifar", 5, base_width=8)
    network = MultiExit(model, exits=("stage2",)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        head_logits, final_logits = network(x)
        assert torch.allclose(final_logits, model(x))
        features = model.stage2(model.stage1(model.stem(x)))
        assert torch.allclose(head_logits, network.heads["stage2"](features))


def test_copied_heads_are_fresh_and_share_nothing_with_the_backbone() -> None:
    model = create_model("resnet10_cifar", 5, base_width=8)
    network = MultiExit(model, exits=("stage1",))
    head = network.heads["stage1"]
    assert [name for name, _ in head.named_children()] == ["stage2", "stage3", "stage4", "pool", "classifier"]
    backbone_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in backbone_ids for p in head.parameters())
    # Freshly initialised: not a copy of the trained weights.
    assert not torch.equal(head.stage2[0].conv1.weight, model.stage2[0].conv1.weight)
    assert head.stage2[0].conv1.weight.shape == model.stage2[0].conv1.weight.shape


def test_exits_are_sorted_into_forward_order() -> None:
    network = MultiExit(create_model("vgg8", 3), exits=("block3", "block1"))
    assert network.exit_names == ("block1", "block3", FINAL_EXIT)


@pytest.mark.parametrize("arch", ["resnet8", "vgg8"])
def test_unknown_exit_lists_the_valid_ones(arch: str) -> None:
    model = create_model(arch, 3)
    valid = model.feature_points[:-1]
    with pytest.raises(ValueError) as error:
        MultiExit(model, exits=("stage9",))
    assert "stage9" in str(error.value)
    assert all(name in str(error.value) for name in valid)
    with pytest.raises(ValueError, match="Cannot attach"):  # the last feature point's exit is the model's own
        MultiExit(model, exits=(model.feature_points[-1],))


def test_bad_models_and_options_are_refused() -> None:
    with pytest.raises(TypeError, match="zoo model"):
        MultiExit(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="heads"):
        MultiExit(create_model("resnet8", 3), heads="huge")
    with pytest.raises(TypeError, match="not a string"):
        MultiExit(create_model("resnet8", 3), exits="stage1")


def test_default_exit_points_follow_the_paper_tables() -> None:
    assert default_exit_points(create_model("resnet50_cifar", 3)) == ("stage1", "stage2", "stage3")
    assert default_exit_points(create_model("vgg13", 3)) == ("block1", "block2", "block3")
    assert default_exit_points(create_model("wrn40_2", 3)) == ("stage1", "stage2")


def test_exit_costs_add_up() -> None:
    model = create_model("resnet10_cifar", 10, base_width=8)
    network = MultiExit(model)
    costs = exit_costs(network)
    assert list(costs.index) == list(network.exit_names)
    full = count_flops(model, (3, 32, 32)).macs
    assert costs.loc[FINAL_EXIT, "path_macs"] == full
    assert costs.loc[FINAL_EXIT, "path_params"] == count_parameters(model)
    # Early exit pays for every head it evaluated on the way.
    heads = costs["head_macs"].cumsum()
    assert (costs["early_exit_macs"] == costs["backbone_macs"] + heads).all()
    assert costs["early_exit_macs"].is_monotonic_increasing
    assert costs.loc[FINAL_EXIT, "early_exit_macs"] == full + costs["head_macs"].sum()
    # A stage-1 head copies stages 2-4, so its path costs about as much as the whole network.
    assert costs.loc["stage1", "path_macs"] == pytest.approx(full, rel=0.01)
    # Light heads are far cheaper.
    light = exit_costs(MultiExit(create_model("resnet10_cifar", 10, base_width=8), heads="light"))
    assert (light["head_macs"].iloc[:-1] < 0.5 * costs["head_macs"].iloc[:-1]).all()
    assert network.training  # counting restored the training mode


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    p_t = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum(1, keepdim=True)
    p_s = torch.exp(student / temperature) / torch.exp(student / temperature).sum(1, keepdim=True)
    return (p_t * torch.log(p_t / p_s)).sum(1).mean()


def test_the_exit_kl_is_lesson_1s_kd_loss_and_its_symmetric_variant() -> None:
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 4), torch.randn(5, 4) * 2, torch.tensor([0, 1, 2, 3, 0])
    _, kd = exit_loss(student, labels, teacher, temperature=3.0)
    assert torch.allclose(kd, 9.0 * _kl_by_hand(student, teacher, 3.0), atol=1e-6)
    assert torch.allclose(kd, kd_loss(student, teacher, 3.0))
    _, same = exit_loss(teacher, labels, teacher, temperature=3.0)
    assert same.abs() < 1e-6
    symmetric = 4.0 * (_kl_by_hand(student, teacher, 2.0) + _kl_by_hand(teacher, student, 2.0)) / 2
    _, kd_symmetric = exit_loss(student, labels, teacher, temperature=2.0, symmetric=True)
    assert torch.allclose(kd_symmetric, symmetric, atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be a positive number; got 0"):
        exit_loss(student, labels, teacher, temperature=0)


def test_mskd_loss_sums_every_exit_against_the_teacher() -> None:
    torch.manual_seed(1)
    exits = [torch.randn(6, 5) for _ in range(3)]
    teacher = torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    terms = mskd_loss(
        exits, labels, teacher, temperature=4.0, alpha=0.5, beta=2.0, exit_names=("a", "b", "c")
    )
    assert set(terms) == {"ce_a", "ce_b", "ce_c", "kd_a", "kd_b", "kd_c"}
    for name, logits in zip("abc", exits):
        ce = -torch.log_softmax(logits, 1)[torch.arange(6), labels].mean()
        assert torch.allclose(terms[f"ce_{name}"], 0.5 * ce, atol=1e-6)
        assert torch.allclose(terms[f"kd_{name}"], 2.0 * 16.0 * _kl_by_hand(logits, teacher, 4.0), atol=1e-5)


def test_one_to_one_pairs_teacher_exit_k_with_student_exit_k() -> None:
    torch.manual_seed(2)
    exits = [torch.randn(4, 3) for _ in range(2)]
    teacher_exits = [torch.randn(4, 3) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0])
    terms = mskd_loss(exits, labels, teacher_exits)
    for k in range(2):
        expected = 9.0 * _kl_by_hand(exits[k], teacher_exits[k], 3.0)
        assert torch.allclose(terms[f"kd_exit{k + 1}"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="one teacher output per student exit"):
        mskd_loss(exits, labels, teacher_exits[:1])


def test_without_teacher_only_cross_entropy_remains() -> None:
    exits = [torch.randn(4, 3) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0])
    assert set(mskd_loss(exits, labels, None)) == {"ce_exit1", "ce_exit2"}
    ce, kd = exit_loss(exits[0], labels, None)
    assert kd == 0 and torch.allclose(ce, F.cross_entropy(exits[0], labels))


def test_mskd_trains_every_exit_and_reaches_the_backbone() -> None:
    torch.manual_seed(0)
    student = MultiExit(create_model("resnet10_cifar", 4, base_width=4))
    teacher = create_model("resnet8", 4)
    method = MSKD(student, teacher)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    logits, terms = method(images, labels)
    assert len(terms) == 2 * student.num_exits and [z.shape for z in logits] == [(8, 4)] * student.num_exits
    sum(terms.values()).backward()
    assert student.backbone.stem.conv.weight.grad.abs().sum() > 0
    assert all(head[-1].weight.grad.abs().sum() > 0 for head in student.heads.values())
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_oto_needs_a_matching_multi_exit_teacher() -> None:
    student = MultiExit(create_model("resnet8", 4))
    with pytest.raises(TypeError, match="multi-exit teacher"):
        OtO(student, create_model("resnet8", 4))
    with pytest.raises(ValueError, match="pairs exits one to one"):
        OtO(student, MultiExit(create_model("resnet10_cifar", 4, base_width=4)))
    teacher = MultiExit(create_model("resnet20", 4))
    method = OtO(student, teacher)
    images = torch.randn(2, 3, 32, 32)
    targets = method.teacher_targets(images, torch.zeros(2, dtype=torch.long))
    assert isinstance(targets, list) and len(targets) == 3


def test_teacher_heads_train_on_a_frozen_backbone() -> None:
    torch.manual_seed(0)
    teacher = create_model("resnet8", 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))) for _ in range(2)]
    network = MultiExit(teacher)
    history = fit(ExitHeadsCrossEntropy(network), batches, epochs=2, lr=0.1, progress=False, device="cpu")
    after = network.backbone.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)  # weights and BN statistics
    assert len(history) == 2 and "train_ce_stage1" in history and "train_ce_final" not in history
    assert "train_acc_stage1" in history  # fit measures every exit
    method = ExitHeadsCrossEntropy(MultiExit(create_model("resnet8", 3)))
    method.train()
    assert not method.student.backbone.training and method.student.heads.training


def test_multi_exit_cross_entropy_has_one_term_per_exit() -> None:
    method = MultiExitCrossEntropy(MultiExit(create_model("resnet8", 3)))
    _, terms = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert set(terms) == {"ce_stage1", "ce_stage2", "ce_final"}


# ---------------------------------------------------------------------------------------------------------
# Per-exit accuracy, ensemble, early exit
# ---------------------------------------------------------------------------------------------------------


def _hand_made_exits() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Four images, 3 classes, labels 0 1 2 0. Exit 1 gets images 0, 1 right; exit 2 all four."""
    labels = torch.tensor([0, 1, 2, 0])
    exit1 = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 4, 0], [0, 0, 4]])  # confident everywhere
    exit2 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])  # right but unsure
    return [exit1, exit2], labels


def test_per_exit_accuracy_on_a_hand_made_batch() -> None:
    exits, labels = _hand_made_exits()
    table = exit_accuracies(exits, labels, ("stage1", FINAL_EXIT))
    assert list(table.index) == ["stage1", FINAL_EXIT, "ensemble"]
    assert table.tolist() == [50.0, 100.0, 50.0]  # percent; the ensemble predicts 0 1 1 2


def test_ensemble_is_the_mean_of_softmax_probabilities() -> None:
    torch.manual_seed(3)
    exits = [torch.randn(5, 4) for _ in range(3)]
    by_hand = sum(torch.exp(z) / torch.exp(z).sum(1, keepdim=True) for z in exits) / 3
    assert torch.allclose(ensemble_probabilities(exits), by_hand, atol=1e-6)
    pair = (torch.softmax(exits[0], 1) + torch.softmax(exits[2], 1)) / 2
    assert torch.allclose(ensemble_probabilities(exits, members=[2, 0]), pair, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        ensemble_probabilities(exits, members=[3])
    # On the hand-made batch the unsure-but-right exit 2 is outvoted where confident exit 1 is wrong.
    hand, _ = _hand_made_exits()
    assert ensemble_probabilities(hand).argmax(1).tolist() == [0, 1, 1, 2]


def test_early_exit_thresholds() -> None:
    exits, labels = _hand_made_exits()
    flops = [10.0, 25.0]
    everyone_first = early_exit(exits, 0.0, flops)
    assert everyone_first.exit_index.tolist() == [0, 0, 0, 0]
    assert torch.equal(everyone_first.predictions, exits[0].argmax(1))
    assert everyone_first.mean_macs == 10.0
    everyone_last = early_exit(exits, 1.01, flops)
    assert everyone_last.exit_index.tolist() == [1, 1, 1, 1]
    assert everyone_last.accuracy(labels) == 100.0 and everyone_last.mean_macs == 25.0
    for bad in (90, -0.2, float("nan")):
        with pytest.raises(ValueError, match="softmax confidence between 0 and 1"):
            early_exit(exits, bad, flops)
    # Exit 1's confidence is softmax([4, 0, 0])_max = e^4 / (e^4 + 2) ~ 0.965 for every image.
    confidence = math.exp(4) / (math.exp(4) + 2)
    assert early_exit(exits, confidence - 1e-4, flops).exit_index.tolist() == [0, 0, 0, 0]
    assert early_exit(exits, confidence + 1e-4, flops).exit_index.tolist() == [1, 1, 1, 1]
    assert everyone_first.exit_fractions(2).tolist() == [1.0, 0.0]


def test_threshold_sweep_runs_from_cheapest_to_most_expensive() -> None:
    exits, labels = _hand_made_exits()
    sweep = threshold_sweep(exits, labels, [10.0, 25.0])
    assert sweep["mean_macs"].iloc[0] == 10.0 and sweep["mean_macs"].iloc[-1] == 25.0
    assert sweep["mean_macs"].is_monotonic_increasing
    assert sweep["accuracy"].iloc[0] == 50.0 and sweep["accuracy"].iloc[-1] == 100.0


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def test_the_exit_figure_draws_every_method_and_exit() -> None:
    rows = [
        {"method": method, "seed": seed, "exit": exit_name, "accuracy": 90.0 + seed}
        for method, exits in [("single exit", [FINAL_EXIT]), ("MSKD", ["stage1", FINAL_EXIT, "ensemble"])]
        for seed in (0, 1)
        for exit_name in exits
    ]
    figure = plot_exit_accuracies(pd.DataFrame(rows))
    axes = figure.axes[0]
    assert len(axes.collections) >= 4  # the single runs of 1 (single exit) + 3 (MSKD) groups
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["stage1", FINAL_EXIT, "ensemble"]
    plt.close(figure)
