"""Two processes on the CPU with the gloo backend, launched by torchrun: FSDP2 / DDP training, sharded
checkpoints resumed on 1 and 2 ranks, the doctor on sharded checkpoints, the monitor under FSDP2, a killed rank."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_checkpoint import losses, with_train

from moe_arch.config import Config, save_config
from moe_arch.doctor.pipeline import diagnose
from moe_arch.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def torchrun(
    cfg: Config, tmp_path: Path, *extra: str, nproc: int = 2, timeout: int = 240
) -> subprocess.CompletedProcess:
    path = tmp_path / f"cfg_{cfg.train.run_name}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "moe_arch",
        "train",
        str(path),
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out


def run_losses(cfg: Config) -> list[float]:
    got = losses(Path(cfg.train.out_dir) / cfg.train.run_name)
    return [got[s] for s in sorted(got)]


@pytest.fixture
def dist_cfg(small_cfg):
    return with_train(small_cfg, steps=6, batch_size=4, log_every=1, ckpt_every=3, sample_tokens=0)


def test_two_ranks_match_one_rank_with_the_same_global_batch(dist_cfg, tmp_path):
    fsdp = with_train(dist_cfg, run_name="fsdp", parallel="fsdp")
    ddp = with_train(dist_cfg, run_name="ddp", parallel="ddp")
    single = with_train(dist_cfg, run_name="single", batch_size=8)
    out = torchrun(fsdp, tmp_path)
    assert out.stdout.count("step 6/6") == 1  # only rank 0 prints
    torchrun(ddp, tmp_path)
    Trainer(single).run()
    ref = run_losses(single)
    # Same data, same math; what differs is float summation order, amplified by Muon's bf16 Newton-Schulz.
    torch.testing.assert_close(torch.tensor(run_losses(fsdp)), torch.tensor(ref), rtol=2e-4, atol=0)
    torch.testing.assert_close(torch.tensor(run_losses(ddp)), torch.tensor(ref), rtol=2e-4, atol=0)
    rows = [json.loads(l) for l in (Path(fsdp.train.out_dir) / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["kind"] == "train"][-1]["tokens_seen"] == 6 * 8 * 32  # counted over both ranks
    ck = Path(fsdp.train.out_dir) / "fsdp" / "checkpoints"
    assert (ck / "final" / ".metadata").is_file() and (ck / "final" / "meta.pt").is_file()
    assert (ck / "latest.txt").read_text().strip() == "final"


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_matches_one_rank(dist_cfg, tmp_path):
    """FSDP2 shards each block; activation checkpointing recomputes the block in the backward, where FSDP gathers
    its parameters again: the losses are those of one process without either."""
    fsdp = with_train(dist_cfg, run_name="fsdp_ac", parallel="fsdp", activation_checkpointing="full", ckpt_every=0)
    single = with_train(dist_cfg, run_name="single", batch_size=8, ckpt_every=0)
    torchrun(fsdp, tmp_path)
    Trainer(single).run()
    torch.testing.assert_close(torch.tensor(run_losses(fsdp)), torch.tensor(run_losses(single)), rtol=2e-4, atol=0)


@pytest.mark.slow  # three torchrun launches, ~60 s
def test_sharded_checkpoint_resumes_on_two_and_one_ranks_and_the_doctor_reads_it(dist_cfg, tmp_path):
    base = with_train(dist_cfg, run_name="base", parallel="fsdp")
    torchrun(base, tmp_path)
    a = run_losses(base)
    mid = Path(base.train.out_dir) / "base" / "checkpoints" / "step_0000003"
    assert (mid / ".metadata").is_file()
    # Resume on 2 ranks: the continuation is the uninterrupted run's.
    two = with_train(dist_cfg, run_name="two", parallel="fsdp")
    torchrun(two, tmp_path, "--resume", str(mid))
    torch.testing.assert_close(torch.tensor(run_losses(two)), torch.tensor(a[3:]), rtol=1e-6, atol=0)
    # Resume on 1 rank (same global batch): resharded by DCP, close to the 2-rank continuation.
    one = with_train(dist_cfg, run_name="one", batch_size=8)
    t = Trainer(one, resume=str(mid))
    assert t.step == 3 and t.tokens_seen == 3 * 8 * 32
    t.run()
    torch.testing.assert_close(torch.tensor(run_losses(one)), torch.tensor(a[3:]), rtol=2e-4, atol=0)
    # The doctor reads the sharded checkpoint (reference: the sharded step-0 folder) and its export.
    final = Path(base.train.out_dir) / "base" / "checkpoints" / "final"
    d = diagnose(str(final))
    assert d.checkpoint["format"] == "moe_arch-dcp" and d.checkpoint["reference"].endswith("step_0000000")
    assert d.status == "healthy" and d.optimizers and all(o["n_mapped"] == o["n_params"] for o in d.optimizers)
    export(final, tmp_path / "one.pt")
    ck = torch.load(tmp_path / "one.pt", weights_only=True)
    view = d.evidence  # same weights in both forms
    from moe_arch.checkpoint.readers import open_checkpoint

    dcp_view = open_checkpoint(final)
    for name in ("embed.weight", "layers.1.ffn.experts.w_gate", "final_norm.weight"):
        assert torch.equal(ck["model"][name], dcp_view.tensors[name].get())
    assert diagnose(str(tmp_path / "one.pt")).status == "healthy" and view
    # `moe-arch eval` reads both forms and gives the same validation loss.
    from moe_arch.evaluation.loss import run_eval

    sharded = run_eval(str(final), {}, "val", 1024, "cpu", log=lambda *a: None)
    single = run_eval(str(tmp_path / "one.pt"), {}, "val", 1024, "cpu", log=lambda *a: None)
    assert sharded["tokens"] == single["tokens"] == 1024 and sharded["step"] == single["step"]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-6) and math.isfinite(single["bits_per_byte"])


def test_monitor_and_doctor_under_fsdp_bf16_pure(dist_cfg, tmp_path):
    d = with_train(
        dist_cfg, run_name="bf16", parallel="fsdp", precision="bf16-pure", steps=10, warmup_steps=0, ckpt_every=0
    ).to_dict()
    d["optim"].update(muon_lr=1e-3, adamw_lr=3e-4)
    d["monitor"] = {"enabled": True, "interval": 5, "window": 10}
    cfg = Config.from_dict(d)
    out = torchrun(cfg, tmp_path)
    run = Path(cfg.train.out_dir) / "bf16"
    alerts = [json.loads(l) for l in (run / "alerts.jsonl").read_text().splitlines()]
    norms = {f"layers.{i}.{n}.weight" for i in range(4) for n in ("seq_norm", "ffn_norm")} | {"final_norm.weight"}
    assert alerts[0]["cause"] == "precision_underflow" and alerts[0]["step"] == 10
    assert norms <= set(alerts[0]["tensors"])
    assert out.stdout.count("monitor critical") == 1  # rank 0 speaks, once
    diag = diagnose(str(run / "checkpoints" / "final"))
    crit = [f for f in diag.findings if f.severity == "critical"]
    assert crit[0].cause == "precision_underflow" and norms <= set(crit[0].tensors)


def test_a_killed_rank_leaves_the_last_complete_checkpoint_loadable(dist_cfg, tmp_path):
    cfg = with_train(dist_cfg, run_name="killed", parallel="fsdp", steps=10_000, ckpt_every=2, keep_last=2)
    latest = kill_a_rank(cfg, tmp_path)
    assert (latest / "meta.pt").is_file()
    t = Trainer(with_train(cfg, batch_size=8, steps=t_step(latest) + 1), resume=str(latest))
    assert t.step == t_step(latest) >= 4
    t.run()


def kill_a_rank(cfg: Config, tmp_path: Path, at: str = "step 5/") -> Path:
    """Train ``cfg`` on 2 ranks, SIGKILL one rank once rank 0 printed a line starting with ``at`` (possibly while
    a checkpoint is being written); returns the newest complete checkpoint ``latest.txt`` names."""
    import psutil

    path = tmp_path / f"{cfg.train.run_name}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "moe_arch", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    for line in proc.stdout:
        if line.startswith(at):
            break
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "moe_arch" in " ".join(c.cmdline())]
    assert workers
    workers[-1].send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    ck = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"
    latest = ck / (ck / "latest.txt").read_text().strip()
    assert (latest / ".metadata").is_file()
    return latest


def export(folder: Path, out: Path) -> None:
    """``moe-arch export FOLDER OUT`` (a sharded checkpoint to one file), as a user runs it."""
    res = subprocess.run(
        [sys.executable, "-m", "moe_arch", "export", str(folder), str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr


def t_step(folder: Path) -> int:
    from moe_arch.checkpoint.distributed import read_meta

    return int(read_meta(folder)["step"])
