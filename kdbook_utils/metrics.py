"""How big, how costly, how accurate: parameter and FLOP counts, model comparisons, accuracy helpers.

Distillation trades a large teacher for a small student, so every lesson reports the two sizes side by
side: :func:`compare_models` gives parameters, multiply-accumulates and the teacher/student ratios that
papers call *compression* and *speed-up* (computation) ratios.

Conventions, since papers mix them:

* **Parameters** count every weight and bias; ``include_batchnorm=False`` leaves out BatchNorm's scale
  and shift, which many papers' tables (and the spec's §1.4) do not count.
* **MACs** (multiply-accumulates) are what most CNN papers call "FLOPs"; **FLOPs** here are true
  floating-point operations, ``2 x MACs`` (one multiply and one add). Only convolutions and matrix
  products are counted, which is where nearly all the work is: BatchNorm, ReLU, pooling, additions and
  biases are not counted.

The accuracy helpers are pure tensor code: they accept logits ``(N, C)`` or predicted labels ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

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


def _predictions(logits_or_preds: Tensor, labels: Tensor) -> Tensor:
    """Predicted labels ``(N,)`` from logits ``(N, C)`` (argmax) or from labels already predicted."""
    if logits_or_preds.dim() == 2:
        predictions = logits_or_preds.argmax(dim=1)
    elif logits_or_preds.dim() == 1:
        predictions = logits_or_preds.long()
    else:
        raise ValueError(
            f"Expected logits (N, C) or predicted labels (N,), got shape {tuple(logits_or_preds.shape)}."
        )
    if labels.dim() != 1 or labels.shape[0] != predictions.shape[0]:
        raise ValueError(
            f"labels must have shape ({predictions.shape[0]},) to match the predictions, "
            f"got {tuple(labels.shape)}."
        )
    return predictions


def accuracy(logits_or_preds: Tensor, labels: Tensor, top_k: int = 1) -> float:
    """Fraction of samples whose label is among the ``top_k`` highest logits (``top_k=1``: argmax).

    Accepts logits ``(N, C)`` or, for ``top_k=1`` only, predicted labels ``(N,)``.
    """
    if top_k == 1:
        predictions = _predictions(logits_or_preds, labels)
        return (predictions == labels.to(predictions.device)).float().mean().item()
    if logits_or_preds.dim() != 2 or not 1 <= top_k <= logits_or_preds.shape[1]:
        raise ValueError(
            f"top_k={top_k} needs logits (N, C) with C >= {top_k}, got shape {tuple(logits_or_preds.shape)}."
        )
    _predictions(logits_or_preds, labels)  # validates the shapes
    top = logits_or_preds.topk(top_k, dim=1).indices
    return (top == labels.to(top.device).unsqueeze(1)).any(dim=1).float().mean().item()


def confusion_matrix(logits_or_preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` counts: entry ``[i, j]`` = samples of true class ``i`` predicted ``j``.

    Rows are true classes and columns predictions (scikit-learn's convention), so the diagonal holds the
    correct predictions and each row sums to that class's number of samples.
    """
    predictions = _predictions(logits_or_preds, labels).cpu()
    labels = labels.long().cpu()
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
                f"found values from {values.min().item()} to {values.max().item()}."
            )
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(logits_or_preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy within each true class (its recall), shape ``(num_classes,)``; NaN for absent classes."""
    matrix = confusion_matrix(logits_or_preds, labels, num_classes).double()
    return matrix.diagonal() / matrix.sum(dim=1)
