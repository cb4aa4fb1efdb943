"""The doctor's causes, one registered object each (see :mod:`moe_arch.doctor.causes.base`).

Checkpoint causes live in :mod:`~moe_arch.doctor.causes.weights`, curve causes in
:mod:`~moe_arch.doctor.causes.curves`; importing this package registers both.
"""

from moe_arch.doctor.causes import curves, replicas, training_state, weights  # noqa: F401  (importing registers them)
from moe_arch.doctor.causes.base import (
    REGISTRY,
    Cause,
    CheckpointCause,
    CheckpointEvidence,
    CurveCause,
    CurveEvidence,
    Finding,
    cause,
    checkpoint_causes,
    curve_causes,
    describe,
    fmt,
    is_curve,
    pattern_groups,
    register,
)

__all__ = [
    "REGISTRY",
    "Cause",
    "CheckpointCause",
    "CheckpointEvidence",
    "CurveCause",
    "CurveEvidence",
    "Finding",
    "cause",
    "checkpoint_causes",
    "curve_causes",
    "describe",
    "fmt",
    "is_curve",
    "pattern_groups",
    "register",
]
