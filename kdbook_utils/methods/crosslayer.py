"""Cross-layer FSP distillation with a KL term and an offline teacher ensemble (Chou, Chiu, Liao 2021).

Chou, Chiu and Liao, "Deep neural network compression with knowledge distillation using cross-layer
matrix, KL divergence and offline ensemble", APSIPA Trans. Signal and Information Processing 10, e18
(2021). Only the abstract and the figure/table captions are public, so everything below is the
reconstruction of the kdbook spec (§1.3); each open choice is a keyword argument whose default is the
spec's recommendation (its ambiguity register C1-C10 is repeated in the lesson notebook).

The method has three parts, P1-P3 in the paper's Tables 13-15:

* **P1, cross-layer matrices.** FSP (Yim et al., CVPR 2017) summarises how a network transforms one
  feature map into the next by a Gram matrix between two checkpoints, ``G[i, j] = mean_{s,t} F_a[i,s,t]
  F_b[j,s,t]``. Chou et al. also pair checkpoints that are two or three stages apart ("cross k layers");
  :func:`cross_layer_pairs` lists the pairs and :func:`fsp_matrix` computes one matrix.
* **P2, KL divergence** from deep mutual learning (Zhang et al., CVPR 2018), used offline: the frozen
  teacher's softmax (no temperature) is the target of ``KL(p_T || p_S)`` (:func:`kl_loss`).
* **P3, an offline ensemble** of K frozen teachers combined by a "stochastic mean"
  (:func:`ensemble_weights`): by default the mean of their probabilities and of their Gram matrices.

Training follows FSP's two phases (:func:`train_cross_layer`): phase A fits the student's Gram matrices
to the teachers' (:func:`gram_loss` only), phase B trains on the task with cross-entropy + KL.
Channel counts must agree at paired checkpoints; :func:`adapt_teacher` inserts 1x1-convolution
adapters on the teacher side when they do not (spec §1.3.8), and chaining teachers
(ResNet-50 -> ResNet-18 -> ResNet-10) is just two calls of the same training function.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.train import Distiller

Pair = tuple[str, str]

PAIR_MODES: tuple[str, ...] = ("cumulative", "exact")
POOL_MODES: tuple[str, ...] = ("max", "avg")
KL_MODES: tuple[str, ...] = ("forward", "symmetric")
ENSEMBLE_MODES: tuple[str, ...] = ("mean", "random_teacher", "random_weights")
PHASES: tuple[str, ...] = ("gram", "task")

#: The spec's Gram-loss scale (C3): ``1e-3 * 1/2 * ||G_T - G_S||_F^2`` per pair, the TF base's FSP scale.
DEFAULT_GRAM_WEIGHT = 1e-3


# ----------------------------------------------------------------------------------------------------
# P1: FSP / cross-layer matrices
# ----------------------------------------------------------------------------------------------------


def cross_layer_pairs(points: Sequence[str], k: int, mode: str = "cumulative") -> list[Pair]:
    """The checkpoint pairs of "cross ``k`` layers" (spec §1.3.3, ambiguity C1).

    With checkpoints ``c_0 ... c_{M-1}`` (in forward order):

    * ``mode="exact"``: the pairs exactly ``k`` apart, ``{(c_i, c_{i+k})}``. ``k = 1`` is plain FSP.
    * ``mode="cumulative"`` (REC): every pair at most ``k`` apart, ``P_1 U ... U P_k``, so cross-3 on a
      ResNet with 4 checkpoints is all 6 pairs: "more features" than FSP, as the abstract promises.

    Pairs come ordered by span, then by position: ``cross_layer_pairs("abcd", 2)`` is
    ``[("a","b"), ("b","c"), ("c","d"), ("a","c"), ("b","d")]``.
    """
    points = list(points)
    if mode not in PAIR_MODES:
        raise ValueError(f"Unknown pair mode {mode!r}; choose one of {PAIR_MODES}.")
    if len(set(points)) != len(points):
        raise ValueError(f"Checkpoint names must be distinct, got {points}.")
    if len(points) < 2:
        raise ValueError(f"Cross-layer pairs need at least two checkpoints, got {points}.")
    largest = len(points) - 1
    if not isinstance(k, int) or not 1 <= k <= largest:
        raise ValueError(f"k must be an integer from 1 to {largest} for {len(points)} checkpoints, got {k!r}.")
    spans = range(1, k + 1) if mode == "cumulative" else [k]
    return [(points[i], points[i + span]) for span in spans for i in range(len(points) - span)]


def fsp_matrix(a: Tensor, b: Tensor, pool: str = "max") -> Tensor:
    """The FSP (Gram) matrix between two feature maps, ``(B, C_a, C_b)`` (spec §1.3.2, Yim et al. 2017).

    ``G[n, i, j] = 1/(H*W) * sum_{s,t} A[n, i, s, t] * B[n, j, s, t]``

    where the larger map is first pooled down to the smaller one's ``H x W`` (spec §1.3.4, C2): adaptive
    max-pool by default (the TF base and torchdistill), adaptive average pool with ``pool="avg"``
    (RepDistiller). ``H*W`` is the size after pooling. The maps may have different channel counts.
    """
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"fsp_matrix needs two (B, C, H, W) feature maps, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"The two maps must come from the same batch, got batch sizes {a.shape[0]} and "
                         f"{b.shape[0]}.")
    if pool not in POOL_MODES:
        raise ValueError(f"Unknown pool {pool!r}; choose one of {POOL_MODES}.")
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a, b = _pool_to(a, size, pool), _pool_to(b, size, pool)
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (size[0] * size[1])


def _pool_to(feature_map: Tensor, size: tuple[int, int], pool: str) -> Tensor:
    if tuple(feature_map.shape[2:]) == size:
        return feature_map
    if pool == "max":
        return F.adaptive_max_pool2d(feature_map, size)
    return F.adaptive_avg_pool2d(feature_map, size)


def fsp_matrices(features: Mapping[str, Tensor], pairs: Iterable[Pair], pool: str = "max") -> dict[Pair, Tensor]:
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
    """Gram-matching loss, summed over pairs (spec §1.3.5, ambiguity C3).

    ``L_G = w * sum_{(a,b)} mean_n [ 1/2 * || G_T^{ab}[n] - G_S^{ab}[n] ||_F^2 ]``, ``w = 1e-3`` by default.

    ``student`` and ``teacher`` map the same pairs to ``(B, C_a, C_b)`` matrices. The teacher matrices
    are targets (pass them computed without gradient). Unequal shapes mean the checkpoints have unequal
    channel counts, which FSP cannot compare: put 1x1-conv adapters on the teacher (:func:`adapt_teacher`).
    """
    if set(student) != set(teacher):
        raise ValueError(f"Student and teacher Gram matrices cover different pairs: {sorted(student)} vs "
                         f"{sorted(teacher)}.")
    if not student:
        raise ValueError("gram_loss needs at least one pair.")
    total = None
    for pair, student_gram in student.items():
        teacher_gram = teacher[pair]
        if student_gram.shape != teacher_gram.shape:
            raise ValueError(
                f"Gram matrices for pair {pair} differ in shape: student {tuple(student_gram.shape)}, teacher "
                f"{tuple(teacher_gram.shape)}. FSP needs equal channel counts at each checkpoint; reduce the "
                "teacher's channels with 1x1-conv adapters (adapt_teacher(teacher, student, ...))."
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
    """Offline-DML KL term between teacher and student distributions (spec §1.3.6, ambiguity C4).

    ``mode="forward"`` (REC, DML's own formula): ``L = mean_n sum_c p_T log(p_T / p_S)``, i.e. KL(p_T||p_S).
    ``mode="symmetric"`` (the TF base): ``1/2 [KL(p_T||p_S) + KL(p_S||p_T)]``.

    ``teacher_probs`` are probabilities (an ensemble's mean is taken in probability space) computed at
    the same ``temperature``; the student's are ``softmax(z_S / T)``. DML uses no temperature (T = 1,
    the default); for T != 1 the loss is multiplied by ``T**2`` as in Hinton et al., so that its gradient
    keeps its scale.
    """
    if mode not in KL_MODES:
        raise ValueError(f"Unknown KL mode {mode!r}; choose one of {KL_MODES}.")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} must have the same shape.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
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


def ensemble_weights(num_teachers: int, mode: str = "mean", generator: torch.Generator | None = None) -> Tensor:
    """This step's convex weights over ``num_teachers`` teachers (spec §1.3.7, ambiguity C5).

    * ``"mean"`` (REC): ``1/K`` each. With forward KL and the squared Gram loss, the loss against the mean
      target has the same student gradient as the mean of the per-teacher losses (spec §4.4).
    * ``"random_teacher"``: a one-hot vector, one teacher drawn uniformly per step (same target in
      expectation).
    * ``"random_weights"``: Dirichlet(1, ..., 1) weights drawn per step.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"Unknown ensemble mode {mode!r}; choose one of {ENSEMBLE_MODES}.")
    if num_teachers < 1:
        raise ValueError(f"The ensemble needs at least one teacher, got {num_teachers}.")
    if mode == "mean":
        return torch.full((num_teachers,), 1.0 / num_teachers)
    if mode == "random_teacher":
        chosen = torch.randint(num_teachers, (1,), generator=generator)
        return F.one_hot(chosen, num_teachers).squeeze(0).float()
    # Normalised independent Exp(1) draws are Dirichlet(1, ..., 1).
    draws = torch.empty(num_teachers).exponential_(generator=generator)
    return draws / draws.sum()


def weighted_mean(per_teacher: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_k w_k x_k``: the ensemble target from per-teacher tensors of one shape."""
    if len(per_teacher) != len(weights):
        raise ValueError(f"Got {len(per_teacher)} tensors but {len(weights)} weights.")
    return sum(w * x for w, x in zip(weights.tolist(), per_teacher))


# ----------------------------------------------------------------------------------------------------
# Feature reading (forward hooks, see kdbook_utils.features)
# ----------------------------------------------------------------------------------------------------


def checkpoint_channels(model: nn.Module, points: Sequence[str], input_shape: Sequence[int]) -> dict[str, int]:
    """Channel count of each checkpoint of ``model`` for inputs of ``input_shape`` = ``(C, H, W)``."""
    from kdbook_utils.features import FeatureExtractor

    with FeatureExtractor(model, list(points)) as extractor:
        shapes = extractor.feature_shapes(input_shape)
    return {name: int(shapes[name][0]) for name in points}


# ----------------------------------------------------------------------------------------------------
# 1x1-convolution adapters for channel mismatch (spec §1.3.8, ambiguity C6)
# ----------------------------------------------------------------------------------------------------


def conv1x1_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 convolution + BatchNorm + ReLU: changes the channel count, keeps the spatial size."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


def adapt_teacher(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: Sequence[int],
    teacher_points: Sequence[str] | None = None,
    student_points: Sequence[str] | None = None,
) -> nn.Module:
    """A copy of the teacher's layout with 1x1-conv channel adapters where checkpoints disagree (C6, REC).

    After each teacher checkpoint whose channel count ``C_T`` differs from the student's ``C_S``, two new
    stages are inserted into the forward path: ``<point>_reduce`` (1x1 conv + BN + ReLU, ``C_T -> C_S``,
    the paper's "1x1 convolutional layers to decrease channels") and ``<point>_restore`` (``C_S -> C_T``)
    so that the next teacher stage still receives ``C_T`` channels. The Gram matrices then read the
    reduced maps. The result shares the teacher's stage modules (the teacher itself is left unchanged
    but its weights are now the adapted model's too); fine-tune it with cross-entropy so the reduced
    features stay task-relevant, then freeze it (:func:`finetune_adapted_teacher`). Its
    ``feature_points`` are the checkpoints to pair with the student's.
    """
    from kdbook_utils.models import ZooModel

    if not isinstance(teacher, nn.Sequential):
        raise TypeError("adapt_teacher needs a zoo model (an nn.Sequential of named stages).")
    teacher_points = list(teacher_points or teacher.feature_points)
    student_points = list(student_points or student.feature_points)
    if len(teacher_points) != len(student_points):
        raise ValueError(f"Teacher checkpoints {teacher_points} and student checkpoints {student_points} "
                         "must be paired one to one; pass teacher_points/student_points of equal length.")
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
    adapted = ZooModel(stages, feature_points=adapted_points)
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
    """Raise a ValueError naming the checkpoints whose channel counts differ, suggesting the adapter."""
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
            + "; ".join(mismatched)
            + ". Reduce the teacher's channels with 1x1-conv adapters: teacher = adapt_teacher(teacher, "
            "student, input_shape), fine-tune it with finetune_adapted_teacher(...), then distil from it."
        )


# ----------------------------------------------------------------------------------------------------
# A per-image cache of the teachers' outputs (un-augmented training data only)
# ----------------------------------------------------------------------------------------------------


class TeacherFeatureCache:
    """Every teacher's logits and checkpoint features for every image of a data set, computed once.

    A frozen teacher in eval mode gives the same outputs for the same image, so when the training loader
    does not augment, the outputs can be computed in one pass and looked up: a sweep of many students
    against the same K teachers (the ablation tables) then runs no teacher forward at all while training.
    :meth:`attach` names the training loader; during :func:`~kdbook_utils.train.fit` the distiller
    learns each batch's (epoch, batch) position through ``on_batch_start`` and the cache finds the images
    of that batch from the loader's epoch plan (it checks their labels, so a mismatch cannot go unnoticed).
    With augmentation the teachers must see each augmented batch, so there is no cache: run them live.
    """

    def __init__(self, teachers: Sequence[nn.Module], dataset: object, points: Sequence[str],
                 batch_size: int = 256, device: str | torch.device = "cpu") -> None:
        from kdbook_utils.data import TensorLoader
        from kdbook_utils.features import FeatureExtractor

        self.teachers = list(teachers)
        self.dataset = dataset
        self.points = list(points)
        in_order = TensorLoader(dataset, batch_size, train=False, device=device)
        self.logits: list[Tensor] = []
        self.features: list[dict[str, Tensor]] = []
        for teacher in self.teachers:
            teacher.eval()
            logits, features = [], {point: [] for point in self.points}
            with torch.no_grad(), FeatureExtractor(teacher, self.points) as extractor:
                for images, _ in in_order:
                    batch_logits, batch_features = extractor.forward_with_features(images)
                    logits.append(batch_logits)
                    for point in self.points:
                        features[point].append(batch_features[point].contiguous())
            self.logits.append(torch.cat(logits))
            self.features.append({point: torch.cat(maps) for point, maps in features.items()})
        self.labels = in_order.labels
        self.loader = None
        self._orders: dict[int, Tensor] = {}

    def attach(self, loader: object) -> TeacherFeatureCache:
        """Serve the batches of ``loader`` (a ``TensorLoader`` over the same data, without augmentation)."""
        if loader.augment:
            raise ValueError("The teacher cache needs a training loader without augmentation (augment=False): "
                             "augmented images change every epoch, so the teachers must run on each batch.")
        if len(loader.dataset) != len(self.labels) or loader.dataset.digest() != self.dataset.digest():
            raise ValueError("The loader serves other images than the cache was built from.")
        self.loader, self._orders = loader, {}
        return self

    def batch_indices(self, batch: int) -> Tensor:
        """Positions in the data set of the images of batch ``batch`` of the loader's current epoch.

        ``iter(loader)`` runs epoch ``loader.epoch`` and then advances the counter, so while an epoch runs
        its number is ``loader.epoch - 1``, however many ``fit`` calls (phases) came before.
        """
        if self.loader is None:
            raise RuntimeError("Attach the training loader first: cache.attach(train_loader).")
        epoch = self.loader.epoch - 1
        if epoch not in self._orders:
            self._orders = {epoch: self.loader.epoch_plan(epoch).order.to(self.labels.device)}
        start = batch * self.loader.batch_size
        return self._orders[epoch][start : start + self.loader.batch_size]

    def lookup(self, teacher_index: int, batch: int, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher ``teacher_index``'s logits and features for batch ``batch`` of the current epoch."""
        indices = self.batch_indices(batch)
        if len(indices) != len(labels) or not torch.equal(self.labels[indices], labels.to(self.labels.device)):
            raise RuntimeError(
                f"The cached batch {batch} of epoch {self.loader.epoch - 1} has other labels than the batch being "
                "trained on: train with the loader the cache is attached to (cache.attach(loader))."
            )
        device = labels.device
        features = {point: maps[indices].to(device) for point, maps in self.features[teacher_index].items()}
        return self.logits[teacher_index][indices].to(device), features


# ----------------------------------------------------------------------------------------------------
# The distiller
# ----------------------------------------------------------------------------------------------------


class CrossLayerDistiller(Distiller):
    """Chou et al.'s method as one :class:`~kdbook_utils.train.Distiller` with two phases.

    * ``phase="gram"`` (phase A): the only loss is ``{"gram": L_G}`` between the student's cross-layer
      matrices and the ensemble's; the student's logits are still returned so accuracy can be logged
      (the classifier gets no gradient).
    * ``phase="task"`` (phase B): ``{"ce": CE, "kl": L_KL}``; ``use_kl=False`` drops the KL (P1 alone),
      ``gram_in_task_phase=True`` keeps ``L_G`` too (ambiguity C8, off by default).

    ``teachers`` is one frozen model or a list of frozen models of the same architecture (P3);
    ``ensemble`` picks how they are combined each step (:func:`ensemble_weights`). Checkpoints are paired
    by position: ``student_points[i]`` with ``teacher_points[i]`` (default: each model's
    ``feature_points``). Set ``phase`` with :meth:`set_phase`. With ``input_shape`` the channel counts
    are checked at once (a mismatch raises and suggests :func:`adapt_teacher`).

    ``cache`` (a :class:`TeacherFeatureCache` built from these teachers) serves the teachers' outputs
    while :func:`~kdbook_utils.train.fit` trains; ``snapshot_images`` (a fixed batch) makes the distiller
    record the student's mean Gram matrices at the start of every epoch in ``snapshots``.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | Sequence[nn.Module],
        *,
        k: int = 3,
        mode: str = "cumulative",
        phase: str = "gram",
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
        cache: TeacherFeatureCache | None = None,
        snapshot_images: Tensor | None = None,
    ) -> None:
        teacher_list = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        if not teacher_list:
            raise ValueError("CrossLayerDistiller needs at least one teacher.")
        super().__init__(student, teacher=None)
        self.teachers = nn.ModuleList(teacher_list)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        for name, value, valid in (("mode", mode, PAIR_MODES), ("kl_mode", kl_mode, KL_MODES),
                                   ("ensemble", ensemble, ENSEMBLE_MODES), ("pool", pool, POOL_MODES)):
            if value not in valid:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {valid}.")
        self.student_points = list(student_points or student.feature_points)
        self.teacher_points = list(teacher_points or teacher_list[0].feature_points)
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
        self.k, self.mode, self.use_kl, self.kl_mode = k, mode, use_kl, kl_mode
        self.temperature, self.ensemble, self.gram_weight = temperature, ensemble, gram_weight
        self.gram_in_task_phase, self.pool = gram_in_task_phase, pool
        self.generator = torch.Generator().manual_seed(seed)
        if cache is not None and (
            len(cache.teachers) < len(self.teachers)
            or any(c is not t for c, t in zip(cache.teachers, self.teachers))
            or list(cache.points) != self.teacher_points
        ):
            raise ValueError("The cache must be built from these teachers (the first K of its list, in order) "
                             f"at the checkpoints {self.teacher_points}.")
        self.cache = cache
        self._position: tuple[int, int] | None = None
        self.snapshot_images = snapshot_images
        self.snapshots: list[dict] = []
        self.phase = ""
        self.set_phase(phase)

    def set_phase(self, phase: str) -> CrossLayerDistiller:
        """Switch between phase A (``"gram"``) and phase B (``"task"``)."""
        if phase not in PHASES:
            raise ValueError(f"Unknown phase {phase!r}; choose one of {PHASES}.")
        self.phase = phase
        return self

    def train(self, mode: bool = True) -> CrossLayerDistiller:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        return self

    def on_batch_start(self, epoch: int, batch: int) -> None:
        """Remember the batch's position (for the cache); snapshot the Gram matrices at each epoch start."""
        self._position = (epoch, batch)
        if batch == 0 and self.snapshot_images is not None:
            self.record_snapshot(epoch)

    @torch.no_grad()
    def record_snapshot(self, epoch: int) -> dict:
        """Append the student's Gram matrices on ``snapshot_images`` (eval mode, sample mean) to ``snapshots``.

        Called at the start of every epoch while training (so entry ``e`` shows the student after ``e``
        epochs of this phase); call it once more after training for the final state.
        """
        if self.snapshot_images is None:
            raise ValueError("Pass snapshot_images=... (a fixed batch) to record Gram-matrix snapshots.")
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        _, features = self._student_forward(self.snapshot_images.to(device), with_features=True)
        self.student.train(was_training)
        grams = {pair: gram.mean(0).cpu() for pair, gram in fsp_matrices(features, self.pairs, self.pool).items()}
        snapshot = {"phase": self.phase, "epoch": epoch, "grams": grams}
        self.snapshots.append(snapshot)
        return snapshot

    def _student_forward(self, images: Tensor, with_features: bool) -> tuple[Tensor, dict[str, Tensor]]:
        if not with_features:
            return self.student(images), {}
        from kdbook_utils.features import FeatureExtractor

        with FeatureExtractor(self.student, self.student_points) as extractor:
            return extractor.forward_with_features(images)

    def _teacher_outputs(
        self, index: int, images: Tensor, need_features: bool, position: tuple[int, int] | None, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher ``index``'s logits (and checkpoint features) for this batch: cached or computed."""
        if position is not None:
            return self.cache.lookup(index, position[1], labels)
        teacher = self.teachers[index]
        if not need_features:
            return teacher(images), {}
        from kdbook_utils.features import FeatureExtractor

        with FeatureExtractor(teacher, self.teacher_points) as extractor:
            return extractor.forward_with_features(images)

    @torch.no_grad()
    def teacher_targets(
        self, images: Tensor, labels: Tensor, need_grams: bool, need_probs: bool
    ) -> tuple[dict[Pair, Tensor], Tensor | None]:
        """This step's ensemble targets: Gram matrices keyed by *student* pair, and probabilities."""
        position = self._position if (self.cache is not None and self.training) else None
        self._position = None  # a position is used once: a forward outside fit computes live
        weights = ensemble_weights(len(self.teachers), self.ensemble, self.generator)
        used = [index for index, weight in enumerate(weights.tolist()) if weight > 0]
        grams: list[dict[Pair, Tensor]] = []
        probs: list[Tensor] = []
        for index in used:
            logits, features = self._teacher_outputs(index, images, need_grams, position, labels)
            if need_grams:
                by_teacher_pair = fsp_matrices(features, self.teacher_pairs, self.pool)
                grams.append({p: by_teacher_pair[tp] for p, tp in zip(self.pairs, self.teacher_pairs)})
            probs.append(F.softmax(logits.float() / self.temperature, dim=1))
        used_weights = weights[used]
        gram_target = {p: weighted_mean([g[p] for g in grams], used_weights) for p in self.pairs} if need_grams else {}
        prob_target = weighted_mean(probs, used_weights) if need_probs else None
        return gram_target, prob_target

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        need_grams = self.phase == "gram" or self.gram_in_task_phase
        need_probs = self.phase == "task" and self.use_kl
        logits, features = self._student_forward(images, with_features=need_grams)
        losses: dict[str, Tensor] = {}
        gram_target, prob_target = {}, None
        if need_grams or need_probs:
            gram_target, prob_target = self.teacher_targets(images, labels, need_grams, need_probs)
        if self.phase == "task":
            losses["ce"] = F.cross_entropy(logits, labels)
            if need_probs:
                losses["kl"] = kl_loss(logits, prob_target, self.kl_mode, self.temperature)
        if need_grams:
            student_grams = fsp_matrices(features, self.pairs, self.pool)
            losses["gram"] = gram_loss(student_grams, gram_target, self.gram_weight)
        return logits, losses


# ----------------------------------------------------------------------------------------------------
# Training procedures
# ----------------------------------------------------------------------------------------------------


def train_cross_layer(
    student: nn.Module,
    teachers: nn.Module | Sequence[nn.Module],
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    gram_epochs: int,
    task_epochs: int,
    lr: float,
    gram_lr: float | None = None,
    progress: bool = True,
    desc: str = "cross-layer KD",
    device: str | torch.device | None = None,
    **distiller_options: object,
) -> tuple[pd.DataFrame, CrossLayerDistiller]:
    """Chou et al.'s full procedure (spec §1.3.10): phase A (Gram only), then phase B (CE + KL).

    Each phase is one call of :func:`kdbook_utils.train.fit`, which builds a fresh optimiser, so the
    momentum buffers are reset at the switch as the spec prescribes. ``gram_epochs=0`` skips phase A.
    ``distiller_options`` go to :class:`CrossLayerDistiller` (``k``, ``mode``, ``use_kl``, ``ensemble``...).
    Returns ``(history, method)``: the two histories stacked with a ``phase`` column, and the distiller
    (whose ``snapshots`` hold the student's Gram matrices per epoch if ``snapshot_images`` was given).
    """
    from kdbook_utils.train import fit

    method = CrossLayerDistiller(student, teachers, **distiller_options)
    histories = []
    for phase, epochs, phase_lr in (("gram", gram_epochs, gram_lr or lr), ("task", task_epochs, lr)):
        if epochs <= 0:
            continue
        method.set_phase(phase)
        history = fit(method, train_loader, val_loader, epochs=epochs, lr=phase_lr, progress=progress, device=device,
                      desc=f"{desc}, phase {'A (Gram)' if phase == 'gram' else 'B (task)'}")
        histories.append(history.assign(phase=phase))
        if method.snapshot_images is not None:
            method.record_snapshot(epochs)  # the state at the end of the phase
    return pd.concat(histories, ignore_index=True), method


def finetune_adapted_teacher(
    adapted_teacher: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    epochs: int,
    lr: float,
    progress: bool = True,
) -> pd.DataFrame:
    """Fine-tune a teacher with its 1x1 adapters on cross-entropy, then freeze it (spec §1.3.8, C6).

    The whole adapted teacher trains, so its later stages learn to read the reduced features and the
    reduced maps stay task-relevant. Afterwards it is put in eval mode with gradients off.
    """
    from kdbook_utils.train import fit

    adapted_teacher.requires_grad_(True)
    history = fit(adapted_teacher, train_loader, val_loader, epochs=epochs, lr=lr, progress=progress)
    adapted_teacher.eval()
    adapted_teacher.requires_grad_(False)
    return history


# ----------------------------------------------------------------------------------------------------
# Ablation settings (the paper's Tables 4-15 as switches)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossLayerSettings:
    """One row of the ablation: which parts of the method are on.

    ``num_teachers=0`` is the student trained alone (CE only, same total epochs as phase B).
    """

    k: int = 3
    mode: str = "cumulative"
    use_kl: bool = True
    num_teachers: int = 3
    ensemble: str = "mean"
    kl_mode: str = "forward"

    @property
    def label(self) -> str:
        if self.num_teachers == 0:
            return "student alone"
        parts = [f"cross-{self.k}" + ("" if self.mode == "cumulative" else " (exact)")]
        if self.use_kl:
            parts.append("KL" if self.kl_mode == "forward" else "symmetric KL")
        parts.append(f"{self.num_teachers} teacher" + ("s" if self.num_teachers > 1 else ""))
        if self.num_teachers > 1 and self.ensemble != "mean":
            parts.append(self.ensemble.replace("_", " "))
        return " + ".join(parts)

    def replace(self, **changes: object) -> CrossLayerSettings:
        return replace(self, **changes)


STUDENT_ALONE = CrossLayerSettings(num_teachers=0)
P1 = CrossLayerSettings(k=3, use_kl=False, num_teachers=1)
P1_P2 = CrossLayerSettings(k=3, use_kl=True, num_teachers=1)
P1_P2_P3 = CrossLayerSettings(k=3, use_kl=True, num_teachers=3)


def ablation_grid(max_k: int = 3, max_teachers: int = 3) -> dict[str, list[CrossLayerSettings]]:
    """The settings behind each group of the paper's tables, sharing identical settings across groups.

    * "cross-k" (Tables 4-6): P1 with k = 1..max_k, one teacher.
    * "KL" (Tables 7-9): cross-max_k with and without the KL term, one teacher.
    * "teachers" (Tables 10-12): cross-max_k + KL with 1..max_teachers teachers.
    * "combinations" (Tables 13-15): P1, P1+P2, P1+P2+P3 (+ the student alone).
    """
    return {
        "cross-k": [STUDENT_ALONE] + [P1.replace(k=k) for k in range(1, max_k + 1)],
        "KL": [P1.replace(k=max_k), P1_P2.replace(k=max_k)],
        "teachers": [P1_P2.replace(k=max_k, num_teachers=n) for n in range(1, max_teachers + 1)],
        "combinations": [STUDENT_ALONE, P1.replace(k=max_k), P1_P2.replace(k=max_k),
                         P1_P2_P3.replace(k=max_k, num_teachers=max_teachers)],
    }


def unique_settings(groups: Mapping[str, Sequence[CrossLayerSettings]]) -> list[CrossLayerSettings]:
    """Every distinct setting of an ablation grid once, in first-seen order (each is trained once)."""
    return list(dict.fromkeys(itertools.chain.from_iterable(groups.values())))


def summarise(results: pd.DataFrame, settings: Sequence[CrossLayerSettings], metric: str = "accuracy") -> pd.DataFrame:
    """Mean +- std over seeds of ``metric`` for the given settings, one row each, in their order.

    ``results`` has one row per (setting label, seed) with columns ``setting`` and ``metric``.
    """
    labels = [s.label for s in settings]
    table = results[results["setting"].isin(labels)].groupby("setting")[metric].agg(["mean", "std", "count"])
    table = table.reindex(labels)
    table["mean +- std"] = [f"{m:.2f} +- {s:.2f}" for m, s in zip(table["mean"], table["std"].fillna(0.0))]
    table.index.name = "setting"
    return table.rename(columns={"count": "seeds"})


# ----------------------------------------------------------------------------------------------------
# Running the experiments of the lesson
# ----------------------------------------------------------------------------------------------------


def at_resolution(dataset: object, size: int) -> object:
    """A copy of an ``ImageDataset`` with its images resized to ``size x size`` (area interpolation).

    The quick preset trains on the scikit-learn digits at their native 8x8 (the data module upsamples
    them to 32x32 so every zoo model accepts them; area-downsampling back loses nothing).
    """
    import dataclasses

    images = F.interpolate(dataset.images.float(), size=(size, size), mode="area")
    return dataclasses.replace(dataset, images=images.round().clamp(0, 255).to(torch.uint8))


def train_teachers(
    arch: str,
    seeds: Sequence[int],
    train_data: object,
    test_data: object,
    *,
    preset: object,
    epochs: int,
    lr: float,
    batch_size: int,
    model_options: Mapping[str, object] | None = None,
    tag: str = "",
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[list[nn.Module], list[pd.DataFrame | None]]:
    """K teachers of one architecture, one per seed, each loaded from the cache or trained and cached.

    The ensemble of P3 needs independently trained teachers of the same architecture (spec §1.3.7). Each is
    trained with cross-entropy (augmented data, :func:`kdbook_utils.train.fit`) and cached by
    :func:`kdbook_utils.checkpoints.load_or_train` under a name with the arch, data set, preset, seed and
    ``tag`` (which must tell apart every other difference: model options, image size, epochs).
    Returns the frozen teachers (eval mode, no gradients) and their histories.
    """
    from kdbook_utils.checkpoints import checkpoint_path, load_or_train
    from kdbook_utils.data import TensorLoader
    from kdbook_utils.models import create_model
    from kdbook_utils.train import fit, seed_everything

    teachers, histories = [], []
    test_loader = TensorLoader(test_data, 256, train=False, device=device)
    for seed in seeds:
        seed_everything(seed)
        model = create_model(arch, train_data.num_classes, in_channels=int(train_data.images.shape[1]),
                             **dict(model_options or {}))
        train_loader = TensorLoader(train_data, batch_size, train=True, seed=seed, device=device,
                                    padding=max(1, train_data.images.shape[-1] // 8))
        path = checkpoint_path(arch, train_data.name, preset.name, seed, tag)

        def train(model: nn.Module, loader: object = train_loader, seed: int = seed) -> pd.DataFrame:
            return fit(model, loader, test_loader, epochs=epochs, lr=lr, progress=progress, device=device,
                       desc=f"teacher {arch} seed {seed}")

        model, history, loaded = load_or_train(model, path, train, recipe={"epochs": epochs, "lr": lr, "tag": tag})
        print(f"{'Loaded' if loaded else 'Trained and saved'} teacher {arch} seed {seed}: {path}")
        model.to(device).eval().requires_grad_(False)
        teachers.append(model)
        histories.append(history)
    return teachers, histories


def run_setting(
    setting: CrossLayerSettings,
    seed: int,
    *,
    make_student: object,
    teachers: Sequence[nn.Module],
    train_data: object,
    test_loader: Iterable,
    gram_epochs: int,
    task_epochs: int,
    lr: float,
    batch_size: int,
    gram_lr: float | None = None,
    cache: TeacherFeatureCache | None = None,
    augment: bool = True,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Train one student under ``setting`` with ``seed`` and return its test accuracy (a results row).

    ``make_student()`` builds a fresh student. The student alone gets ``gram_epochs + task_epochs`` epochs
    of cross-entropy, the same number of passes as a distilled student. With a ``cache`` the training
    loader does not augment (the cache's condition) and the teachers' outputs come from the cache.
    """
    import time

    from kdbook_utils.data import TensorLoader
    from kdbook_utils.train import evaluate, fit, seed_everything

    seed_everything(seed)
    student = make_student()
    loader = TensorLoader(train_data, batch_size, train=True, seed=seed, augment=augment and cache is None,
                          padding=max(1, train_data.images.shape[-1] // 8), device=device)
    started = time.perf_counter()
    if setting.num_teachers == 0:
        fit(student, loader, epochs=gram_epochs + task_epochs, lr=lr, progress=progress, device=device)
    else:
        if setting.num_teachers > len(teachers):
            raise ValueError(f"{setting.label} needs {setting.num_teachers} teachers; {len(teachers)} were given.")
        train_cross_layer(
            student, teachers[: setting.num_teachers], loader, gram_epochs=gram_epochs, task_epochs=task_epochs,
            lr=lr, gram_lr=gram_lr, progress=progress, input_shape=tuple(train_data.images.shape[1:]), device=device, k=setting.k, mode=setting.mode, use_kl=setting.use_kl,
            kl_mode=setting.kl_mode, ensemble=setting.ensemble, seed=seed,
            cache=None if cache is None else cache.attach(loader),
        )
    seconds = time.perf_counter() - started
    accuracy = 100 * evaluate(student, test_loader)["accuracy"]
    return {"setting": setting.label, "seed": seed, "accuracy": accuracy, "seconds": seconds}


def run_grid(
    settings: Sequence[CrossLayerSettings], seeds: Sequence[int], progress: bool = True, **run_options: object
) -> pd.DataFrame:
    """:func:`run_setting` for every setting and seed (each distinct setting once), one row per run."""
    from tqdm.auto import tqdm

    jobs = [(setting, seed) for setting in dict.fromkeys(settings) for seed in seeds]
    rows = [run_setting(setting, seed, **run_options)
            for setting, seed in tqdm(jobs, desc="students", unit="run", disable=not progress)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Figures of the lesson
# ----------------------------------------------------------------------------------------------------


def plot_pairs(points: Sequence[str], k: int, mode: str = "cumulative") -> object:
    """The checkpoints on a line and one arc per pair of "cross ``k`` layers" (the paper's Fig. 2)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Arc

    pairs = cross_layer_pairs(points, k, mode)
    fig, ax = plt.subplots(figsize=(1.6 * len(points) + 1, 2.4), layout="constrained")
    colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.8, len(points) - 1).tolist())
    for first, second in pairs:
        i, j = points.index(first), points.index(second)
        ax.add_patch(Arc(((i + j) / 2, 0), j - i, 0.9 * (j - i), theta1=0, theta2=180, lw=2,
                         color=colours[j - i - 1]))
    ax.scatter(range(len(points)), [0] * len(points), s=120, color="black", zorder=3)
    for index, name in enumerate(points):
        ax.annotate(name, (index, 0), xytext=(0, -16), textcoords="offset points", ha="center", va="top")
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_ylim(-0.45, 0.5 * (len(points) - 1) + 0.1)
    ax.set_axis_off()
    ax.set_title(f"cross {k} layer{'s' if k > 1 else ''}, {mode}: {len(pairs)} pair{'s' if len(pairs) > 1 else ''}")
    return fig


def pair_title(pair: Pair) -> str:
    return f"{pair[0]} x {pair[1]}"


@torch.no_grad()
def mean_grams(
    model: nn.Module, images: Tensor, points: Sequence[str], pairs: Sequence[Pair], pool: str = "max"
) -> dict[Pair, Tensor]:
    """A model's Gram matrices on a batch, averaged over the batch (eval mode): ``{pair: (C_a, C_b)}``.

    ``pairs`` name ``points`` by position in ``model``'s own checkpoint names.
    """
    from kdbook_utils.features import FeatureExtractor

    was_training = model.training
    model.eval()
    with FeatureExtractor(model, list(points)) as extractor:
        features = extractor(images)
    model.train(was_training)
    return {pair: gram.mean(0).cpu() for pair, gram in fsp_matrices(features, pairs, pool).items()}


def _teacher_scales(teacher_grams: Mapping[Pair, Tensor]) -> dict[Pair, float]:
    """Each pair's largest absolute teacher entry: pairs differ in scale by orders of magnitude."""
    return {pair: float(gram.abs().max()) or 1.0 for pair, gram in teacher_grams.items()}


def plot_gram_comparison(
    teacher_grams: Mapping[Pair, Tensor], student_grams: Mapping[Pair, Tensor], title: str = ""
) -> object:
    """Teacher (top row), student (middle row) and teacher - student (bottom row), one column per pair.

    Each pair's three matrices are divided by the largest absolute entry of the teacher's matrix (the
    pairs' raw scales differ by orders of magnitude), so one diverging colour scale serves every panel
    and 1 means "as large as the teacher's largest entry".
    """
    from kdbook_utils.plots import heatmap_grid

    pairs = list(teacher_grams)
    scale = _teacher_scales(teacher_grams)
    return heatmap_grid(
        [teacher_grams[p] / scale[p] for p in pairs] + [student_grams[p] / scale[p] for p in pairs]
        + [(teacher_grams[p] - student_grams[p]) / scale[p] for p in pairs],
        titles=[f"teacher {pair_title(p)}" for p in pairs] + [f"student {pair_title(p)}" for p in pairs]
        + [f"difference {pair_title(p)}" for p in pairs],
        ncols=len(pairs), cmap="RdBu_r", center=0.0, colorbar_label="G / max |G_teacher| (per pair)",
        suptitle=title or None, panel_size=2.0,
    )


def plot_gram_gap(teacher_grams: Mapping[Pair, Tensor], snapshot: Mapping[str, object]) -> object:
    """The difference teacher - student of each pair at one snapshot, on a fixed diverging scale.

    As in :func:`plot_gram_comparison` each pair is divided by its teacher matrix's largest absolute
    entry, and the colour scale is fixed to [-1, 1] for every snapshot, so the colours fade as training
    closes the gap.
    """
    from kdbook_utils.plots import heatmap_grid

    pairs = list(teacher_grams)
    scale = _teacher_scales(teacher_grams)
    gaps = [(teacher_grams[p] - snapshot["grams"][p]) / scale[p] for p in pairs]
    distance = sum(float(g.pow(2).sum()) for g in gaps) ** 0.5
    phase = "phase A (Gram)" if snapshot["phase"] == "gram" else "phase B (task)"
    return heatmap_grid(
        gaps, titles=[pair_title(p) for p in pairs], ncols=len(pairs), cmap="RdBu_r", vmin=-1.0, vmax=1.0,
        colorbar_label="(G_T - G_S) / max |G_T|",
        suptitle=f"{phase}, after {snapshot['epoch']} epoch(s): relative distance summed over pairs = {distance:.1f}",
        panel_size=2.0,
    )
