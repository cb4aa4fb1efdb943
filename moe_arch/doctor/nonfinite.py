"""Find where a NaN/Inf first appears: forward hooks armed for one forward pass only."""

from __future__ import annotations

import torch
from torch import nn


def _has_nonfinite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() and not bool(torch.isfinite(x).all())
    if isinstance(x, (tuple, list)):
        return any(_has_nonfinite(v) for v in x)
    if isinstance(x, dict):
        return any(_has_nonfinite(v) for v in x.values())
    return False


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, *inputs, **kwargs) -> str | None:
    """Run ``model(*inputs)`` with hooks on every module; return the name of the first module (in execution
    order) whose output holds a NaN/Inf, or ``None``. Hooks are removed before returning."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, output):
        if not found and _has_nonfinite(output):
            found.append(names.get(module, type(module).__name__) or "<model>")

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        model(*[i for i in inputs if i is not None], **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # Parents finish after their children, so the first hook to fire is the innermost culprit.
    return found[0] if found else None
