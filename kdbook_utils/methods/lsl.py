"""Layer Selectivity Learning (LSL): Li, Lin, Chen and Chiang, "Layer-Level Knowledge Distillation for Deep
Neural Network Learning", Applied Sciences 9(10) 1966 (2019), https://www.mdpi.com/2076-3417/9/10/1966.

LSL has two halves:

* **LSP, the layer selectivity procedure**, decides *which* layers to distil. For every candidate layer
  ``l`` of a trained network it measures

  - ``G_diversity(l)``: the mean of the *inter-layered Gram matrix* (Eqs. 4-5), the cosine similarity of
    every channel of layer ``l-1`` with every channel of layer ``l``. Low = layer ``l`` computes features
    unlike its input (diverse);
  - ``H_class(l)``: the mean of the off-diagonal upper triangle of the *layered inter-class Gram matrix*
    (Eq. 6), the cosine similarity of the class-mean features. Low = the classes look different there;

  and scores ``LSP(l) = G_diversity(l) + H_class(l)`` (Eq. 7); the lowest scores are the layers to bind.
  :func:`lsp_scores` streams over a data set (memory does not grow with the number of images).
* **ASL, alignment learning**, trains the student with the chosen *bindings* (teacher layer <-> student
  layer). Each bound layer of both networks gets a linear projection to a common size (2048); the
  alignment loss is the squared L2 distance of the two projections (Eq. 1), and
  ``L_total = sum_k Align_k + CE(teacher) + CE(student)`` (Eq. 2). The teacher's conv layers are frozen,
  its FC layers train with the student, and only the student is kept (:class:`ASLDistiller`).

Choices the paper leaves open (each a keyword argument; the book's appendix, "How each paper was
reconstructed", gives the alternatives and the reasons):

* ``<a, b>_K`` is the cosine ``a.b / (|a| |b|)`` with ``eps = 1e-8``; an all-zero (dead) vector has
  similarity 0 with everything. Only the cosine gives the paper's unit diagonal and [0, 1] range for ReLU
  features; the paper's own values (about 1e-3) suggest another scale, so only the ranking carries over.
* Channels of layers ``l-1`` and ``l`` have different lengths ``H W``; ``align="pad"`` (the default,
  the paper's words) pads the shorter vector with trailing zeros, ``align="pool"`` average-pools both maps to the
  smaller size first (spatially aligned, not the paper's).
* A pair that involves an FC layer has one number per neuron per image, so per-image cosines are
  meaningless: each neuron's (channel's) vector is built over a group of ``group_size`` consecutive
  images instead (image x position for conv maps), and the group Grams are averaged.
* Projections are linear with no activation; conv features are flattened first.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.features import FeatureExtractor, eval_mode, resolve_layer
from kdbook_utils.train import Distiller

EPS = 1e-8
ALIGN_MODES: tuple[str, ...] = ("pad", "pool")
DEFAULT_GROUP_SIZE = 64
DEFAULT_PROJECTION_DIM = 2048
#: Largest projection (weights) a binding may create; conv1 of a full-width teacher would need ~200M.
DEFAULT_MAX_PROJECTION_WEIGHTS = 100_000_000

Binding = tuple[str, str]  # (teacher layer, student layer)

#: Table 8's headline bindings: teacher Conv4, Conv5, FC1 <-> student Conv2, Conv3, FC1.
PAPER_BINDINGS: tuple[Binding, ...] = (("conv4", "conv2"), ("conv5", "conv3"), ("fc1", "fc1"))


# ----------------------------------------------------------------------------------------------------
# Cosine Gram matrices
# ----------------------------------------------------------------------------------------------------


def padded_cosine(rows_a: Tensor, rows_b: Tensor, eps: float = EPS) -> Tensor:
    """Cosine of every row of ``rows_a`` with every row of ``rows_b``, zero-padding the shorter rows.

    ``rows_a`` is ``(..., M, K_a)`` and ``rows_b`` is ``(..., N, K_b)``; the result is ``(..., M, N)`` with
    ``G[m, n] = <a_m, b_n> / (max(|a_m|, eps) * max(|b_n|, eps))``, so an all-zero row gives 0.

    Padding the shorter rows with trailing zeros up to ``K = max(K_a, K_b)`` (the paper's zero padding) changes neither
    their norms nor any product beyond their own length, so the dot products only need the first
    ``min(K_a, K_b)`` entries and the zeros are never materialised.
    """
    if rows_a.shape[:-2] != rows_b.shape[:-2]:
        raise ValueError(f"Leading dimensions differ: {tuple(rows_a.shape)} vs {tuple(rows_b.shape)}.")
    common = min(rows_a.shape[-1], rows_b.shape[-1])
    norms_a = rows_a.norm(dim=-1).clamp_min(eps)
    norms_b = rows_b.norm(dim=-1).clamp_min(eps)
    dots = rows_a[..., :common] @ rows_b[..., :common].transpose(-1, -2)
    return dots / (norms_a.unsqueeze(-1) * norms_b.unsqueeze(-2))


def _is_map(features: Tensor) -> bool:
    return features.dim() == 4


def _check_features(features: Tensor, name: str) -> None:
    if not isinstance(features, Tensor) or features.dim() not in (2, 4):
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(
            f"{name} must be a conv feature map (B, C, H, W) or FC features (B, N), got {shape}."
        )


def _channel_rows(prev: Tensor, cur: Tensor, align: str) -> tuple[Tensor, Tensor, bool]:
    """The channel vectors whose cosines form the inter-layered Gram matrix.

    Returns ``(rows_prev, rows_cur, per_image)``. Two conv maps give per-image rows ``(B, C, H*W)``
    (``per_image=True``). A pair involving an FC layer gives one set of rows built over the whole batch,
    ``(C, B*H*W)`` for a conv map (image-major) and ``(N, B)`` for FC features (``per_image=False``).
    With ``align="pool"`` conv maps are first average-pooled to the smaller map's size (to 1x1 when the
    other layer is FC), so no padding is needed.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"Unknown align mode {align!r}; choose one of {ALIGN_MODES}.")
    _check_features(prev, "The features of layer l-1")
    _check_features(cur, "The features of layer l")
    if prev.shape[0] != cur.shape[0]:
        raise ValueError(
            f"Both layers must come from the same images, got batch sizes {prev.shape[0]} and {cur.shape[0]}."
        )
    if _is_map(prev) and _is_map(cur):
        if align == "pool":
            size = (min(prev.shape[2], cur.shape[2]), min(prev.shape[3], cur.shape[3]))
            prev, cur = F.adaptive_avg_pool2d(prev, size), F.adaptive_avg_pool2d(cur, size)
        return prev.flatten(2), cur.flatten(2), True

    def over_batch(features: Tensor) -> Tensor:
        if _is_map(features):
            if align == "pool":
                features = features.mean(dim=(2, 3))
            else:  # (B, C, H, W) -> (C, B, H, W) -> (C, B*H*W): image-major
                return features.transpose(0, 1).flatten(1)
        return features.transpose(0, 1)  # (B, N) -> (N, B)

    return over_batch(prev), over_batch(cur), False


def inter_layer_gram(
    prev: Tensor,
    cur: Tensor,
    *,
    align: str = "pad",
    group_size: int | None = None,
    eps: float = EPS,
) -> Tensor:
    """The inter-layered Gram matrix ``G^l`` (M x N) between layer ``l-1`` and layer ``l`` (Eq. 4).

    ``G[m, n] = <F^{l-1}_m, F^l_n>_K``: the cosine of channel ``m`` of ``prev`` (``(B, M, H, W)`` or
    ``(B, M)``) with channel ``n`` of ``cur``, each flattened to a vector and zero-padded to the common
    length ``K`` (``align="pad"``, the default) or pooled to a common size first (``align="pool"``).

    * Two conv maps: one Gram matrix per image, averaged over the ``B`` images.
    * A pair involving an FC layer: each channel's vector runs over a group of images (see
      :func:`_channel_rows`); the batch is cut into consecutive groups of ``group_size`` images (the whole
      batch if ``None``) and the group matrices are averaged, weighted by group size.

    ReLU features are non-negative, so every entry lies in [0, 1] (up to rounding).
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be a positive number of images, got {group_size!r}.")
    rows_prev, rows_cur, per_image = _channel_rows(prev, cur, align)
    if per_image:
        return padded_cosine(rows_prev, rows_cur, eps).mean(dim=0)
    batch = prev.shape[0]
    size = batch if group_size is None else group_size
    total = torch.zeros(prev.shape[1], cur.shape[1], dtype=torch.float64, device=prev.device)
    for start in range(0, batch, size):
        group_prev, group_cur, _ = _channel_rows(prev[start : start + size], cur[start : start + size], align)
        count = min(size, batch - start)
        total += padded_cosine(group_prev, group_cur, eps).double() * count
    return (total / batch).to(prev.dtype)


def g_diversity(gram: Tensor) -> float:
    """``G_diversity = sum_{m,n} G[m, n] / (M N)`` (Eq. 5): the mean entry of the inter-layered Gram."""
    return float(gram.double().mean())


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean of the flattened features, ``(num_classes, K)``; a class with no image gets zeros."""
    sums, counts = _class_sums(features, labels, num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1)


def _class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    flat = features.reshape(features.shape[0], -1)
    if labels.shape != (flat.shape[0],):
        raise ValueError(
            f"Need one label per image: {flat.shape[0]} images, labels of shape {tuple(labels.shape)}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Labels must lie in [0, {num_classes - 1}], got {int(labels.min())}..{int(labels.max())}."
        )
    one_hot = F.one_hot(labels, num_classes).to(flat.dtype)  # (B, C): a matrix product sums each class
    sums = (one_hot.T @ flat).double()
    return sums, one_hot.sum(dim=0).double()


def inter_class_gram(features: Tensor, labels: Tensor, num_classes: int, eps: float = EPS) -> Tensor:
    """The layered inter-class Gram matrix ``H^l`` (C x C, Eq. 6): cosine of the class-mean features.

    ``H[c, c'] = <f_c, f_c'>_K`` where ``f_c`` is the mean of layer ``l``'s flattened features over the
    images of class ``c``. Symmetric, unit diagonal, entries in [0, 1] for ReLU features; a class without
    images has a zero mean, hence a zero row and column.
    """
    means = class_means(features, labels, num_classes)
    return padded_cosine(means, means, eps).to(features.dtype)


def h_class(gram: Tensor) -> float:
    """``H_class = sum_{c < c'} H[c, c'] / C(|C|, 2)``: the mean of the strict upper triangle (Eq. 6)."""
    classes = gram.shape[0]
    if gram.shape != (classes, classes) or classes < 2:
        raise ValueError(f"H_class needs a square matrix over at least two classes, got {tuple(gram.shape)}.")
    rows, cols = torch.triu_indices(classes, classes, offset=1)
    return float(gram.double()[rows, cols].mean())


# ----------------------------------------------------------------------------------------------------
# LSP: streaming over a data set
# ----------------------------------------------------------------------------------------------------


def candidate_layers(model: nn.Module) -> tuple[str, ...]:
    """The layers LSP scores, in forward order: the paper's layers (``model.paper_layers``, FC included) for
    the LSL AlexNets, else the zoo model's ``feature_points``."""
    layers = getattr(model, "paper_layers", None) or getattr(model, "feature_points", None)
    if not layers:
        raise ValueError(
            "This model names no candidate layers: give it `feature_points` (zoo models have them)."
        )
    return tuple(layers)


def previous_layer(model: nn.Module, layer: str) -> str:
    """Layer ``l-1`` of ``layer``: the candidate just before it in forward order."""
    candidates = candidate_layers(model)
    if layer not in candidates:
        resolve_layer(model, layer)  # an unknown module path: this lists every valid one
        raise ValueError(
            f"Layer {layer!r} is not an LSP candidate of this model. Candidates: {', '.join(candidates)}."
        )
    index = candidates.index(layer)
    if index == 0:
        raise ValueError(
            f"{layer!r} is the first candidate layer, so it has no layer l-1 for the inter-layered Gram "
            f"matrix (the paper's Table 3 starts at Conv2). Score any of: {', '.join(candidates[1:])}."
        )
    return candidates[index - 1]


@dataclass
class LayerGrams:
    """The two LSP matrices of one layer and the scores derived from them."""

    layer: str
    previous: str
    output_shape: tuple[int, ...]
    inter_layer: Tensor  # (M, N): channels of `previous` x channels of `layer`
    inter_class: Tensor  # (C, C)

    @property
    def g_diversity(self) -> float:
        return g_diversity(self.inter_layer)

    @property
    def h_class(self) -> float:
        return h_class(self.inter_class)

    @property
    def lsp(self) -> float:
        """``LSP(l) = G_diversity + H_class`` (Eq. 7): lower is a better layer to bind."""
        return self.g_diversity + self.h_class


@dataclass
class _GramAccumulator:
    """Running sums for one layer: memory is O(M N + C K + group_size), whatever the number of images."""

    num_classes: int
    align: str
    group_size: int
    eps: float
    gram_sum: Tensor | None = None
    images: int = 0
    class_sums: Tensor | None = None
    class_counts: Tensor | None = None
    pending_prev: list[Tensor] = field(default_factory=list)
    pending_cur: list[Tensor] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()

    def _add_gram(self, gram_sum: Tensor, count: int) -> None:
        self.gram_sum = gram_sum if self.gram_sum is None else self.gram_sum + gram_sum
        self.images += count

    def update(self, prev: Tensor, cur: Tensor, labels: Tensor) -> None:
        self.output_shape = tuple(cur.shape[1:])
        sums, counts = _class_sums(cur, labels, self.num_classes)
        self.class_sums = sums if self.class_sums is None else self.class_sums + sums
        self.class_counts = counts if self.class_counts is None else self.class_counts + counts
        if _is_map(prev) and _is_map(cur):
            rows_prev, rows_cur, _ = _channel_rows(prev, cur, self.align)
            self._add_gram(padded_cosine(rows_prev, rows_cur, self.eps).double().sum(0), prev.shape[0])
            return
        # FC involved: Gram matrices over fixed groups of consecutive images, independent of the batching
        self.pending_prev.append(prev)
        self.pending_cur.append(cur)
        while sum(len(batch) for batch in self.pending_prev) >= self.group_size:
            self._flush(self.group_size)

    def _flush(self, count: int) -> None:
        prev, cur = torch.cat(self.pending_prev), torch.cat(self.pending_cur)
        rows_prev, rows_cur, _ = _channel_rows(prev[:count], cur[:count], self.align)
        self._add_gram(padded_cosine(rows_prev, rows_cur, self.eps).double() * count, count)
        self.pending_prev = [prev[count:]] if len(prev) > count else []
        self.pending_cur = [cur[count:]] if len(cur) > count else []

    def finish(self, layer: str, previous: str) -> LayerGrams:
        remaining = sum(len(batch) for batch in self.pending_prev)
        if remaining:
            self._flush(remaining)
        if self.gram_sum is None or self.class_sums is None or self.class_counts is None:
            raise ValueError("The data gave no images; LSP needs at least one batch.")
        missing = [c for c in range(self.num_classes) if self.class_counts[c] == 0]
        if missing:
            raise ValueError(
                f"Classes {missing} have no image in the data, so their class-mean features (and H_class) "
                "are undefined. Use data that covers every class (e.g. the whole training set)."
            )
        means = self.class_sums / self.class_counts.unsqueeze(1)
        return LayerGrams(
            layer=layer,
            previous=previous,
            output_shape=self.output_shape,
            inter_layer=(self.gram_sum / self.images).float(),
            inter_class=padded_cosine(means, means, self.eps).float(),
        )


def _batches(data: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("data must yield (images, labels) batches, e.g. a TensorLoader or DataLoader.")
        yield batch[0], batch[1]


@torch.no_grad()
def layer_grams(
    model: nn.Module,
    data: Iterable,
    layers: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    align: str = "pad",
    group_size: int = DEFAULT_GROUP_SIZE,
    max_images: int | None = None,
    eps: float = EPS,
) -> dict[str, LayerGrams]:
    """Both LSP matrices of every layer in ``layers`` (default: every candidate with a layer before it),
    streamed over ``data`` (batches of ``(images, labels)``) in eval mode without gradients.

    Only running sums are kept: the per-image Gram matrices (or per-group ones for FC pairs) and the
    per-class feature sums, so memory does not grow with the number of images. The result equals the
    one-shot :func:`inter_layer_gram` (with the same ``group_size``) and :func:`inter_class_gram` on all
    features at once.
    """
    candidates = candidate_layers(model)
    chosen = tuple(layers) if layers is not None else candidates[1:]
    if not chosen:
        raise ValueError(f"Give at least one layer to score; candidates: {', '.join(candidates[1:])}.")
    previous = {layer: previous_layer(model, layer) for layer in chosen}
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"H_class needs num_classes >= 2 (pass num_classes=...), got {num_classes!r}.")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive number of images, got {group_size!r}.")
    if align not in ALIGN_MODES:
        raise ValueError(f"Unknown align mode {align!r}; choose one of {ALIGN_MODES}.")
    hooked = [layer for layer in candidates if layer in chosen or layer in previous.values()]
    accumulators = {layer: _GramAccumulator(num_classes, align, group_size, eps) for layer in chosen}
    device = next(model.parameters()).device
    seen = 0
    with eval_mode(model), FeatureExtractor(model, hooked, detach=True) as extractor:
        for images, labels in _batches(data):
            if max_images is not None:
                if seen >= max_images:
                    break
                images, labels = images[: max_images - seen], labels[: max_images - seen]
            features = extractor(images.to(device))
            labels = labels.to(device)
            for layer, accumulator in accumulators.items():
                accumulator.update(features[previous[layer]].float(), features[layer].float(), labels)
            seen += len(images)
    return {layer: accumulators[layer].finish(layer, previous[layer]) for layer in chosen}


def lsp_table(grams: Mapping[str, LayerGrams]) -> pd.DataFrame:
    """The LSP scores as a table like the paper's Table 3, one row per layer in forward order.

    Columns: ``previous`` (layer l-1), ``output_shape``, ``G_diversity``, ``H_class``, ``LSP`` and
    ``rank`` (1 = lowest LSP = the layer LSP binds first).
    """
    table = pd.DataFrame(
        {
            "previous": [g.previous for g in grams.values()],
            "output_shape": [g.output_shape for g in grams.values()],
            "G_diversity": [g.g_diversity for g in grams.values()],
            "H_class": [g.h_class for g in grams.values()],
            "LSP": [g.lsp for g in grams.values()],
        },
        index=pd.Index(list(grams), name="layer"),
    )
    table["rank"] = table["LSP"].rank(method="first").astype(int)
    return table


def lsp_scores(
    model: nn.Module,
    data: Iterable,
    layers: Sequence[str] | None = None,
    **options: object,
) -> pd.DataFrame:
    """``LSP(l) = G_diversity(l) + H_class(l)`` for each layer, streamed over ``data`` (see
    :func:`layer_grams` for the options and :func:`lsp_table` for the columns)."""
    return lsp_table(layer_grams(model, data, layers, **options))  # type: ignore[arg-type]


def select_layers(table: pd.DataFrame, count: int) -> list[str]:
    """The ``count`` layers with the lowest LSP score (``l* = argmin LSP``, Eq. 7), in forward order."""
    if not 1 <= count <= len(table):
        raise ValueError(f"count must be between 1 and {len(table)} (the scored layers), got {count}.")
    chosen = set(table["LSP"].nsmallest(count).index)
    return [layer for layer in table.index if layer in chosen]


# ----------------------------------------------------------------------------------------------------
# ASL: alignment training
# ----------------------------------------------------------------------------------------------------


REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def alignment_loss(teacher_projection: Tensor, student_projection: Tensor, reduction: str = "sum") -> Tensor:
    """``Align(t, s) = || X_t - X_s ||_2^2`` (Eq. 1), the squared L2 distance of the two ``(B, D)``
    projections of a bound pair, averaged over the batch.

    ``reduction="sum"`` (the paper's form) sums the squares over the ``D`` dimensions; ``"mean"`` averages
    them, i.e. divides the loss by ``D``. The paper trained at lr 1e-4; at the learning rates used to
    train from scratch (1e-2 and up) the summed form can diverge, because the loss is quadratic in the
    projection weights with curvature ~ ``|x|^2`` (thousands for a flattened conv map).
    """
    if teacher_projection.shape != student_projection.shape:
        raise ValueError(
            f"Projections must have the same shape, got {tuple(teacher_projection.shape)} and "
            f"{tuple(student_projection.shape)}."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; choose one of {REDUCTIONS}.")
    squares = (teacher_projection - student_projection).pow(2)
    per_image = squares.sum(dim=1) if reduction == "sum" else squares.mean(dim=1)
    return per_image.mean()


class Alignment(nn.Module):
    """One binding's two projections (a linear layer per network, no activation) and its loss."""

    def __init__(
        self, teacher_features: int, student_features: int, projection_dim: int, reduction: str = "sum"
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; choose one of {REDUCTIONS}.")
        self.teacher_projection = nn.Linear(teacher_features, projection_dim)
        self.student_projection = nn.Linear(student_features, projection_dim)
        self.reduction = reduction

    def forward(self, teacher_features: Tensor, student_features: Tensor) -> Tensor:
        return alignment_loss(
            self.teacher_projection(teacher_features.flatten(1)),
            self.student_projection(student_features.flatten(1)),
            self.reduction,
        )


def _linear_children(model: nn.Module) -> list[str]:
    """Top-level children that contain a linear layer: the FC layers and the classifier."""
    return [
        name
        for name, child in model.named_children()
        if any(isinstance(module, nn.Linear) for module in child.modules())
    ]


def _parse_bindings(bindings: Iterable[Sequence[str]]) -> tuple[Binding, ...]:
    parsed = []
    for binding in bindings:
        if isinstance(binding, str) or len(binding) != 2:
            raise ValueError(f"A binding is a pair (teacher_layer, student_layer), got {binding!r}.")
        parsed.append((str(binding[0]), str(binding[1])))
    if not parsed:
        raise ValueError("Give at least one binding, e.g. [('conv5', 'conv3')].")
    return tuple(parsed)


def _probe_sizes(
    model: nn.Module, layers: Sequence[str], input_shape: Sequence[int], which: str
) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of each layer for an input of ``input_shape`` (eval mode, no gradients)."""
    with FeatureExtractor(model, list(dict.fromkeys(layers))) as extractor:
        try:
            shapes = extractor.feature_shapes((2, *tuple(input_shape)[-3:]))
        except RuntimeError as error:
            raise ValueError(
                f"The {which} cannot run on inputs of shape {tuple(input_shape)}, so the projection sizes "
                f"cannot be known: {error}"
            ) from error
    for layer, shape in shapes.items():
        if not isinstance(shape, tuple) or any(isinstance(part, tuple) for part in shape):
            raise TypeError(
                f"The {which}'s layer {layer!r} does not output one feature tensor, so it cannot be flattened "
                "and projected. Bind a layer that outputs a feature tensor."
            )
        if _numel(shape) == 0:
            raise ValueError(
                f"The {which}'s layer {layer!r} outputs an empty tensor {shape} for inputs of shape "
                f"{tuple(input_shape)}: there is nothing to project. Use larger inputs or an earlier layer."
            )
    return shapes


class ASLDistiller(Distiller):
    """Alignment learning (ASL, the training half of LSL): bound layers of teacher and student are
    projected to ``projection_dim`` and pulled together, while both networks learn the task.

    ``L_total = alpha * sum_k Align_k + CE(teacher) + CE(student)`` (Eq. 2, ``alpha = 1`` in the paper).

    * ``bindings``: ``[(teacher_layer, student_layer), ...]``, e.g. Table 8's :data:`PAPER_BINDINGS`.
    * The teacher's conv layers stay frozen and in eval mode; its FC layers and classifier
      (``teacher_trainable``, default: every top-level child holding an ``nn.Linear``) train jointly, as
      the paper says. The teacher is deep-copied first, so the model you pass in is left unchanged.
    * ``reduction``: ``"sum"`` is Eq. 1 as printed; ``"mean"`` divides each Align term by
      ``projection_dim`` and keeps training stable at from-scratch learning rates
      (:func:`alignment_loss`).
    * ``input_shape`` (``(C, H, W)``) sizes the projections; another input size at training time raises.
    * After training keep ``distiller.student``; ``distiller.teacher`` is the jointly fine-tuned teacher
      whose accuracy the paper's Tables 4-7 also report.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        bindings: Iterable[Sequence[str]] = PAPER_BINDINGS,
        *,
        input_shape: Sequence[int] = (3, 32, 32),
        projection_dim: int = DEFAULT_PROJECTION_DIM,
        alpha: float = 1.0,
        reduction: str = "sum",
        teacher_trainable: Sequence[str] | None = None,
        max_projection_weights: int = DEFAULT_MAX_PROJECTION_WEIGHTS,
    ) -> None:
        teacher = copy.deepcopy(teacher)
        trainable = list(teacher_trainable) if teacher_trainable is not None else _linear_children(teacher)
        super().__init__(student, teacher, trainable_teacher_parts=trainable)
        self.bindings = _parse_bindings(bindings)
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be positive; got {projection_dim!r}.")
        self.alpha = float(alpha)
        self.input_shape = tuple(int(size) for size in input_shape)
        self.teacher_layers = list(dict.fromkeys(t for t, _ in self.bindings))
        self.student_layers = list(dict.fromkeys(s for _, s in self.bindings))
        teacher_shapes = _probe_sizes(teacher, self.teacher_layers, self.input_shape, "teacher")
        student_shapes = _probe_sizes(student, self.student_layers, self.input_shape, "student")

        self.feature_sizes: dict[str, tuple[int, int]] = {}
        alignments = []
        for teacher_layer, student_layer in self.bindings:
            sizes = (_numel(teacher_shapes[teacher_layer]), _numel(student_shapes[student_layer]))
            weights = (sizes[0] + sizes[1]) * projection_dim
            if weights > max_projection_weights:
                raise ValueError(
                    f"Binding teacher {teacher_layer!r} {teacher_shapes[teacher_layer]} to student "
                    f"{student_layer!r} {student_shapes[student_layer]} needs projections from {sizes[0]:,} "
                    f"and {sizes[1]:,} values to {projection_dim}: {weights:,} weights, over the limit of "
                    f"{max_projection_weights:,}. Bind a later (smaller) layer, lower projection_dim, or raise "
                    "max_projection_weights if you have the memory."
                )
            self.feature_sizes[_binding_name((teacher_layer, student_layer))] = sizes
            alignments.append(Alignment(sizes[0], sizes[1], projection_dim, reduction))
        self.alignments = nn.ModuleList(alignments)

    def _check_size(self, which: str, layer: str, features: Tensor, expected: int) -> None:
        got = features[0].numel()
        if got != expected:
            raise ValueError(
                f"The {which}'s layer {layer!r} gave {got:,} values per image ({tuple(features.shape[1:])}) "
                f"but its projection was built for {expected:,} (input_shape={self.input_shape}). Build the "
                "distiller with the input_shape of the images you train on."
            )

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits, teacher_features = self.teacher_outputs(images, labels, layers=self.teacher_layers)
        with FeatureExtractor(self.student, self.student_layers) as extractor:
            student_logits, student_features = extractor.forward_with_features(images)
        losses: dict[str, Tensor] = {}
        for (teacher_layer, student_layer), alignment in zip(self.bindings, self.alignments):
            name = _binding_name((teacher_layer, student_layer))
            teacher_size, student_size = self.feature_sizes[name]
            self._check_size("teacher", teacher_layer, teacher_features[teacher_layer], teacher_size)
            self._check_size("student", student_layer, student_features[student_layer], student_size)
            losses[name] = self.alpha * alignment(
                teacher_features[teacher_layer], student_features[student_layer]
            )
        losses["ce_teacher"] = F.cross_entropy(teacher_logits, labels)
        losses["ce"] = F.cross_entropy(student_logits, labels)
        return student_logits, losses


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _binding_name(binding: Binding) -> str:
    return f"align[{binding[0]}->{binding[1]}]"
