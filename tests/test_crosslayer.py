"""Tests of lesson 3: cross-layer FSP distillation with KL and an offline ensemble (Chou et al. 2021)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdbook_utils.data import TensorLoader, load_dataset
from kdbook_utils.experiments import TeacherOutputCache
from kdbook_utils.methods.crosslayer import (
    ENSEMBLE_MODES,
    CrossLayerDistiller,
    adapt_teacher,
    cross_layer_pairs,
    ensemble_weights,
    fsp_matrices,
    fsp_matrix,
    gram_loss,
    kl_loss,
    weighted_mean,
)
from kdbook_utils.methods.hinton import kd_loss
from kdbook_utils.models import create_model
from kdbook_utils.train import fit


def loop_fsp(a: torch.Tensor, b: torch.Tensor, pool: str = "max") -> torch.Tensor:
    """FSP written out entry by entry, pooling with explicit windows (sizes divide evenly here)."""

    def pool_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, c, height, width = x.shape
        sh, sw = height // h, width // w
        out = torch.empty(n, c, h, w, dtype=x.dtype)
        for i in range(h):
            for j in range(w):
                window = x[:, :, i * sh : (i + 1) * sh, j * sw : (j + 1) * sw].reshape(n, c, -1)
                out[:, :, i, j] = window.amax(dim=2) if pool == "max" else window.mean(dim=2)
        return out

    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    a, b = pool_to(a, h, w), pool_to(b, h, w)
    gram = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=a.dtype)
    for n in range(a.shape[0]):
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                gram[n, i, j] = sum(a[n, i, s, t] * b[n, j, s, t] for s in range(h) for t in range(w)) / (
                    h * w
                )
    return gram


# ---- FSP matrices -------------------------------------------------------------------------------------


def test_fsp_matrix_hand_example() -> None:
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # 1 x 2 x 2 x 2
    b = torch.ones(1, 1, 2, 2)
    gram = fsp_matrix(a, b)
    assert gram.shape == (1, 2, 1)
    assert torch.allclose(gram, torch.tensor([[[2.5], [0.5]]]))  # (1+2+3+4)/4 and (0+1+0+1)/4


def test_fsp_matrix_pools_the_larger_map_with_max_by_default() -> None:
    a = torch.arange(16.0).reshape(1, 1, 4, 4)  # max-pooled 2x2 windows: 5, 7, 13, 15
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert fsp_matrix(a, b).item() == pytest.approx((5 + 15) / 4)
    assert fsp_matrix(a, b, pool="avg").item() == pytest.approx((2.5 + 12.5) / 4)  # window means 2.5 ... 12.5
    assert fsp_matrix(b, a).item() == pytest.approx((5 + 15) / 4)  # either argument may be the larger


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize(("size_a", "size_b"), [(4, 4), (8, 4), (8, 2), (2, 8)])
def test_fsp_matrix_matches_loop(pool: str, size_a: int, size_b: int) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, size_a, size_a, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 4, size_b, size_b, generator=generator, dtype=torch.float64)
    gram = fsp_matrix(a, b, pool=pool)
    assert gram.shape == (2, 3, 4)
    assert torch.allclose(gram, loop_fsp(a, b, pool))


@pytest.mark.parametrize(("size_a", "size_b"), [(6, 6), (8, 4)])
def test_fsp_matrix_matches_torchdistill(size_a: int, size_b: int) -> None:
    mid_level = pytest.importorskip("torchdistill.losses.mid_level")
    a, b = torch.randn(3, 5, size_a, size_a), torch.randn(3, 7, size_b, size_b)
    expected = mid_level.FSPLoss.compute_fsp_matrix(a, b)
    assert torch.allclose(fsp_matrix(a, b), expected, atol=1e-6)


def test_fsp_matrix_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="B, C, H, W"):
        fsp_matrix(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        fsp_matrix(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="pool"):
        fsp_matrix(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), pool="median")


# ---- pairs --------------------------------------------------------------------------------------------


def test_cross_layer_pairs_exact_and_cumulative() -> None:
    points = ["c0", "c1", "c2", "c3"]
    assert cross_layer_pairs(points, 1, "exact") == [("c0", "c1"), ("c1", "c2"), ("c2", "c3")]
    assert cross_layer_pairs(points, 2, "exact") == [("c0", "c2"), ("c1", "c3")]
    assert cross_layer_pairs(points, 3, "exact") == [("c0", "c3")]
    assert cross_layer_pairs(points, 1, "cumulative") == cross_layer_pairs(points, 1, "exact")
    cumulative = cross_layer_pairs(points, 3, "cumulative")
    assert len(cumulative) == 6 and set(cumulative) == {
        (a, b) for i, a in enumerate(points) for b in points[i + 1 :]
    }


def test_cross_layer_pairs_errors() -> None:
    with pytest.raises(ValueError, match="from 1 to 3"):
        cross_layer_pairs(["a", "b", "c", "d"], 4)
    with pytest.raises(ValueError, match="mode"):
        cross_layer_pairs(["a", "b"], 1, "sideways")
    with pytest.raises(ValueError, match="distinct"):
        cross_layer_pairs(["a", "a"], 1)


# ---- losses -------------------------------------------------------------------------------------------


def test_gram_loss_value() -> None:
    student = {("a", "b"): torch.zeros(2, 2, 3)}
    teacher = {("a", "b"): torch.stack([torch.ones(2, 3), 2 * torch.ones(2, 3)])}
    # per sample: 1/2 * 6 * 1^2 = 3 and 1/2 * 6 * 2^2 = 12; batch mean 7.5; times 1e-3
    assert gram_loss(student, teacher).item() == pytest.approx(7.5e-3)
    two_pairs = {**student, ("b", "c"): torch.zeros(2, 1, 1)}
    two_targets = {**teacher, ("b", "c"): torch.full((2, 1, 1), 2.0)}
    assert gram_loss(two_pairs, two_targets, weight=1.0).item() == pytest.approx(7.5 + 2.0)


def test_gram_loss_channel_mismatch_suggests_adapter() -> None:
    with pytest.raises(ValueError, match="adapt_teacher"):
        gram_loss({("a", "b"): torch.zeros(2, 4, 4)}, {("a", "b"): torch.zeros(2, 8, 4)})


def test_kl_loss_forward_matches_torch_and_vanishes_at_the_target() -> None:
    logits, teacher_logits = torch.randn(5, 7), torch.randn(5, 7)
    probs = F.softmax(teacher_logits, dim=1)
    expected = F.kl_div(F.log_softmax(logits, dim=1), probs, reduction="batchmean")
    assert kl_loss(logits, probs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_loss(teacher_logits, probs).abs().item() < 1e-6
    assert kl_loss(teacher_logits, probs, mode="symmetric").abs().item() < 1e-6


def test_kl_loss_at_t1_with_one_teacher_is_lesson_1s_kd_loss() -> None:
    logits, teacher_logits = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(kl_loss(logits, F.softmax(teacher_logits, 1)), kd_loss(logits, teacher_logits, 1.0))


def test_kl_loss_symmetric_is_the_mean_of_both_directions() -> None:
    logits, teacher_logits = torch.randn(4, 5), torch.randn(4, 5)
    p_t, log_s = F.softmax(teacher_logits, dim=1), F.log_softmax(logits, dim=1)
    forward = F.kl_div(log_s, p_t, reduction="batchmean")
    reverse = F.kl_div(F.log_softmax(teacher_logits, dim=1), log_s.exp(), reduction="batchmean")
    assert kl_loss(logits, p_t, mode="symmetric").item() == pytest.approx(
        0.5 * (forward + reverse).item(), rel=1e-5
    )


# ---- the two gradient identities behind the ensemble's mean target ---------------------------------------


def student_gradient(loss_fn, parameter: torch.Tensor) -> torch.Tensor:
    parameter.grad = None
    loss_fn().backward()
    return parameter.grad.clone()


def test_mean_of_kl_losses_and_kl_to_the_mean_give_the_same_gradient() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_probs = [
        F.softmax(3 * torch.randn(6, 10, generator=generator, dtype=torch.float64), 1) for _ in range(3)
    ]
    mean_probs = sum(teacher_probs) / 3
    per_teacher = student_gradient(lambda: sum(kl_loss(logits, p) for p in teacher_probs) / 3, logits)
    against_mean = student_gradient(lambda: kl_loss(logits, mean_probs), logits)
    assert torch.allclose(per_teacher, against_mean, atol=1e-12)
    # The identity is special to the forward KL: the symmetric KL breaks it.
    per_teacher_sym = student_gradient(
        lambda: sum(kl_loss(logits, p, "symmetric") for p in teacher_probs) / 3, logits
    )
    against_mean_sym = student_gradient(lambda: kl_loss(logits, mean_probs, "symmetric"), logits)
    assert not torch.allclose(per_teacher_sym, against_mean_sym, atol=1e-6)


def test_mean_of_gram_losses_and_gram_loss_to_the_mean_give_the_same_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    student_map = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    later_map = torch.randn(4, 5, 4, 4, generator=generator, dtype=torch.float64)

    def student_grams() -> dict:
        return {("a", "b"): fsp_matrix(student_map, later_map)}

    targets = [{("a", "b"): torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)} for _ in range(3)]
    mean_target = {("a", "b"): weighted_mean([t[("a", "b")] for t in targets], ensemble_weights(3))}
    per_teacher = student_gradient(
        lambda: sum(gram_loss(student_grams(), t) for t in targets) / 3, student_map
    )
    against_mean = student_gradient(lambda: gram_loss(student_grams(), mean_target), student_map)
    assert torch.allclose(per_teacher, against_mean, atol=1e-12)
    assert per_teacher.abs().sum() > 0


# ---- the ensemble -------------------------------------------------------------------------------------------


def test_ensemble_weights() -> None:
    assert torch.allclose(ensemble_weights(4), torch.full((4,), 0.25))
    generator = torch.Generator().manual_seed(0)
    picks = torch.stack([ensemble_weights(3, "random_teacher", generator) for _ in range(300)])
    assert set(picks.sum(1).tolist()) == {1.0} and set(picks.flatten().tolist()) == {0.0, 1.0}
    assert (picks.sum(0) > 60).all()  # every teacher is drawn (uniform: about 100 each)
    dirichlet = torch.stack([ensemble_weights(3, "random_weights", generator) for _ in range(300)])
    assert torch.allclose(dirichlet.sum(1), torch.ones(300)) and (dirichlet > 0).all()
    assert torch.allclose(dirichlet.mean(0), torch.full((3,), 1 / 3), atol=0.05)
    again = [ensemble_weights(3, "random_weights", torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    with pytest.raises(ValueError, match="ensemble mode"):
        ensemble_weights(3, "median")


# ---- the distiller --------------------------------------------------------------------------------------------


def small_pair(num_teachers: int = 1, classes: int = 5) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    student = create_model("resnet8w", classes, width=0.125)
    teachers = [create_model("resnet32w", classes, width=0.125) for _ in range(num_teachers)]
    return student, teachers


@pytest.mark.parametrize("ensemble", ENSEMBLE_MODES)
def test_every_ensemble_mode_runs_both_phases(ensemble: str) -> None:
    student, teachers = small_pair(3)
    method = CrossLayerDistiller(student, teachers, ensemble=ensemble, input_shape=(3, 16, 16))
    method.set_phase("gram")
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    method.train()
    logits, losses = method(images, labels)
    assert logits.shape == (4, 5) and set(losses) == {"gram"}
    losses["gram"].backward()
    assert student.classifier.weight.grad is None  # phase A trains the backbone only
    assert student.stem.conv.weight.grad is not None and student.stem.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for t in teachers for p in t.parameters())
    assert all(not t.training for t in method.teachers)
    method.set_phase("task")
    logits, losses = method(images, labels)
    assert set(losses) == {"ce", "kl"} and all(torch.isfinite(v) for v in losses.values())


def test_mean_ensemble_of_identical_teachers_equals_one_teacher() -> None:
    student, (teacher,) = small_pair(1)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    one = CrossLayerDistiller(student, [teacher]).eval()
    three = CrossLayerDistiller(student, [teacher] * 3).eval()
    one.set_phase("gram"), three.set_phase("gram")
    assert torch.allclose(one(images, labels)[1]["gram"], three(images, labels)[1]["gram"], rtol=1e-5)


def test_task_phase_switches() -> None:
    student, teachers = small_pair(1)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    method = CrossLayerDistiller(student, teachers, use_kl=False)
    assert set(method(images, labels)[1]) == {"ce"}  # phase B ("task") unless fit says otherwise
    method = CrossLayerDistiller(student, teachers, gram_in_task_phase=True)
    assert set(method(images, labels)[1]) == {"ce", "kl", "gram"}
    with pytest.raises(ValueError, match="phase"):
        method.set_phase("both")


def test_pairs_follow_k_and_mode() -> None:
    student, teachers = small_pair(1)
    assert len(CrossLayerDistiller(student, teachers, k=3).pairs) == 6
    assert CrossLayerDistiller(student, teachers, k=3, mode="exact").pairs == [("stem", "stage3")]
    assert len(CrossLayerDistiller(student, teachers, k=1).pairs) == 3


def test_channel_mismatch_without_adapter_suggests_the_adapter() -> None:
    student = create_model("resnet8", 5)  # 16/16/32/64 channels
    teacher = create_model("resnet32w", 5, width=0.25)  # 8/16/32/64 channels
    with pytest.raises(ValueError, match=r"stem \(8\) vs stem \(16\).*adapt_teacher"):
        CrossLayerDistiller(student, teacher, input_shape=(3, 16, 16))


def test_adapter_reduces_teacher_channels_to_the_students() -> None:
    from kdbook_utils.features import FeatureExtractor

    torch.manual_seed(0)
    teacher = create_model("resnet50_cifar", 5, base_width=4)  # bottleneck stages: 16/32/64/128 channels
    student = create_model("resnet10_cifar", 5, base_width=4)  # 4/8/16/32 channels
    adapted = adapt_teacher(teacher, student, (3, 16, 16))
    assert adapted.feature_points[0] == "stem"  # equal channels there: no adapter
    assert all(point.endswith("_reduce") for point in adapted.feature_points[1:])
    shapes = FeatureExtractor(adapted, adapted.feature_points).feature_shapes((3, 16, 16))
    student_shapes = FeatureExtractor(student, student.feature_points).feature_shapes((3, 16, 16))
    assert [s[0] for s in shapes.values()] == [s[0] for s in student_shapes.values()]
    assert adapted.stage2 is teacher.stage2  # the teacher's stages are reused, not copied
    method = CrossLayerDistiller(student, adapted, k=4, input_shape=(3, 16, 16))
    method.set_phase("gram")
    _, losses = method(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(losses["gram"])


def test_unequal_checkpoint_lists_are_rejected() -> None:
    student, teachers = small_pair(1)
    with pytest.raises(ValueError, match="paired by position"):
        CrossLayerDistiller(student, teachers, teacher_points=["stem", "stage1"])


# ---- the zoo models of this lesson ----------------------------------------------------------------------------


def test_paper_resnets_have_the_spec_parameter_counts() -> None:
    from kdbook_utils.metrics import count_parameters

    teacher, student = create_model("resnet32w", 100), create_model("resnet8w", 100)
    assert count_parameters(teacher, include_batchnorm=False) == 7_423_940  # TF-base ResNet-32/8 widths
    assert count_parameters(student, include_batchnorm=False) == 1_230_788


@pytest.mark.parametrize(
    ("teacher_name", "student_name", "size", "classes"),
    [("resnet32w", "resnet8w", 32, 100), ("vgg11", "vgg6", 32, 100), ("mobilenet16", "mobilenet9", 64, 1000)],
)
def test_paper_pairs_share_checkpoint_channels(
    teacher_name: str, student_name: str, size: int, classes: int
) -> None:
    from kdbook_utils.features import FeatureExtractor

    teacher, student = create_model(teacher_name, classes), create_model(student_name, classes)
    assert len(teacher.feature_points) == len(student.feature_points)
    shapes = [
        FeatureExtractor(m, m.feature_points).feature_shapes((3, size, size)) for m in (teacher, student)
    ]
    assert [s for s in shapes[0].values()] == [s for s in shapes[1].values()]
    assert student.eval()(torch.zeros(1, 3, size, size)).shape == (1, classes)


def test_mobilenets_have_one_checkpoint_per_resolution() -> None:
    from kdbook_utils.features import FeatureExtractor

    model = create_model("mobilenet9", 1000, width=0.25)
    shapes = FeatureExtractor(model, model.feature_points).feature_shapes((3, 64, 64))
    assert [s[1] for s in shapes.values()] == [64, 64, 32, 16, 8, 4]
    assert (
        len(cross_layer_pairs(model.feature_points, 4)) == 5 + 4 + 3 + 2
    )  # cross-4 as in the paper's Fig. 7


def test_fsp_matrices_name_missing_checkpoints() -> None:
    with pytest.raises(KeyError, match="available"):
        fsp_matrices({"a": torch.zeros(1, 1, 2, 2)}, [("a", "b")])


# ---- the teacher cache and the two-phase procedure ----------------------------------------------------------------


def tiny_digits(size: int = 8, count: int = 96) -> object:
    return load_dataset("digits", "train").resized(size).subset(count, seed=0)


def test_cached_teacher_targets_equal_live_ones() -> None:
    data = tiny_digits()
    student, teachers = small_pair(2, classes=10)
    loader = TensorLoader(data, 32, train=True, augment=False, seed=3)
    cache = TeacherOutputCache()
    cached = CrossLayerDistiller(student, teachers).train()
    cached.use_teacher_cache(cache.for_loader(loader))
    live = CrossLayerDistiller(student, teachers).train()
    next(iter(loader))  # epoch 0 is skipped: the cache follows the loader's own epoch
    for phase in ("gram", "task"):
        cached.set_phase(phase), live.set_phase(phase)
        for _ in range(2):  # the first pass fills the cache, the second is served from it
            for batch, (images, labels) in enumerate(loader):
                cached.on_batch_start(loader.current_epoch, batch)
                with torch.no_grad():
                    expected = live(images, labels)[1]
                    got = cached(images, labels)[1]
                cached.on_batch_end()
                assert got.keys() == expected.keys()
                for term in got:
                    assert torch.allclose(got[term], expected[term], rtol=1e-4, atol=1e-6), term
    assert cache.hits > 0


def test_fit_runs_both_phases_and_the_distiller_records_snapshots() -> None:
    data = tiny_digits()
    student, teachers = small_pair(1, classes=10)
    loader = TensorLoader(data, 32, train=True)
    fixed = next(iter(TensorLoader(data, 8, train=False)))[0]
    method = CrossLayerDistiller(student, teachers, gram_epochs=2, gram_lr=0.01, snapshot_images=fixed)
    history = fit(method, loader, epochs=1, lr=0.01, progress=False)
    method.record_snapshot()
    assert history["phase"].tolist() == ["gram", "gram", "task"]
    assert history["lr"].tolist()[:2] != history["lr"].tolist()[2:]  # phase A at gram_lr
    assert history["train_gram"].notna().tolist() == [True, True, False]
    assert history.loc[2, ["train_ce", "train_kl"]].notna().all()
    assert [(s["phase"], s["epoch"]) for s in method.snapshots] == [
        ("gram", 0),
        ("gram", 1),
        ("task", 0),
        ("task", 1),
    ]
    first, after_a = method.snapshots[0]["grams"], method.snapshots[2]["grams"]
    assert set(first) == set(method.pairs) and first[("stem", "stage1")].shape == (
        4,
        8,
    )  # width 0.125: 4 and 8
    assert not torch.equal(
        first[("stem", "stage3")], after_a[("stem", "stage3")]
    )  # phase A changed the student


def test_mobilenet9_consumes_an_imagenet64_batch(tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "imagenet64"
    folder.mkdir()
    np.savez(
        folder / "val_data.npz",
        data=rng.integers(0, 256, (6, 3 * 64 * 64), dtype=np.uint8),
        labels=rng.integers(1, 1001, 6),
    )
    data = load_dataset("imagenet64", "test", root=tmp_path)
    images, labels = next(iter(TensorLoader(data, 4, train=False)))
    assert images.shape == (4, 3, 64, 64) and 0 <= int(labels.min()) and int(labels.max()) < 1000
    model = create_model("mobilenet9", data.num_classes, width=0.125).eval()
    assert model(images).shape == (4, 1000)
