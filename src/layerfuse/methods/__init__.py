"""How info is combined with hidden states: the registry, fixed formulas and learned modules.

>>> sorted(METHODS)[:3]
['ablate', 'addition', 'clamp']
"""

from .base import (
    METHODS,
    Method,
    canonical_name,
    check_arguments,
    make_method,
    method_names,
    method_parameters,
    recorded_arguments,
    register_method,
)
from .fixed import Ablate, Addition, Clamp, Erase, Interpolate, Multiplication, Project, Replace, Scale
from .learned import Concat, CrossAttention, Film, Gate, LearnedMethod

__all__ = [
    "METHODS",
    "Ablate",
    "Addition",
    "Clamp",
    "Concat",
    "CrossAttention",
    "Erase",
    "Film",
    "Gate",
    "Interpolate",
    "LearnedMethod",
    "Method",
    "Multiplication",
    "Project",
    "Replace",
    "Scale",
    "canonical_name",
    "check_arguments",
    "make_method",
    "method_names",
    "method_parameters",
    "recorded_arguments",
    "register_method",
]
