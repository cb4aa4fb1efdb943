"""Checkpoints: the one owner of reading and writing them.

================  =====================================================================================
module            what it owns
================  =====================================================================================
``layout``        the run folder: ``checkpoints/``, step names, ``latest.txt``, pruning, the run lock, errors
``resolve``       which checkpoint a path or run folder means; the run's initial (step-0) checkpoint
``formats``       our two formats behind one save / load / read_meta / load_weights (the registry FORMATS)
``single_file``   one ``torch.save`` file per checkpoint
``distributed``   a ``torch.distributed.checkpoint`` folder, resumable on any number of ranks
``state``         what must match to resume, model-state checks, the random generators' state
``readers``       other stacks' checkpoints (and ours) as lazy views, for the doctor (the registry READERS)
================  =====================================================================================

Training, eval, export, generate and the doctor call the functions below; none tests a path's format itself.
"""

from moe_arch.checkpoint.distributed import full_model_state
from moe_arch.checkpoint.formats import (
    FORMATS,
    Format,
    Weights,
    checked_model,
    format_of,
    load,
    load_model,
    load_weights,
    read_meta,
    save,
    to_single_file,
)
from moe_arch.checkpoint.layout import (
    STEP_RE,
    CheckpointError,
    RunFolderError,
    RunLock,
    checkpoint_dir,
    claim_for_fresh_start,
    existing_checkpoints,
    is_complete,
    is_distributed,
    prune,
    step_name,
    writable_dir,
    write_latest,
)
from moe_arch.checkpoint.resolve import initial_checkpoint, newest_in, resolve_resume, run_checkpoints
from moe_arch.checkpoint.single_file import FORMAT, load_checkpoint, save_checkpoint
from moe_arch.checkpoint.state import (
    RESUME_KEYS,
    check_model_state,
    config_differences,
    field,
    loading,
    rng_state,
    set_rng_state,
)

__all__ = [
    "FORMAT",
    "FORMATS",
    "RESUME_KEYS",
    "STEP_RE",
    "CheckpointError",
    "Format",
    "RunFolderError",
    "RunLock",
    "Weights",
    "check_model_state",
    "checked_model",
    "checkpoint_dir",
    "claim_for_fresh_start",
    "config_differences",
    "existing_checkpoints",
    "field",
    "format_of",
    "full_model_state",
    "initial_checkpoint",
    "is_complete",
    "is_distributed",
    "load",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "loading",
    "newest_in",
    "prune",
    "read_meta",
    "resolve_resume",
    "rng_state",
    "run_checkpoints",
    "save",
    "save_checkpoint",
    "set_rng_state",
    "step_name",
    "to_single_file",
    "writable_dir",
    "write_latest",
]
