"""Hugging Face folders: a ``Trainer`` ``checkpoint-N/`` (``model.safetensors`` or ``pytorch_model.bin``, sharded or
not, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``trainer_state.json``, the warmup of ``training_args.bin``),
an accelerate ``save_state`` folder (``optimizer.bin`` / ``optimizer_1.bin``, ``scheduler.bin``), and a PEFT adapter
checkpoint (``adapter_model.safetensors``: the adapters are diagnosed, the frozen base is not saved).

The optimizer lists parameters in the model's registration order, while safetensors sorts names and transformers
5 may save tensors in another layout than it trains them: both come from the model class of ``config.json``
built on the meta device, and transformers' own save-time conversion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moe_arch.checkpoint.readers.base import (
    CheckpointView,
    LoadError,
    TensorInfo,
    load_with_inert_classes,
    optimizers_from,
    tensor_infos,
    torch_load,
)
from moe_arch.checkpoint.readers.safetensors import read_safetensors


def read_hf_folder(folder: Path, trust_pickle: bool) -> CheckpointView:
    notes: list[str] = []
    shards = sorted(folder.glob("model*.safetensors"))
    if shards:
        view = read_safetensors(shards, folder)
        view.notes = [n for n in view.notes if not n.startswith("safetensors holds")]
    elif (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").is_file():
        # PEFT (LoRA, ...): the checkpoint holds the adapters only; the base model is frozen on purpose and not saved
        st = folder / "adapter_model.safetensors"
        if st.is_file():
            view = read_safetensors([st], folder)
            view.notes = [n for n in view.notes if not n.startswith("safetensors holds")]
        else:
            obj, mm = torch_load(folder / "adapter_model.bin", trust_pickle)
            view = CheckpointView(folder, "peft", tensor_infos(obj, notes), [], {}, notes, mm, from_pickle=True)
        view.notes.append(
            "PEFT adapter checkpoint: the adapters are diagnosed; the base model is frozen on purpose "
            "and not in the checkpoint (not a finding)"
        )
        view.meta["peft"] = True
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise LoadError(
                f"{folder}: a Hugging Face Trainer folder without model.safetensors, pytorch_model.bin or "
                "adapter_model.safetensors"
            )
        tensors: dict[str, TensorInfo] = {}
        mm = True
        for b in bins:
            obj, mm_b = torch_load(b, trust_pickle)
            mm &= mm_b
            tensors.update(tensor_infos(obj, notes))
        view = CheckpointView(folder, "hf-trainer", tensors, [], {}, notes, mm, from_pickle=True)
    view.format = "peft" if view.meta.get("peft") else "hf-trainer"
    # Trainer writes optimizer.pt; accelerate's save_state writes optimizer.bin, optimizer_1.bin, ... (torch.save
    # files either way) next to model.safetensors, and scheduler.bin with the schedule's base (peak) lrs.
    opt_paths = [folder / "optimizer.pt"] + sorted(folder.glob("optimizer*.bin"), key=lambda p: (len(p.name), p.name))
    opt_paths = [p for p in opt_paths if p.is_file()]
    if opt_paths and not (folder / "trainer_state.json").is_file() and opt_paths[0].suffix == ".bin":
        view.format = "accelerate"
    for opt_path in opt_paths:
        obj, _ = torch_load(opt_path, trust_pickle)
        found = optimizers_from(obj)
        for o in found:
            o.name = opt_path.stem if len(opt_paths) > 1 else o.name
        view.optimizers += found
    if not opt_paths:
        view.notes.append("no optimizer.pt / optimizer.bin in the folder: optimizer analyses skipped")
    for sched_path in (folder / "scheduler.pt", folder / "scheduler.bin"):
        if sched_path.is_file():
            sched, _ = torch_load(sched_path, trust_pickle)
            if isinstance(sched, dict) and isinstance(sched.get("base_lrs"), list):
                view.meta["scheduled_peak_lrs"] = [float(x) for x in sched["base_lrs"]]
                view.meta.setdefault("schedulers", []).append(sched)
                if view.format == "accelerate":  # no trainer_state.json: the scheduler counts the steps
                    view.meta.setdefault("step", sched.get("last_epoch"))
    for scaler_path in (folder / "scaler.pt", folder / "scaler.bin"):  # the Trainer's / accelerate's GradScaler
        if scaler_path.is_file():
            view.meta["scaler"], _ = torch_load(scaler_path, trust_pickle)
    state = folder / "trainer_state.json"
    if state.is_file():
        ts = json.loads(state.read_text())
        view.meta["step"] = ts.get("global_step")
        view.meta["epoch"] = ts.get("epoch")
        view.meta["max_steps"] = ts.get("max_steps")
        hist = [h for h in ts.get("log_history", []) if "learning_rate" in h]
        if hist:
            view.meta["last_logged_lr"] = hist[-1]["learning_rate"]
            view.meta["logged_lrs"] = [(h.get("step"), h["learning_rate"]) for h in hist]
    if (folder / "training_args.bin").is_file():
        _warmup(view, folder / "training_args.bin")
    cfg = folder / "config.json"
    if cfg.is_file():
        view.meta["hf_config"] = json.loads(cfg.read_text())
        _hf_layout(view, view.meta["hf_config"])
    return view


def _warmup(view: CheckpointView, path: Path) -> None:
    """The Trainer's warmup in optimizer steps (``warmup_steps``, or a ratio of ``max_steps``), from its pickled
    TrainingArguments read with inert stand-ins (no transformers code runs); nothing when it cannot be read."""
    try:
        args = load_with_inert_classes(path, ("transformers.", "accelerate."))
    except Exception:  # noqa: BLE001 - an optional fact: unreadable arguments leave the warmup unknown, not an error
        return
    steps, ratio, total = (getattr(args, k, None) for k in ("warmup_steps", "warmup_ratio", "max_steps"))
    total = view.meta.get("max_steps") or total
    num = (int, float)
    if isinstance(steps, num) and 0 < steps < 1:  # transformers 5: a warmup_steps below 1 is a ratio
        steps, ratio = None, steps
    if isinstance(steps, num) and steps >= 1:
        view.meta["warmup_steps"] = int(steps)
    elif isinstance(ratio, num) and ratio > 0 and isinstance(total, int) and total > 0:
        view.meta["warmup_steps"] = math.ceil(ratio * total)


def _hf_meta_model(config: dict):
    """The model class named in config.json, built on the meta device (no weights, no code from the checkpoint:
    only classes that ship with transformers); None when transformers is absent or cannot build it."""
    try:
        import transformers  # lazy: optional and ~3 s to import; only Hugging Face folders need it
    except ImportError:
        return None
    try:
        archs = config.get("architectures") or []
        klass = getattr(transformers, archs[0], None) if archs else None
        if klass is None:
            return None
        conf = transformers.AutoConfig.for_model(
            **{k: v for k, v in config.items() if k != "model_type"}, model_type=config["model_type"]
        )
        with torch.device("meta"):
            return klass(conf)
    except Exception:  # an architecture this transformers version cannot build
        return None


def _hf_layout(view: CheckpointView, config: dict) -> None:
    """Give the optimizer mapping the parameters as the model registered them.

    safetensors sorts tensor names, and the optimizer lists parameters in registration order, so the order comes
    from the model built on the meta device. Where transformers converts weights between the saved and the
    in-memory layout (v5 MoE models: per-expert ``experts.N.w1`` saved, stacked ``experts.gate_up_proj`` trained),
    the optimizer's state is in the in-memory layout; transformers' own save-time conversion
    (``revert_weight_conversion``, what ``save_pretrained`` applies) carries each state tensor to the saved names.
    """
    model = _hf_meta_model(config)
    if model is None:
        view.notes.append(
            "Hugging Face checkpoint: the model's parameter order could not be rebuilt from config.json "
            "(is transformers installed, and does it know this architecture?); safetensors sorts names, "
            "so optimizer parameters may stay unmapped"
        )
        return
    layout = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if all(n in view.tensors and tuple(view.tensors[n].shape) == shp for n, shp in layout):
        rank = {n: i for i, (n, _) in enumerate(layout)}
        view.tensors = dict(sorted(view.tensors.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        view.notes.append(
            "Hugging Face checkpoint: parameter order rebuilt from config.json on the meta device; "
            "optimizer parameters mapped to names by that order and their state shapes"
        )
        return
    try:
        from transformers.core_model_loading import revert_weight_conversion  # lazy: optional, as above
    except ImportError:
        view.notes.append(
            "Hugging Face checkpoint: the model's in-memory parameters differ from the saved tensors and "
            "this transformers version has no revert_weight_conversion; the optimizer may stay unmapped"
        )
        return

    def to_saved(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return revert_weight_conversion(model, sd)

    view.param_layout, view.to_saved = layout, to_saved
    view.notes.append(
        "Hugging Face checkpoint: the model trains some tensors in another layout than it saves "
        f"({sum(1 for n, _ in layout if n not in view.tensors)} parameters differ); optimizer state "
        "mapped to the in-memory parameters by order and shape, then to the saved tensors with "
        "transformers' own save-time conversion"
    )
