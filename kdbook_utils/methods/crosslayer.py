"""Cross-layer FSP distillation with a KL term and an offline ensemble of teachers: Chou, Chiu and Liao,
"Cross-layer knowledge distillation with KL divergence and offline ensemble for compressing deep neural
network", APSIPA Transactions on Signal and Information Processing 10, e18 (2021),
https://doi.org/10.1017/ATSIP.2021.16.

The method has three parts, P1-P3 in the paper's Tables 13-15:

* **P1, cross-layer matrices.** FSP (Yim et al., CVPR 2017) summarises how a network transforms one
  feature map into another by a Gram matrix between two checkpoints (:func:`fsp_matrix`). The paper also
  pairs checkpoints two and three stages apart, "cross k layers" (:func:`cross_layer_pairs`).
* **P2, a KL term** from deep mutual learning (Zhang et al., CVPR 2018), used offline: the frozen
  teachers' softmax (no temperature) is the target of ``KL(p_T || p_S)`` (:func:`kl_loss`).
* **P3, an offline ensemble** of K frozen teachers of one architecture, combined by a "stochastic mean"
  (:func:`ensemble_weights`): by default the mean of their probabilities and of their Gram matrices.

Training follows FSP's two stages (:class:`CrossLayerDistiller` has two training phases): phase A fits
the student's Gram matrices to the teachers' (:func:`gram_loss` only), phase B trains on the task with
cross-entropy + KL. Paired checkpoints need equal channel counts; :func:`adapt_teacher` inserts 1x1
convolutions on the teacher side when they differ, and "two-stage" distillation (ResNet-50 -> ResNet-18
-> ResNet-10) is the same method applied twice.

Only the abstract and the figure and table captions of the paper could be read, so every formula here
is a reconstruction; each open choice is a keyword argument, and the book's appendix ("How each paper
was reconstructed") gives the alternatives and the reasons for each default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.features import FeatureExtractor
from kdbook_utils.models import ZooModel
from kdbook_utils.train import Distiller, TrainingPhase

Pair = tuple[str, str]

PAIR_MODES: tuple[str, ...] = ("cumulative", "exact")
POOL_MODES: tuple[str, ...] = ("max", "avg")
KL_MODES: tuple[str, ...] = ("forward", "symmetric")
ENSEMBLE_MODES: tuple[str, ...] = ("mean", "random_teacher", "random_weights")
PHASES: tuple[str, ...] = ("gram", "task")

DEFAULT_GRAM_WEIGHT = 1e-3
"""The Gram loss's scale, ``1e-3 * 1/2 * ||G_T - G_S||_F^2`` per pair: FSP's scale in the TensorFlow
KD code base that runs the paper's ResNet-32 -> ResNet-8 pair."""


def _choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {tuple(valid)}.")


# ----------------------------------------------------------------------------------------------------
# P1: FSP / cross-layer matrices
# ----------------------------------------------------------------------------------------------------


def cross_layer_pairs(points: Sequence[str], k: int, mode: str = "cumulative") -> list[Pair]:
    """The checkpoint pairs of "cross ``k`` layers", for checkpoints ``c_0 ... c_{M-1}`` in forward order.

    * ``mode="exact"``: the pairs exactly ``k`` apart, ``{(c_i, c_{i+k})}``. ``k = 1`` is plain FSP.
    * ``mode="cumulative"`` (default): every pair at most ``k`` apart, ``P_1 U ... U P_k``, so cross-3 on
      a ResNet with 4 checkpoints is all 6 pairs: "more features" than FSP, as the abstract promises.

    Pairs come ordered by span, then position: ``cross_layer_pairs("abcd", 2)`` is
    ``[("a","b"), ("b","c"), ("c","d"), ("a","c"), ("b","d")]``.
    """
    points = list(points)
    _choice("pair mode", mode, PAIR_MODES)
    if len(set(points)) != len(points):
        raise ValueError(f"Checkpoint names must be distinct; got {points}.")
    if len(points) < 2:
        raise ValueError(f"Cross-layer pairs need at least two checkpoints; got {points}.")
    largest = len(points) - 1
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= largest:
        raise ValueError(
            f"k must be an integer from 1 to {largest} for {len(points)} checkpoints; got {k!r}."
        )
    spans = range(1, k + 1) if mode == "cumulative" else [k]
    return [(points[i], points[i + span]) for span in spans for i in range(len(points) - span)]


def fsp_matrix(a: Tensor, b: Tensor, pool: str = "max") -> Tensor:
    """The FSP (Gram) matrix between two feature maps, ``(B, C_a, C_b)`` (Yim et al. 2017, Eq. 1):

        G[n, i, j] = 1/(H*W) * sum_{s,t} A[n, i, s, t] * B[n, j, s, t]

    The larger map is first pooled down to the smaller one's ``H x W``: adaptive max-pooling by default,
    average pooling with ``pool="avg"`` (RepDistiller's choice). ``H*W`` is the size after pooling.
    """
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"fsp_matrix needs two (B, C, H, W) feature maps; got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")  # fmt: skip
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"The two maps must come from the same batch; got batch sizes {a.shape[0]} and "
                         f"{b.shape[0]}.")  # fmt: skip
    _choice("pool", pool, POOL_MODES)
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a, b = _pool_to(a, size, pool), _pool_to(b, size, pool)
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (size[0] * size[1])


def _pool_to(feature_map: Tensor, size: tuple[int, int], pool: str) -> Tensor:
    if tuple(feature_map.shape[2:]) == size:
        return feature_map
    if pool == "max":
        return F.adaptive_max_pool2d(feature_map, size)
    return F.adaptive_avg_pool2d(feature_map, size)


def fsp_matrices(
    features: Mapping[str, Tensor], pairs: Iterable[Pair], pool: str = "max"
) -> dict[Pair, Tensor]:
    """One :func:`fsp_matrix` per pair, ``{(a, b): G_ab}``, from a dict of feature maps by checkpoint."""
    matrices = {}
    for first, second in pairs:
        missing = [name for name in (first, second) if name not in features]
        if missing:
            raise KeyError(f"No feature map for checkpoint(s) {missing}; available: {list(features)}.")
        matrices[(first, second)] = fsp_matrix(features[first], features[second], pool)
    return matrices


def gram_loss(
    student: Mapping[Pair, Tensor], teacher: Mapping[Pair, Tensor], weight: float = DEFAULT_GRAM_WEIGHT
) -> Tensor:
    """The Gram-matching loss, summed over pairs:

        L_G = w * sum_{(a,b)} mean_n [ 1/2 * || G_T^{ab}[n] - G_S^{ab}[n] ||_F^2 ],   w = 1e-3

    FSP's squared Frobenius distance with equal weights for all pairs (Yim et al. 2017, Eq. 2), at the
    scale of the TensorFlow FSP code (its ``1e-3 * 1/2``); in phase A it is the only loss, so ``w`` acts
    like the learning rate. Unequal shapes mean unequal channel counts, which FSP cannot compare: put
    1x1-conv adapters on the teacher (:func:`adapt_teacher`).
    """
    if set(student) != set(teacher):
        raise ValueError(f"Student and teacher Gram matrices cover different pairs: {sorted(student)} vs "
                         f"{sorted(teacher)}.")  # fmt: skip
    if not student:
        raise ValueError("gram_loss needs at least one pair.")
    total = None
    for pair, student_gram in student.items():
        teacher_gram = teacher[pair]
        if student_gram.shape != teacher_gram.shape:
            raise ValueError(
                f"Gram matrices for pair {pair} differ in shape: student {tuple(student_gram.shape)}, teacher "
                f"{tuple(teacher_gram.shape)}. FSP needs equal channel counts at each checkpoint; reduce the "
                "teacher's channels with 1x1-conv adapters (adapt_teacher(teacher, student, input_shape))."
            )
        term = 0.5 * (teacher_gram - student_gram).pow(2).flatten(1).sum(dim=1).mean()
        total = term if total is None else total + term
    return weight * total


# ----------------------------------------------------------------------------------------------------
# P2: the KL term
# ----------------------------------------------------------------------------------------------------


def kl_loss(
    student_logits: Tensor, teacher_probs: Tensor, mode: str = "forward", temperature: float = 1.0
) -> Tensor:
    """Offline deep mutual learning's KL term, averaged over the batch (Zhang et al. 2018, Eq. 3):

        forward:    KL(p_T || p_S) = mean_n sum_c p_T log(p_T / p_S)
        symmetric:  1/2 [KL(p_T || p_S) + KL(p_S || p_T)]

    ``teacher_probs`` are *probabilities*, not logits: the ensemble's target is the mean of the teachers'
    probabilities, which lesson 1's ``kd_loss`` (logits at one temperature) cannot take. With one teacher
    and ``T = 1`` the forward form equals ``kd_loss(student_logits, teacher_logits, 1)``. DML uses no
    temperature (``T = 1``); for ``T != 1`` the loss is multiplied by ``T**2`` as in Hinton et al.
    """
    _choice("KL mode", mode, KL_MODES)
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} must have the same shape.")  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"The temperature must be positive; got {temperature!r} (DML uses T = 1).")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    forward = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(dim=1).mean()
    if mode == "forward":
        loss = forward
    else:
        log_teacher = torch.log(teacher_probs.clamp_min(torch.finfo(teacher_probs.dtype).tiny))
        reverse = (log_student.exp() * (log_student - log_teacher)).sum(dim=1).mean()
        loss = 0.5 * (forward + reverse)
    return loss * temperature**2


# ----------------------------------------------------------------------------------------------------
# P3: the offline ensemble ("stochastic mean")
# ----------------------------------------------------------------------------------------------------


def ensemble_weights(
    num_teachers: int, mode: str = "mean", generator: torch.Generator | None = None
) -> Tensor:
    """This step's convex weights over ``num_teachers`` teachers:

    * ``"mean"`` (default): ``1/K`` each. With the forward KL and the squared Gram loss, the loss against
      the mean target gives the student the same gradient as the mean of the per-teacher losses;
    * ``"random_teacher"``: one teacher drawn uniformly per step (the same target in expectation);
    * ``"random_weights"``: Dirichlet(1, ..., 1) weights drawn per step.
    """
    _choice("ensemble mode", mode, ENSEMBLE_MODES)
    if num_teachers < 1:
        raise ValueError(f"The ensemble needs at least one teacher; got {num_teachers}.")
    if mode == "mean":
        return torch.full((num_teachers,), 1.0 / num_teachers)
    if mode == "random_teacher":
        chosen = torch.randint(num_teachers, (1,), generator=generator)
        return F.one_hot(chosen, num_teachers).squeeze(0).float()
    draws = torch.empty(num_teachers).exponential_(generator=generator)  # normalised Exp(1) = Dirichlet(1)
    return draws / draws.sum()


def weighted_mean(per_teacher: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_k w_k x_k``: the ensemble target from per-teacher tensors of one shape."""
    if len(per_teacher) != len(weights):
        raise ValueError(f"Got {len(per_teacher)} tensors but {len(weights)} weights.")
    return sum(w * x for w, x in zip(weights.tolist(), per_teacher))


# ----------------------------------------------------------------------------------------------------
# Channel mismatch: 1x1-convolution adapters on the teacher side (the paper's Fig. 12)
# ----------------------------------------------------------------------------------------------------


def checkpoint_channels(
    model: nn.Module, points: Sequence[str], input_shape: Sequence[int]
) -> dict[str, int]:
    """Channel count of each checkpoint of ``model`` for inputs of ``input_shape`` = ``(C, H, W)``."""
    with FeatureExtractor(model, list(points)) as extractor:
        shapes = extractor.feature_shapes(input_shape)
    return {name: int(shapes[name][0]) for name in points}


def conv1x1_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 convolution + BatchNorm + ReLU: changes the channel count, keeps the spatial size."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                                     bn=nn.BatchNorm2d(out_channels), relu=nn.ReLU()))  # fmt: skip


def adapt_teacher(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: Sequence[int],
    teacher_points: Sequence[str] | None = None,
    student_points: Sequence[str] | None = None,
) -> ZooModel:
    """A teacher with 1x1-conv channel adapters where its checkpoints' widths differ from the student's.

    After each teacher checkpoint whose channel count ``C_T`` differs from the student's ``C_S``, two
    stages are inserted into the forward path: ``<point>_reduce`` (1x1 conv + BN + ReLU, ``C_T -> C_S``,
    the paper's "1x1 convolutional layers to decrease channels") and ``<point>_restore`` (``C_S -> C_T``)
    so the next teacher stage still receives ``C_T`` channels. The Gram matrices read the reduced maps
    (the returned model's ``feature_points``). The adapted model shares the teacher's stages; fine-tune
    it with cross-entropy so the reduced maps stay useful for the task, then freeze it.
    """
    if not isinstance(teacher, nn.Sequential):
        raise TypeError("adapt_teacher needs a zoo model (an nn.Sequential of named stages).")
    teacher_points = list(teacher_points or teacher.feature_points)
    student_points = list(student_points or student.feature_points)
    if len(teacher_points) != len(student_points):
        raise ValueError(
            f"Teacher checkpoints {teacher_points} and student checkpoints {student_points} "
            "must be paired one to one; pass teacher_points/student_points of equal length."
        )
    stage_names = [name for name, _ in teacher.named_children()]
    unknown = [name for name in teacher_points if name not in stage_names]
    if unknown:
        raise ValueError(f"Teacher checkpoints {unknown} are not stages of the teacher: {stage_names}.")
    teacher_channels = checkpoint_channels(teacher, teacher_points, input_shape)
    student_channels = checkpoint_channels(student, student_points, input_shape)
    wanted = {t: student_channels[s] for t, s in zip(teacher_points, student_points)}
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    adapted_points = []
    for name, module in teacher.named_children():
        stages[name] = module
        if name not in wanted:
            continue
        if teacher_channels[name] == wanted[name]:
            adapted_points.append(name)
            continue
        stages[f"{name}_reduce"] = conv1x1_bn_relu(teacher_channels[name], wanted[name])
        stages[f"{name}_restore"] = conv1x1_bn_relu(wanted[name], teacher_channels[name])
        adapted_points.append(f"{name}_reduce")
    adapted = ZooModel(
        stages, feature_points=adapted_points, min_input_size=getattr(teacher, "min_input_size", None)
    )
    adapted.arch = f"{getattr(teacher, 'arch', type(teacher).__name__)}+adapters"
    adapted.num_classes = getattr(teacher, "num_classes", None)
    return adapted.to(next(teacher.parameters()).device)


def check_channels(
    teacher: nn.Module,
    student: nn.Module,
    teacher_points: Sequence[str],
    student_points: Sequence[str],
    input_shape: Sequence[int],
) -> None:
    """Raise a ValueError naming the checkpoints whose channel counts differ, suggesting the adapters."""
    teacher_channels = checkpoint_channels(teacher, teacher_points, input_shape)
    student_channels = checkpoint_channels(student, student_points, input_shape)
    mismatched = [
        f"{t} ({teacher_channels[t]}) vs {s} ({student_channels[s]})"
        for t, s in zip(teacher_points, student_points)
        if teacher_channels[t] != student_channels[s]
    ]
    if mismatched:
        raise ValueError(
            "FSP matrices need equal channel counts at paired checkpoints, but teacher vs student differ at: "
            + "; ".join(mismatched) + ". Reduce the teacher's channels with 1x1-conv adapters: "
            "adapt_teacher(teacher, student, input_shape), fine-tune it, then distil from it."
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The distiller
# ----------------------------------------------------------------------------------------------------


class CrossLayerDistiller(Distiller):
    """The paper's method as one :class:`~kdbook_utils.train.Distiller` with two training phases.

    * Phase A, ``"gram"`` (``gram_epochs`` epochs at ``gram_lr``): the only loss is ``{"gram": L_G}``
      between the student's cross-layer matrices and the ensemble's. The student's logits are returned so
      accuracy can be logged; its classifier gets no gradient.
    * Phase B, ``"task"`` (the ``epochs`` given to ``fit``): ``{"ce": CE, "kl": L_KL}``;
      ``use_kl=False`` drops the KL (P1 alone); ``gram_in_task_phase=True`` keeps ``L_G`` too.

    :func:`~kdbook_utils.train.fit` starts each phase with a fresh optimiser, so the momentum is reset at
    the switch, as in FSP. ``teachers`` is one frozen model or several of one architecture (P3), combined
    each step by ``ensemble`` (:func:`ensemble_weights`). Checkpoints are paired by position,
    ``student_points[i]`` with ``teacher_points[i]`` (default: each model's ``feature_points``). With
    ``input_shape`` the channel counts are checked at once. ``snapshot_images`` (a fixed batch) makes the
    distiller record the student's mean Gram matrices at the start of every epoch in ``snapshots``.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | Sequence[nn.Module],
        *,
        gram_epochs: int = 0,
        gram_lr: float | None = None,
        k: int = 3,
        mode: str = "cumulative",
        use_kl: bool = True,
        kl_mode: str = "forward",
        temperature: float = 1.0,
        ensemble: str = "mean",
        gram_weight: float = DEFAULT_GRAM_WEIGHT,
        gram_in_task_phase: bool = False,
        pool: str = "max",
        student_points: Sequence[str] | None = None,
        teacher_points: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        seed: int = 0,
        snapshot_images: Tensor | None = None,
    ) -> None:
        super().__init__(student, teachers)
        if not len(self.teachers):
            raise ValueError("CrossLayerDistiller needs at least one teacher.")
        for name, value, valid in (
            ("mode", mode, PAIR_MODES),
            ("kl_mode", kl_mode, KL_MODES),
            ("ensemble", ensemble, ENSEMBLE_MODES),
            ("pool", pool, POOL_MODES),
        ):
            _choice(name, value, valid)  # fmt: skip
        if isinstance(gram_epochs, bool) or not isinstance(gram_epochs, int) or gram_epochs < 0:
            raise ValueError(
                f"gram_epochs must be a whole number of epochs (0 skips phase A); got {gram_epochs!r}."
            )
        self.student_points = list(student_points or student.feature_points)
        self.teacher_points = list(teacher_points or self.teacher.feature_points)
        if len(self.student_points) != len(self.teacher_points):
            raise ValueError(
                f"Student checkpoints {self.student_points} and teacher checkpoints {self.teacher_points} "
                "are paired by position and must be as many; pass student_points/teacher_points."
            )
        self.pairs = cross_layer_pairs(self.student_points, k, mode)
        to_teacher = dict(zip(self.student_points, self.teacher_points))
        self.teacher_pairs = [(to_teacher[a], to_teacher[b]) for a, b in self.pairs]
        if input_shape is not None:
            for teacher in self.teachers:
                check_channels(teacher, student, self.teacher_points, self.student_points, input_shape)
        self.gram_epochs, self.gram_lr = gram_epochs, gram_lr
        self.k, self.mode, self.use_kl, self.kl_mode = k, mode, use_kl, kl_mode
        self.temperature, self.ensemble, self.gram_weight = temperature, ensemble, gram_weight
        self.gram_in_task_phase, self.pool = gram_in_task_phase, pool
        self.generator = torch.Generator().manual_seed(seed)
        self.snapshot_images = snapshot_images
        self.snapshots: list[dict] = []
        self.phase = "task"

    def training_phases(self, epochs: int, lr: float) -> list[TrainingPhase]:
        phase_b = TrainingPhase("task", epochs, lr)
        if self.gram_epochs == 0:
            return [phase_b]
        return [TrainingPhase("gram", self.gram_epochs, self.gram_lr or lr), phase_b]

    def set_phase(self, phase: str) -> None:
        """Switch between phase A (``"gram"``) and phase B (``"task"``)."""
        _choice("phase", phase, PHASES)
        self.phase = phase

    def on_batch_start(self, epoch: int, batch: int) -> None:
        super().on_batch_start(epoch, batch)
        if batch == 0 and self.snapshot_images is not None:
            self.record_snapshot()

    @torch.no_grad()
    def record_snapshot(self) -> dict:
        """Append the student's Gram matrices on ``snapshot_images`` (eval mode, batch mean) to
        ``snapshots``, labelled with the phase and the epochs of it done so far. ``fit`` takes one at the
        start of every epoch; call it once more after training for the final state."""
        if self.snapshot_images is None:
            raise ValueError("Pass snapshot_images=... (a fixed batch) to record Gram-matrix snapshots.")
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        try:
            with FeatureExtractor(self.student, self.student_points) as extractor:
                features = extractor(self.snapshot_images.to(device))
        finally:
            self.student.train(was_training)
        grams = {
            pair: gram.mean(0).cpu() for pair, gram in fsp_matrices(features, self.pairs, self.pool).items()
        }
        done = sum(1 for snapshot in self.snapshots if snapshot["phase"] == self.phase)
        snapshot = {"phase": self.phase, "epoch": done, "grams": grams}
        self.snapshots.append(snapshot)
        return snapshot

    @torch.no_grad()
    def teacher_targets(
        self, images: Tensor, labels: Tensor, need_grams: bool, need_probs: bool
    ) -> tuple[dict[Pair, Tensor], Tensor | None]:
        """This step's ensemble targets: Gram matrices keyed by *student* pair, and probabilities."""
        weights = ensemble_weights(len(self.teachers), self.ensemble, self.generator)
        used = [index for index, weight in enumerate(weights.tolist()) if weight > 0]
        layers = self.teacher_points if need_grams else ()
        grams: list[dict[Pair, Tensor]] = []
        probs: list[Tensor] = []
        for index in used:
            logits, features = self.teacher_outputs(images, labels, index=index, layers=layers)
            if need_grams:
                by_teacher_pair = fsp_matrices(features, self.teacher_pairs, self.pool)
                grams.append({p: by_teacher_pair[tp] for p, tp in zip(self.pairs, self.teacher_pairs)})
            probs.append(F.softmax(logits.float() / self.temperature, dim=1))
        used_weights = weights[used]
        gram_target = (
            {p: weighted_mean([g[p] for g in grams], used_weights) for p in self.pairs} if need_grams else {}
        )
        return gram_target, (weighted_mean(probs, used_weights) if need_probs else None)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        need_grams = self.phase == "gram" or self.gram_in_task_phase
        need_probs = self.phase == "task" and self.use_kl
        if need_grams:
            with FeatureExtractor(self.student, self.student_points) as extractor:
                logits, features = extractor.forward_with_features(images)
        else:
            logits, features = self.student(images), {}
        losses: dict[str, Tensor] = {}
        gram_target, prob_target = {}, None
        if need_grams or need_probs:
            gram_target, prob_target = self.teacher_targets(images, labels, need_grams, need_probs)
        if self.phase == "task":
            losses["ce"] = F.cross_entropy(logits, labels)
            if prob_target is not None:
                losses["kl"] = kl_loss(logits, prob_target, self.kl_mode, self.temperature)
        if need_grams:
            losses["gram"] = gram_loss(
                fsp_matrices(features, self.pairs, self.pool), gram_target, self.gram_weight
            )
        return logits, losses
