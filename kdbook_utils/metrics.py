"""How big, how costly, how accurate: parameter and FLOP counts, model comparisons, accuracy helpers.

Distillation trades a large teacher for a small student, so every lesson reports the two sizes side by
side: :func:`compare_models` gives parameters, multiply-accumulates and the teacher/student ratios that
papers call *compression* and *speed-up* (computation) ratios.

Conventions, since papers mix them:

* **Parameters** count every weight and bias; ``include_batchnorm=False`` leaves out BatchNorm's scale
  and shift, which many papers' tables do not count.
* **MACs** (multiply-accumulates) are what most CNN papers call "FLOPs"; **FLOPs** here are true
  floating-point operations, ``2 x MACs`` (one multiply and one add). Only convolutions and matrix
  products are counted, which is where nearly all the work is: BatchNorm, ReLU, pooling, additions and
  biases are not counted.

The accuracy helpers are pure tensor code: they accept logits ``(N, C)`` or predicted labels ``(N,)``
with integer labels ``(N,)``, and report accuracy **in percent** (0 to 100), the one unit the package
uses for accuracy everywhere. Labels outside ``[0, C - 1]``, NaN logits, float labels and mismatched
lengths are errors, never a quietly wrong score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from kdbook_utils.errors import Seen, check_int, must_be
from kdbook_utils.features import eval_mode, zeros_input


def count_parameters(model: nn.Module, trainable_only: bool = False, include_batchnorm: bool = True) -> int:
    """Number of parameters of ``model`` (a parameter shared by two modules counts once).

    ``trainable_only`` counts only those with ``requires_grad``; ``include_batchnorm=False`` leaves out
    the weight and bias of every BatchNorm layer (the running statistics are buffers, never counted).
    """
    excluded: set[int] = set()
    if not include_batchnorm:
        excluded = {
            id(parameter)
            for module in model.modules()
            if isinstance(module, _BatchNorm)
            for parameter in module.parameters(recurse=False)
        }
    return sum(
        parameter.numel()
        for parameter in model.parameters()  # deduplicates shared parameters
        if id(parameter) not in excluded and (parameter.requires_grad or not trainable_only)
    )


@dataclass(frozen=True)
class FlopCount:
    """Cost of one forward pass **per image**: ``macs`` multiply-accumulates, ``flops = 2 * macs``."""

    macs: int
    flops: int

    def __str__(self) -> str:
        return f"{self.macs / 1e6:.1f} M MACs ({self.flops / 1e6:.1f} M FLOPs) per image"


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)) -> FlopCount:
    """MACs and FLOPs of one forward pass, per image, measured with ``torch.utils.flop_counter``.

    ``FlopCounterMode`` counts FLOPs as ``2 x MACs`` for convolutions and matrix products (a conv with
    ``C_in`` inputs, ``C_out`` outputs, a ``k x k`` kernel and an ``H_out x W_out`` output costs
    ``C_in * k * k * C_out * H_out * W_out`` MACs, ``C_in / groups`` for a grouped conv; a ``Linear(d_in, d_out)`` costs ``d_in * d_out``).
    BatchNorm, ReLU, pooling, residual additions and biases are not counted.
    The model runs once on zeros in eval mode without gradients; its training mode is restored.
    ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``; the totals are divided by ``N``.
    """
    images = zeros_input(model, input_shape)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(images)
    flops = counter.get_total_flops() // images.shape[0]
    return FlopCount(macs=flops // 2, flops=flops)


def compare_models(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int] = (1, 3, 32, 32),
    reference: str | None = None,
    include_batchnorm: bool = True,
) -> pd.DataFrame:
    """One row per model: ``params``, ``macs``, ``flops`` and the ratios to the ``reference`` model.

    ``reference`` is usually the teacher; ``None`` takes the first model. ``compression_ratio`` is
    reference parameters / model parameters and ``computation_ratio`` is reference MACs / model MACs,
    so a student 5x smaller than its teacher shows 5.0 (and the reference itself 1.0).
    """
    if not models:
        raise ValueError("compare_models needs at least one model, e.g. {'teacher': t, 'student': s}.")
    reference = next(iter(models)) if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models: {', '.join(models)}.")
    rows = {}
    for name, model in models.items():
        cost = count_flops(model, input_shape)
        rows[name] = {
            "params": count_parameters(model, include_batchnorm=include_batchnorm),
            "macs": cost.macs,
            "flops": cost.flops,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    table["compression_ratio"] = table.loc[reference, "params"] / table["params"]
    table["computation_ratio"] = table.loc[reference, "macs"] / table["macs"]
    return table


def _as_tensor(what: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            must_be(
                what,
                "a torch.Tensor",
                Seen(f"a {type(value).__name__}"),
                "Convert it with torch.as_tensor(...).",
            )
        )
    return value


def _predictions(
    logits_or_preds: Tensor, labels: Tensor, num_classes: int | None = None
) -> tuple[Tensor, Tensor, int | None]:
    """``(predictions, labels, classes)``, all checked: predicted labels ``(N,)`` from logits ``(N, C)``
    (argmax) or as given, integer labels ``(N,)``, and the class count if known (``C`` or
    ``num_classes``); every label and prediction lies in ``[0, classes - 1]``."""
    _as_tensor("logits_or_preds", logits_or_preds)
    labels = _as_tensor("labels", labels)
    shape = tuple(logits_or_preds.shape)
    if logits_or_preds.dim() == 2:
        if not logits_or_preds.is_floating_point():
            raise TypeError(
                must_be(
                    "logits (N, C)",
                    "floating-point",
                    Seen(f"dtype {logits_or_preds.dtype}"),
                    "Pass the model's output, or predicted labels of shape (N,).",
                )
            )
        if num_classes is not None and shape[1] != num_classes:
            raise ValueError(
                must_be(
                    f"The logits' class count for num_classes={num_classes}",
                    str(num_classes),
                    Seen(f"logits of shape {shape}"),
                    "Pass the num_classes of the model that made them.",
                )
            )
        nan_rows = torch.isnan(logits_or_preds).any(dim=1).nonzero()
        if len(nan_rows):
            raise ValueError(
                must_be(
                    "logits",
                    "free of NaN",
                    Seen(
                        f"NaN in {len(nan_rows)} of {shape[0]} rows (the first is row {nan_rows[0].item()})"
                    ),
                    "The model diverged or its input holds NaN: check the data, lower the learning rate.",
                )
            )
        predictions = logits_or_preds.argmax(dim=1)
        num_classes = shape[1]
    elif logits_or_preds.dim() == 1:
        if logits_or_preds.is_floating_point() or logits_or_preds.dtype == torch.bool:
            raise TypeError(
                must_be(
                    "Predicted labels (N,)",
                    "integer class indices",
                    Seen(f"dtype {logits_or_preds.dtype}"),
                    "Pass logits as (N, C), or predictions.long() if they hold whole numbers.",
                )
            )
        predictions = logits_or_preds.long()
    else:
        raise ValueError(
            must_be(
                "logits_or_preds",
                "logits (N, C) or predicted labels (N,)",
                Seen(f"shape {shape}"),
                "Flatten extra dimensions, e.g. logits.reshape(-1, num_classes).",
            )
        )
    if labels.dim() != 1 or labels.shape[0] != predictions.shape[0]:
        raise ValueError(
            must_be(
                "labels",
                f"of shape ({predictions.shape[0]},), one per prediction",
                Seen(f"shape {tuple(labels.shape)}"),
                "Pass the labels of the same samples, in the same order.",
            )
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            must_be("labels", "integer class indices", Seen(f"dtype {labels.dtype}"), "Use labels.long().")
        )
    if predictions.shape[0] == 0:
        raise ValueError(must_be("The number of samples", "at least 1", 0, "Pass a non-empty batch."))
    labels = labels.long().to(predictions.device)
    for name, values in (("labels", labels), ("predictions", predictions)):
        low, high = values.min().item(), values.max().item()
        if low < 0 or (num_classes is not None and high >= num_classes):
            bad = low if low < 0 else high
            valid = f"[0, {num_classes - 1}]" if num_classes is not None else "non-negative"
            raise ValueError(
                must_be(
                    f"Every one of the {name}",
                    f"a class index in {valid}" if num_classes is not None else "a non-negative class index",
                    Seen(f"{bad} (the {name} range from {low} to {high})"),
                    "Check that the model was created for the data set's number of classes"
                    + (f" (num_classes={num_classes})." if num_classes is not None else "."),
                )
            )
    return predictions, labels, num_classes


def accuracy(
    logits_or_preds: Tensor, labels: Tensor, top_k: int = 1, num_classes: int | None = None
) -> float:
    """Percentage (0 to 100) of samples whose label is among the ``top_k`` highest logits (``top_k=1``:
    the argmax).

    Accepts logits ``(N, C)`` or, for ``top_k=1`` only, predicted labels ``(N,)``; labels are integer class
    indices ``(N,)`` in ``[0, C - 1]``. With predicted labels the class count is unknown, so pass
    ``num_classes`` to have labels out of range refused there too.
    """
    predictions, labels, classes = _predictions(logits_or_preds, labels, num_classes)
    if top_k == 1:
        correct = (predictions == labels).sum().item()
        return 100.0 * correct / labels.shape[0]
    if logits_or_preds.dim() != 2:
        raise ValueError(
            must_be(
                f"The input of accuracy(top_k={top_k})",
                "logits (N, C)",
                Seen(f"predicted labels of shape {tuple(logits_or_preds.shape)}"),
                "Top-k accuracy needs every class's score: pass the logits.",
            )
        )
    assert classes is not None
    check_int("top_k", top_k, minimum=1, maximum=classes, fix=f"The logits have {classes} classes.")
    top = logits_or_preds.topk(top_k, dim=1).indices
    correct = (top == labels.unsqueeze(1)).any(dim=1).sum().item()
    return 100.0 * correct / labels.shape[0]


def confusion_matrix(logits_or_preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` counts: entry ``[i, j]`` = samples of true class ``i`` predicted ``j``.

    Rows are true classes and columns predictions (scikit-learn's convention), so the diagonal holds the
    correct predictions and each row sums to that class's number of samples.
    """
    check_int("num_classes", num_classes, minimum=1, fix="It is the number of classes, e.g. 10 for CIFAR-10.")
    predictions, labels, _ = _predictions(logits_or_preds, labels, num_classes)
    flat = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(logits_or_preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy within each true class (its recall) in percent, shape ``(num_classes,)``; NaN for classes
    with no sample."""
    matrix = confusion_matrix(logits_or_preds, labels, num_classes).double()
    return 100.0 * matrix.diagonal() / matrix.sum(dim=1)
