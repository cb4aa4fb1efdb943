"""The loss-spike rule shared by the live monitor and the history doctor: one score, so the two agree."""

from __future__ import annotations

import torch


def robust_z(values: list[float]) -> list[float]:
    """(x - median) / (1.4826 * MAD): an outlier score that a few extreme values cannot hide."""
    if not values:
        return []
    t = torch.tensor(values, dtype=torch.float64)
    med = t.median()
    mad = (t - med).abs().median() * 1.4826
    if mad == 0:
        mad = torch.tensor(1e-12, dtype=torch.float64)
    return ((t - med) / mad).tolist()


SPIKE_MIN_HISTORY = 10  # losses seen before a spike can be judged


def spike_window(monitor_window: int) -> int:
    """How many recent losses a spike is judged against (the live monitor's window, doubled, at least 20)."""
    return max(20, 2 * monitor_window)


def spike_z(recent: list[float], loss: float) -> float | None:
    """The loss-spike score shared by the live monitor and the history doctor: the robust z-score of ``loss``
    against the recent losses (None until there are enough of them)."""
    if len(recent) < SPIKE_MIN_HISTORY:
        return None
    return robust_z(list(recent) + [loss])[-1]
