"""Nothing lost, nothing cryptic, round 2: the token cache under real SIGKILLs (at the split, at every durable
point of a build, twice in a row), damaged caches met by training, two builders at once; a run's history after a
kill; a tokenizer changed under a checkpoint; a damaged latest.txt.

A crash here is a real SIGKILL: a forked child (cheap: the parent has the modules imported) or a subprocess (for
training, whose thread pools a fork could deadlock) patches one function so that it kills its own process at a
deterministic call, on the real code path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, one_line_error
from test_faults import _read_only, with_train

from moe_arch import checkpoint as ckpt
from moe_arch.checkpoint import CheckpointError
from moe_arch.config import Config, DataConfig, load_config, save_config
from moe_arch.data import dataset as ds
from moe_arch.data.corpus import DataError
from moe_arch.data.dataset import prepare_data
from moe_arch.data.tokenizer import train_bpe
from moe_arch.training.metrics import rewind_history
from moe_arch.training.trainer import Trainer

DOCS = [
    f"Document {i}: the router sends token {i % 7} to expert {i % 5}; the norm weight moves by {i} ulp."
    for i in range(240)
]
BOOK = "".join(f"line {i} of a long book about experts, routers and the norms between them.\n" for i in range(600))


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    tok = train_bpe(DOCS * 3 + [BOOK], 400)
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(out.parent)
    return out


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "book.txt").write_text(BOOK)
    return {"jsonl": str(tmp_path / "docs.jsonl"), "text": str(tmp_path / "book.txt")}


def arrays(d) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(d.train).copy(), np.asarray(d.val).copy()


def killed_in_child(work, patches: dict) -> int:
    """Run ``work()`` in a forked child in which ``patches`` ({(object, name): n}) make the n-th call of each named
    function (counted together) SIGKILL the child before the call runs. Returns the signal or exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = {"n": 0}
            for (obj, name), n in patches.items():
                real = getattr(obj, name)

                def hooked(*a, _real=real, _n=n, **k):
                    calls["n"] += 1
                    if calls["n"] == _n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*a, **k)

                setattr(obj, name, hooked)
            work()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the exit code reports it
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def count_calls(monkeypatch, targets: list, work) -> int:
    """How many calls of ``targets`` ([(object, name)]) ``work()`` makes: the kill points a sweep can choose."""
    calls = {"n": 0}
    for obj, name in targets:
        real = getattr(obj, name)

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(obj, name, counted)
    work()
    monkeypatch.undo()
    return calls["n"]


# ------------------------------------------------------------------------------------------ item 1: the split
def test_a_kill_between_the_tail_split_and_the_manifest_resumes_to_the_uninterrupted_cache(tmp_path, sources):
    """One text file (a tail split), train-bpe: SIGKILL just before meta.json is written, rerun. It used to
    resume by lengthening the already-cut train shard with zeros: 100% of the validation tokens were 0."""
    cfg = DataConfig(source=sources["text"], cache_dir=str(tmp_path / "c"))
    real = ds._write_json
    pid = os.fork()
    if pid == 0:
        try:

            def hooked(path, obj, indent=None):
                if Path(path).name == "meta.json":
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(path, obj, indent)

            ds._write_json = hooked
            prepare_data(cfg, 300, log=quiet)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the exit code reports it
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    cache = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert not (cache / "meta.json").exists() and (cache / "progress.json").exists()
    logs = []
    resumed = prepare_data(cfg, 300, log=logs.append)
    assert any("resuming the interrupted tokenization" in m for m in logs), logs
    assert not any("training a byte-level BPE" in m for m in logs)  # the journal vouched for its tokenizer
    fresh = prepare_data(DataConfig(source=sources["text"], cache_dir=str(tmp_path / "c2")), 300, log=quiet)
    rt, rv = arrays(resumed)
    ft, fv = arrays(fresh)
    assert resumed.meta["split"] == "tail" and np.array_equal(rt, ft) and np.array_equal(rv, fv)
    assert (rv == 0).mean() == (fv == 0).mean() < 0.05  # the symptom: it was 1.0
    tok = resumed.tokenizer
    assert tok.decode(np.concatenate([rt, rv])[:-1].tolist()) == BOOK  # the stream is the book, whole


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_a_kill_at_any_durable_point_of_a_build_resumes_to_identical_shards(tmp_path, sources, bpe, monkeypatch, kind):
    """Every fsync and rename of a build is a point a crash can land after: kill there (and, for some, again in
    the resumed build), with garbage past the journal as a torn write leaves it; the result is always the
    uninterrupted cache."""
    from moe_arch.data import corpus as corpus_mod

    def small_batches():  # several batches, and the book in pieces (a document that spans batches)
        monkeypatch.setattr(ds, "BATCH_DOCS", 48)
        monkeypatch.setattr(ds, "BATCH_CHARS", 6000)
        monkeypatch.setattr(corpus_mod, "TEXT_PIECE_CHARS", 2000)

    small_batches()

    def cfg(name):
        return DataConfig(source=sources[kind], tokenizer=str(bpe), shard_tokens=1024, cache_dir=str(tmp_path / name))

    targets = [(os, "fsync"), (os, "replace")]
    n = count_calls(monkeypatch, targets, lambda: prepare_data(cfg("ref"), 0, log=quiet))
    small_batches()
    ref = arrays(prepare_data(cfg("ref"), 0, log=quiet))
    assert n > 30
    for k in range(1, n + 1):
        name = f"k{k}"
        assert (
            killed_in_child(lambda: prepare_data(cfg(name), 0, log=quiet), {t: k for t in targets}) == signal.SIGKILL
        ), k
        cache = next(p for p in (tmp_path / name).iterdir() if p.is_dir())
        if not (cache / "meta.json").exists():  # not yet committed: add what a torn append leaves past the journal
            for shard in cache.glob("*.bin"):
                with open(shard, "ab") as f:
                    f.write(b"\x07\x01" * 37)
        if k % 3 == 0:  # and killed again while resuming
            assert killed_in_child(
                lambda: prepare_data(cfg(name), 0, log=quiet), {t: max(1, n // 4) for t in targets}
            ) in (signal.SIGKILL, 0), k
        logs = []
        got = prepare_data(cfg(name), 0, log=logs.append)
        assert not any("damaged" in m for m in logs), (k, logs)
        assert all(np.array_equal(a, b) for a, b in zip(arrays(got), ref)), k


def test_disk_full_during_preparation_is_one_line_and_the_rerun_completes(tmp_path, sources, bpe, monkeypatch):
    import errno

    monkeypatch.setattr(ds, "BATCH_DOCS", 48)
    cfg = DataConfig(source=sources["jsonl"], tokenizer=str(bpe), shard_tokens=1024, cache_dir=str(tmp_path / "c"))
    real, calls = ds._ShardWriter.write, {"n": 0}

    def full(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tokens)

    monkeypatch.setattr(ds._ShardWriter, "write", full)
    with pytest.raises(
        DataError,
        match=r"cannot write the token cache \(no space left on the device\); "
        r"free space",
    ) as e:
        prepare_data(cfg, 0, log=quiet)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(ds._ShardWriter, "write", real)
    got = arrays(prepare_data(cfg, 0, log=quiet))
    want = arrays(prepare_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c2")}), 0, log=quiet))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_two_processes_preparing_the_same_cache_build_it_once(tmp_path, sources, bpe):
    cfg = DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "c"))
    started = tmp_path / "started"
    pid = os.fork()
    if pid == 0:
        try:
            real = ds._Builder.run

            def slow(self):
                started.write_text("1")
                time.sleep(1.0)  # the other process arrives while this one holds the lock
                return real(self)

            ds._Builder.run = slow
            prepare_data(cfg, 0, log=quiet)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    while not started.exists():
        time.sleep(0.01)
    logs = []
    d = prepare_data(cfg, 0, log=logs.append)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert any(
        f"another process (pid {pid} on " in m and "is preparing this token cache; waiting" in m for m in logs
    ), logs
    assert not any(m.startswith("tokenized") for m in logs)  # it opened what the other built
    want = arrays(prepare_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c2")}), 0, log=quiet))
    assert all(np.array_equal(a, b) for a, b in zip(arrays(d), want))


# ------------------------------------------------------------------------------ item 2: damage met by training
def _train_cfg(small_cfg, tmp_path, source: str, cache: Path, **train) -> Path:
    d = with_train(small_cfg, steps=2, run_name="dmg", **train).to_dict()
    d["data"].update(source=source, cache_dir=str(cache))
    d["model"]["vocab_size"] = 320
    path = tmp_path / "cfg.yaml"
    save_config(Config.from_dict(d), path)
    return path


def _baseline(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("validation:")).split("unigram baseline")[1]


def test_training_on_a_half_cut_shard_rebuilds_it_and_trains_on_the_whole_data(small_cfg, tmp_path, sources, cli):
    """The shard cut to half while meta.json still records its length: training used the half file without a
    word (the unigram baseline moved). Now the cache is rebuilt, with one line saying why."""
    cfg_path = _train_cfg(small_cfg, tmp_path, sources["text"], tmp_path / "cache")
    healthy = cli("train", cfg_path)
    assert healthy.returncode == 0, healthy.stderr
    assert "damaged" not in healthy.stdout
    cache = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    shard = cache / "train-00000.bin"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 4 * 2])
    out = cli("train", cfg_path, "--train.overwrite", "true")
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stdout.splitlines() if "damaged" in line]
    assert len(said) == 1 and str(cache) in said[0] and "train-00000.bin is" in said[0] and "rebuilding" in said[0]
    assert shard.read_bytes() == whole and _baseline(out.stdout) == _baseline(healthy.stdout)


@pytest.mark.parametrize("damage", ["odd size", "random bytes", "meta.json cut"])
def test_a_damaged_cache_that_cannot_be_rebuilt_is_one_line_naming_the_folder(
    small_cfg, tmp_path, sources, cli, monkeypatch, damage
):
    """These used to be tracebacks (ValueError from np.memmap, IndexError in the embedding, JSONDecodeError)."""
    cfg_path = _train_cfg(small_cfg, tmp_path, sources["jsonl"], tmp_path / "ro" / "cache")
    prepare_data(load_config(str(cfg_path)).data, 320, log=quiet)
    cache = next(p for p in (tmp_path / "ro" / "cache").iterdir() if p.is_dir())
    shard = cache / "train-00000.bin"
    if damage == "odd size":
        shard.write_bytes(shard.read_bytes()[:-1])
    elif damage == "random bytes":
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, shard.stat().st_size, dtype=np.uint8).tobytes())
    else:
        meta = (cache / "meta.json").read_bytes()
        (cache / "meta.json").write_bytes(meta[: len(meta) // 2])
    _read_only(monkeypatch, tmp_path / "ro")
    one_line_error(
        cli("train", cfg_path),
        str(cache),
        "the token cache is damaged",
        "cannot be rebuilt there",
        "read-only file system",
    )
    monkeypatch.undo()
    out = cli("train", cfg_path)  # the healthy twin: writable again, the same damage is repaired
    assert out.returncode == 0 and "rebuilding it" in out.stdout, out.stderr


def test_an_id_outside_the_vocabulary_written_after_the_check_is_a_data_error(tmp_path, sources, bpe):
    """A shard changed while a run reads it: the batch that would reach the embedding is refused, naming the
    cache (it was `IndexError: index out of range in self`)."""
    d = prepare_data(
        DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "c")), 0, log=quiet
    )
    sampler = ds.WindowSampler(d.train, 16, 1, 4, seed=0)
    assert sampler.batch().max() < d.tokenizer.vocab_size  # healthy: reads fine
    with open(d.cache_dir / d.meta["train_shards"][0], "r+b") as f:
        f.write(np.full(4096, 65535, dtype=np.uint16).tobytes())
    with pytest.raises(
        DataError,
        match=rf"\(train split\): token \d+ is id 65535, outside the tokenizer's "
        rf"{d.tokenizer.vocab_size} ids",
    ) as e:
        for _ in range(50):
            sampler.batch()
    assert str(d.cache_dir) in str(e.value)
    logs = []
    again = prepare_data(
        DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "c")), 0, log=logs.append
    )
    assert any("damaged" in m for m in logs) and int(np.asarray(again.train).max()) < d.tokenizer.vocab_size


# ------------------------------------------------------------------------------------------ item 3: the history
CHILD_TRAIN = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # as conftest: the same reductions as the parent's
from moe_arch.config import load_config
from moe_arch.training import metrics
from moe_arch.training.trainer import Trainer

kill_step = int(sys.argv[3])
real = metrics.MetricsLogger.log


class HalfThenKill:
    # the write of the step's row stops half-way, as a SIGKILL inside a large write leaves it
    def __init__(self, f):
        self.f = f

    def write(self, s):
        self.f.write(s[:len(s) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def log(self, step, m, kind="train"):
    if kind == "train" and step == kill_step:
        self._f = HalfThenKill(self._f)
    return real(self, step, m, kind)


metrics.MetricsLogger.log = log
Trainer(load_config(sys.argv[2])).run()
"""


def test_a_kill_after_step_6_resumed_from_step_4_logs_every_step_once(small_cfg, tmp_path):
    """SIGKILL mid-row at step 6, `--resume latest` from step 4: steps 5-6 appeared twice, and the cut row got
    the next one glued onto it. Now the history is cut back to step 4 and the losses are the uninterrupted
    run's."""
    cfg = with_train(small_cfg, steps=12, log_every=1, ckpt_every=4, run_name="killed")
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_TRAIN, str(ROOT), str(tmp_path / "cfg.yaml"), "6"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = Path(cfg.train.out_dir) / "killed"
    raw = (run / "metrics.jsonl").read_bytes()
    assert not raw.endswith(b"\n") and raw.count(b'"kind": "train"') == 6  # 5 whole rows and half of step 6's
    said = []
    t = Trainer(cfg, resume="latest", log=said.append)
    assert t.step == 4
    t.run()
    assert any("metrics.jsonl: removed 1 rows of steps 5-5" in s and "a last line cut mid-row" in s for s in said)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, 13))
    Trainer(with_train(cfg, run_name="whole")).run()
    whole = [
        json.loads(line) for line in (Path(cfg.train.out_dir) / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [r["loss"] for r in whole if r["kind"] == "train"]


def test_rewinding_a_history(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"kind": "eval", "step": 4}]
    clean = "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"]))
    path = tmp_path / "metrics.jsonl"
    path.write_text(clean)
    before = path.stat().st_mtime_ns
    assert rewind_history(path, 6) is None and rewind_history(path, 9) is None  # healthy: not rewritten
    assert path.read_text() == clean and path.stat().st_mtime_ns == before
    path.write_text(clean + "not json\n" + '{"kind": "train", "st')
    said = rewind_history(path, 4)
    assert said == (
        f"{path}: removed 2 rows of steps 5-6 (after step 4, where this run starts) and a last line "
        "cut mid-row and 1 unreadable lines"
    )
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4] and path.read_text().endswith("\n")
    assert rewind_history(tmp_path / "absent.jsonl", 3) is None


# ------------------------------------------------------------------------------------------ item 4: the tokenizer
def test_a_tokenizer_edited_in_place_under_a_checkpoint_is_refused_before_tokenizing(small_cfg, tmp_path, sources, cli):
    from moe_arch.data.tokenizer import padded_vocab

    tok = train_bpe([BOOK] + DOCS * 3, 512)
    tok.save(tmp_path / "tok")
    tok_json = tmp_path / "tok" / "tokenizer.json"
    d = with_train(small_cfg, steps=2, run_name="tok").to_dict()
    d["data"].update(source=sources["jsonl"], tokenizer=str(tok_json), cache_dir=str(tmp_path / "cache"))
    d["model"]["vocab_size"] = padded_vocab(tok.vocab_size)
    save_config(Config.from_dict(d), tmp_path / "cfg.yaml")
    assert cli("train", tmp_path / "cfg.yaml").returncode == 0
    out = cli("train", tmp_path / "cfg.yaml", "--train.steps", "3", "--resume", "latest")  # healthy twin
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stderr
    spec = json.loads(tok_json.read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[300], by_id[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_json.write_text(json.dumps(spec))
    caches = sorted((tmp_path / "cache").iterdir())
    out = cli("train", tmp_path / "cfg.yaml", "--train.steps", "4", "--resume", "latest")
    one_line_error(
        out,
        "final.pt",
        f"data.tokenizer={str(tok_json)!r} is not the tokenizer this checkpoint was trained with",
        "2 ids stand for other tokens now",
        "restore the tokenizer",
    )
    assert sorted((tmp_path / "cache").iterdir()) == caches  # refused before tokenizing anything with it


def test_resuming_a_train_bpe_run_tokenizes_with_the_checkpoints_tokenizer(small_cfg, tmp_path, sources):
    """A train-bpe run whose cache was lost: the resumed run re-tokenizes with the BPE in the checkpoint instead
    of training another."""
    d = with_train(small_cfg, steps=2, run_name="bpe").to_dict()
    d["data"].update(source=sources["text"], cache_dir=str(tmp_path / "cache"))
    d["model"]["vocab_size"] = 320
    cfg = Config.from_dict(d)
    first = Trainer(cfg, log=quiet)
    first.run()
    import shutil

    shutil.rmtree(tmp_path / "cache")
    said = []
    t = Trainer(with_train(cfg, steps=3), resume="latest", log=said.append)
    assert not any("training a byte-level BPE" in s for s in said), said
    assert t.data.tokenizer.fingerprint() == first.data.tokenizer.fingerprint()
    assert np.array_equal(np.asarray(t.data.train), np.asarray(first.data.train))
    t.close()


# ------------------------------------------------------------------------------------------ item 5: latest.txt
def test_an_emptied_latest_txt_falls_back_to_the_newest_complete_checkpoint(small_cfg):
    cfg = with_train(small_cfg, steps=4, ckpt_every=2, run_name="lt")
    Trainer(cfg, log=quiet).run()
    ck_dir = Path(cfg.train.out_dir) / "lt" / "checkpoints"
    said = []
    t = Trainer(with_train(cfg, steps=6), resume="latest", log=said.append)  # healthy twin: what latest.txt names
    assert t.resumed_from == ck_dir / "final.pt" and not any("latest.txt" in s for s in said)
    t.close()
    (ck_dir / "latest.txt").write_text("")
    said = []
    t = Trainer(with_train(cfg, steps=6), resume="latest", log=said.append)
    assert t.resumed_from == ck_dir / "final.pt" and t.step == 4
    assert any(
        f"{ck_dir / 'latest.txt'} is empty; resuming the newest complete checkpoint, final.pt" in s for s in said
    ), said
    t.close()


def test_latest_txt_naming_a_damaged_or_foreign_checkpoint(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        ckpt.save_checkpoint(d / f"step_{step:07d}.pt", {"step": step})
        time.sleep(0.01)
    ckpt.save_checkpoint(d / "final.pt", {"step": 6})
    ckpt.write_latest(d, "final.pt")
    said = []
    assert ckpt.resolve_resume("latest", tmp_path / "run", log=said.append) == d / "final.pt" and not said
    (d / "final.pt").write_bytes((d / "final.pt").read_bytes()[:200])  # cut after it was saved
    assert ckpt.resolve_resume("latest", tmp_path / "run", log=said.append) == d / "step_0000004.pt"
    assert said[-1] == (
        f"{d / 'latest.txt'} names 'final.pt', which is not a complete checkpoint; resuming the "
        "newest complete checkpoint, step_0000004.pt"
    )
    for text, note in (
        ("../other/final.pt\n", "names '../other/final.pt', not a checkpoint in"),
        ("gone.pt\n", "names 'gone.pt', which does not exist"),
        ("\n\n", "is empty"),
    ):
        (d / "latest.txt").write_text(text)
        assert ckpt.resolve_resume("latest", tmp_path / "run", log=said.append) == d / "step_0000004.pt"
        assert note in said[-1]
    (d / "latest.txt").write_bytes(b"\xff\xfe")
    assert ckpt.resolve_resume(str(tmp_path / "run"), tmp_path, log=said.append) == d / "step_0000004.pt"
    assert "latest.txt cannot be read" in said[-1]
    for p in d.glob("step_*.pt"):
        p.write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=r"no complete checkpoint in .*checkpoints \(.*latest.txt cannot be "
        r"read",
    ):
        ckpt.resolve_resume("latest", tmp_path / "run")


# ------------------------------------------------------------------------------------------ round 3
def test_a_cache_folder_blocked_by_a_file_is_one_line_and_a_folder_in_a_files_place_is_rebuilt(tmp_path, sources, bpe):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        DataError,
        match=r"^data.cache_dir='.*file': .*file is a file, not a folder; move it, or set "
        r"data.cache_dir to a folder$",
    ):
        prepare_data(
            DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "file")), 0, log=quiet
        )
    cfg = DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "c"))
    want = arrays(prepare_data(cfg, 0, log=quiet))  # the healthy twin
    cache = next((tmp_path / "c").iterdir())
    shutil.rmtree(cache)
    cache.write_text("x")
    with pytest.raises(DataError, match=rf"{cache} is a file, not a folder; remove it"):
        prepare_data(cfg, 0, log=quiet)
    cache.unlink()
    prepare_data(cfg, 0, log=quiet)
    for name in ("meta.json", "train-00000.bin"):  # a folder where a file belongs: rebuilt, not "free space"
        target = cache / name
        target.unlink()
        target.mkdir()
        (target / "x").write_text("x")
        logs = []
        assert all(np.array_equal(a, b) for a, b in zip(arrays(prepare_data(cfg, 0, log=logs.append)), want))
        assert any("damaged" in m for m in logs), logs
    assert (cache / "meta.json").stat().st_mode & 0o077 == 0o644 & ~_umask() & 0o077  # readable by the group


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_a_manifest_or_journal_of_the_wrong_shape_is_rebuilt_not_a_traceback(tmp_path, sources, bpe, monkeypatch):
    cfg = DataConfig(source=sources["jsonl"], tokenizer=str(bpe), shard_tokens=1024, cache_dir=str(tmp_path / "c"))
    want = arrays(prepare_data(cfg, 0, log=quiet))
    cache = next((tmp_path / "c").iterdir())
    good = json.loads((cache / "meta.json").read_text())
    for change in (
        {"files": []},
        {"segments": {"train": [["train-00000.bin", True, 3]], "val": []}},
        {"train_tokens": -1},
    ):
        meta = {**good, **change}
        meta["checksum"] = ds._checksum(meta)  # a valid checksum: only the shape is wrong
        (cache / "meta.json").write_text(json.dumps(meta))
        logs = []
        assert all(np.array_equal(a, b) for a, b in zip(arrays(prepare_data(cfg, 0, log=logs.append)), want))
        assert any("damaged (meta.json's" in m for m in logs), logs
    # The journal: negative or boolean counts misplace the document index (and so the split) or crash islice.
    monkeypatch.setattr(ds, "BATCH_DOCS", 48)
    monkeypatch.setattr(ds._Builder, "_commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    cfg2 = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "j")})
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg2, 0, log=quiet)
    monkeypatch.undo()
    cache2 = next((tmp_path / "j").iterdir())
    journal = json.loads((cache2 / "progress.json").read_text())
    shutil.copytree(cache2, tmp_path / "j_saved")
    for change in ({"docs": {"train": -1, "val": -1}}, {"items": -10, "done": False}, {"items": True}):
        shutil.rmtree(cache2)
        shutil.copytree(tmp_path / "j_saved", cache2)
        (cache2 / "progress.json").write_text(json.dumps({**journal, **change}))
        logs = []
        assert all(np.array_equal(a, b) for a, b in zip(arrays(prepare_data(cfg2, 0, log=logs.append)), want))
        assert any("cannot resume the interrupted tokenization" in m for m in logs), (change, logs)


HOLD_CACHE_LOCK = r"""
import fcntl, json, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_stopped_or_hung_builder_is_named_instead_of_waited_for_forever(tmp_path, sources, bpe, monkeypatch):
    """A killed builder never blocks (the kernel drops its flock); one stopped with SIGSTOP, or hung, held it for
    ever and every later run waited on it, silent, for ever."""
    cfg = DataConfig(source=sources["jsonl"], tokenizer=str(bpe), cache_dir=str(tmp_path / "c"))
    cache = ds.cache_folder(cfg, ds.open_corpus(cfg), ds.resolve_tokenizer(cfg), 0)
    cache.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_CACHE_LOCK, str(cache / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        monkeypatch.setattr(ds, "LOCK_POLL_S", 0.05)
        monkeypatch.setattr(ds, "LOCK_STALL_S", 1.0)
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"\(pid {proc.pid} on .*\) is stopped .*kill -CONT {proc.pid}"):
            prepare_data(cfg, 0, log=quiet)
        os.kill(proc.pid, signal.SIGCONT)
        logs = []
        with pytest.raises(DataError, match=rf"\(pid {proc.pid} on .*\) has used no CPU and made no progress for"):
            prepare_data(cfg, 0, log=logs.append)
        assert time.monotonic() - t0 < 10
        assert any(f"another process (pid {proc.pid} on" in m for m in logs), logs
    finally:
        proc.kill()
        proc.wait()
    assert prepare_data(cfg, 0, log=quiet).train.size > 0  # the killed holder's lock is gone with it


def test_non_utf8_bytes_are_named_by_line_and_file_offset(tmp_path):
    """The offset was counted from the decoder's last 8 KiB buffer, not from the file's start."""
    from moe_arch.data.corpus import Corpus

    good = "".join(
        json.dumps({"text": f"caf\u00e9 {i} " + "x" * 90}, ensure_ascii=False) + "\n" for i in range(12000)
    )  # > 1 MiB
    path = tmp_path / "d.jsonl"
    path.write_text(good)
    assert sum(1 for _ in Corpus(str(path)).documents()) == 12000  # the healthy twin
    raw = good.encode()
    at = raw.index(b"\xc3\xa9", 1 << 20)  # a two-byte character near the reader's 1 MiB blocks
    path.write_bytes(raw[:at] + b"\xc3(" + raw[at + 2 :])
    line = raw[:at].count(b"\n") + 1
    with pytest.raises(
        DataError,
        match=rf"d.jsonl:{line}: not UTF-8 text \(invalid continuation byte at byte "
        rf"{at:,}\); convert it to UTF-8",
    ):
        list(Corpus(str(path)).documents())


def test_a_history_file_in_the_way_is_refused_before_the_data_and_a_rewind_keeps_its_mode(small_cfg, tmp_path):
    from moe_arch.checkpoint import RunFolderError

    run = Path(small_cfg.train.out_dir) / "t"
    (run / "alerts.jsonl").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"alerts.jsonl is a folder, not a file; move it out of the run folder"):
        Trainer(small_cfg, log=quiet)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 5)))
    path.chmod(0o644)
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    assert "removed 2 rows" in rewind_history(link, 2)
    assert link.is_symlink() and path.stat().st_mode & 0o777 == 0o644  # the link and the mode as they were
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_resuming_past_train_steps_is_refused_and_a_finished_run_resumed_logs_its_final_eval_once(small_cfg):
    cfg = with_train(small_cfg, steps=2, run_name="done")
    Trainer(cfg, log=quiet).run()
    with pytest.raises(
        CheckpointError,
        match=r"final.pt is at step 2, past train.steps=1; raise --train.steps "
        r"above 2",
    ):
        Trainer(with_train(cfg, steps=1), resume="latest", log=quiet)
    for _ in range(2):  # a finished run started again (a requeued job): its final validation is not doubled
        Trainer(cfg, resume="latest", log=quiet).run()
    rows = [json.loads(x) for x in (Path(cfg.train.out_dir) / "done" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 2), ("eval", 2)]
