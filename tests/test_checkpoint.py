import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from moe_arch.checkpoint import CheckpointError, load_checkpoint
from moe_arch.config import Config
from moe_arch.training.trainer import Trainer


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def with_train(cfg: Config, **train) -> Config:
    d = cfg.to_dict()
    d["train"].update(train)
    return Config.from_dict(d)


def stop_after(trainer: Trainer, step: int) -> Trainer:
    inner = trainer.train_step

    def step_then_stop():
        out = inner()
        if trainer.step == step:
            trainer.request_stop()
        return out

    trainer.train_step = step_then_stop
    return trainer


def test_resume_reproduces_the_uninterrupted_loss_sequence(small_cfg):
    full = with_train(small_cfg, steps=8, log_every=1, run_name="full", grad_accum=2)
    Trainer(full).run()
    half = with_train(small_cfg, steps=8, log_every=1, run_name="half", grad_accum=2)
    r = stop_after(Trainer(half), 4).run()
    assert r.steps == 4 and r.last_checkpoint.name == "checkpoint_interrupted.pt"
    t = Trainer(half, resume="latest")
    assert t.step == 4
    t.run()
    a, b = losses(Path(full.train.out_dir) / "full"), losses(Path(half.train.out_dir) / "half")
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-exact on CPU


def test_checkpoint_contents_and_plain_torch_loading(small_cfg):
    Trainer(with_train(small_cfg, steps=3)).run()
    ck_dir = Path(small_cfg.train.out_dir) / "t" / "checkpoints"
    assert {"step_0000000.pt", "final.pt", "latest.txt"} <= {p.name for p in ck_dir.iterdir()}
    # Readable without the project: plain torch, weights_only=True, in a fresh interpreter.
    code = (
        "import torch,sys; ck=torch.load(sys.argv[1], weights_only=True); "
        "print(ck['step'], ck['tokens_seen'], sorted(ck['optimizers']), len(ck['model']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ck_dir / "final.pt")], capture_output=True, text=True, check=True, cwd="/"
    )
    step, tokens, opts, n = out.stdout.split(" ", 3)
    assert int(step) == 3 and int(tokens) == 3 * 4 * 32
    ck = load_checkpoint(ck_dir / "final.pt")
    for key in ("model", "optimizers", "schedulers", "rng", "config", "precision", "version", "data_state", "epoch"):
        assert key in ck
    assert ck["precision"] == "fp32" and ck["config"]["model"]["d_model"] == 64
    init = load_checkpoint(ck_dir / "step_0000000.pt")
    assert init["step"] == 0 and not torch.equal(init["model"]["embed.weight"], ck["model"]["embed.weight"])


def test_keep_last_prunes_periodic_checkpoints(small_cfg):
    Trainer(with_train(small_cfg, steps=8, ckpt_every=2, keep_last=2)).run()
    names = sorted(p.name for p in (Path(small_cfg.train.out_dir) / "t" / "checkpoints").glob("*.pt"))
    assert names == ["final.pt", "step_0000000.pt", "step_0000004.pt", "step_0000006.pt"]


def test_resume_with_incompatible_config_names_the_fields(small_cfg):
    Trainer(with_train(small_cfg, steps=2)).run()
    d = with_train(small_cfg, steps=4).to_dict()
    d["model"]["d_ff"] = 96
    d["train"]["seq_len"] = 16
    with pytest.raises(CheckpointError) as e:
        Trainer(Config.from_dict(d), resume="latest")
    msg = str(e.value)
    assert "model.d_ff (checkpoint 128, now 96)" in msg and "train.seq_len (checkpoint 32, now 16)" in msg


def _spawn_training(cfg: Config, tmp_path: Path, steps: int) -> subprocess.Popen:
    cfg_path = tmp_path / "cfg.yaml"
    from moe_arch.config import save_config

    save_config(with_train(cfg, steps=steps, log_every=1), cfg_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moe_arch", "train", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_checkpoint_interrupted_and_exits_cleanly(small_cfg, tmp_path, sig):
    proc = _spawn_training(small_cfg, tmp_path, steps=100000)
    lines = []
    for line in proc.stdout:  # wait until it is really training
        lines.append(line)
        if line.startswith("step 3/"):
            break
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 128 + sig, text
    assert "Traceback" not in text
    ck_path = Path(small_cfg.train.out_dir) / "t" / "checkpoints" / "checkpoint_interrupted.pt"
    ck = load_checkpoint(ck_path)
    assert ck["kind"] == "interrupted" and ck["step"] >= 3
    assert f"interrupted at step {ck['step']}" in text
    # The interrupted checkpoint resumes.
    t = Trainer(with_train(small_cfg, steps=ck["step"] + 1), resume=str(ck_path))
    assert t.step == ck["step"]


SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from moe_arch.checkpoint import save_checkpoint
big = {"model": {"w": torch.randn(64, 1024, 1024)}, "step": 2}   # 256 MB: the save takes a while
print("saving", flush=True)
while True:
    save_checkpoint(sys.argv[1], big)
"""


def test_killing_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ck.pt"
    from moe_arch.checkpoint import save_checkpoint

    save_checkpoint(path, {"model": {"w": torch.arange(10.0)}, "step": 1})
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".ck.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    tmps = list(tmp_path.glob(".ck.pt.*.tmp"))
    assert tmps, "the saver never started writing"
    time.sleep(0.05)  # let it write part of the file
    proc.kill()
    proc.wait()
    if path.read_bytes() != before:  # the kill landed after a complete save: that one must be whole
        assert load_checkpoint(path)["step"] == 2
    else:
        assert load_checkpoint(path)["step"] == 1
    # A partial temp file may remain; it is never mistaken for the checkpoint and is cleaned by prune().
    from moe_arch.checkpoint import prune

    prune(tmp_path, keep_last=2)
    assert not list(tmp_path.glob(".ck.pt.*.tmp"))


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """Checkpoints and reports are shared with a group or a job scheduler: an atomic write must not leave them
    readable by their owner only (mkstemp's 0600)."""
    from moe_arch.checkpoint import save_checkpoint
    from moe_arch.utils import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
        save_checkpoint(tmp_path / "c.pt", {"step": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
