"""What a checkpoint holds beyond tensors, and the checks that it fits the run reading it: the fields that must
match to resume, the model's tensor names and shapes, the random-number generators' state, and one-line errors for
a missing or malformed entry."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import torch

from moe_arch.checkpoint.layout import CheckpointError

# Fields that must match to resume: they fix the model's shapes, the precision of its weights, the optimizer
# layout and the data stream. Anything else (steps, logging, eval cadence, ...) may change on resume.
RESUME_KEYS = {
    "model": None,  # every field
    "optim": ["muon_roles"],
    "train": ["seq_len", "grad_accum", "seed", "precision"],  # batch size: checked as the global batch
    "data": ["source", "tokenizer", "val_fraction", "text_field"],
}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section, keys in RESUME_KEYS.items():
        a, b = saved.get(section, {}), current.get(section, {})
        for k in keys if keys is not None else sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})")
    return diffs


def check_model_state(path, saved: dict, expected: dict) -> None:
    """The checkpoint's weights fit the model: same names, every entry a tensor of the model's shape; else one
    line naming the first that does not."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(
            f"{path}: model tensor {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(
            f"{path}: model tensor {extra[0]!r} is not in this model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for k, ref in expected.items():
        v = saved[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: model tensor {k!r} has shape {list(v.shape)}, the model expects {list(ref.shape)}"
            )


def field(path, state: dict, key: str, kind: type, name: str | None = None):
    """state[key], or a one-line CheckpointError naming the file and the key when it is missing or of the wrong
    type (a hand-edited or foreign checkpoint)."""
    name = name or key
    if not isinstance(state, dict) or key not in state:
        raise CheckpointError(
            f"{path}: no {name!r} in this checkpoint; it cannot be resumed (start a new run, "
            "or resume a checkpoint moe_arch wrote)"
        )
    value = state[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(
            f"{path}: {name!r} is a {type(value).__name__}, not a {kind.__name__}; the file "
            "was changed after moe_arch wrote it and cannot be resumed"
        )
    return value


@contextmanager
def loading(path, name: str):
    """Turn the errors of load_state_dict on a malformed entry into one line naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: {name!r} does not fit this run ({type(e).__name__}: {msg[:300]})") from None
