"""Write a Hugging Face model folder from a moe_arch checkpoint, and read one back for ``train --init-from``.

The folder holds ``config.json`` (``auto_map`` to the classes below), the weights as safetensors (sharded above
``max_shard_size`` by ``huggingface_hub``, with its index), the tokenizer (``tokenizer.json`` +
``tokenizer_config.json``) and the modeling code: ``modeling_moe_arch.py`` / ``configuration_moe_arch.py`` from
this package, and the project's model files themselves with ``moe_arch.`` imports made relative (transformers
copies a remote-code module and the files it imports relatively). The C kernels' sources are not Python and do
not travel through transformers' module cache: the loaded model runs the documented PyTorch paths (one warning),
with the same numbers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from moe_arch.checkpoint import CheckpointError, check_model_state
from moe_arch.config import Config
from moe_arch.evaluation.loss import load_for_eval
from moe_arch.model.transformer import HybridLM
from moe_arch.utils import os_reason, parse_size, writable_folder

PACKAGE = Path(__file__).resolve().parents[1]
MODEL_FILES = [
    "attention.py",
    "cpu_kernels.py",
    "fused.py",
    "generation.py",
    "layers.py",
    "losses.py",
    "mamba.py",
    "mod.py",
    "moe.py",
    "roles.py",
    "transformer.py",
]
HERE_FILES = ["configuration_moe_arch.py", "modeling_moe_arch.py"]


class ExportError(RuntimeError):
    pass


def relative_imports(source: str, name: str) -> str:
    """``from moe_arch.model.x import`` -> ``from .x import``; ``from moe_arch.model import x`` -> ``from . import
    x``; ``from moe_arch.config|utils import`` -> ``from .config|utils import``. Anything else of moe_arch left
    is an error (the model code must not reach outside the model)."""
    out = re.sub(r"\bfrom moe_arch\.model\.(\w+) import", r"from .\1 import", source)
    out = re.sub(r"\bfrom moe_arch\.model import (\w+)", r"from . import \1", out)
    out = re.sub(r"\bfrom moe_arch\.(config|utils) import", r"from .\1 import", out)
    left = [line.strip() for line in out.splitlines() if re.search(r"\bmoe_arch\.\w", line) and "import" in line]
    if left:
        raise ExportError(f"{name}: imports outside the model code cannot be exported: {left[0]}")
    return out


def write_code(folder: Path) -> None:
    for f in MODEL_FILES:
        (folder / f).write_text(relative_imports((PACKAGE / "model" / f).read_text(), f))
    for f in ("config.py", "utils.py"):
        (folder / f).write_text(relative_imports((PACKAGE / f).read_text(), f))
    for f in HERE_FILES:
        text = (Path(__file__).with_name(f)).read_text()
        if f == "modeling_moe_arch.py":
            # transformers copies only files named in `from .x import` lines; `from . import x` is not one.
            text += "\n\n# Every model file, so that transformers' remote-code loader copies them all.\n" + "".join(
                f"from .{Path(m).stem} import __name__ as _{Path(m).stem}_module  # noqa: E402,F401\n"
                for m in MODEL_FILES + ["utils.py"]
            )
        (folder / f).write_text(text)


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_size: str | int = "5GB") -> Path:
    out = Path(out)
    # Everything about the destination is checked before the checkpoint is read (a large one takes minutes).
    try:
        shard_bytes = (
            max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size, "--max-shard-size")
        )
    except ValueError as e:
        raise ExportError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise ExportError(f"--hf {out}: is a file, not a folder; give a new (or empty) folder for the export")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--hf {out}: the folder exists and is not empty; choose a new folder")
    writable_folder(out.parent, "exported model folder", "--hf")
    ck = load_for_eval(checkpoint, torch.device("cpu"))
    cfg: Config = ck.cfg
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_folder(tmp, ck, cfg, shard_bytes, save_torch_state_dict)
        if out.exists():
            out.rmdir()
        tmp.rename(out)  # the folder appears complete or not at all
    except (OSError, SafetensorError) as e:  # a full disk: safetensors reports it as SafetensorError
        reason = os_reason(e) if isinstance(e, OSError) else (str(e).splitlines() or [type(e).__name__])[0][:200]
        if "No space left" in reason or "StorageFull" in reason:
            reason = "no space left on the device"
        raise ExportError(
            f"--hf {out}: the export could not be written ({reason}); nothing was left there. Free "
            "space or choose another --hf folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_folder(tmp: Path, ck, cfg: Config, shard_bytes: int, save_torch_state_dict) -> None:
    state = {f"model.{k}": v.detach().contiguous() for k, v in ck.model.state_dict().items()}
    save_torch_state_dict(state, tmp, max_shard_size=shard_bytes)
    dtype = next(iter(state.values())).dtype
    tok = ck.tokenizer
    config = {
        "architectures": ["MoeArchForCausalLM"],
        "model_type": "moe_arch",
        "auto_map": {
            "AutoConfig": "configuration_moe_arch.MoeArchConfig",
            "AutoModelForCausalLM": "modeling_moe_arch.MoeArchForCausalLM",
        },
        "moe_arch": cfg.to_dict()["model"],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eos_token_id": tok.eos_id,
        "bos_token_id": tok.bos_id if tok.add_bos else tok.eos_id,
        "use_cache": False,
        "moe_arch_step": ck.step,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tok.eos_id, "bos_token_id": config["bos_token_id"], "use_cache": False}, indent=2)
    )
    tok.save(tmp)
    write_code(tmp)


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, state dict with HybridLM names) of an exported folder; safetensors only."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{folder}: no config.json; give a folder written by `moe-arch export CKPT --hf DIR`")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_path}: not JSON ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise ExportError(
            f"{cfg_path}: a JSON {type(cfg).__name__}, not an object; --init-from reads folders written "
            "by `moe-arch export --hf`"
        )
    if cfg.get("model_type") != "moe_arch" or "moe_arch" not in cfg:
        raise ExportError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}, not a moe_arch export; "
            "--init-from reads folders written by `moe-arch export --hf`"
        )
    if not isinstance(cfg["moe_arch"], dict):
        raise ExportError(
            f"{cfg_path}: 'moe_arch' is a {type(cfg['moe_arch']).__name__}, not the model config's "
            "object; export the checkpoint again"
        )
    index = folder / "model.safetensors.index.json"
    try:
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(
            f"{index}: not a safetensors index (no 'weight_map' of file names: {type(e).__name__})"
        ) from None
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(folder / f)))
        except (OSError, SafetensorError) as e:
            raise ExportError(
                f"{folder / f}: cannot be read as safetensors ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:200]})"
            ) from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg["moe_arch"].get("tie_embeddings"):  # safetensors stores a shared tensor once, under one of its names
        for a, b in (("lm_head.weight", "embed.weight"), ("embed.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    return cfg["moe_arch"], state


def init_from_config(cfg: Config, folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """``train --init-from DIR``: the run takes the folder's model config and tokenizer; a model field set by hand
    that disagrees is an error naming it. Returns the config and the weights to start from."""
    model_cfg, state = read_hf_folder(folder)
    mine = cfg.to_dict()
    for k, v in model_cfg.items():
        if f"model.{k}" in cfg.explicit and mine["model"].get(k) != v:
            raise ExportError(
                f"model.{k}={mine['model'].get(k)!r} was set by hand, but {folder} holds a model with "
                f"{k}={v!r}; remove the override to start from that model"
            )
    mine["model"] = {**mine["model"], **model_cfg}
    if "data.tokenizer" not in cfg.explicit:
        mine["data"]["tokenizer"] = str(Path(folder))
    out = Config.from_dict(mine, f"{folder} (--init-from)")
    with torch.device("meta"):  # shapes only
        expected = HybridLM(out.model).state_dict()
    try:
        check_model_state(folder, state, expected)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    out.explicit = cfg.explicit | {"model.vocab_size"}  # the weights fix it: a different tokenizer is an error
    return out, state
