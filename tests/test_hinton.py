"""Lesson 1's method (Hinton et al. 2015): the KD loss against its formula and torchdistill, its gradient,
bad input, the distiller, and the small student family."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdbook_utils.methods.hinton import (
    HintonKD,
    KDLoss,
    kd_loss,
    logit_matching_limit,
    soft_cross_entropy,
    soft_targets,
)
from kdbook_utils.models import ZooModel, create_model
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.train import TeacherOutputs


def random_logits(
    batch: int = 8, classes: int = 10, scale: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    return student, teacher


# ---------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_the_formula_written_out(temperature: float) -> None:
    student, teacher = random_logits()
    p = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum(dim=1, keepdim=True)
    q = torch.exp(student / temperature) / torch.exp(student / temperature).sum(dim=1, keepdim=True)
    direct = temperature**2 * (p * (torch.log(p) - torch.log(q))).sum(dim=1).mean()
    assert torch.allclose(kd_loss(student, teacher, temperature), direct, rtol=1e-10)
    assert torch.allclose(KDLoss(temperature)(student, teacher), direct, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_distiller_objective_matches_torchdistill_kdloss(alpha: float) -> None:
    torchdistill_losses = pytest.importorskip("torchdistill.losses.mid_level")
    temperature = 4.0
    student_logits, teacher_logits = (logits.float() for logits in random_logits(seed=1))
    labels = torch.arange(8) % 10
    reference = torchdistill_losses.KDLoss(
        "fc", "output", "fc", "output", temperature=temperature, alpha=alpha
    )
    expected = reference({"fc": {"output": student_logits}}, {"fc": {"output": teacher_logits}}, labels)
    ours = alpha * F.cross_entropy(student_logits, labels) + (1 - alpha) * kd_loss(
        student_logits, teacher_logits, temperature
    )
    assert torch.allclose(ours, expected, rtol=1e-5)

    # The distiller returns the same two weighted terms.
    distiller = HintonKD(nn.Identity(), nn.Identity(), temperature=temperature, alpha=alpha)
    distiller.teacher_outputs = lambda images, labels: TeacherOutputs(teacher_logits, {})  # type: ignore[method-assign]
    _, terms = distiller(student_logits, labels)
    assert torch.allclose(terms["ce"] + terms["kd"], expected, rtol=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    student, teacher = random_logits()
    assert kd_loss(teacher, teacher, 4.0).abs().item() < 1e-12
    assert kd_loss(student, teacher, 4.0).item() > 0


def test_kd_loss_ignores_a_constant_added_to_the_logits() -> None:
    student, teacher = random_logits()
    shifts = torch.linspace(-50, 50, steps=8, dtype=torch.float64).unsqueeze(1)  # one constant per image
    reference = kd_loss(student, teacher, 3.0)
    assert torch.allclose(kd_loss(student + shifts, teacher, 3.0), reference, rtol=1e-10)
    assert torch.allclose(kd_loss(student, teacher - 7.5, 3.0), reference, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kl_and_soft_cross_entropy_give_the_same_gradient(temperature: float) -> None:
    student, teacher = random_logits()
    kl_input = student.clone().requires_grad_(True)
    ce_input = student.clone().requires_grad_(True)
    (kl_gradient,) = torch.autograd.grad(kd_loss(kl_input, teacher, temperature), kl_input)
    soft_ce = soft_cross_entropy(ce_input, teacher, temperature) * temperature**2
    (ce_gradient,) = torch.autograd.grad(soft_ce, ce_input)
    assert torch.allclose(kl_gradient, ce_gradient, rtol=1e-10, atol=1e-14)
    # Both equal Hinton et al.'s gradient dC/dz = (1/T)(q - p), times T^2, averaged over the batch.
    q, p = soft_targets(student, temperature), soft_targets(teacher, temperature)
    assert torch.allclose(kl_gradient, temperature * (q - p) / student.shape[0], rtol=1e-10, atol=1e-14)
    # And they differ in value by T^2 times the teacher's entropy.
    entropy = -(p * p.log()).sum(dim=1).mean()
    assert torch.allclose(soft_ce - kd_loss(student, teacher, temperature), temperature**2 * entropy)


def test_kd_loss_rejects_bad_inputs_with_clear_messages() -> None:
    student, teacher = random_logits()
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, teacher[:, :5], 4.0)
    with pytest.raises(ValueError, match="temperature must be a positive number; got 0.0"):
        kd_loss(student, teacher, 0.0)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        kd_loss(student[0], teacher[0], 4.0)
    broken = teacher.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher logits contain NaN"):
        kd_loss(student, broken, 4.0)
    with pytest.warns(UserWarning, match="look like probabilities"):
        kd_loss(student, teacher.softmax(dim=1), 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd_loss(student, teacher, 4.0)  # real logits: no warning
    assert torch.allclose(logit_matching_limit(student, teacher), kd_loss(student, teacher, 1e4), rtol=1e-3)


# ----------------------------------------------------------------------------------------- the distiller


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", 10, blocks=1, width=4)


def test_distiller_freezes_the_teacher_and_weights_its_terms() -> None:
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    distiller = HintonKD(student, teacher, temperature=2.0, alpha=0.25).train()
    assert not teacher.training and student.training
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    logits, terms = distiller(images, labels)
    assert set(terms) == {"ce", "kd"}
    with torch.no_grad():
        teacher_logits = teacher(images)
    assert torch.allclose(terms["ce"], 0.25 * F.cross_entropy(logits, labels))
    assert torch.allclose(terms["kd"], 0.75 * kd_loss(logits, teacher_logits, 2.0))
    (terms["ce"] + terms["kd"]).backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert all(parameter.grad is not None for parameter in student.parameters())
    assert {id(p) for p in distiller.trainable_parameters()} == {id(p) for p in student.parameters()}


def test_distiller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        HintonKD(tiny_cnn(0), tiny_cnn(1), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        HintonKD(tiny_cnn(0), tiny_cnn(1), temperature=-1.0)


def test_a_learners_loss_function_replaces_kd_loss() -> None:
    calls = []

    def my_loss(
        student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        calls.append(temperature)
        return kd_loss(student_logits, teacher_logits, temperature) * 2

    reference = HintonKD(tiny_cnn(1), tiny_cnn(0), temperature=3.0)
    custom = HintonKD(tiny_cnn(1), tiny_cnn(0), temperature=3.0, loss=my_loss)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, expected = reference(images, labels)
    _, got = custom(images, labels)
    assert calls == [3.0] and torch.allclose(got["kd"], 2 * expected["kd"])


# ---------------------------------------------------------------------------------------------- the models


@pytest.mark.parametrize("member", list(SMALL_CNN_FAMILY))
def test_small_cnn_family_members(member: str) -> None:
    options = SMALL_CNN_FAMILY[member]
    model = create_model("small_cnn", 10, **options)
    assert isinstance(model, ZooModel) and model.arch == "small_cnn"
    assert model.feature_points == tuple(f"block{i}" for i in range(1, options["blocks"] + 1))
    assert isinstance(model.classifier, nn.Linear)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    grey = create_model("small_cnn", 7, in_channels=1, **options)
    assert grey(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    last_width = options["width"] * 2 ** (options["blocks"] - 1)
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert len(layers) == options["fc_layers"] and layers[0].in_features == last_width


def test_small_cnn_family_grows_and_rejects_bad_options() -> None:
    sizes = [
        sum(p.numel() for p in create_model("small_cnn", 10, **o).parameters())
        for o in SMALL_CNN_FAMILY.values()
    ]
    assert sizes == sorted(sizes)
    with pytest.raises(ValueError, match="blocks"):
        create_model("small_cnn", 10, blocks=6)
    with pytest.raises(ValueError, match="width"):
        create_model("small_cnn", 10, width=0)


def test_torchvision_resnet50_runs_at_cifar_size() -> None:
    model = create_model("torchvision_resnet50", 10)
    assert model.feature_points == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 2048
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pretrained_teacher_offline_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from kdbook_utils.models.torchvision_zoo import PretrainedWeightsUnavailable

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="not in the local cache"):
        create_model("torchvision_resnet50", 10, pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="not in the local cache"):
        create_model("torchvision_inception_v3", 10, pretrained=True)
