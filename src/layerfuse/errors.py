"""The errors layerfuse raises: one base class, each kind also a built-in error it fits.

>>> from layerfuse.errors import LayerfuseError, LayerIndexError
>>> issubclass(LayerIndexError, (LayerfuseError, IndexError))
True
"""

from __future__ import annotations

import math
from typing import NoReturn


class LayerfuseError(Exception):
    """Base class of every error layerfuse raises on purpose."""


class LayerIndexError(LayerfuseError, IndexError):
    """A `layer` outside the model's range."""


class UnknownNameError(LayerfuseError, ValueError):
    """A method or approach name that is not registered."""


class ArgumentValueError(LayerfuseError, ValueError):
    """An argument of the right type with a value that is not allowed."""


class InfoShapeError(LayerfuseError, ValueError):
    """Info whose rank or sizes do not fit the hidden states."""


class ArgumentTypeError(LayerfuseError, TypeError):
    """An argument of the wrong type, such as a layer that is not an int."""


class InfoTypeError(ArgumentTypeError):
    """Info that is not a dense floating-point tensor with data."""


class InfoValueError(LayerfuseError, ValueError):
    """Info that holds NaN or infinity."""


class ArchitectureError(LayerfuseError, ValueError):
    """A model whose blocks or embeddings cannot be located, or whose modules a run cannot reproduce."""


class ModelNotFoundError(LayerfuseError, FileNotFoundError):
    """A model name or path that cannot be loaded here."""


class FileFormatError(LayerfuseError, ValueError):
    """A saved fusion or info file that is missing, corrupt or does not fit the model."""


class FusionStateError(LayerfuseError, RuntimeError):
    """An operation that the current state of a fusion does not allow."""


class MergeError(LayerfuseError, ValueError):
    """A fusion that cannot be folded into the model's weights: not one affine map for all, or no parameter to take it."""


class DataError(LayerfuseError, ValueError):
    """Activations or labels that an estimator cannot use: a wrong shape, NaN, mismatched lengths, too few examples."""


class MeasurementError(LayerfuseError, RuntimeError):
    """A measurement that failed or cannot be trusted, such as a compiled forward that differs from the eager one."""


def positive_int(name: str, value: object) -> int:
    """`value` if it is a positive int, else the error that says so.

    >>> positive_int("batch size", 0)
    Traceback (most recent call last):
    ...
    layerfuse.errors.ArgumentValueError: batch size must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ArgumentValueError(f"{name} must be a positive int, got {value}")
    return value


def positive_number(name: str, value: object) -> float:
    """`value` as a float if it is a positive finite real number, else the error that says so.

    >>> positive_number("lr", float("nan"))
    Traceback (most recent call last):
    ...
    layerfuse.errors.ArgumentValueError: lr must be a positive finite number, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a positive finite number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ArgumentValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


COPY_REFUSED = (
    "cannot pickle or deep-copy a model while a layerfuse fusion is attached to it (a copy cannot take the "
    "fusion along): remove the fusion first (fusion.remove(), or leave its with-block), or copy "
    "model.state_dict() instead"
)


def refuse_copy(*_: object) -> NoReturn:
    """Refuse to pickle or deep-copy: the `__reduce_ex__` and `__deepcopy__` of what a fusion puts on a model."""
    raise FusionStateError(COPY_REFUSED)
