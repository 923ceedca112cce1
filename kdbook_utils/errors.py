"""One style for every error message: what is wrong, the value seen, and how to fix it.

Every check in the package words its error the same way::

    batch_size must be a positive integer; got 0. Use e.g. 64 (the quick preset's batch size).

:func:`must_be` builds that sentence; the ``check_*`` helpers apply the common rules (a positive integer, a
finite number in a range, one of a few names, known keyword arguments) and raise it. Wrong types raise
``TypeError``, wrong values ``ValueError``, as Python itself does. This module imports nothing from the
rest of the package, so any module may use it.
"""

from __future__ import annotations

import difflib
import math
import operator
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "Seen",
    "TrainingLoaderWarning",
    "check_choice",
    "check_int",
    "check_keywords",
    "check_number",
    "closest",
    "describe",
    "must_be",
    "warn_if_training_loader",
]

_MAX_SHOWN = 80  # characters of a value's repr before it is cut


class Seen(str):
    """A ready-made description of the value seen, used as it is by :func:`must_be` (not ``repr``-ed).

    ``must_be("images", "(N, C, H, W)", Seen("a 3-D tensor of shape (3, 32, 32)"), fix)``.
    """


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message.

    Tensors and arrays are described by type, shape and dtype (never printed), NumPy and 0-d tensor
    scalars by their Python value; other values by their ``repr``, cut to 80 characters; a :class:`Seen`
    text is used as it is.
    """
    if isinstance(value, Seen):
        return str(value)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None and len(shape) > 0:
        module = type(value).__module__
        kind = (
            "a tensor" if module.startswith("torch") else "a NumPy array" if module == "numpy" else "an array"
        )
        return f"{kind} of shape {tuple(shape)} and dtype {dtype}"
    if shape is not None and dtype is not None and hasattr(value, "item"):  # a NumPy or 0-d tensor scalar
        value = value.item()
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def must_be(what: str, rule: str, got: Any, fix: str = "") -> str:
    """The message ``"<what> must be <rule>; got <value>. <fix>"``.

    >>> must_be("batch_size", "a positive integer", 0, "Use e.g. 64.")
    'batch_size must be a positive integer; got 0. Use e.g. 64.'
    """
    message = f"{what} must be {rule}; got {describe(got)}."
    return f"{message} {fix}" if fix else message


def closest(value: Any, choices: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` when a name is close to one of ``choices`` (else an empty string)."""
    names = [str(choice) for choice in choices]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_int(
    what: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, fix: str = ""
) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``, else raise.

    ``TypeError`` for a non-integer (``3.0``, ``"3"``, ``True``), ``ValueError`` for one out of range.
    NumPy and 0-d tensor integers are accepted.
    """
    if minimum is not None and maximum is not None:
        rule = f"an integer from {minimum} to {maximum}"
    elif minimum == 1:
        rule = "a positive integer"
    elif minimum == 0:
        rule = "a non-negative integer"
    elif minimum is not None:
        rule = f"an integer >= {minimum}"
    elif maximum is not None:
        rule = f"an integer <= {maximum}"
    else:
        rule = "an integer"
    if isinstance(value, bool):
        raise TypeError(must_be(what, rule, value, fix))
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(must_be(what, rule, value, fix)) from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(must_be(what, rule, value, fix))
    return number


def check_number(
    what: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    fix: str = "",
) -> float:
    """``value`` as a finite ``float`` with ``minimum <= value <= maximum`` and ``value > above``, else raise.

    ``TypeError`` for a non-number (a string, a bool, a tensor with several elements), ``ValueError`` for
    NaN, an infinity or a number out of range.
    """
    parts = []
    if above is not None:
        parts.append(f"> {above}")
    if minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    rule = "a finite number" + (f" {' and '.join(parts)}" if parts else "")
    if isinstance(value, (bool, str)):
        raise TypeError(must_be(what, rule, value, fix))
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(must_be(what, rule, value, fix)) from None
    if (
        not math.isfinite(number)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
        or (above is not None and number <= above)
    ):
        raise ValueError(must_be(what, rule, value, fix))
    return number


def check_choice(what: str, value: Any, choices: Sequence[Any], fix: str = "") -> Any:
    """``value`` if it is one of ``choices``; else a ``ValueError`` listing them (and the closest name)."""
    if value in choices:
        return value
    listed = ", ".join(repr(choice) for choice in choices)
    hint = closest(value, choices).strip()
    raise ValueError(must_be(what, f"one of {listed}", value, " ".join(part for part in (hint, fix) if part)))


def check_keywords(
    where: str, given: Iterable[str], valid: Sequence[str] | Mapping[str, Any], fix: str = ""
) -> None:
    """Refuse keyword arguments that ``where`` does not take, listing the ones it does (``TypeError``).

    ``valid`` is a list of names, or a ``{name: default}`` dict to show the defaults too.
    ``check_keywords("Preset.replace", ["epoch"], fields)`` ->
    ``Preset.replace got an unknown keyword 'epoch'. Valid keywords: name, dataset, ... Did you mean ...?``
    """
    unknown = [name for name in given if name not in valid]
    if not unknown:
        return
    if isinstance(valid, Mapping):
        listed = ", ".join(f"{name}={default!r}" for name, default in valid.items())
    else:
        listed = ", ".join(valid)
    listed = listed or "(none)"
    plural = "s" if len(unknown) > 1 else ""
    names = ", ".join(repr(name) for name in unknown)
    message = f"{where} got {'unknown keywords' if plural else 'an unknown keyword'} {names}. "
    message += f"Valid keywords: {listed}.{closest(unknown[0], valid)}"
    raise TypeError(f"{message} {fix}" if fix else message)


class TrainingLoaderWarning(UserWarning):
    """An evaluation got a loader that augments or shuffles (a ``TensorLoader`` made with ``train=True``)."""


_WARNED_LOADERS: weakref.WeakSet[Any] = weakref.WeakSet()


def warn_if_training_loader(loader: Any, where: str) -> bool:
    """Warn once per loader when ``where`` (e.g. ``"evaluate"``, ``"fit's val_loader"``) measures on a
    loader that augments (or a training loader that shuffles); returns whether it does.

    An evaluation loader made with ``train=True`` crops, flips and shuffles the images it measures on,
    so its accuracy is that of other images than the split's, and it changes from call to call. Only
    loaders that say so (``augment`` or ``shuffle`` attributes, as :class:`~kdbook_utils.data.TensorLoader`
    has) are recognised; others pass silently.
    """
    augments, shuffles = bool(getattr(loader, "augment", False)), bool(getattr(loader, "shuffle", False))
    if not (augments or (shuffles and getattr(loader, "train", False))):  # a shuffled eval loader is harmless
        return False
    try:
        if loader in _WARNED_LOADERS:
            return True
        _WARNED_LOADERS.add(loader)
    except TypeError:  # not weak-referable: Python's own warning registry still shows it once per place
        pass
    doing = " and ".join(word for word, on in (("augments", augments), ("shuffles", shuffles)) if on)
    warnings.warn(
        f"{where} got a loader that {doing} (a training loader, train=True), so it measures on cropped or "
        "flipped copies of the images, in a new order each time. Build evaluation loaders with train=False, "
        "e.g. TensorLoader(data, batch_size, train=False).",
        TrainingLoaderWarning,
        stacklevel=3,
    )
    return True
