"""Fuzzing the doctor's readers: checkpoints of every supported format, truncated or with bytes overwritten,
give a verdict or one LoadError line, never another exception (hypothesis picks the damage)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_arch.checkpoint import save_checkpoint
from moe_arch.checkpoint.readers import LoadError
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def _trained():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        m(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per format the doctor reads, written by the library that owns the format."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fuzz_originals")
    m, opt = _trained()
    out = {}
    out["torch_dict"] = root / "trainer.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 2}, out["torch_dict"])
    out["state_dict"] = root / "bare.pt"
    torch.save(m.state_dict(), out["state_dict"])
    out["safetensors"] = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out["safetensors"]))
    out["moe_arch"] = root / "ours.pt"
    save_checkpoint(
        out["moe_arch"],
        {
            "step": 2,
            "model": m.state_dict(),
            "optimizers": {"adamw": opt.state_dict()},
            "param_roles": {},
            "config": {},
        },
    )
    out["dcp"] = root / "dcp_step"
    dcp.save({f"model/{k}": v for k, v in m.state_dict().items()}, checkpoint_id=str(out["dcp"]), no_dist=True)
    out["hf_trainer"] = _hf_trainer_folder(root / "hf")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    out["torchtitan"] = root / "step-2"  # torchtitan's layout: model at the top level, optimizer flattened
    dcp.save(
        {
            **get_model_state_dict(m),
            "optimizer": get_optimizer_state_dict(m, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)),
            "train_state": {"step": torch.tensor(2)},
        },
        checkpoint_id=str(out["torchtitan"]),
        no_dist=True,
    )
    if "deepspeed" in FORMATS:
        import os
        import subprocess
        import sys

        ds = root / "deepspeed"
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("deepspeed_run.py")), str(ds), "2"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        shutil.rmtree(ds / "global_step0")
        out["deepspeed"] = ds
    return out


def _hf_trainer_folder(root: Path) -> Path:
    """A checkpoint-N/ folder written by transformers' Trainer itself (model.safetensors, optimizer.pt,
    scheduler.pt, trainer_state.json, ...)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from plain_runs import HFTokens, hf_tiny_llama_bf16
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
    )
    Trainer(model=hf_tiny_llama_bf16(), args=args, train_dataset=HFTokens(n=8)).train()
    return root / "checkpoint-2"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


FORMATS = ["torch_dict", "state_dict", "safetensors", "moe_arch", "dcp", "hf_trainer", "torchtitan"] + (
    ["deepspeed"] if importlib.util.find_spec("deepspeed") else []
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(FORMATS),
    which=st.integers(0, 10),
    cut=st.floats(0, 1),
    writes=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=4),
    truncate=st.booleans(),
)
def test_damaged_checkpoints_give_a_verdict_or_one_line(originals, tmp_path_factory, fmt, which, cut, writes, truncate):
    work = tmp_path_factory.mktemp("fuzz")
    src = originals[fmt]
    dst = work / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    files = _files(dst)
    target = files[which % len(files)]
    data = bytearray(target.read_bytes())
    for pos, chunk in writes:
        at = int(pos * max(0, len(data) - 1))
        data[at : at + len(chunk)] = chunk
    if truncate:
        data = data[: int(cut * len(data))]
    target.write_bytes(bytes(data))
    try:
        d = diagnose(str(dst), DiagnoseOptions(probe=False))
    except LoadError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert d.status in ("healthy", "warning", "critical", "inconclusive")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_undamaged_original_is_read(originals, fmt):
    """Each reader runs on its format's undamaged files every time (hypothesis may not draw every format clean)."""
    d = diagnose(str(originals[fmt]), DiagnoseOptions(probe=False))
    assert d.status in ("healthy", "warning", "critical", "inconclusive") and d.evidence
