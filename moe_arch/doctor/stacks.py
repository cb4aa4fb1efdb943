"""Which stack wrote a checkpoint, told once from its format, meta and optimizer state, so that every fix is said in
the words of that stack (a Hugging Face Trainer user gets ``TrainingArguments``, not our ``--train.precision``).

:func:`detect_stacks` returns keys, the most specific first: the optimizer library when it has its own remedy
(``torchao``, ``optimi``), then the trainer (``moe_arch``, ``deepspeed``, ``lightning``, ``hf-trainer``,
``accelerate``, ``peft``, ``torchtitan``), then ``torch`` (any PyTorch loop). A cause's ``fixes`` maps such keys to
its recommendation; the first key it has wins, else its stack-neutral ``recommendation``.

:func:`subulp_keeper` says whether the checkpoint's optimizer keeps updates smaller than half a ULP of a bf16/fp16
weight (fp32 master weights, Kahan compensation, stochastic rounding): then the rounding rule does not apply.
"""

from __future__ import annotations

from moe_arch.checkpoint.readers import CheckpointView

# Param-group keys of torchao's low-bit/bf16 AdamW family (torchao.optim._AdamBase): exactly these, with the lr kept
# as a tensor. torch.optim's Adam/AdamW add foreach, maximize, capturable, differentiable, fused.
TORCHAO_GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "params"})
# torch-optimi's param-group keys (beta1/beta2 instead of betas; its Kahan summation and decoupled lr flags)
OPTIMI_GROUP_KEYS = frozenset({"kahan_sum", "decouple_lr", "max_lr"})
# Optimizer-state keys that hold what rounding drops (Kahan / compensation buffers) or an fp32 master copy
KEEPER_STATE_KEYS = {
    "kahan_comp": "Kahan compensation buffer (kahan_comp) in the optimizer state",
    "compensation": "compensation buffer in the optimizer state",
    "master_param": "fp32 master copy (master_param) in the optimizer state",
    "master_weight": "fp32 master copy (master_weight) in the optimizer state",
    "fp32_param": "fp32 master copy (fp32_param) in the optimizer state",
}
# Param-group flags that make an optimizer keep sub-ULP updates when they are saved (some libraries' versions do)
KEEPER_GROUP_FLAGS = {
    "kahan_sum": "Kahan summation (kahan_sum=True)",
    "bf16_stochastic_round": "bf16 stochastic rounding (bf16_stochastic_round=True)",
    "stochastic_rounding": "stochastic rounding",
    "compensated": "compensated updates",
}

# What would settle a verdict, per stack: the run's initial weights, and the optimizer state's file.
REFERENCE_FILE = {
    "moe_arch": "the run's step_0000000.pt (written at step 0 unless checkpoint.save_initial is off)",
    "hf-trainer": "the initial weights (model.save_pretrained('init') before trainer.train())",
    "accelerate": "the initial weights (accelerator.save_state before the first step)",
    "peft": "the initial adapters (model.save_pretrained('init') before training)",
    "lightning": "a checkpoint at step 0 (trainer.save_checkpoint in on_train_start)",
    "deepspeed": "an early save_checkpoint folder (global_step0 or the first interval)",
    "torch": "the initial state dict (torch.save(model.state_dict(), 'init.pt') before the first step)",
}
OPTIMIZER_FILE = {
    "moe_arch": "a checkpoint with its optimizer state (our checkpoints carry it unless saved weights-only)",
    "hf-trainer": "optimizer.pt in the checkpoint-N folder (TrainingArguments(save_only_model=False))",
    "accelerate": "optimizer.bin from accelerator.save_state",
    "peft": "optimizer.pt in the checkpoint-N folder (TrainingArguments(save_only_model=False))",
    "lightning": "a .ckpt saved with its optimizer state (save_weights_only=False)",
    "deepspeed": "the zero_pp_rank_*_optim_states.pt files of the save_checkpoint folder",
    "torch": "the optimizer's state_dict() saved with the weights (torch.save({'model': ..., 'optimizer': ...}))",
}


def trainer_stack(view: CheckpointView) -> str:
    """The stack that wrote the files: ours, DeepSpeed, Lightning, the Hugging Face family, torchtitan, or torch."""
    fmt = view.format
    if fmt in ("moe_arch", "moe_arch-dcp"):
        return "moe_arch"
    if fmt in ("deepspeed", "hf-trainer", "accelerate", "peft"):
        return fmt
    if "pytorch-lightning_version" in view.meta:
        return "lightning"
    if fmt == "torchtitan-dcp":
        return "torchtitan"
    return "torch"


def optimizer_library(view: CheckpointView) -> str | None:
    """torchao or optimi when the saved param groups are theirs (each saves its own key set), else None."""
    for o in view.optimizers:
        groups = o.state_dict.get("param_groups") or []
        if not groups:
            continue
        keys = set(groups[0])
        if keys & OPTIMI_GROUP_KEYS and "beta1" in keys:
            return "optimi"
        if keys == TORCHAO_GROUP_KEYS and hasattr(groups[0].get("lr"), "dim"):
            return "torchao"
    return None


def detect_stacks(view: CheckpointView | None) -> tuple[str, ...]:
    """The stack keys of a checkpoint, most specific first (see the module's docstring); () for none."""
    if view is None:
        return ()
    lib = optimizer_library(view)
    trainer = trainer_stack(view)
    return tuple(dict.fromkeys(k for k in (lib, trainer, "torch") if k))


def subulp_keeper(view: CheckpointView) -> str | None:
    """Why this checkpoint's optimizer keeps sub-ULP updates of low-precision weights, checkpoint-wide (None: it
    does not show that it does). DeepSpeed with bf16/fp16 enabled steps fp32 master weights and casts them to the
    module (unless its config keeps the master weights in bf16)."""
    if view.format == "deepspeed" and isinstance(cfg := view.meta.get("config"), dict):
        for k in ("bf16", "fp16"):
            sec = cfg.get(k)
            if isinstance(sec, dict) and sec.get("enabled") and not sec.get("bf16_master_weights_and_grads"):
                return f"fp32 master weights (DeepSpeed {k}.enabled)"
    return None


def group_keeper(group: dict) -> str | None:
    """A param group's flag that keeps sub-ULP updates (optimi's kahan_sum=True, a saved stochastic-rounding flag)."""
    for k, why in KEEPER_GROUP_FLAGS.items():
        if group.get(k) is True:
            return why
    return None


def state_keeper(state: dict, numel: int) -> str | None:
    """A state tensor that holds what rounding drops, or an fp32 master copy of the weight (same size)."""
    for k, why in KEEPER_STATE_KEYS.items():
        t = state.get(k)
        if hasattr(t, "numel") and t.numel() == numel:
            return why
    return None


def rounding_unknown(view: CheckpointView | None) -> str | None:
    """Why whether sub-ULP updates are kept cannot be read from the checkpoint (None: it can)."""
    if view is not None and optimizer_library(view) == "torchao":
        return (
            "torchao's AdamW does not save bf16_stochastic_round in its state dict: whether updates below half a "
            "ULP were kept (stochastic rounding) or lost cannot be read from the checkpoint, so no rounding "
            "forecast is made; tensors still at their initial constant are still proof"
        )
    return None


def first_for(table: dict[str, str], stacks: tuple[str, ...]) -> str:
    """The entry of the most specific stack that ``table`` has (else its ``torch`` entry)."""
    for s in stacks:
        if s in table:
            return table[s]
    return table["torch"]
