"""Nothing lost, nothing cryptic: run folders, locks, resume of foreign files, non-finite state, full or read-only
disks, signals, and malformed input of every kind end in a one-line error (exit 2) or a verdict, never a
traceback and never another run's files deleted."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line_error

from moe_arch import checkpoint as ckpt
from moe_arch.checkpoint import CheckpointError, RunFolderError, RunLock
from moe_arch.config import Config
from moe_arch.training.trainer import NonFiniteLossError, Trainer


def with_train(cfg: Config, **train) -> Config:
    d = cfg.to_dict()
    d["train"].update(train)
    return Config.from_dict(d)


# ------------------------------------------------------------------------------------------ run folders
def test_fresh_start_over_another_runs_checkpoints_is_refused(small_cfg):
    cfg = with_train(small_cfg, steps=2)
    Trainer(cfg).run()
    ck_dir = Path(cfg.train.out_dir) / "t" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ck_dir.iterdir()}
    with pytest.raises(
        RunFolderError,
        match=r"already holds another run's checkpoints.*--resume latest.*"
        r"--train.run_name.*--train.overwrite true",
    ):
        Trainer(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in ck_dir.iterdir()} == before  # nothing touched
    # explicit overwrite: the old run's files and metrics are gone, the new run's are all there
    Trainer(with_train(cfg, overwrite=True, seed=7)).run()
    final = ckpt.load_checkpoint(ck_dir / "final.pt")
    assert final["config"]["train"]["seed"] == 7
    rows = [json.loads(l) for l in (ck_dir.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2]  # not doubled


def test_second_run_in_the_same_folder_is_refused_naming_the_holder(small_cfg):
    first = Trainer(with_train(small_cfg, steps=2))
    with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()} on "):
        Trainer(with_train(small_cfg, steps=2), resume="latest")
    first.run()  # the lock is released when the run ends
    Trainer(with_train(small_cfg, steps=3), resume="latest").run()


HOLD_LOCK = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from moe_arch.checkpoint import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_runs_lock_is_not_stale(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run"), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"pid {proc.pid}"):
        RunLock(tmp_path / "run")
    proc.kill()
    proc.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays; the kernel dropped the lock with the process
    RunLock(tmp_path / "run").release()


def test_resume_latest_on_the_first_launch_starts_fresh(small_cfg):
    said = []
    t = Trainer(with_train(small_cfg, steps=2), resume="latest", log=said.append)
    assert t.step == 0 and t.resumed_from is None
    assert any("no checkpoint" in s and "starting a new run" in s for s in said)
    t.run()
    assert (Path(small_cfg.train.out_dir) / "t" / "checkpoints" / "final.pt").is_file()


def test_pruning_touches_only_this_timeline_and_latest_always_exists(small_cfg):
    cfg = with_train(small_cfg, steps=8, ckpt_every=2, keep_last=1)
    Trainer(cfg).run()
    ck_dir = Path(cfg.train.out_dir) / "t" / "checkpoints"
    assert sorted(p.name for p in ck_dir.glob("step_*")) == ["step_0000000.pt", "step_0000006.pt"]
    # resume the step-6 checkpoint into a longer run that saves step 8, 10: nothing of the later timeline is lost
    Trainer(with_train(cfg, steps=12), resume=str(ck_dir / "step_0000006.pt")).run()
    names = sorted(p.name for p in ck_dir.glob("step_*"))
    assert names == ["step_0000000.pt", "step_0000010.pt"]
    assert (ck_dir / (ck_dir / "latest.txt").read_text().strip()).exists()
    # a checkpoint beyond the current step (another timeline) is never pruned
    ckpt.save_checkpoint(ck_dir / "step_0000099.pt", {"step": 99})
    ckpt.prune(ck_dir, keep_last=1, current_step=10)
    assert (ck_dir / "step_0000099.pt").exists() and (ck_dir / "step_0000010.pt").exists()


# ------------------------------------------------------------------------------------------ foreign checkpoints
@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda ck: ck.pop("optimizers"), "no 'optimizers' in this checkpoint"),
        (
            lambda ck: ck["model"].update({"embed.weight": torch.zeros(3, 3)}),
            "model tensor 'embed.weight' has shape [3, 3]",
        ),
        (lambda ck: ck.update(config="a string"), "'config' is a str, not a dict"),
        (lambda ck: ck["model"].pop("final_norm.weight"), "model tensor 'final_norm.weight' is missing"),
        (lambda ck: ck.update(schedulers=[1, 2]), "'schedulers' is a list, not a dict"),
        (
            lambda ck: ck["optimizers"].update(adamw={"state": {}, "param_groups": []}),
            "'optimizers.adamw' does not fit",
        ),
        (lambda ck: ck.update(step="ten"), "'step' is a str, not a int"),
    ],
)
def test_resuming_a_hand_edited_checkpoint_is_one_line(small_cfg, tmp_path, edit, needle):
    cfg = with_train(small_cfg, steps=2)
    Trainer(cfg).run()
    ck = ckpt.load_checkpoint(Path(cfg.train.out_dir) / "t" / "checkpoints" / "final.pt")
    edit(ck)
    bad = tmp_path / "edited.pt"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError) as e:
        Trainer(with_train(cfg, steps=4), resume=str(bad))
    assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ non-finite state
def test_skipping_stops_at_once_when_the_state_itself_is_non_finite(small_cfg):
    t = Trainer(with_train(small_cfg, steps=20, nan_policy="skip", max_nan_skips=1000, grad_clip=0.0))
    with torch.no_grad():
        t.raw_model.final_norm.weight[0] = float("inf")
    with pytest.raises(NonFiniteLossError) as e:
        t.run()
    msg = str(e.value)
    assert "final_norm.weight" in msg and "skipping batches cannot recover" in msg
    assert "micro-batch 1 of 1" in msg or "after the backward of all 1 micro-batch" in msg
    assert t.nan_skips == 0


# ------------------------------------------------------------------------------------------ disks
def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        CheckpointError, match="could not be written .*No space left on device.*previous checkpoint is kept"
    ):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def _read_only(monkeypatch, root: Path):
    """Writes under ``root`` fail as on a read-only mount (root ignores file modes, so chmod cannot test it)."""
    real_write, real_mkdir = Path.write_bytes, Path.mkdir

    def write_bytes(self, data):
        if str(self).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    def mkdir(self, *a, **k):
        if str(self).startswith(str(root)) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_out_dir_and_data_cache_fail_before_any_work(small_cfg, tmp_path, monkeypatch):
    from moe_arch.data.corpus import DataError

    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    with pytest.raises(RunFolderError, match="cannot write the run there .read-only file system.; choose another"):
        Trainer(with_train(small_cfg, out_dir=str(ro / "runs")))
    d = with_train(small_cfg).to_dict()
    d["data"]["cache_dir"] = str(ro / "cache")
    with pytest.raises(DataError, match="cannot write the token cache there .read-only file system.*data.cache_dir"):
        Trainer(Config.from_dict(d))


def test_diagnose_checks_its_report_folder_before_the_analysis(tmp_path, monkeypatch):
    from moe_arch.cli import main
    from moe_arch.doctor import cli as doctor_cli

    path = tmp_path / "w.pt"
    torch.save({"a.weight": torch.ones(4, 4)}, path)
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    monkeypatch.setattr(doctor_cli, "diagnose", lambda *a, **k: pytest.fail("the analysis ran"))
    assert main(["diagnose", str(path), "--out", str(ro / "report"), "--quiet"]) == 2
    assert main(["export", str(tmp_path), str(ro / "out" / "x.pt")]) == 2


# ------------------------------------------------------------------------------------------ inputs
def test_config_inputs_that_used_to_crash_or_hang_are_one_line(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  d_model: \xff\xfe\n")
    one_line_error(cli("info", bad), "not UTF-8", "bad.yaml")
    t0 = time.time()
    one_line_error(cli("info", "tiny", "--model.d_model", "10000000000"), "model.d_model=10000000000")
    one_line_error(cli("info", "tiny", "--model.n_layers", "100000000"), "model.n_layers=100000000")
    one_line_error(cli("train", "tiny", "--model.vocab_size", "99999999999999"), "model.vocab_size")
    one_line_error(cli("info", "tiny", "--model.d_model", "1000000", "--model.n_layers", "4000"), "parameters")
    assert time.time() - t0 < 60
    one_line_error(
        cli(
            "train",
            "tiny",
            "--model.d_model",
            "65536",
            "--model.n_heads",
            "4",
            "--train.steps",
            "1",
            "--train.out_dir",
            tmp_path,
        ),
        "GiB free",
    )


def test_unknown_field_hint_is_real_and_train_help_lists_overrides(cli):
    out = cli("info", "tiny", "--train.stpes", "3")
    one_line_error(out, "train.stpes", "did you mean 'steps'", "moe-arch config --help-fields train")
    fields = cli("config", "--help-fields", "train")
    assert fields.returncode == 0 and "train.steps" in fields.stdout and "default 400" in fields.stdout
    assert "--section.field VALUE" in cli("train", "--help").stdout


def test_generate_rejects_bad_arguments(tmp_path, cli):
    one_line_error(cli("generate", tmp_path / "x.pt", "--prompt", "a", "--max-new-tokens", "-5"), "--max-new-tokens -5")


# ------------------------------------------------------------------------------------------ signals
def test_sigint_during_start_up_and_final_validation_is_one_line(small_cfg, monkeypatch, capsys):
    from moe_arch import cli as cli_mod
    from moe_arch.training import trainer as trainer_mod

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    cfg = with_train(small_cfg, steps=2)
    monkeypatch.setattr(cli_mod, "_split_overrides", lambda rest: rest)
    monkeypatch.setattr(cli_mod, "load_config", lambda *a, **k: cfg)
    monkeypatch.setattr(trainer_mod, "prepare_data", interrupt)
    assert cli_mod.main(["train"]) == 130
    assert "interrupted during start-up; no checkpoint was written" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(cli_mod, "_split_overrides", lambda rest: rest)
    monkeypatch.setattr(cli_mod, "load_config", lambda *a, **k: cfg)
    monkeypatch.setattr(Trainer, "evaluate", interrupt)
    assert cli_mod.main(["train"]) == 130
    err = capsys.readouterr().err
    assert "interrupted during the final validation; the last checkpoint is" in err and "final.pt" in err


def test_a_second_sigint_stops_at_once_without_a_traceback(small_cfg, tmp_path):
    from moe_arch.config import save_config

    cfg_path = tmp_path / "cfg.yaml"
    save_config(with_train(small_cfg, steps=100000, log_every=1, ckpt_every=0), cfg_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_arch", "train", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        lines.append(line)
        if "received SIGINT" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode in (130, 128 + signal.SIGINT), text  # stopped at once, or the first stop won the race
    assert "Traceback" not in text


def test_sigint_after_the_last_step_does_not_name_a_step_that_does_not_exist(small_cfg):
    t = Trainer(with_train(small_cfg, steps=2))
    said = []
    t.ui.print = said.append
    old = t._install_signals()
    try:
        t.step = 2
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert said and "training is complete (step 2)" in said[0] and "step 3" not in said[0]


# ------------------------------------------------------------------------------------------ doctor inputs
def _safetensors_bytes(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


@pytest.mark.parametrize(
    "header, needle",
    [
        (None, "not JSON"),
        ([1, 2], "a JSON list, not an object"),
        ({"w": {"dtype": "F32", "shape": [4]}}, "has no 'data_offsets'"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, "0 <= begin <= end"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, "but a byte range of 16"),
        ({"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 16]}}, "non-negative integers"),
        ({"w": "text"}, "is a JSON str"),
        ({"w": {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}}, "truncated safetensors file"),
    ],
)
def test_malformed_safetensors_headers_are_one_line(tmp_path, header, needle, cli):
    path = tmp_path / "m.safetensors"
    if header is None:
        raw = b"{not json"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        path.write_bytes(_safetensors_bytes(header))
    out = cli("diagnose", path, "--quiet")
    one_line_error(out, needle, str(path))


def test_random_bytes_with_trust_pickle_and_non_utf8_names(tmp_path, cli):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    out = cli("diagnose", junk, "--trust-pickle", "--quiet")
    one_line_error(out, "junk.pt")
    assert "re-run with --trust-pickle" not in out.stderr
    name = os.fsdecode(b"w\xff.pt")
    good = tmp_path / name
    torch.save({"lin.weight": torch.randn(4, 4), "norm.weight": torch.ones(4)}, str(tmp_path / "tmp.pt"))
    os.replace(tmp_path / "tmp.pt", good)
    from moe_arch.checkpoint.readers import open_checkpoint

    view = open_checkpoint(good)
    assert set(view.tensors) == {"lin.weight", "norm.weight"}


def _dcp_checkpoint(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model/lin.weight": torch.randn(64, 64), "model/norm.weight": torch.ones(64)}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_distributed_checkpoint_with_a_damaged_shard_is_one_line(tmp_path, damage, cli):
    folder = tmp_path / "step_dcp"
    _dcp_checkpoint(folder)
    shard = next(folder.glob("*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    out = cli("diagnose", folder, "--quiet", "--no-probe")
    one_line_error(out, str(folder))
    out = cli("export", folder, tmp_path / "out.pt")
    one_line_error(out, str(folder))


def test_resume_and_export_of_our_distributed_checkpoint_with_a_truncated_shard(small_cfg, tmp_path, cli):
    from moe_arch.checkpoint.distributed import save_dcp

    t = Trainer(small_cfg)
    folder = save_dcp(t.ckpt_dir / "step_0000000", t.raw_model, t.optimizers, t._meta("init"))
    t.close()
    del t
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="a shard is missing, truncated or does not match"):
        Trainer(small_cfg, resume=str(folder))
    one_line_error(cli("export", folder, tmp_path / "out.pt"), "a shard is missing, truncated")
    one_line_error(cli("diagnose", folder, "--quiet", "--no-probe"), str(folder))


def test_a_bad_kernel_isa_is_one_line_before_training(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_ARCH_KERNEL_ISA", "sse9")
    one_line_error(cli("train", "tiny", "--train.out_dir", tmp_path), "MOE_ARCH_KERNEL_ISA='sse9'")


def test_eval_and_export_input_errors_are_one_line(tmp_path, cli):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = cli("eval", tmp_path / "junk.pt")
    assert out.returncode == 2 and "junk.pt: cannot be read as a checkpoint" in out.stderr
    out = cli("eval", tmp_path / "missing.pt")
    assert out.returncode == 2 and "missing.pt: no such checkpoint file" in out.stderr
    out = cli("export", tmp_path / "junk.pt")
    assert out.returncode == 2 and "give either OUTPUT.pt" in out.stderr
    out = cli("train", "--init-from", tmp_path)
    assert out.returncode == 2 and (
        "no config.json; give a folder written by `moe-arch export CKPT --hf DIR`" in out.stderr
    )
