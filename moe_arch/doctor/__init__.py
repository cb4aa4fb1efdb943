"""Find out why a run is not learning: ``moe-arch diagnose`` (checkpoints) and :class:`Monitor` (live)."""

from moe_arch.doctor.monitor import Alert, CriticalAlert, Monitor

__all__ = ["Alert", "CriticalAlert", "Monitor"]
