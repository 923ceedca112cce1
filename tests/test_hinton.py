"""Lesson 1 (Hinton KD): the loss and its conventions, the distiller, the teacher cache, the small-CNN
family, the torchvision teachers and the exercise checks."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdbook_utils.data import TensorLoader, load_dataset
from kdbook_utils.exercises.hinton import check_high_temperature_prediction, check_kd_loss
from kdbook_utils.methods.hinton import (
    WHICH_LOSS_EXAMPLE,
    HintonKD,
    KDLoss,
    TeacherCache,
    TeacherCacheMismatch,
    dark_knowledge_table,
    high_temperature_table,
    kd_gradient_norms,
    kd_loss,
    kd_loss_conventions,
    logit_matching_limit,
    plot_soft_targets,
    run_seeds,
    soft_cross_entropy,
    soft_targets,
    teacher_fingerprint,
)
from kdbook_utils.models import ZooModel, create_model
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.train import fit, seed_everything


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
    distiller.teacher_logits = lambda images, labels: teacher_logits  # type: ignore[method-assign]
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
    with pytest.raises(ValueError, match="temperature must be positive"):
        kd_loss(student, teacher, 0.0)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        kd_loss(student[0], teacher[0], 4.0)


def test_conventions_differ_by_the_stated_factors() -> None:
    student, teacher = random_logits(classes=7)
    table = kd_loss_conventions(student, teacher, 3.0).set_index("convention")["value"]
    reference = kd_loss(student, teacher, 3.0).item()
    entropy = -(soft_targets(teacher, 3.0) * soft_targets(teacher, 3.0).log()).sum(dim=1).mean().item()
    assert table["batchmean KL x T^2"] == pytest.approx(reference)
    assert table["per-element mean KL x T^2"] == pytest.approx(reference / 7)
    assert table["KL without T^2"] == pytest.approx(reference / 9)
    assert table["soft cross-entropy x T^2"] == pytest.approx(reference + 9 * entropy)


def test_the_notebook_example_reads_as_the_lesson_says() -> None:
    example = WHICH_LOSS_EXAMPLE
    student = torch.tensor([example["student_logits"]])
    teacher = torch.tensor([example["teacher_logits"]])
    values = kd_loss_conventions(student, teacher, example["temperature"])["value"].tolist()
    assert [f"{value:.2f}" for value in values[:3]] == ["8.00", "0.80", "0.50"]
    assert f"{values[3]:.1f}" == "41.8"
    assert teacher.argmax().item() == 7  # the example's story: a teacher sure of "7"


def test_high_temperature_kd_becomes_logit_matching() -> None:
    student, teacher = random_logits()
    limit = logit_matching_limit(student, teacher).item()
    assert kd_loss(student, teacher, 1000.0).item() == pytest.approx(limit, rel=1e-3)
    table = high_temperature_table(student, teacher, [1, 10, 100, 1000])
    assert table["teacher max prob"].is_monotonic_decreasing
    assert table["teacher max prob"].iloc[-1] == pytest.approx(0.1, abs=1e-2)
    assert table["KL"].iloc[-1] < 1e-5


def test_t_squared_keeps_the_soft_gradient_from_vanishing() -> None:
    student, teacher = random_logits()
    table = kd_gradient_norms(student, teacher, [4.0, 40.0, 400.0])
    with_t2 = table["grad norm, KL x T^2"].to_numpy()
    without = table["grad norm, KL"].to_numpy()
    assert with_t2.max() / with_t2.min() < 1.5  # levels off
    assert without[1] / without[2] == pytest.approx(100, rel=0.05)  # falls like 1/T^2


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
    with pytest.raises(ValueError, match="data_fingerprint"):
        HintonKD(tiny_cnn(0), tiny_cnn(1), cache=TeacherCache())


# -------------------------------------------------------------------------------------- the teacher cache


@pytest.fixture(scope="module")
def digits() -> object:
    return load_dataset("digits", "train", subset=96, seed=0)


def train_student(digits: object, teacher: nn.Module, cache: TeacherCache | None, seed: int = 3) -> nn.Module:
    """Two epochs of KD for a tiny student, with a fresh augmenting loader (as a sweep does)."""
    loader = TensorLoader(digits, 32, train=True, seed=seed)
    seed_everything(seed)
    student = create_model("small_cnn", 10, blocks=1, width=4)
    method = HintonKD(
        student, teacher, temperature=4.0, alpha=0.1, cache=cache, data_fingerprint=loader.fingerprint
    )
    fit(method, loader, epochs=2, lr=0.05, device="cpu", progress=False)
    return student


class ForwardCounter:
    """Counts a module's forward passes with a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *_: object) -> None:
        self.count += 1


def test_warm_cache_runs_no_teacher_and_trains_the_same_student_bit_for_bit(digits: object) -> None:
    teacher = tiny_cnn(0).eval()
    counter = ForwardCounter(teacher)
    uncached = train_student(digits, teacher, cache=None)
    batches = 2 * math.ceil(96 / 32)
    assert counter.count == batches

    cache = TeacherCache()
    cold = train_student(digits, teacher, cache)
    assert counter.count == 2 * batches and cache.misses == batches and cache.hits == 0
    warm = train_student(digits, teacher, cache)
    assert counter.count == 2 * batches, "the warm run must not run the teacher"
    assert cache.hits == batches

    for name, tensor in cold.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name
        assert torch.equal(tensor, uncached.state_dict()[name]), name


def test_cache_refuses_a_different_batch_under_the_same_key(digits: object) -> None:
    teacher = tiny_cnn(0).eval()
    cache = TeacherCache()
    loader = TensorLoader(digits, 32, train=True, seed=3)
    student = tiny_cnn(5)
    method = HintonKD(student, teacher, cache=cache, data_fingerprint=loader.fingerprint)
    fit(method, loader, epochs=1, device="cpu", progress=False)
    # Reusing the loader without resetting it: fit's epoch 0 now sees the loader's epoch 1.
    with pytest.raises(TeacherCacheMismatch, match="set_epoch"):
        fit(method, loader, epochs=1, device="cpu", progress=False)
    loader.set_epoch(0)
    fit(method, loader, epochs=1, device="cpu", progress=False)
    assert cache.hits == len(loader)


def test_cache_keys_on_the_teacher_and_the_data(digits: object) -> None:
    teacher, other_teacher = tiny_cnn(0).eval(), tiny_cnn(1).eval()
    assert teacher_fingerprint(teacher) == teacher_fingerprint(tiny_cnn(0))
    assert teacher_fingerprint(teacher) != teacher_fingerprint(other_teacher)
    cache = TeacherCache()
    train_student(digits, teacher, cache, seed=3)
    train_student(digits, other_teacher, cache, seed=3)  # another teacher: all misses
    train_student(digits, teacher, cache, seed=4)  # another shuffling seed: all misses
    assert cache.hits == 0 and cache.misses == 3 * 2 * 3


def test_cache_round_trips_through_files(digits: object, tmp_path: object) -> None:
    teacher = tiny_cnn(0).eval()
    cache = TeacherCache(directory=tmp_path)
    cold = train_student(digits, teacher, cache)
    assert len(cache.save()) == 1
    reloaded = TeacherCache(directory=tmp_path)
    counter = ForwardCounter(teacher)
    warm = train_student(digits, teacher, reloaded)
    assert counter.count == 0 and reloaded.hits == 6 and reloaded.misses == 0
    for name, tensor in cold.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name


def test_evaluation_outside_fit_runs_the_teacher_not_the_cache() -> None:
    teacher = tiny_cnn(0).eval()
    cache = TeacherCache()
    method = HintonKD(tiny_cnn(1), teacher, cache=cache, data_fingerprint="anything").eval()
    method(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert len(cache) == 0


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


# ---------------------------------------------------------------------------------- seeds and exercises


def test_run_seeds_makes_one_labelled_row_per_seed() -> None:
    table = run_seeds(lambda seed: {"accuracy": seed / 10}, [0, 1, 2], method="KD", T=4)
    assert isinstance(table, pd.DataFrame)
    assert table.to_dict("records") == [
        {"method": "KD", "T": 4, "seed": s, "accuracy": s / 10} for s in (0, 1, 2)
    ]


def test_check_kd_loss_accepts_the_reference_and_names_common_mistakes(capsys: pytest.CaptureFixture) -> None:
    assert check_kd_loss(kd_loss)
    mistakes = {
        "T^2": lambda s, t, T: F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean"),
        "wrong way": lambda s, t, T: kd_loss(t, s, T),
        "log-probabilities": lambda s, t, T: F.kl_div(F.softmax(s / T, 1), F.softmax(t / T, 1),
                                                      reduction="batchmean") * T * T,
        "returns None": lambda s, t, T: None,
        "no gradient": lambda s, t, T: kd_loss(s.detach(), t, T),
    }  # fmt: skip
    for expected_hint, mistake in mistakes.items():
        capsys.readouterr()
        assert not check_kd_loss(mistake)
        assert expected_hint in capsys.readouterr().out


def test_high_temperature_prediction_check(capsys: pytest.CaptureFixture) -> None:
    assert check_high_temperature_prediction("uniform", "levels off")
    assert not check_high_temperature_prediction("one-hot", "levels off")
    assert "uniform" in capsys.readouterr().out
    assert not check_high_temperature_prediction("uniform", "goes to zero")
    assert "T^2 factor cancels" in capsys.readouterr().out
    assert not check_high_temperature_prediction("blurry", "levels off")


def test_dark_knowledge_table_names_the_most_similar_wrong_class() -> None:
    # Class 0 images lean towards class 2, class 1 images towards class 0.
    logits = torch.tensor([[5.0, 0.0, 2.0], [6.0, -1.0, 3.0], [1.5, 5.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    table = dark_knowledge_table(logits, labels, ["a", "b", "c"], temperature=4.0)
    assert table["class"].tolist() == ["a", "b"]  # class "c" has no images
    assert table["most similar wrong class"].tolist() == ["c", "a"]
    row = table.iloc[0]
    assert row["its probability, T = 4"] > row["its probability, T = 1"]


def test_plot_soft_targets_draws_one_row_per_image() -> None:
    import matplotlib

    matplotlib.use("Agg")
    figure = plot_soft_targets(torch.randn(2, 10), torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                               torch.tensor([1, 2]), [str(i) for i in range(10)], temperatures=(1, 4))  # fmt: skip
    assert len(figure.axes) == 4
    assert len(figure.axes[1].patches) == 2 * 10
    with pytest.raises(ValueError, match="labels"):
        plot_soft_targets(torch.randn(2, 10), torch.zeros(2, 3, 8, 8), torch.tensor([1]), list("0123456789"))
