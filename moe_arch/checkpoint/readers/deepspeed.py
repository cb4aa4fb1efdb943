"""DeepSpeed checkpoints: ``engine.save_checkpoint(dir)`` writes ``dir/latest`` and ``dir/global_stepN/`` with

- ``mp_rank_00_model_states.pt``: the module's state dict (``module``), ``global_steps``, ``ds_config``, and for
  ZeRO ``param_shapes`` (per param group, name -> shape) or, without ZeRO, the optimizer's own state dict;
- ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (ZeRO stages 1 and 2), one per data-parallel rank: the
  wrapped optimizer's state over *flat* partitions of each param group, and ``param_slice_mappings``, which say
  where each named parameter's fragment lies in that rank's partition.

Each parameter's state is put back together from its fragments on every rank and reshaped to its shape, so the
mapping to names is exact (by name, not by order). ZeRO stage 3 (per-parameter partitions) is not read: its state
stays unmapped, and the report says so.

DeepSpeed pickles some of its own objects into these files (``LossScaler``, ``ZeroStageEnum``,
``fragment_address``). They are loaded with ``torch.load(weights_only=True)`` and an allowlist that maps exactly
those ``deepspeed.*`` names to inert stand-ins holding the pickled fields: no DeepSpeed code (or any code) runs,
and DeepSpeed need not be installed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moe_arch.checkpoint.readers.base import (
    CheckpointView,
    LoadError,
    OptimizerInfo,
    TensorInfo,
    load_with_inert_classes,
    optimizers_from,
    tensor_infos,
)

MODEL_STATES = "mp_rank_00_model_states.pt"
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_MP_RANK = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _load(path: Path, trust_pickle: bool) -> Any:
    return load_with_inert_classes(path, ("deepspeed.",), trust_pickle)


def is_deepspeed_dir(p: Path) -> bool:
    return p.is_dir() and (
        (p / MODEL_STATES).is_file()
        or (p / "latest").is_file()
        and any((p / d.name / MODEL_STATES).is_file() for d in p.glob("global_step*"))
    )


def _step_folder(p: Path) -> Path:
    if (p / MODEL_STATES).is_file():
        return p
    tag = (p / "latest").read_text().strip()
    folder = p / tag
    if not (folder / MODEL_STATES).is_file():
        raise LoadError(f"{p / 'latest'}: names {tag!r}, but {folder / MODEL_STATES} does not exist")
    return folder


def _zero_optimizer(
    files: list[Path], param_shapes: list[dict], trust_pickle: bool, notes: list[str]
) -> OptimizerInfo | None:
    """One optimizer state dict keyed by parameter name, assembled from every rank's flat partitions."""
    fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
    groups: list[dict] = []
    steps: dict[int, Any] = {}
    for path in files:
        obj = _load(path, trust_pickle)
        osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        base = osd.get("base_optimizer_state") if isinstance(osd, dict) else None
        mappings = osd.get("param_slice_mappings") if isinstance(osd, dict) else None
        if not isinstance(base, dict) or not isinstance(mappings, list):
            stage = getattr(osd.get("zero_stage"), "args", (None,))[0] if isinstance(osd, dict) else None
            notes.append(
                f"DeepSpeed optimizer state in {path.name} is not ZeRO stage 1/2 (stage {stage}); it is not "
                "mapped to tensor names"
            )
            return None
        if not groups:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in base.get("param_groups", [])]
        for gi, mapping in enumerate(mappings):
            flat = base["state"].get(gi, {})
            steps.setdefault(gi, flat.get("step"))
            for name, frag in mapping.items():
                start, numel = int(frag.start), int(frag.numel)
                for key, t in flat.items():
                    if isinstance(t, torch.Tensor) and t.dim() == 1:
                        fragments.setdefault(name, {}).setdefault(key, []).append(t[start : start + numel])
    state: dict[int, dict] = {}
    out_groups = []
    pid = 0
    for gi, shapes in enumerate(param_shapes):
        names = []
        for name, shape in shapes.items():
            st = {}
            for key, parts in fragments.get(name, {}).items():
                flat = torch.cat(parts) if len(parts) > 1 else parts[0]
                if flat.numel() != torch.Size(shape).numel():
                    raise LoadError(
                        f"DeepSpeed optimizer state for {name}: {flat.numel()} elements over the ranks' "
                        f"files, the parameter has {torch.Size(shape).numel()} (a rank's file missing?)"
                    )
                st[key] = flat.view(tuple(shape))
            if st and steps.get(gi) is not None:
                st["step"] = steps[gi]
            state[pid] = st
            names.append(name)
            pid += 1
        out_groups.append(
            {
                **(groups[gi] if gi < len(groups) else {}),
                "params": list(range(pid - len(names), pid)),
                "param_names": names,
            }
        )
    return OptimizerInfo("optimizer", {"state": state, "param_groups": out_groups})


def read_deepspeed(path: Path, trust_pickle: bool = False) -> CheckpointView:
    folder = _step_folder(path)
    model_states = _load(folder / MODEL_STATES, trust_pickle)
    if not isinstance(model_states, dict) or not isinstance(model_states.get("module"), dict):
        raise LoadError(f"{folder / MODEL_STATES}: no 'module' state dict (not a DeepSpeed model-states file?)")
    notes = [
        f"DeepSpeed checkpoint {folder.name} (ZeRO stage "
        f"{(model_states.get('ds_config') or {}).get('zero_optimization', {}).get('stage', 0)})"
    ]
    tensors = tensor_infos(model_states["module"], notes)
    optimizers: list[OptimizerInfo] = []
    files = sorted(
        (p for p in folder.iterdir() if _OPTIM.match(p.name)), key=lambda p: int(_OPTIM.match(p.name).group(1))
    )
    if isinstance(model_states.get("optimizer"), dict):  # no ZeRO: the optimizer's own state dict
        optimizers = optimizers_from(model_states["optimizer"])
    elif files and isinstance(model_states.get("param_shapes"), list):
        dp = model_states.get("dp_world_size")
        if isinstance(dp, int) and dp != len(files):
            notes.append(f"{len(files)} optimizer partition files for {dp} data-parallel ranks: state not mapped")
        else:
            opt = _zero_optimizer(files, model_states["param_shapes"], trust_pickle, notes)
            optimizers = [opt] if opt is not None else []
            if opt is not None:
                notes.append(f"ZeRO optimizer state assembled by name from {len(files)} rank partition(s)")
    else:
        notes.append("no DeepSpeed optimizer state in the folder: optimizer analyses skipped")
    meta: dict[str, Any] = {"step": model_states.get("global_steps"), "config": model_states.get("ds_config")}
    replicas = _tensor_parallel_copies(folder, model_states, tensors, trust_pickle, meta, notes)
    view = CheckpointView(folder, "deepspeed", tensors, optimizers, meta, notes, mmapped=True, from_pickle=True)
    view.replicas = replicas
    return view


def _tensor_parallel_copies(
    folder: Path, rank0: dict, tensors: dict[str, TensorInfo], trust_pickle: bool, meta: dict, notes: list[str]
) -> dict[str, dict[int, TensorInfo]]:
    """Each tensor-parallel rank's copy of the tensors rank 0 saved too (``mp_rank_01_model_states.pt``, ...), with
    the parameter patterns Megatron-DeepSpeed declares replicated over tensor parallelism (its universal
    checkpoint info), when saved."""
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _MP_RANK.match(p.name))}
    info = rank0.get("universal_checkpoint_info")
    patterns = info.get("tp_replicated_parameter_patterns") if isinstance(info, dict) else None
    if isinstance(patterns, (list, tuple)) and all(isinstance(x, str) for x in patterns):
        meta["replicated_patterns"] = list(patterns)
    if len(files) < 2:
        return {}
    copies: dict[str, dict[int, TensorInfo]] = {n: {0: t} for n, t in tensors.items()}
    for rank, path in sorted(files.items()):
        if rank == 0:
            continue
        states = _load(path, trust_pickle)
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict):
            raise LoadError(f"{path}: no 'module' state dict (not a DeepSpeed model-states file?)")
        for name, t in tensor_infos(module, []).items():
            if name in copies and t.shape == tensors[name].shape:
                copies[name][rank] = t
    notes.append(f"{len(files)} tensor-parallel ranks (mp_rank_XX files): each rank's copy of its tensors read")
    return {n: c for n, c in copies.items() if len(c) > 1}
