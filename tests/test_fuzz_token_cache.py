"""Fault injection into the token cache, as test_fuzz_checkpoints.py does for checkpoints: every file of a built
cache (shards, meta.json, the tokenizer), truncated, extended, overwritten with random bytes, cut to an odd size;
opening it again gives exactly the uninterrupted tokens (verified, or rebuilt with one line saying why) or one
DataError line, never another exception and never other tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_arch.config import DataConfig
from moe_arch.data.corpus import DataError
from moe_arch.data.dataset import prepare_data
from moe_arch.data.tokenizer import train_bpe

DOCS = [
    f"Document {i}: expert {i % 5} takes token {i % 7}; the router's bias moves by {i / 7:.3f}." for i in range(200)
]
BOOK = "".join(f"line {i}: a long book, one document, held out by its tail.\n" for i in range(400))
KINDS = ("jsonl", "text")


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Per source kind (by-document split over several shards; a tail split of one text file): its config
    (relative to a cache_dir filled in per example), a pristine copy of its cache folder, and its tokens."""
    root = tmp_path_factory.mktemp("fuzz_cache")
    tok = train_bpe(DOCS + [BOOK], 400)
    tok.save(root / "tok")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "book.txt").write_text(BOOK)
    out = {}
    for kind, src in (("jsonl", root / "docs.jsonl"), ("text", root / "book.txt")):
        cfg = dict(source=str(src), tokenizer=str(root / "tok" / "tokenizer.json"), shard_tokens=1024)
        d = prepare_data(DataConfig(**cfg, cache_dir=str(root / kind)), 0, log=quiet)
        assert len(d.meta["files"]) >= 3
        out[kind] = {
            "cfg": cfg,
            "pristine": d.cache_dir,
            "train": np.asarray(d.train).copy(),
            "val": np.asarray(d.val).copy(),
        }
    return out


def _files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


def _fresh_copy(built: dict, kind: str, work: Path) -> tuple[DataConfig, Path]:
    src = built[kind]["pristine"]
    dst = work / "cache" / src.name
    shutil.copytree(src, dst)  # copy2: the mtimes travel, as after `cp -a`
    return DataConfig(**built[kind]["cfg"], cache_dir=str(work / "cache")), dst


def _reopen(built: dict, kind: str, cfg: DataConfig) -> tuple[list[str], bool]:
    """Open the (damaged) cache: it must give the original tokens or one DataError line. (what it said, opened)"""
    logs: list[str] = []
    try:
        d = prepare_data(cfg, 0, log=logs.append)
    except DataError as e:
        assert str(e) and "\n" not in str(e)
        return logs, False
    assert np.array_equal(np.asarray(d.train), built[kind]["train"])
    assert np.array_equal(np.asarray(d.val), built[kind]["val"])
    return logs, True


def _damage(path: Path, how: str, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    if how == "truncate":
        data = data[: len(data) // 2 // 4 * 4]  # a whole number of tokens: only the size says it is short
    elif how == "extend":
        data = data + bytes(64)
    elif how == "random bytes":
        data = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif how == "odd size":
        data = data[:-1]
    path.write_bytes(data)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "target, how",
    [
        ("train-00000.bin", "truncate"),
        ("train-00001.bin", "extend"),
        ("train-00000.bin", "random bytes"),
        ("train-00002.bin", "odd size"),
        ("val-00000.bin", "extend"),
        ("meta.json", "truncate"),
        ("tokenizer/tokenizer.json", "random bytes"),
    ],
)
def test_each_kind_of_damage_is_found_and_repaired(built, tmp_path, kind, target, how):
    cfg, cache = _fresh_copy(built, kind, tmp_path)
    if not (cache / target).exists():
        pytest.skip(f"{kind} has no {target}")
    _damage(cache / target, how, np.random.default_rng(0))
    logs, opened = _reopen(built, kind, cfg)
    said = [m for m in logs if "damaged" in m]
    assert opened and len(said) == 1 and str(cache) in said[0] and "rebuilding it" in said[0], logs
    logs, opened = _reopen(built, kind, cfg)  # repaired: the next open is clean
    assert opened and not logs


@pytest.mark.parametrize("kind", KINDS)
def test_an_undamaged_copy_opens_without_a_rebuild(built, tmp_path, kind):
    """The healthy twin: a copied cache verifies as it is, nothing rewritten."""
    cfg, cache = _fresh_copy(built, kind, tmp_path)
    before = {p: p.read_bytes() for p in _files(cache)}
    logs, opened = _reopen(built, kind, cfg)
    assert opened and not logs and {p: p.read_bytes() for p in _files(cache)} == before


def test_a_copy_with_new_mtimes_is_hashed_in_full_once(built, tmp_path, monkeypatch):
    """Shards too large for a full hash at every open get one when their mtime moved (a `cp` without -p): the
    manifest then records the new mtimes, and a shard overwritten in the middle is found either way."""
    from moe_arch.data import dataset as ds

    monkeypatch.setattr(ds, "FULL_CHECK_BYTES", 0)  # every shard "large"
    monkeypatch.setattr(ds, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(ds, "SAMPLE_BLOCK_BYTES", 64)
    cfg, cache = _fresh_copy(built, "jsonl", tmp_path)
    for p in cache.glob("*.bin"):
        p.write_bytes(p.read_bytes())  # same bytes, new mtime
    meta = json.loads((cache / "meta.json").read_text())
    logs, opened = _reopen(built, "jsonl", cfg)
    assert opened and not logs
    refreshed = json.loads((cache / "meta.json").read_text())
    assert all(refreshed["files"][n]["mtime_ns"] == (cache / n).stat().st_mtime_ns for n in refreshed["files"])
    assert refreshed["files"] != meta["files"]
    import os
    import time

    time.sleep(0.05)  # past the file system's timestamp granularity
    shard = cache / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 - 2 : len(data) // 2 + 2] = b"\x01\x00\x02\x00"  # outside both sample blocks
    shard.write_bytes(bytes(data))
    logs, opened = _reopen(built, "jsonl", cfg)
    assert opened and any("train-00000.bin does not match its sha256" in m for m in logs), logs
    # With its mtime put back, a change inside a sample block is still found.
    shard = cache / "train-00001.bin"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[10:12] = bytes([data[10] ^ 1, data[11]])
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    logs, opened = _reopen(built, "jsonl", cfg)
    assert opened and any("train-00001.bin does not match its sha256" in m for m in logs), logs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    which=st.integers(0, 30),
    cut=st.floats(0, 1),
    writes=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=4),
    truncate=st.booleans(),
    extend=st.binary(max_size=9),
)
def test_damaged_token_caches_give_the_original_tokens_or_one_line(
    built, tmp_path_factory, kind, which, cut, writes, truncate, extend
):
    work = tmp_path_factory.mktemp("fuzz")
    cfg, cache = _fresh_copy(built, kind, work)
    files = _files(cache)
    target = files[which % len(files)]
    before = target.read_bytes()
    data = bytearray(before)
    for pos, chunk in writes:
        at = int(pos * max(0, len(data) - 1))
        data[at : at + len(chunk)] = chunk
    if truncate:
        data = data[: int(cut * len(data))]
    data += extend
    target.write_bytes(bytes(data))
    logs, opened = _reopen(built, kind, cfg)
    # Shards and the manifest are covered byte for byte; a tokenizer file may change without changing the
    # tokenizer (JSON whitespace, a key order), which is no damage.
    if bytes(data) != before and (target.suffix == ".bin" or target.name == "meta.json"):
        assert not opened or any("damaged" in m for m in logs), (target.name, logs)
