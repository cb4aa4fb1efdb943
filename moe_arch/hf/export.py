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

from moe_arch.config import Config

PACKAGE = Path(__file__).resolve().parents[1]
MODEL_FILES = ["attention.py", "cpu_kernels.py", "fused.py", "generation.py", "layers.py", "losses.py", "mamba.py",
               "mod.py", "moe.py", "roles.py", "transformer.py"]
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
                for m in MODEL_FILES + ["utils.py"])
        (folder / f).write_text(text)


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_size: str = "5GB") -> Path:
    from huggingface_hub import save_torch_state_dict

    from moe_arch.evaluation.loss import load_for_eval

    out = Path(out)
    ck = load_for_eval(checkpoint, torch.device("cpu"))
    cfg: Config = ck.cfg
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: the folder exists and is not empty; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {f"model.{k}": v.detach().contiguous() for k, v in ck.model.state_dict().items()}
    save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
    dtype = next(iter(state.values())).dtype
    tok = ck.tokenizer
    config = {
        "architectures": ["MoeArchForCausalLM"], "model_type": "moe_arch",
        "auto_map": {"AutoConfig": "configuration_moe_arch.MoeArchConfig",
                     "AutoModelForCausalLM": "modeling_moe_arch.MoeArchForCausalLM"},
        "moe_arch": cfg.to_dict()["model"], "torch_dtype": str(dtype).removeprefix("torch."),
        "eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id if tok.add_bos else tok.eos_id,
        "use_cache": False, "moe_arch_step": ck.step,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.eos_id, "bos_token_id": config["bos_token_id"], "use_cache": False}, indent=2))
    tok.save(tmp)
    write_code(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the folder appears complete or not at all
    return out


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, state dict with HybridLM names) of an exported folder; safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{folder}: no config.json; give a folder written by `moe-arch export CKPT --hf DIR`")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "moe_arch" or "moe_arch" not in cfg:
        raise ExportError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, not a moe_arch export; "
                          "--init-from reads folders written by `moe-arch export --hf`")
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return cfg["moe_arch"], {k.removeprefix("model."): v for k, v in state.items()}


def init_from_config(cfg: Config, folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """``train --init-from DIR``: the run takes the folder's model config and tokenizer; a model field set by hand
    that disagrees is an error naming it. Returns the config and the weights to start from."""
    model_cfg, state = read_hf_folder(folder)
    mine = cfg.to_dict()
    for k, v in model_cfg.items():
        if f"model.{k}" in cfg.explicit and mine["model"].get(k) != v:
            raise ExportError(f"model.{k}={mine['model'].get(k)!r} was set by hand, but {folder} holds a model with "
                              f"{k}={v!r}; remove the override to start from that model")
    mine["model"] = {**mine["model"], **model_cfg}
    if "data.tokenizer" not in cfg.explicit:
        mine["data"]["tokenizer"] = str(Path(folder))
    out = Config.from_dict(mine, f"{folder} (--init-from)")
    out.explicit = cfg.explicit | {"model.vocab_size"}  # the weights fix it: a different tokenizer is an error
    return out, state
