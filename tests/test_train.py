"""The training loop: it learns, logs every loss term, is reproducible, respects a frozen teacher,
stops cleanly on an interrupt, and evaluates the right network."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import math
import platform
import sys

import pandas as pd
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import kdbook_utils.train as train_module
from kdbook_utils.data import ImageDataset, TensorLoader
from kdbook_utils.models import create_model
from kdbook_utils.presets import get_preset
from kdbook_utils.train import (
    CrossEntropy,
    Distiller,
    NonFiniteLossError,
    TrainingPhase,
    choose_device,
    configure_cpu_performance,
    evaluate,
    fit,
    lr_factor,
    predict,
    resolve_device,
    seed_everything,
)

IMAGE_SIZE = 8  # the zoo's ResNets work at any size the two stride-2 stages can halve; small is fast


def toy_dataset(count: int, seed: int) -> ImageDataset:
    """Two classes anyone can tell apart: a bright top half (class 0) or a bright bottom half (class 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    images = torch.randint(0, 80, (count, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    half = IMAGE_SIZE // 2
    images[labels == 0, :, :half] += 150
    images[labels == 1, :, half:] += 150
    return ImageDataset(
        name="toy", split="train", images=images.to(torch.uint8), labels=labels, classes=["top", "bottom"],
        mean=(0.4,), std=(0.3,), flip_ok=False,
    )  # fmt: skip


def loaders(batch_size: int = 32) -> tuple[TensorLoader, TensorLoader]:
    train = TensorLoader(toy_dataset(128, seed=0), batch_size, train=True, augment=False, seed=0)
    test = TensorLoader(toy_dataset(64, seed=1), 64, train=False)
    return train, test


def small_resnet(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return create_model("resnet8", 2, in_channels=1)


class KnowledgeDistillation(Distiller):
    """A two-term method for the tests: cross-entropy plus a KL term towards the frozen teacher.

    It records the teacher's mode at every forward, and can raise KeyboardInterrupt at a chosen epoch.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, interrupt_at_epoch: int | None = None) -> None:
        super().__init__(student, teacher)
        self.interrupt_at_epoch = interrupt_at_epoch
        self.teacher_modes: list[bool] = []
        self.batches_started: list[tuple[int, int]] = []
        self.epoch = 0

    def on_batch_start(self, epoch: int, batch: int) -> None:
        self.batches_started.append((epoch, batch))
        self.epoch = epoch

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.epoch == self.interrupt_at_epoch:
            raise KeyboardInterrupt
        self.teacher_modes.append(self.teacher.training)
        logits = self.student(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        kd = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                      reduction="batchmean")  # fmt: skip
        return logits, {"ce": F.cross_entropy(logits, labels), "kd": kd}


def test_a_small_model_learns_a_separable_problem() -> None:
    train, test = loaders()
    model = small_resnet()
    history = fit(model, train, test, epochs=5, lr=0.05, progress=False)

    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert history["train_acc"].iloc[-1] > history["train_acc"].iloc[0]
    assert history["train_acc"].iloc[-1] >= 90  # percent
    assert history["val_acc"].iloc[-1] >= 90
    assert evaluate(model, test)["accuracy"] == pytest.approx(history["val_acc"].iloc[-1])
    assert not model.training  # fit leaves the model in eval mode
    expected = ["epoch", "train_ce", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert list(history.columns) == expected
    assert type(history) is pd.DataFrame


def test_history_logs_every_loss_term_and_their_sum() -> None:
    train, _ = loaders()
    method = KnowledgeDistillation(small_resnet(seed=1), small_resnet(seed=2))
    history = fit(method, train, epochs=2, progress=False)

    assert {"train_ce", "train_kd", "train_loss", "train_acc", "lr", "seconds"} <= set(history.columns)
    assert "val_acc" not in history.columns  # no val_loader, no validation columns
    assert (history["train_kd"] > 0).all()
    assert history["train_loss"].to_numpy() == pytest.approx(
        (history["train_ce"] + history["train_kd"]).to_numpy()
    )
    assert method.batches_started == [(epoch, batch) for epoch in range(2) for batch in range(len(train))]


def test_the_frozen_teacher_stays_in_eval_mode_and_unchanged() -> None:
    train, _ = loaders()
    teacher = small_resnet(seed=2)
    teacher_before = copy.deepcopy(teacher.state_dict())  # includes BatchNorm running statistics
    method = KnowledgeDistillation(small_resnet(seed=1), teacher)
    student_before = copy.deepcopy(method.student.state_dict())
    fit(method, train, epochs=2, progress=False)

    assert method.teacher_modes and not any(method.teacher_modes)
    assert all(parameter.grad is None for parameter in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert any(
        not torch.equal(value, student_before[name]) for name, value in method.student.state_dict().items()
    )
    assert all(parameter.grad is not None for parameter in method.student.parameters())


def test_seeded_cpu_runs_are_bit_for_bit_reproducible() -> None:
    def run(seed: int) -> dict[str, Tensor]:
        train, _ = loaders()
        model = small_resnet(seed)
        fit(model, train, epochs=2, progress=False, device="cpu")
        return model.state_dict()

    first, second, other_seed = run(0), run(0), run(1)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(first[name], other_seed[name]) for name in first)


def test_a_keyboard_interrupt_returns_the_completed_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    train, test = loaders()
    method = KnowledgeDistillation(small_resnet(seed=1), small_resnet(seed=2), interrupt_at_epoch=2)
    history = fit(method, train, test, epochs=5, progress=False)

    assert list(history["epoch"]) == [1, 2]
    assert history[["train_ce", "train_kd", "val_acc"]].notna().all().all()
    assert "interrupted during epoch 3/5" in capsys.readouterr().out
    assert evaluate(method, test)["count"] == 64  # the model is still usable

    method.interrupt_at_epoch = 0
    train.set_epoch(0)  # on_batch_start gets the loader's own epoch, which would go on from 3
    empty = fit(method, train, epochs=5, progress=False)
    assert len(empty) == 0 and {"epoch", "train_loss", "train_acc"} <= set(empty.columns)


def test_the_learning_rate_follows_the_schedule() -> None:
    assert lr_factor("constant", 3, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    # RepDistiller's milestones, as epochs: epochs 1-150 (indices 0-149) at the full rate.
    factors = [lr_factor("step", epoch, 240, milestones=[150, 180, 210]) for epoch in (149, 150, 180, 210)]
    assert factors == pytest.approx([1.0, 0.1, 0.01, 0.001])
    assert lr_factor("step", 150, 240) == pytest.approx(0.1)  # the default milestones are those, as fractions
    assert lr_factor(lambda epoch, epochs: 1 / (epoch + 1), 3, 10) == 0.25
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        lr_factor("linear", 0, 10)

    train, _ = loaders(batch_size=128)
    history = fit(small_resnet(), train, epochs=4, lr=0.1, schedule="step", milestones=[0.5], progress=False)
    assert history["lr"].to_numpy() == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_fit_rejects_bad_settings_before_training() -> None:
    train, _ = loaders()
    with pytest.raises(ValueError, match="Unknown schedule"):
        fit(small_resnet(), train, epochs=1, schedule="linear", progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(small_resnet(), train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        fit(small_resnet(), train, epochs=1, precision="fp8", progress=False)
    with pytest.raises(ValueError, match="divergence_factor must be a number above 1"):
        fit(small_resnet(), train, epochs=1, divergence_factor=0.5, progress=False)

    class NoLosses(Distiller):
        def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            return self.student(images), {}

    with pytest.raises(TypeError, match="at least one loss term"):
        fit(NoLosses(small_resnet()), train, epochs=1, progress=False)


def test_progress_bars_and_a_ready_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    train, test = loaders()
    model = small_resnet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = fit(model, train, test, epochs=2, optimizer=optimizer, schedule="constant", desc="toy run")
    assert history["lr"].tolist() == [1e-3, 1e-3]
    assert "toy run" in capsys.readouterr().err  # tqdm writes to stderr in a terminal


def evaluation_pair() -> tuple[Distiller, TensorLoader]:
    """A distiller whose student always answers class 0 and whose teacher always answers class 1."""

    def constant(answer: int) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 2))
        nn.init.zeros_(model[1].weight)
        with torch.no_grad():
            model[1].bias.copy_(torch.tensor([2.0, 0.0] if answer == 0 else [0.0, 2.0]))
        return model

    dataset = toy_dataset(40, seed=3)
    dataset.labels.fill_(1)
    return CrossEntropy(constant(0), teacher=constant(1)), TensorLoader(dataset, 16, train=False)


def test_evaluate_measures_the_student_of_a_distiller() -> None:
    method, loader = evaluation_pair()
    scores = evaluate(method, loader)
    assert scores["accuracy"] == 0.0
    assert scores["count"] == 40
    assert scores["loss"] == pytest.approx(
        F.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1])).item()
    )
    assert evaluate(method.teacher, loader)["accuracy"] == 100.0


def test_predict_returns_cpu_logits_and_labels_in_order() -> None:
    method, loader = evaluation_pair()
    logits, labels = predict(method, loader)
    assert logits.shape == (40, 2) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.equal(labels, loader.dataset.labels)
    assert (logits.argmax(1) == 0).all()  # the student's answers, not the teacher's


def test_choose_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("kdbook_utils.train._mps_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")
    assert choose_device("CPU") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA was requested"):
        choose_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA was requested"):
        choose_device(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="MPS"):
        choose_device("mps")
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        choose_device("gpu0")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="needs glibc Linux"
)
def test_cpu_tuning_keeps_large_blocks_off_mmap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBOOK_CPU_TUNING", "0")
    assert "off" in configure_cpu_performance()
    monkeypatch.delenv("KDBOOK_CPU_TUNING")
    report = configure_cpu_performance()  # fit does this on the CPU anyway; it is process-wide
    assert "M_MMAP_THRESHOLD=32 MiB" in report and "refused" not in report

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    mmapped_before = libc.mallinfo2().hblks
    block = libc.malloc(24 * 1024**2)  # far above glibc's default 128 KiB threshold
    try:
        assert libc.mallinfo2().hblks == mmapped_before  # served from the heap, not a fresh mmap
    finally:
        libc.free(block)


# ------------------------------------------------------------------------------ several outputs, phases


class TwoExits(nn.Module):
    """A tiny network with an early exit and a final one: forward returns both logits."""

    exit_names = ("early", "final")
    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 16), nn.ReLU())
        self.early = nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 2)
        self.final = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.early(x.flatten(1)), self.final(self.body(x))]


class BothExitsCE(Distiller):
    def forward(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        exits = self.student(images)
        return exits, {
            f"ce_{name}": F.cross_entropy(out, labels) for name, out in zip(self.student.exit_names, exits)
        }


def test_a_student_with_several_exits_is_trained_and_measured_per_exit() -> None:
    train, test = loaders()
    seed_everything(0)
    network = TwoExits()
    history = fit(BothExitsCE(network), train, test, epochs=3, progress=False)
    for column in ("train_acc_early", "train_acc_final", "val_acc_early", "val_acc_final"):
        assert column in history.columns
    assert history["val_acc"].tolist() == history["val_acc_final"].tolist()  # the last exit is the model's
    scores = evaluate(network, test)
    assert (
        set(scores["per_output"]) == {"early", "final"}
        and scores["accuracy"] == scores["per_output"]["final"]
    )
    logits, labels = predict(network, test)
    assert isinstance(logits, list) and [t.shape for t in logits] == [(64, 2), (64, 2)]
    manual = 100 * (logits[0].argmax(1) == labels).float().mean().item()
    assert scores["per_output"]["early"] == pytest.approx(manual)


class TwoPhases(Distiller):
    """Phase "warm" uses only the first loss term; phase "main" the second. Records the optimiser."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student)
        self.seen_phases: list[str] = []

    def training_phases(self, epochs: int, lr: float) -> list[TrainingPhase]:
        return [TrainingPhase("warm", 2, lr / 10), TrainingPhase("main", epochs, lr)]

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.seen_phases.append(self.phase)
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}


def test_phases_run_in_order_with_their_own_learning_rate() -> None:
    train, _ = loaders()
    method = TwoPhases(small_resnet())
    history = fit(method, train, epochs=3, lr=0.1, schedule="constant", progress=False)
    assert history["phase"].tolist() == ["warm", "warm", "main", "main", "main"]
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert history["lr"].tolist() == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.1])
    assert method.seen_phases[0] == "warm" and method.seen_phases[-1] == "main"
    with pytest.raises(ValueError, match="fresh optimiser"):
        fit(
            method,
            train,
            epochs=1,
            optimizer=torch.optim.SGD(method.student.parameters(), lr=0.1),
            progress=False,
        )


# ------------------------------------------------------------------------------ faults and bad input


class ExplodesAt(Distiller):
    """Cross-entropy, but the loss becomes NaN from epoch ``bad_epoch`` (zero-based), batch 2 on."""

    def __init__(self, student: nn.Module, bad_epoch: int) -> None:
        super().__init__(student)
        self.bad_epoch = bad_epoch
        self.where = (0, 0)

    def on_batch_start(self, epoch: int, batch: int) -> None:
        super().on_batch_start(epoch, batch)
        self.where = (epoch, batch)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        ce = F.cross_entropy(logits, labels)
        epoch, batch = self.where
        kd = ce * (float("nan") if epoch >= self.bad_epoch and batch >= 2 else 0.0)
        return logits, {"ce": ce, "kd": kd}


def test_a_non_finite_loss_stops_training_and_restores_the_last_good_epoch() -> None:
    train, _ = loaders()
    method = ExplodesAt(small_resnet(), bad_epoch=1)
    after_first_epoch: dict[str, Tensor] = {}

    def remember(*_: object) -> None:
        if method.where == (1, 0) and not after_first_epoch:
            after_first_epoch.update({k: v.clone() for k, v in method.student.state_dict().items()})

    method.register_forward_pre_hook(remember)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 3.*'kd'.*lr") as caught:
        fit(method, train, epochs=3, progress=False)
    assert list(caught.value.history["epoch"]) == [1]  # the completed epoch's history comes with the error
    for name, value in method.student.state_dict().items():  # the weights are those after epoch 1
        assert torch.equal(value, after_first_epoch[name]), name
        assert torch.isfinite(value.float()).all(), name


def test_fit_and_evaluate_refuse_batches_a_model_cannot_learn_from() -> None:
    dataset = toy_dataset(32, seed=0)
    model = create_model("resnet8", 2, in_channels=1)
    raw = [(dataset.images[:16], dataset.labels[:16])]  # uint8 images, not normalised
    with pytest.raises(TypeError, match="uint8.*TensorLoader"):
        fit(model, raw, epochs=1, progress=False)
    images = dataset.images[:16].float() / 255
    with pytest.raises(ValueError, match=r"class indices in 0\.\.1; found values from 12 to 12.*num_classes"):
        fit(model, [(images, torch.full((16,), 12))], epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad = images.clone()
        bad[0, 0, 0, 0] = float("nan")
        fit(model, [(bad, dataset.labels[:16])], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*unsqueeze"):
        evaluate(model, [(images[0], dataset.labels[:1])])
    with pytest.raises(ValueError, match="lr must be a positive number; got -0.1"):
        fit(model, raw, epochs=1, lr=-0.1, progress=False)


# ------------------------------------------------------------------------------ teachers


def test_a_partly_trainable_teacher_trains_only_its_named_parts() -> None:
    teacher = small_resnet(seed=2)
    method = KnowledgeDistillation(small_resnet(seed=1), teacher)
    assert not any(p.requires_grad for p in method.teacher.parameters())

    class JointTeacher(Distiller):
        def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            teacher_logits = self.teacher_outputs(images, labels).logits
            logits = self.student(images)
            return logits, {
                "ce": F.cross_entropy(logits, labels),
                "ce_teacher": F.cross_entropy(teacher_logits, labels),
            }

    joint = JointTeacher(small_resnet(seed=1), [small_resnet(seed=2)], trainable_teacher_parts=["classifier"])
    stem_before = joint.teacher.stem[0].weight.clone()
    classifier_before = joint.teacher.classifier.weight.clone()
    joint.train()
    assert joint.teacher.classifier.training and not joint.teacher.stem.training
    fit(joint, loaders()[0], epochs=1, progress=False)
    assert torch.equal(joint.teacher.stem[0].weight, stem_before)
    assert not torch.equal(joint.teacher.classifier.weight, classifier_before)
    with pytest.raises(ValueError, match="cannot be cached"):
        joint.use_teacher_cache(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not submodules of the teacher"):
        JointTeacher(small_resnet(), small_resnet(), trainable_teacher_parts=["fc9"])


def test_no_public_trainer_or_evaluator_defaults_to_a_hard_coded_device() -> None:
    import importlib
    import inspect
    import pkgutil

    import kdbook_utils

    offenders = []
    for module_info in pkgutil.walk_packages(kdbook_utils.__path__, "kdbook_utils."):
        module = importlib.import_module(module_info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            functions = [obj] if inspect.isfunction(obj) else [obj.__init__] if inspect.isclass(obj) else []
            for function in functions:
                try:
                    parameter = inspect.signature(function).parameters.get("device")
                except (TypeError, ValueError):
                    continue
                if parameter is not None and parameter.default not in (inspect.Parameter.empty, None):
                    offenders.append(f"{module.__name__}.{name}: device={parameter.default!r}")
    assert not offenders, "device must default to None (the device rule): " + "; ".join(offenders)


def test_no_hidden_state_device_and_precision_are_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in training reads $KDBOOK_PRESET: None is 'auto' and float32 whatever the environment says."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_module, "cpu_runs_bfloat16_natively", lambda: True)
    for name in ("quick", "lab"):
        monkeypatch.setenv("KDBOOK_PRESET", name)
        assert resolve_device(None) == train_module.choose_device("auto")
        assert train_module.check_precision(None, cpu) is None
    assert resolve_device("cpu") == cpu


def test_a_presets_precision_rule_follows_the_preset_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_module, "cpu_runs_bfloat16_natively", lambda: True)
    monkeypatch.setenv("KDBOOK_PRESET", "quick")  # the environment plays no part
    assert train_module.preset_precision(get_preset("quick"), cpu) is None  # cpu_bf16 off
    assert train_module.preset_precision(get_preset("lab"), cpu) is torch.bfloat16
    assert train_module.preset_precision(get_preset("lab").replace(cpu_bf16=False), cpu) is None
    monkeypatch.setattr(train_module, "cpu_runs_bfloat16_natively", lambda: False)  # emulated: stay float32
    assert train_module.preset_precision(get_preset("lab"), cpu) is None
    assert train_module.check_precision("bf16", cpu) is torch.bfloat16
    assert (
        train_module.precision_name(torch.bfloat16) == "bfloat16"
        and train_module.precision_name(None) == "float32"
    )
    with pytest.raises(TypeError, match="cpu_bf16"):
        get_preset("lab").replace(cpu_bf16="yes")
    with pytest.raises(TypeError, match="a Preset"):
        train_module.preset_precision("lab", cpu)  # type: ignore[arg-type]


def test_fit_trains_in_the_precision_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.dtype] = []

    class Recorder(CrossEntropy):
        def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            seen.append(
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
            )
            return super().forward(images, labels)

    train, _ = loaders()
    fit(Recorder(small_resnet()), train, epochs=1, precision="bf16", progress=False)
    fit(Recorder(small_resnet()), train, epochs=1, progress=False)
    batches = len(list(train))
    assert seen == [torch.bfloat16] * batches + [torch.float32] * batches


def test_train_step_is_one_sgd_step_on_the_sum_of_the_terms() -> None:
    """train_step's update equals a hand-made SGD step on the sum of the method's terms."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    images, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))

    class TwoTerms(Distiller):
        def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            logits = self.student(images)
            return logits, {"ce": F.cross_entropy(logits, labels), "l2": 0.1 * logits.pow(2).mean()}

    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits = model(images)
    total = F.cross_entropy(logits, labels) + 0.1 * logits.pow(2).mean()
    gradients = torch.autograd.grad(total, list(model.parameters()))
    for (name, _), gradient in zip(model.named_parameters(), gradients):
        expected[name] -= 0.5 * gradient
    method = TwoTerms(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out, losses = train_module.train_step(
        method, images, labels, optimizer, train_module.grad_scaler(None, cpu_device())
    )
    assert set(losses) == {"ce", "l2"} and out.shape == (8, 3)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name])


def cpu_device() -> torch.device:
    return torch.device("cpu")


def test_fit_stops_on_divergence_and_puts_the_last_good_epoch_back() -> None:
    """lr=100 (a typo for 0.1): the loss grows by orders of magnitude without turning NaN at once."""
    train, _ = loaders(batch_size=32)
    model = small_resnet()
    with pytest.raises(train_module.DivergedError, match="diverged at epoch") as stopped:
        fit(model, train, epochs=6, lr=100.0, progress=False)
    assert "lr=0.05" in str(stopped.value) and "times the first batch's" in str(stopped.value)
    history = stopped.value.history
    assert len(history) < 6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    # A sane rate trains on: the same run at lr=0.05 does not stop.
    assert len(fit(small_resnet(), train, epochs=2, lr=0.05, progress=False)) == 2
