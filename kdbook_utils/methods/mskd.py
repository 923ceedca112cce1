"""Multiple-Stage Knowledge Distillation (MSKD): Xu et al., Applied Sciences 12(19) 9453, 2022.

The student is a **multi-exit network**: classifier heads ("exits") branch off after intermediate
stages, and the backbone's own classifier is the last exit. During training every exit imitates the
teacher (and the labels); at test time the exits vote (the mean of their softmax probabilities), or an
image leaves at the first exit that is confident enough (*early exit*), which saves computation.

Only the paper's abstract, contribution list, Algorithm 1's line skeleton (symbols lost) and result
tables could be read, so this module is a **reconstruction** (spec §2.3, ambiguity register §2.7).
The choices, each a switch where cheap:

* M1 heads: a head after stage ``i`` is a fresh copy of the backbone's remaining stages, then global
  average pooling and a new linear classifier (HSAKD-style, ``heads="copy"``); ``heads="light"`` is one
  3x3 stride-2 conv-BN-ReLU + pooling + classifier (BYOT/SCAN-style, cheaper and weaker).
* M2 the last exit is the backbone's own classifier, so the deployed single-path student is the
  ordinary network.
* M3 per exit ``alpha * CE + beta * T^2 * KL``, alpha = beta = 1, T = 3, equal exit weights.
* M4 all exits are trained jointly on every mini-batch (one loop over batches, an inner loop over
  exits, as Algorithm 1's skeleton has it): the gradients of all later exits also reach early stages,
  which is our reading of "phased recursive training".
* M5 the ensemble is the mean of the exits' softmax probabilities.
* M6 OtO: the teacher gets the same exits; its heads are trained with CE on its frozen backbone, and
  teacher exit k teaches student exit k. M7 OtO*: teacher backbone and exits trained jointly from
  scratch (``train_teacher_exits(..., joint_from_scratch=True)``).
* M10 forward KL(teacher || exit), with a symmetric-KL switch.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.metrics import count_flops, count_parameters
from kdbook_utils.train import Distiller, fit

FINAL_EXIT = "final"
"""Name of the last exit: the backbone's own classifier."""

DEFAULT_TEMPERATURE = 3.0
"""HSAKD's ``--kd_T 3`` (spec §2.3, M3); RepDistiller's default would be 4."""

HEAD_STYLES = ("copy", "light")


# --------------------------------------------------------------------------------------------------------
# Where exits can go
# --------------------------------------------------------------------------------------------------------


def _stage_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def _check_zoo_model(model: nn.Module) -> None:
    """MultiExit needs a zoo model: an nn.Sequential of named stages with feature points and a classifier."""
    if not isinstance(model, nn.Sequential) or not getattr(model, "feature_points", None):
        raise TypeError(
            "MultiExit needs a zoo model (an nn.Sequential of named stages with .feature_points), "
            f"e.g. create_model('resnet8', 10); got {type(model).__name__}."
        )
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise TypeError(
            "MultiExit needs the model's last stage to be an nn.Linear child called 'classifier'."
        )
    if _stage_names(model)[-1] != "classifier":
        raise TypeError(f"The model's last stage must be 'classifier'; its stages are {_stage_names(model)}.")


def valid_exit_points(model: nn.Module) -> tuple[str, ...]:
    """Stages an exit may follow: every feature point except the last (whose exit is the model's own)."""
    _check_zoo_model(model)
    return tuple(model.feature_points[:-1])


def default_exit_points(model: nn.Module, max_heads: int = 3) -> tuple[str, ...]:
    """The spec's attach points: the first ``max_heads`` feature points after the stem, but not the last.

    ResNet-18/50 (``stem, stage1..stage4``): stage1, stage2, stage3, so 4 exits as in the paper's tables.
    VGG8/13 (``block1..block5``): block1, block2, block3 (HSAKD's block0-2). CIFAR ResNets and WRNs
    (three stages): stage1, stage2, so 3 exits (spec M8).
    """
    points = [name for name in valid_exit_points(model) if name != "stem"]
    return tuple(points[:max_heads])


# --------------------------------------------------------------------------------------------------------
# The multi-exit network
# --------------------------------------------------------------------------------------------------------


def _reinitialise(module: nn.Module) -> None:
    """Fresh weights for a copied head: PyTorch's defaults, then He-normal convolutions as the zoo uses."""
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
        if isinstance(submodule, nn.Conv2d):
            nn.init.kaiming_normal_(submodule.weight, mode="fan_out", nonlinearity="relu")


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise TypeError("The model has no nn.Conv2d, so MultiExit cannot tell its input channels.")


@torch.no_grad()
def stage_output_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch dimension) of every named stage for one input of ``input_shape``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1, *input_shape), device=device)
        shapes = {}
        for name, stage in model.named_children():
            x = stage(x)
            shapes[name] = tuple(x.shape[1:])
    finally:
        model.train(was_training)
    return shapes


class MultiExit(nn.Module):
    """A zoo model with extra classifier heads after named stages; ``forward`` returns every exit.

    ``MultiExit(create_model("resnet18_cifar", 100))`` attaches heads after ``stage1..stage3`` (see
    :func:`default_exit_points`); ``exits=("stage2",)`` chooses. The exits are named by the stage they
    follow, and the last is ``"final"``, the model's own classifier, so ``exit_names`` is e.g.
    ``("stage1", "stage2", "stage3", "final")``. ``forward(x)`` runs the backbone once, stage by stage
    (a zoo model's forward is exactly its stages in order), branches each head off its stage's output,
    and returns the list of exit logits in that order. The wrapped model is read, never edited.

    Args:
        model: a zoo model (``create_model(...)``); its weights become the shared backbone.
        exits: the stages to attach heads after; default :func:`default_exit_points`.
        heads: ``"copy"`` (spec REC, M1): a freshly initialised copy of the stages after the exit point,
            then pooling and a new classifier; ``"light"``: one 3x3 stride-2 conv-BN-ReLU to the final
            feature width, pooling and a classifier.
        input_shape: ``(C, H, W)`` of one image, used to size light heads (the default is 32x32).
    """

    def __init__(
        self,
        model: nn.Module,
        exits: Sequence[str] | None = None,
        heads: str = "copy",
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_zoo_model(model)
        if heads not in HEAD_STYLES:
            raise ValueError(f"heads must be one of {HEAD_STYLES}, got {heads!r}.")
        valid = valid_exit_points(model)
        if isinstance(exits, str):
            raise TypeError(f"exits must be a sequence of stage names, e.g. ({exits!r},), not a string.")
        chosen = default_exit_points(model) if exits is None else tuple(exits)
        unknown = [name for name in chosen if name not in valid]
        if unknown:
            raise ValueError(
                f"Cannot attach an exit after {unknown}: this {type(model).__name__} "
                f"({getattr(model, 'arch', 'model')}) can have exits after {list(valid)} "
                f"(its last feature point's exit is the model's own classifier, {FINAL_EXIT!r})."
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"Each stage can carry one exit; got duplicates in {list(chosen)}.")
        stages = _stage_names(model)
        self.exit_points: tuple[str, ...] = tuple(sorted(chosen, key=stages.index))
        self.head_style = heads
        self.backbone = model
        self.input_shape = (
            tuple(input_shape) if input_shape is not None else (_first_conv_channels(model), 32, 32)
        )
        self.heads = nn.ModuleDict({name: self._make_head(name) for name in self.exit_points})

    @property
    def exit_names(self) -> tuple[str, ...]:
        """Names of the exits in forward order; the last is ``"final"`` (the backbone's classifier)."""
        return (*self.exit_points, FINAL_EXIT)

    @property
    def arch(self) -> str:
        """E.g. ``resnet20+exits(stage1,stage2;copy)``: checkpoints of other exit layouts are refused."""
        backbone = getattr(self.backbone, "arch", type(self.backbone).__name__)
        return f"{backbone}+exits({','.join(self.exit_points)};{self.head_style})"

    @property
    def num_exits(self) -> int:
        return len(self.exit_points) + 1

    @property
    def num_classes(self) -> int:
        return self.backbone.classifier.out_features

    def _make_head(self, after: str) -> nn.Sequential:
        stages = dict(self.backbone.named_children())
        names = list(stages)
        classifier = self.backbone.classifier
        new_classifier = nn.Linear(classifier.in_features, classifier.out_features)
        if self.head_style == "copy":
            rest = names[names.index(after) + 1 : names.index("classifier")]
            layers = {name: copy.deepcopy(stages[name]) for name in rest}
            head = nn.Sequential(OrderedDict([*layers.items(), ("classifier", new_classifier)]))
            _reinitialise(head)
            return head
        shapes = stage_output_shapes(self.backbone, self.input_shape)
        in_channels = shapes[after][0]
        light = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, classifier.in_features, 3, stride=2, padding=1, bias=False),
                bn=nn.BatchNorm2d(classifier.in_features),
                relu=nn.ReLU(),
                pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                classifier=new_classifier,
            )
        )
        _reinitialise(light)
        return light

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for name, stage in self.backbone.named_children():
            x = stage(x)
            if name in self.heads:
                outputs.append(self.heads[name](x))
        outputs.append(x)  # after 'classifier': the backbone's own logits
        return outputs

    def exit_costs(self, input_shape: Sequence[int] | None = None) -> pd.DataFrame:
        """Parameters and FLOPs up to each exit (see :func:`exit_costs`)."""
        return exit_costs(self, input_shape)


# --------------------------------------------------------------------------------------------------------
# Cost of each exit
# --------------------------------------------------------------------------------------------------------


def exit_costs(multi_exit: MultiExit, input_shape: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per exit: what it costs to reach that exit, per image.

    Columns (MACs = multiply-accumulates; FLOPs = 2 x MACs, as in :mod:`kdbook_utils.metrics`):

    * ``backbone_macs``: the backbone up to the exit's stage (the whole network for ``final``);
    * ``head_macs`` / ``head_params``: the exit's own head (0 for ``final``);
    * ``path_macs`` / ``path_params``: backbone up to the exit + its head, i.e. the cost of a network
      that *only* has this exit (the final row is the plain single-exit model);
    * ``early_exit_macs`` / ``early_exit_flops``: the cost of an image that *leaves* at this exit during
      early exit: the backbone up to the exit plus every head evaluated on the way, the rejected
      earlier ones included. These are the numbers :func:`early_exit` charges;
    * ``relative_macs``: ``early_exit_macs`` / the single-exit model's MACs.
    """
    was_training = multi_exit.training
    try:
        return _exit_costs(
            multi_exit, tuple(input_shape) if input_shape is not None else multi_exit.input_shape
        )
    finally:
        multi_exit.train(was_training)  # counting runs stages in eval mode through temporary containers


def _exit_costs(multi_exit: MultiExit, shape: tuple[int, ...]) -> pd.DataFrame:
    backbone = multi_exit.backbone
    stages = list(backbone.named_children())
    names = [name for name, _ in stages]
    shapes = stage_output_shapes(backbone, shape)
    full = count_flops(backbone, shape)
    rows = []
    heads_so_far = 0
    for exit_name in multi_exit.exit_names:
        if exit_name == FINAL_EXIT:
            backbone_macs, head_macs, head_params = full.macs, 0, 0
            path_params = count_parameters(backbone)
        else:
            upto = names.index(exit_name) + 1
            prefix = nn.Sequential(OrderedDict(stages[:upto]))
            backbone_macs = count_flops(prefix, shape).macs
            head = multi_exit.heads[exit_name]
            head_macs = count_flops(head, shapes[exit_name]).macs
            head_params = count_parameters(head)
            path_params = count_parameters(prefix) + head_params
        heads_so_far += head_macs
        early = backbone_macs + heads_so_far
        rows.append(
            {
                "exit": exit_name,
                "backbone_macs": backbone_macs,
                "head_macs": head_macs,
                "head_params": head_params,
                "path_macs": backbone_macs + head_macs,
                "path_params": path_params,
                "early_exit_macs": early,
                "early_exit_flops": 2 * early,
                "relative_macs": early / full.macs,
            }
        )
    return pd.DataFrame(rows).set_index("exit")


# --------------------------------------------------------------------------------------------------------
# The loss (pure functions, then the methods)
# --------------------------------------------------------------------------------------------------------


def distillation_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    symmetric: bool = False,
) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch (Hinton et al. 2015).

    The ``T^2`` keeps the soft-target gradients on the scale of the cross-entropy's whatever ``T`` is.
    ``symmetric=True`` uses ``T^2 * (KL(p_t || p_s) + KL(p_s || p_t)) / 2`` (spec M10, the paper's ref [38]).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    forward = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    if symmetric:
        reverse = F.kl_div(log_p_teacher, log_p_student, reduction="batchmean", log_target=True)
        forward = (forward + reverse) / 2
    return temperature**2 * forward


def exit_loss(
    exit_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = 1.0,
    beta: float = 1.0,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """One exit's loss terms ``(alpha * CE(y, z_k), beta * T^2 * KL(q_T || softmax(z_k / T)))``.

    MSKD (Xu et al. 2022, reconstructed Algorithm 1): ``L_k = alpha * CE + beta * T^2 * KL``, where the
    target ``q_T`` is the teacher's final output (MSKD) or the teacher's exit k (OtO). Without a teacher
    the KL term is zero.
    """
    ce = alpha * F.cross_entropy(exit_logits.float(), labels)
    if teacher_logits is None or beta == 0:
        return ce, ce.new_zeros(())
    return ce, beta * distillation_kl(exit_logits, teacher_logits, temperature, symmetric)


def mskd_loss(
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    teacher_logits: Tensor | Sequence[Tensor] | None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = 1.0,
    beta: float = 1.0,
    exit_names: Sequence[str] | None = None,
    symmetric: bool = False,
) -> dict[str, Tensor]:
    """The MSKD loss ``L = sum_k [alpha * CE(y, z_k) + beta * T^2 * KL(q_k || softmax(z_k / T))]``.

    ``teacher_logits`` is one tensor (MSKD: the teacher's final output guides every exit), one tensor per
    exit (OtO: teacher exit k guides student exit k), or None (multi-exit training without a teacher).
    Returns the weighted terms by name, ``ce_<exit>`` and ``kd_<exit>``; the training loop sums them.
    """
    names = (
        list(exit_names) if exit_names is not None else [f"exit{k}" for k in range(1, len(exit_logits) + 1)]
    )
    if len(names) != len(exit_logits):
        raise ValueError(f"Got {len(exit_logits)} exits but {len(names)} exit names.")
    if teacher_logits is None or isinstance(teacher_logits, Tensor):
        targets: list[Tensor | None] = [teacher_logits] * len(exit_logits)
    else:
        targets = list(teacher_logits)
        if len(targets) != len(exit_logits):
            raise ValueError(
                f"One-to-one distillation needs one teacher output per student exit: the teacher has "
                f"{len(targets)} exits and the student {len(exit_logits)}. Give both the same exits."
            )
    terms: dict[str, Tensor] = {}
    for name, logits, target in zip(names, exit_logits, targets):
        ce, kd = exit_loss(logits, labels, target, temperature, alpha, beta, symmetric)
        terms[f"ce_{name}"] = ce
        if target is not None and beta != 0:
            terms[f"kd_{name}"] = kd
    return terms


def ensemble_probabilities(exit_logits: Sequence[Tensor], members: Iterable[int] | None = None) -> Tensor:
    """The exits' vote ``p_ens = (1/|S|) sum_{k in S} softmax(z_k)`` (spec M5); ``members`` picks S."""
    chosen = list(range(len(exit_logits))) if members is None else sorted(set(members))
    if not chosen:
        raise ValueError("The ensemble needs at least one exit; members is empty.")
    bad = [k for k in chosen if not 0 <= k < len(exit_logits)]
    if bad:
        raise ValueError(
            f"Exit indices {bad} out of range: there are {len(exit_logits)} exits (0..{len(exit_logits) - 1})."
        )
    return torch.stack([F.softmax(exit_logits[k].float(), dim=1) for k in chosen]).mean(dim=0)


def ensemble_log_probabilities(exit_logits: Sequence[Tensor], members: Iterable[int] | None = None) -> Tensor:
    """``log p_ens``: usable as logits (same argmax; its cross-entropy is the ensemble's NLL)."""
    return ensemble_probabilities(exit_logits, members).clamp_min(1e-12).log()


class MultiExitCrossEntropy(Distiller):
    """A multi-exit student trained without a teacher: ``L = sum_k alpha * CE(y, z_k)``.

    The logits it reports to the training loop are the ensemble's log-probabilities.
    """

    def __init__(self, student: MultiExit, alpha: float = 1.0) -> None:
        if not isinstance(student, MultiExit):
            raise TypeError(f"The student must be a MultiExit, got {type(student).__name__}.")
        super().__init__(student)
        self.alpha = alpha

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        exits = self.student(images)
        terms = mskd_loss(exits, labels, None, alpha=self.alpha, exit_names=self.student.exit_names)
        return ensemble_log_probabilities(exits).detach(), terms


class MSKD(Distiller):
    """Multiple-stage KD: every exit of a multi-exit student learns from the labels and the teacher.

    ``teacher`` is a trained model (its final logits guide every exit), or, with ``one_to_one=True``
    (OtO), a :class:`MultiExit` teacher with as many exits as the student: teacher exit k guides student
    exit k. Loss: :func:`mskd_loss` with ``temperature`` (3), ``alpha`` (1), ``beta`` (1).
    """

    def __init__(
        self,
        student: MultiExit,
        teacher: nn.Module,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = 1.0,
        beta: float = 1.0,
        one_to_one: bool = False,
        symmetric_kl: bool = False,
    ) -> None:
        if not isinstance(student, MultiExit):
            raise TypeError(f"The student must be a MultiExit, got {type(student).__name__}.")
        if one_to_one:
            if not isinstance(teacher, MultiExit):
                raise TypeError(
                    "One-to-one MSKD (OtO) needs a multi-exit teacher: wrap it with MultiExit and train its "
                    "heads first (train_teacher_exits)."
                )
            if teacher.num_exits != student.num_exits:
                raise ValueError(
                    f"OtO pairs exits one to one, but the teacher has {teacher.num_exits} exits "
                    f"{teacher.exit_names} and the student {student.num_exits} {student.exit_names}."
                )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        super().__init__(student, teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.one_to_one = one_to_one
        self.symmetric_kl = symmetric_kl

    def teacher_targets(self, images: Tensor) -> Tensor | list[Tensor]:
        """The teacher's final logits (MSKD) or its exits' logits (OtO), without gradients."""
        with torch.no_grad():
            output = self.teacher(images)
        if isinstance(output, Tensor):
            return output
        return list(output) if self.one_to_one else output[-1]

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        targets = self.teacher_targets(images)
        exits = self.student(images)
        terms = mskd_loss(
            exits,
            labels,
            targets,
            self.temperature,
            self.alpha,
            self.beta,
            exit_names=self.student.exit_names,
            symmetric=self.symmetric_kl,
        )
        return ensemble_log_probabilities(exits).detach(), terms


class OtO(MSKD):
    """One-to-one MSKD: a multi-exit teacher's exit k teaches the student's exit k (``MSKD(one_to_one=True)``)."""

    def __init__(
        self,
        student: MultiExit,
        teacher: MultiExit,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = 1.0,
        beta: float = 1.0,
        symmetric_kl: bool = False,
    ) -> None:
        super().__init__(
            student, teacher, temperature, alpha, beta, one_to_one=True, symmetric_kl=symmetric_kl
        )


# --------------------------------------------------------------------------------------------------------
# The OtO teacher's exits
# --------------------------------------------------------------------------------------------------------


class ExitHeadsCrossEntropy(Distiller):
    """Train only the heads of a multi-exit network on its frozen backbone (spec M6): ``sum_k CE(y, z_k)``.

    The backbone keeps its weights and its BatchNorm statistics (it stays in eval mode).
    """

    def __init__(self, network: MultiExit) -> None:
        if not isinstance(network, MultiExit):
            raise TypeError(f"Expected a MultiExit network, got {type(network).__name__}.")
        super().__init__(network)
        for parameter in network.backbone.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ExitHeadsCrossEntropy:
        super().train(mode)
        self.student.backbone.eval()
        return self

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        exits = self.student(images)
        heads = exits[:-1]
        terms = mskd_loss(heads, labels, None, exit_names=self.student.exit_points)
        return ensemble_log_probabilities(exits).detach(), terms


def train_teacher_exits(
    teacher: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float = 0.05,
    exits: Sequence[str] | None = None,
    heads: str = "copy",
    joint_from_scratch: bool = False,
    input_shape: Sequence[int] | None = None,
    **fit_options: object,
) -> tuple[MultiExit, pd.DataFrame]:
    """A multi-exit teacher for OtO, and its training history.

    Default (OtO, spec M6): heads are attached to a copy of the trained ``teacher`` and trained with CE
    while its backbone stays frozen, so the teacher's final exit is exactly the trained teacher.
    ``joint_from_scratch=True`` (OtO*, spec M7): the teacher's architecture is re-initialised and its
    backbone and exits are trained together from scratch with ``sum_k CE``.
    """
    network = MultiExit(copy.deepcopy(teacher), exits=exits, heads=heads, input_shape=input_shape)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    if joint_from_scratch:
        _reinitialise(network.backbone)
        method: Distiller = MultiExitCrossEntropy(network)
    else:
        method = ExitHeadsCrossEntropy(network)
    history = fit(method, train_loader, epochs=epochs, lr=lr, **fit_options)
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network, history


def cached_teacher(
    arch: str,
    train_data: object,
    test_data: object,
    *,
    epochs: int,
    tag: str,
    lr: float = 0.05,
    batch_size: int = 64,
    padding: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **model_options: object,
) -> tuple[nn.Module, pd.DataFrame | None]:
    """A teacher trained with cross-entropy on ``train_data``: loaded from the cache, or trained and cached.

    The cache file is named by arch, data set, ``tag`` (say what is special, e.g. ``"quick16px"``) and seed,
    so it never collides with another lesson's teacher. Returns ``(model in eval mode, history)``.
    """
    from kdbook_utils.checkpoints import checkpoint_path, load_or_train
    from kdbook_utils.data import TensorLoader
    from kdbook_utils.models import create_model
    from kdbook_utils.train import seed_everything

    seed_everything(seed)
    channels = int(train_data.images.shape[1])  # type: ignore[attr-defined]
    model = create_model(arch, train_data.num_classes, in_channels=channels, **model_options)  # type: ignore[attr-defined]
    path = checkpoint_path(arch, train_data.name, "mskd", seed, f"{tag}_{epochs}ep")  # type: ignore[attr-defined]
    loader = TensorLoader(train_data, batch_size, train=True, device=device, seed=seed, padding=padding)
    test_loader = TensorLoader(test_data, 512, train=False, device=device)

    def train(model: nn.Module) -> pd.DataFrame:
        return fit(model, loader, test_loader, epochs=epochs, lr=lr, device=device, progress=progress,
                   desc=f"teacher {arch}")  # fmt: skip

    model, history, loaded = load_or_train(
        model, path, train, recipe={"fingerprint": str(loader.fingerprint)}
    )
    print(f"{'Loaded' if loaded else 'Trained and saved'} teacher {arch}: {path}")
    return model.to(device).eval(), history


def cached_teacher_exits(
    teacher: nn.Module,
    train_data: object,
    *,
    epochs: int,
    tag: str,
    lr: float = 0.05,
    batch_size: int = 64,
    padding: int = 4,
    seed: int = 0,
    exits: Sequence[str] | None = None,
    heads: str = "copy",
    joint_from_scratch: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> MultiExit:
    """:func:`train_teacher_exits`, cached: the OtO teacher (or OtO*'s with ``joint_from_scratch``)."""
    from kdbook_utils.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
    from kdbook_utils.data import TensorLoader

    network = MultiExit(
        copy.deepcopy(teacher), exits=exits, heads=heads, input_shape=train_data.images.shape[1:]
    )  # type: ignore[attr-defined]
    variant = "joint" if joint_from_scratch else "frozen"
    arch = getattr(teacher, "arch", type(teacher).__name__)
    path = checkpoint_path(f"{arch}-exits-{variant}", train_data.name, "mskd", seed, f"{tag}_{epochs}ep")  # type: ignore[attr-defined]
    if path.is_file():
        load_checkpoint(network, path)
        print(f"Loaded the multi-exit teacher ({variant} backbone): {path}")
    else:
        loader = TensorLoader(train_data, batch_size, train=True, device=device, seed=seed, padding=padding)
        network, history = train_teacher_exits(
            teacher, loader, epochs=epochs, lr=lr, exits=exits, heads=heads,
            joint_from_scratch=joint_from_scratch, input_shape=network.input_shape, device=device,
            progress=progress,
        )  # fmt: skip
        save_checkpoint(network, path, history=history)
        print(f"Trained and saved the multi-exit teacher ({variant} backbone): {path}")
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.to(device).eval()


# --------------------------------------------------------------------------------------------------------
# Evaluation: per-exit accuracy, ensembles, early exit
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_exits(
    network: MultiExit | Distiller, loader: Iterable[tuple[Tensor, Tensor]]
) -> tuple[list[Tensor], Tensor]:
    """Every exit's logits over ``loader``: ``([logits of exit k, (N, C) float32 CPU], labels (N,))``."""
    network = network.student if isinstance(network, Distiller) else network
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    per_exit: list[list[Tensor]] = []
    all_labels = []
    try:
        for images, labels in loader:
            outputs = network(images.to(device))
            if isinstance(outputs, Tensor):
                outputs = [outputs]
            if not per_exit:
                per_exit = [[] for _ in outputs]
            for bucket, logits in zip(per_exit, outputs):
                bucket.append(logits.float().cpu())
            all_labels.append(labels.cpu())
    finally:
        network.train(was_training)
    if not all_labels:
        raise ValueError("The loader yielded no batches.")
    return [torch.cat(bucket) for bucket in per_exit], torch.cat(all_labels)


def per_exit_accuracy(exit_logits: Sequence[Tensor], labels: Tensor) -> list[float]:
    """Fraction correct (in [0, 1]) of each exit's argmax."""
    return [(logits.argmax(dim=1) == labels).float().mean().item() for logits in exit_logits]


def exit_accuracy_table(
    exit_logits: Sequence[Tensor], labels: Tensor, exit_names: Sequence[str] | None = None
) -> pd.Series:
    """Accuracy of each exit and of the ensemble of all exits, as a Series indexed by exit name."""
    names = (
        list(exit_names) if exit_names is not None else [f"exit{k}" for k in range(1, len(exit_logits) + 1)]
    )
    values = per_exit_accuracy(exit_logits, labels)
    ensemble = (ensemble_probabilities(exit_logits).argmax(dim=1) == labels).float().mean().item()
    return pd.Series([*values, ensemble], index=[*names, "ensemble"], name="accuracy")


@dataclass(frozen=True)
class EarlyExitResult:
    """What early exit did with each image: its prediction, the exit it left at, and the FLOPs spent."""

    predictions: Tensor  # (N,) class indices
    exit_index: Tensor  # (N,) index of the exit each image left at
    flops: Tensor  # (N,) float64 FLOPs spent on each image

    @property
    def mean_flops(self) -> float:
        return self.flops.mean().item()

    def accuracy(self, labels: Tensor) -> float:
        return (self.predictions == labels).float().mean().item()

    def exit_fractions(self, num_exits: int) -> Tensor:
        """Fraction of the images leaving at each exit."""
        return torch.bincount(self.exit_index, minlength=num_exits).double() / len(self.exit_index)


def early_exit(
    exit_logits: Sequence[Tensor], threshold: float, exit_flops: Sequence[float]
) -> EarlyExitResult:
    """Each image leaves at the first exit whose confidence ``max_c softmax(z_k)_c`` is ``>= threshold``.

    Images that no exit is sure enough about leave at the last. ``exit_flops[k]`` is what an image that
    leaves at exit k costs, the heads it evaluated and rejected included: the ``early_exit_flops`` column
    of :func:`exit_costs`. Threshold 0 stops every image at the first exit; a threshold above 1 sends every
    image to the last.
    """
    if len(exit_flops) != len(exit_logits):
        raise ValueError(f"Need one cost per exit: {len(exit_logits)} exits, {len(exit_flops)} costs.")
    probabilities = torch.stack([F.softmax(logits.float(), dim=1) for logits in exit_logits])  # (K, N, C)
    confidence, predicted = probabilities.max(dim=2)  # (K, N)
    confident = confidence >= threshold
    confident[-1] = True  # the last exit always answers
    exit_index = confident.int().argmax(dim=0)  # first True along the exits
    columns = torch.arange(exit_index.shape[0])
    costs = torch.as_tensor(list(exit_flops), dtype=torch.float64)
    return EarlyExitResult(predicted[exit_index, columns], exit_index, costs[exit_index])


def threshold_sweep(
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    exit_flops: Sequence[float],
    thresholds: Iterable[float] | None = None,
) -> pd.DataFrame:
    """Accuracy and mean FLOPs of early exit for each threshold (the accuracy-versus-FLOPs curve)."""
    grid = list(thresholds) if thresholds is not None else [k / 100 for k in range(0, 101, 2)] + [1.01]
    rows = []
    for threshold in grid:
        result = early_exit(exit_logits, threshold, exit_flops)
        fractions = result.exit_fractions(len(exit_logits))
        row = {"threshold": threshold, "accuracy": result.accuracy(labels), "mean_flops": result.mean_flops}
        row.update({f"share_exit{k + 1}": fractions[k].item() for k in range(len(exit_logits))})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# One training run of a lesson's method, for a sweep over seeds
# --------------------------------------------------------------------------------------------------------

LESSON_METHODS = ("single exit", "multi-exit CE", "MSKD", "OtO")
"""The four ways the lesson trains a student: alone with one exit, multi-exit without a teacher, MSKD, OtO."""


@dataclass
class ExitRun:
    """One trained student: its test logits per exit, the labels, its history and the network."""

    method: str
    seed: int
    exit_names: tuple[str, ...]
    exit_logits: list[Tensor]
    labels: Tensor
    history: pd.DataFrame
    network: nn.Module
    seconds: float

    def accuracy(self) -> pd.Series:
        """Accuracy of every exit and of the ensemble of all exits (a single-exit run: just ``final``)."""
        return exit_accuracy_table(self.exit_logits, self.labels, self.exit_names)

    def rows(self) -> list[dict[str, object]]:
        """Long-format rows ``method, seed, exit, accuracy`` for a results table."""
        return [
            {"method": self.method, "seed": self.seed, "exit": name, "accuracy": value}
            for name, value in self.accuracy().items()
            if not (len(self.exit_names) == 1 and name == "ensemble")
        ]


def train_exit_student(
    method: str,
    build_student: Callable[[], nn.Module],
    train_data: object,
    test_data: object,
    *,
    seed: int,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    teacher_exits: MultiExit | None = None,
    exits: Sequence[str] | None = None,
    heads: str = "copy",
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = 1.0,
    beta: float = 1.0,
    padding: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ExitRun:
    """Train a fresh student (``build_student()``, seeded with ``seed``) with one of :data:`LESSON_METHODS`.

    ``"single exit"``: the plain network with cross-entropy. ``"multi-exit CE"``: :class:`MultiExit` with
    ``sum_k CE``. ``"MSKD"``: :class:`MSKD` with ``teacher``. ``"OtO"``: :class:`OtO` with the multi-exit
    ``teacher_exits`` (from :func:`train_teacher_exits`). ``seed`` fixes the initialisation and the
    loader's order and augmentation. Returns the test logits of every exit (see :class:`ExitRun`).
    """
    from kdbook_utils.data import TensorLoader
    from kdbook_utils.train import seed_everything

    if method not in LESSON_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {LESSON_METHODS}.")
    train_loader = TensorLoader(train_data, batch_size, train=True, device=device, seed=seed, padding=padding)
    test_loader = TensorLoader(test_data, 512, train=False, device=device)
    seed_everything(seed)
    student = build_student()
    network: nn.Module = student
    trainer: nn.Module
    if method == "single exit":
        trainer = student
    else:
        network = MultiExit(student, exits=exits, heads=heads)
        if method == "multi-exit CE":
            trainer = MultiExitCrossEntropy(network, alpha=alpha)
        elif method == "MSKD":
            if teacher is None:
                raise ValueError("MSKD needs a trained teacher: pass teacher=...")
            trainer = MSKD(network, teacher, temperature, alpha, beta)
        else:
            if teacher_exits is None:
                raise ValueError(
                    "OtO needs a multi-exit teacher: pass teacher_exits=train_teacher_exits(...)[0]."
                )
            trainer = OtO(network, teacher_exits, temperature, alpha, beta)
    started = time.perf_counter()
    history = fit(trainer, train_loader, epochs=epochs, lr=lr, device=device, progress=progress,
                  desc=f"{method} seed {seed}")  # fmt: skip
    seconds = time.perf_counter() - started
    exit_logits, labels = predict_exits(network, test_loader)
    names = network.exit_names if isinstance(network, MultiExit) else (FINAL_EXIT,)
    return ExitRun(method, seed, tuple(names), exit_logits, labels, history, network, seconds)


# --------------------------------------------------------------------------------------------------------
# The paper's numbers (Xu et al. 2022, Tables as read from the MDPI page; spec §2.6, all [SRC])
# --------------------------------------------------------------------------------------------------------

_EXIT_COLUMNS = [
    "teacher",
    "teacher_base",
    "student",
    "student_base",
    "exit1",
    "exit2",
    "exit3",
    "exit4",
    "ensemble",
]

PAPER_CIFAR100_EXITS = pd.DataFrame(
    [
        ["ResNet152", 80.88, "ResNet50", 79.34, 79.32, 80.80, 81.78, 81.74, 83.20],
        ["ResNet152", 80.88, "ResNet18", 78.47, 75.06, 77.40, 80.15, 80.50, 81.73],
        ["ResNet152", 80.88, "ResNet10", 76.19, 73.19, 75.12, 77.52, 78.02, 79.74],
        ["ResNet50", 79.34, "ResNet18", 78.47, 74.37, 77.62, 80.09, 80.65, 81.42],
        ["ResNet50", 79.34, "VGG8", 70.36, 71.20, 69.79, 70.95, 72.98, 76.05],
        ["VGG13", 74.64, "VGG8", 70.36, 71.17, 70.59, 71.10, 72.65, 76.27],
    ],
    columns=_EXIT_COLUMNS,
)
"""Per-exit top-1 accuracy (%) on CIFAR-100. The ensemble column equals Table C's OtO row: most likely OtO."""

PAPER_TINY_IMAGENET_EXITS = pd.DataFrame(
    [
        ["ResNet34", 66.40, "ResNet34", 66.40, 59.52, 63.80, 68.65, 70.38, 71.38],
        ["ResNet34", 66.40, "ResNet18", 64.40, 59.86, 62.30, 65.30, 68.04, 69.86],
    ],
    columns=_EXIT_COLUMNS,
)
"""Per-exit top-1 accuracy (%) on Tiny ImageNet (ensemble = Table D's OtO row)."""

PAPER_CIFAR100_METHODS = pd.DataFrame(
    {
        "KD": [79.69, 79.86, 77.85, 79.72, 73.81, 72.98, 74.92],
        "FitNet": [80.51, 79.24, 78.02, 76.27, 73.24, 73.22, 73.07],
        "AT": [80.41, 80.19, 78.45, 78.28, 74.01, 73.48, 73.97],
        "SP": [80.72, 79.87, 78.25, 79.32, 73.52, 73.49, 74.34],
        "CC": [79.89, 79.82, 78.06, 77.42, 73.48, 73.04, 73.18],
        "VID": [79.24, 79.67, 77.80, 76.79, 73.46, 72.97, 74.07],
        "RKD": [80.22, 79.60, 77.90, 78.75, 73.51, 73.19, 73.36],
        "PKT": [80.57, 79.44, 78.41, 78.89, 73.61, 73.25, 74.42],
        "AB": [81.21, 79.50, 78.18, 76.77, 73.65, 73.35, 72.65],
        "FT": [80.37, 79.26, 77.53, 76.29, 72.98, 73.44, 73.33],
        "CRD": [80.53, 79.81, 78.60, 74.58, 74.58, 74.29, 75.79],
        "SSKD": [80.29, 80.36, 78.60, 79.72, 75.36, 75.27, 76.14],
        "HSAKD": [83.33, 82.17, 79.75, 81.22, 75.20, 75.07, 78.20],
        "TSKD": [83.09, 81.27, 79.34, 81.28, 75.63, 75.42, 78.31],
        "MSKD": [82.37, 81.32, 79.38, 81.17, 75.74, 75.83, 77.58],
        "OtO": [83.20, 81.73, 79.74, 81.42, 76.05, 76.27, 78.57],
        "OtO*": [83.47, 82.63, 80.52, 82.10, 76.19, 76.36, 78.72],
    },
    index=["R152→R50", "R152→R18", "R152→R10", "R50→R18", "R50→VGG8", "VGG13→VGG8", "WRN40-2→WRN16-2"],
).T
"""Top-1 accuracy (%) on CIFAR-100 of MSKD, OtO, OtO* and other KD methods (rows) per teacher→student pair."""

PAPER_TINY_IMAGENET_METHODS = pd.DataFrame(
    {
        "R34→R18": [
            66.40,
            64.40,
            67.90,
            64.44,
            66.54,
            67.06,
            66.92,
            65.90,
            65.76,
            67.94,
            68.56,
            69.04,
            69.86,
        ],
        "R34→R34": [
            66.40,
            66.40,
            68.80,
            66.18,
            67.16,
            68.36,
            68.08,
            67.80,
            68.18,
            68.96,
            69.58,
            70.78,
            71.38,
        ],
    },
    index=[
        "Teacher",
        "Student",
        "KD",
        "FitNet",
        "AT",
        "SP",
        "VID",
        "RKD",
        "PKT",
        "CRD",
        "AFD",
        "MSKD",
        "OtO",
    ],
)
"""Top-1 accuracy (%) on Tiny ImageNet (the paper gives no OtO* here)."""

PAPER_PAIRS: tuple[tuple[str, str], ...] = (
    ("resnet152_cifar", "resnet50_cifar"),
    ("resnet152_cifar", "resnet18_cifar"),
    ("resnet152_cifar", "resnet10_cifar"),
    ("resnet50_cifar", "resnet18_cifar"),
    ("resnet50_cifar", "vgg8"),
    ("vgg13", "vgg8"),
    ("wrn40_2", "wrn16_2"),
)
"""The paper's CIFAR-100 (teacher, student) pairs as zoo names, in Table C's column order."""


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def plot_exit_diagram(network: MultiExit, costs: pd.DataFrame | None = None) -> Figure:
    """Where the exits sit: the backbone's stages left to right, a head branching down after each exit point.

    With ``costs`` (from :func:`exit_costs`), each exit is labelled with its early-exit cost relative to
    the single-exit network.
    """
    stages = [name for name, _ in network.backbone.named_children()]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.25 * len(stages)), 3.3), layout="constrained")
    palette = plt.get_cmap("tab10")
    ax.set_xlim(-0.6, len(stages) - 0.4)
    ax.set_ylim(-2.15, 0.9)
    ax.axis("off")
    for position, name in enumerate(stages):
        ax.add_patch(Rectangle((position - 0.4, 0.0), 0.8, 0.6, facecolor="#dfe8f5", edgecolor="#34495e"))
        ax.text(position, 0.3, name, ha="center", va="center", fontsize=9)
        if position:
            ax.annotate("", (position - 0.4, 0.3), (position - 0.6, 0.3), arrowprops={"arrowstyle": "->"})
    for index, exit_name in enumerate(network.exit_names):
        colour = palette(index)
        if exit_name == FINAL_EXIT:
            x, label = len(stages) - 1, f"exit {index + 1}: {FINAL_EXIT}\n(the model's own classifier)"
            ax.annotate("", (x, -0.95), (x, 0.0), arrowprops={"arrowstyle": "->", "color": colour, "lw": 2})
        else:
            x = stages.index(exit_name)
            ax.annotate(
                "",
                (x + 0.25, -0.95),
                (x + 0.25, 0.0),
                arrowprops={"arrowstyle": "->", "color": colour, "lw": 2},
            )
            head = network.heads[exit_name]
            copied = [name for name, _ in head.named_children() if name not in ("pool", "classifier")]
            if network.head_style == "light":
                kind = "one conv"
            elif len(copied) > 1:
                kind = f"copy of\n{copied[0]}-{copied[-1]}"
            else:
                kind = f"copy of\n{copied[0]}" if copied else "none"
            label = f"exit {index + 1} after {exit_name}\nhead: {kind}\n+ pool + classifier"
        if costs is not None:
            label += f"\n{costs.loc[exit_name, 'relative_macs']:.2f}x the MACs"
        ax.text(x + (0.25 if exit_name != FINAL_EXIT else 0), -1.0, label, ha="center", va="top", fontsize=7.5,
                color=colour, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": colour})  # fmt: skip
    ax.set_title(
        f"{getattr(network.backbone, 'arch', 'model')} with {network.num_exits} exits ({network.head_style} heads)"
    )
    return fig


def plot_exit_accuracies(runs: pd.DataFrame, ylim: tuple[float, float] | None = None) -> Figure:
    """Grouped bars: per exit (groups) and method (colours), mean accuracy over seeds with std error bars.

    ``runs`` has the columns ``method, seed, exit, accuracy`` (:meth:`ExitRun.rows`).
    """
    summary = runs.groupby(["exit", "method"], sort=False)["accuracy"].agg(["mean", "std"]).fillna(0.0) * 100
    per_method = runs.groupby("method", sort=False)["exit"].unique()
    exits = list(max(per_method, key=len))  # forward order, from the method with the most exits
    exits = [name for name in exits if name != "ensemble"] + (["ensemble"] if "ensemble" in exits else [])
    methods = list(dict.fromkeys(runs["method"]))
    width = 0.8 / len(methods)
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(1.6 * len(exits) + 2.5, 3.6), layout="constrained")
    for m, method in enumerate(methods):
        for e, exit_name in enumerate(exits):
            if (exit_name, method) not in summary.index:
                continue
            mean, std = summary.loc[(exit_name, method)]
            ax.bar(e + (m - (len(methods) - 1) / 2) * width, mean, width * 0.95, yerr=std, capsize=3,
                   color=palette(m))  # fmt: skip
    handles = [Rectangle((0, 0), 1, 1, color=palette(m)) for m in range(len(methods))]
    ax.legend(handles, methods, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(range(len(exits)), exits)
    ax.set_xlabel("exit (named by the stage it follows)")
    ax.set_ylabel("test accuracy (%)")
    low = float((summary["mean"] - summary["std"]).min())
    ax.set_ylim(*(ylim or (max(0.0, low - 5), 100.5)))
    ax.set_title("Accuracy per exit, mean ± std over seeds")
    return fig


def plot_accuracy_vs_flops(
    curves: dict[str, pd.DataFrame], points: dict[str, tuple[float, float]] | None = None
) -> Figure:
    """Early exit's accuracy against mean FLOPs per image (one curve per :func:`threshold_sweep`), plus
    single models as points ``{name: (flops, accuracy)}``."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8), layout="constrained")
    for name, sweep in curves.items():
        ax.plot(sweep["mean_flops"] / 1e6, sweep["accuracy"] * 100, marker=".", label=name)
    for name, (flops, accuracy) in (points or {}).items():
        ax.scatter([flops / 1e6], [accuracy * 100], marker="*", s=160, zorder=3, label=name)
    ax.set_xlabel("mean FLOPs per image (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Early exit: accuracy versus computation")
    return fig
