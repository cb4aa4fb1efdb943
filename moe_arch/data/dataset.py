"""Tokenized data on disk and the windows the trainer and evaluator read from it.

Preparation streams: documents are read from the source (``corpus.py``), tokenized in batches (``tokenizers``'
parallel ``encode_batch``, on all cores, while a reader thread fetches the next batch) and appended to sharded
memory-mapped token files, so peak memory does not grow with the corpus. Each document goes to the train or the
validation split by a hash of its index, framed as the tokenizer frames a text ([BOS] text EOS).

The cache is crash-consistent by construction:

* Shard files are only ever appended to while tokenizing; nothing rewrites them afterwards (a tail split is a cut
  position recorded in the manifest, not a truncation), so no later step can destroy what an earlier one made.
* ``progress.json`` (the journal) records, after every appended batch whose shards were fsynced, how many source
  items are done and each shard's length and sha256. A resumed build verifies every shard against it (the bytes
  past the recorded length are cut away) and starts over when they do not match: it resumes only from verified
  state.
* ``meta.json`` (the manifest) is written last, atomically: every shard's size, sha256, a sampled sha256 and its
  largest token id, the segments each split reads, the tokenizer's fingerprint, and a checksum of itself. A cache
  without a manifest is never used.
* Opening a cache verifies it against the manifest (sizes always; the content hash of every shard that is small,
  or whose mtime changed, a sampled hash of the others; token ids against the vocabulary). A damaged cache is
  rebuilt from the source, with one line saying why, or refused in one line when it cannot be rebuilt there.
  Every slice read during training is checked against the vocabulary as well.
* One process builds a cache at a time (``flock`` on ``<cache>/.lock``); the others wait, then open it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from moe_arch.config import DataConfig
from moe_arch.data.corpus import Corpus, DataError, Piece
from moe_arch.data.tokenizer import TRAIN_BPE, TextTokenizer, train_bpe
from moe_arch.utils import atomic_path, clean_stale_temps, os_reason, prove_writable

CACHE_VERSION = 3
BATCH_DOCS = 1024
BATCH_CHARS = 1 << 18
# train-bpe learns its merges from at most this many characters of training text (the first documents): word
# statistics settle long before, and a second full pass over a corpus of terabytes would cost as much as the
# tokenization itself.
BPE_TRAIN_CHARS = 1 << 30
# Opening a cache hashes every shard up to this size in full (~50 ms at sha256's ~1.3 GB/s), and larger ones in
# full only when their mtime moved since the manifest was written (a write through the file system); otherwise a
# sample of SAMPLE_BLOCKS blocks spread over the file, so that starting a run on a cache of terabytes stays cheap.
FULL_CHECK_BYTES = 64 << 20
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 << 10
READ_CHUNK = 16 << 20
# A process waiting for another's build polls its lock this often, says every LOCK_REPORT_S that it still waits
# (and how far the build is), and gives up when the holder, on this host, is stopped (SIGSTOP, Ctrl-Z) or has
# neither used CPU time nor advanced progress.json for LOCK_STALL_S: a hung builder must not hang every later run.
LOCK_POLL_S = 0.5
LOCK_REPORT_S = 60.0
LOCK_STALL_S = 600.0


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    """Atomically, readable as a plain file would be (the umask's mode, not the temporary file's 0600): a cache
    folder shared by several users must stay readable by all of them."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))
        os.chmod(tmp, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for every thread, for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ShardedTokens:
    """Token segments of memory-mapped shard files, read as one 1-D array: ``len``, ``size`` and slices that may
    cross a segment boundary. Nothing is loaded until a slice is read.

    ``parts`` are shard paths (the whole file) or ``(path, start, stop)`` token ranges. With ``vocab``, every read
    is checked against it: an id outside the vocabulary (a file changed after it was verified) is a DataError
    naming ``where``, never an index error inside the embedding."""

    def __init__(self, parts: list, dtype, vocab: int | None = None, where: str = "the token cache"):
        self.dtype = np.dtype(dtype)
        self.vocab, self.where = vocab, where
        self.shards = []
        for part in parts:
            if isinstance(part, (str, Path)):
                path, lo, hi = Path(part), 0, Path(part).stat().st_size // self.dtype.itemsize
            else:
                path, lo, hi = Path(part[0]), int(part[1]), int(part[2])
            if hi > lo:
                self.shards.append(
                    np.memmap(path, dtype=self.dtype, mode="r", offset=lo * self.dtype.itemsize, shape=(hi - lo,))
                )
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.size = int(self.starts[-1])

    def __len__(self) -> int:
        return self.size

    def _checked(self, a: np.ndarray, start: int) -> np.ndarray:
        if self.vocab is not None and a.size and int(a.max()) >= self.vocab:
            k = int(np.argmax(a >= self.vocab))
            raise DataError(
                f"{self.where}: token {start + k:,} is id {int(a[k])}, outside the tokenizer's "
                f"{self.vocab} ids (the cache changed after it was verified); remove the folder so that "
                "the next run rebuilds it"
            )
        return a

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = int(key) + (self.size if key < 0 else 0)
            if not 0 <= key < self.size:
                raise IndexError(f"token {key} of {self.size}")
            i = int(np.searchsorted(self.starts, key, side="right")) - 1
            return self._checked(self.shards[i][key - self.starts[i] : key - self.starts[i] + 1], key)[0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        j = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        if i == j:
            out = self.shards[i][start - self.starts[i] : stop - self.starts[i]]
        else:
            out = np.concatenate(
                [
                    self.shards[k][max(start - self.starts[k], 0) : min(stop - self.starts[k], len(self.shards[k]))]
                    for k in range(i, j + 1)
                ]
            )
        return self._checked(out, start)

    def __array__(self, dtype=None, copy=None):
        out = self[0 : self.size]
        return out.astype(dtype) if dtype is not None else np.asarray(out)

    def chunks(self, n: int = 1 << 24) -> Iterator[np.ndarray]:
        for s, base in zip(self.shards, self.starts):
            for a in range(0, len(s), n):
                yield self._checked(s[a : a + n], int(base) + a)


@dataclass
class TokenData:
    train: ShardedTokens
    val: ShardedTokens
    tokenizer: TextTokenizer
    cache_dir: Path
    meta: dict

    def split(self, name: str) -> list[ShardedTokens]:
        """The token streams of a split name: train, val, or all (both, each read on its own)."""
        return {"train": [self.train], "val": [self.val], "all": [self.train, self.val]}[name]


def _is_val(i: int, frac: float) -> bool:
    return int(hashlib.sha1(str(i).encode()).hexdigest()[:8], 16) % 100_000 < frac * 100_000


def resolve_tokenizer(cfg: DataConfig) -> TextTokenizer | None:
    """The configured tokenizer, or None when it is trained on the data (train-bpe)."""
    return None if cfg.tokenizer in TRAIN_BPE else TextTokenizer.load(cfg.tokenizer, cfg.eos_token)


def open_corpus(cfg: DataConfig) -> Corpus:
    return Corpus(
        cfg.source,
        cfg.text_field,
        hf_config=cfg.hf_config,
        split=cfg.split,
        streaming=cfg.streaming,
        max_documents=cfg.max_documents,
    )


def cache_folder(cfg: DataConfig, corpus: Corpus, tok: TextTokenizer | None, vocab_size: int) -> Path:
    tok_key = tok.fingerprint() if tok is not None else f"train-bpe-{vocab_size}"
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{corpus.fingerprint()}|{tok_key}|{cfg.val_fraction}|{cfg.max_tokens}".encode()
    ).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / f"{corpus.kind}-{key}"


def prepare_data(
    cfg: DataConfig, vocab_size: int, log=print, tokenizer: TextTokenizer | None = None, progress: bool = False
) -> TokenData:
    """Tokenize ``cfg``'s source once (cached) and open it, verified. ``tokenizer`` (e.g. a checkpoint's) replaces
    data.tokenizer; with neither, a byte-level BPE of ``vocab_size`` is trained on the training split."""
    corpus = open_corpus(cfg)
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(cfg)
    cache = cache_folder(cfg, corpus, tok, vocab_size)
    blocker = _in_the_way(cache)
    if blocker is not None:  # otherwise "meta.json is not readable", and a rebuild that cannot create the folder
        fix = "remove it" if blocker.startswith(str(cache)) else "move it"
        raise DataError(f"data.cache_dir={cfg.cache_dir!r}: {blocker}; {fix}, or set data.cache_dir to a folder")
    data, problem = _open_verified(cache)
    if data is not None:
        return data
    if tokenizer is not None and problem is None:
        # A run that trained its BPE keyed its cache before the tokenizer existed ("train-bpe-V"): a checkpoint's
        # copy of that tokenizer (moe-arch eval, resuming) finds the same tokens there instead of re-tokenizing.
        trained = cache_folder(cfg, corpus, None, vocab_size)
        meta, _ = _read_manifest(trained)
        if meta is not None and meta.get("tokenizer_fingerprint") == tokenizer.fingerprint():
            data, _ = _open_verified(trained, meta)
            if data is not None:
                return data
    try:
        _check_writable(cache)  # before tokenizing, which can take long
    except DataError as e:
        if problem is None:
            raise
        raise DataError(
            f"{cache}: the token cache is damaged ({problem}) and cannot be rebuilt there ({e}); "
            "remove the folder, or set data.cache_dir to a writable folder"
        ) from None
    with _build_lock(cache, log):
        data, problem = _open_verified(cache)  # another process may have built (or repaired) it meanwhile
        if data is not None:
            return data
        if problem is not None:
            log(f"{cache}: the token cache is damaged ({problem}); rebuilding it from {corpus.describe()}")
        try:
            meta = _build(cfg, corpus, tok, vocab_size, cache, log, progress, damaged=problem is not None)
        except OSError as e:  # the manifest is written last, so a half-written cache is never used
            raise DataError(
                f"{cache}: cannot write the token cache ({_os_problem(e, cache)}); "
                f"{_os_fix(e)}, or set data.cache_dir to another folder"
            ) from None
        data, problem = _open_verified(cache, meta)
        if data is None:  # the files changed under the build: a second build would fare no better
            raise DataError(
                f"{cache}: the token cache just built does not verify ({problem}); check the disk, or "
                "set data.cache_dir to another folder"
            )
        return data


def _in_the_way(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder: it or an ancestor is a file; None otherwise."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a folder"
    return None


def _os_problem(e: OSError, cache: Path) -> str:
    where = Path(e.filename).name if e.filename and Path(e.filename).parent == cache else e.filename
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EISDIR: "a folder is in the way",
        errno.ENOTDIR: "a file is in the way",
    }.get(e.errno)
    return f"{where}: {reason or e.strerror or e}" if where else (reason or e.strerror or str(e))


def _os_fix(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if e.errno in (errno.EISDIR, errno.ENOTDIR):
        return "remove what is in the way"
    return "make the folder writable"


@contextlib.contextmanager
def _build_lock(cache: Path, log):
    """An exclusive flock on ``<cache>/.lock`` while a cache is built: two runs that start on the same data at
    once would otherwise append to the same shards. The holder writes its pid and host into the file, so that a
    waiting run can name it and tell a working builder from a stopped or hung one (``_wait_for_lock``). Where no
    lock can be had (a file system without locks, such as some NFS mounts) the build goes on unguarded, as it
    always did. A killed holder never blocks anyone: the kernel drops its lock with the process."""
    f = None
    try:
        f = open(cache / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        if busy:
            try:
                _wait_for_lock(f, cache, log)
            except BaseException:
                f.close()
                raise
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        f.flush()
    except OSError:
        pass
    try:
        yield
    finally:
        if f is not None:
            f.close()  # closing drops the lock (as the kernel does when the process dies)


def _holder(cache: Path) -> dict:
    try:
        info = json.loads((cache / ".lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _cpu_ticks(pid: int) -> tuple[str, int] | None:
    """(state letter, user + system CPU ticks) of a process on this host, from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_lock(f, cache: Path, log) -> None:
    """Wait for another process's build to end, saying so now and every LOCK_REPORT_S. A holder on this host
    that is stopped, or that has used no CPU and journaled no progress for LOCK_STALL_S, is a DataError naming
    it: waiting on it would hang this run (and every later one) forever."""
    info = _holder(cache)
    pid = info.get("pid") if isinstance(info.get("pid"), int) else None
    local = pid is not None and info.get("host") == socket.gethostname()
    who = f"pid {pid} on {info.get('host')}" if pid is not None else "holder unknown"
    log(f"{cache}: another process ({who}) is preparing this token cache; waiting for it to finish")
    t0 = last_report = last_change = time.monotonic()
    seen = None
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        try:
            journal_mtime = (cache / "progress.json").stat().st_mtime_ns
        except OSError:
            journal_mtime = None
        proc = _cpu_ticks(pid) if local else None
        if proc is not None and proc[0] in "Tt":
            raise DataError(
                f"{cache}: the process building this token cache ({who}) is stopped (SIGSTOP or "
                f"Ctrl-Z) and holds {cache / '.lock'}; continue it (kill -CONT {pid}) or end it, then "
                "rerun"
            )
        state = (journal_mtime, proc[1] if proc is not None else None)
        if state != seen:
            seen, last_change = state, now
        elif proc is not None and now - last_change > LOCK_STALL_S:
            raise DataError(
                f"{cache}: the process building this token cache ({who}) has used no CPU and made no "
                f"progress for {now - last_change:.0f} s and holds {cache / '.lock'}; if it is hung, "
                f"end it (kill {pid}), then rerun"
            )
        if now - last_report > LOCK_REPORT_S:
            done = _read_json(cache / "progress.json")[0] or {}
            items = done.get("items") if isinstance(done.get("items"), int) else None
            log(
                f"{cache}: still waiting for {who} ({now - t0:.0f} s"
                + (f"; {items:,} source items tokenized" if items is not None else "")
                + ")"
            )
            last_report = now
        time.sleep(LOCK_POLL_S)


# ---------------------------------------------------------------------------------------------- the manifest
def _checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:  # a rebuild removes it
        return None, f"{path.name} is a folder, not a file"
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        return None, f"{path.name} is not readable JSON ({why})"
    if not isinstance(obj, dict):
        return None, f"{path.name} holds a JSON {type(obj).__name__}, not an object"
    return obj, None


def _read_manifest(cache: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) when there is none, or (None, what is wrong with it)."""
    meta, problem = _read_json(cache / "meta.json")
    if meta is None:
        return None, problem
    if meta.get("version") != CACHE_VERSION or meta.get("checksum") != _checksum(meta):
        return None, "meta.json does not match its own checksum (changed after it was written)"
    return meta, None


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_shape(meta: dict) -> str | None:
    """What in the manifest is not of the shape this code writes (a hand-made meta.json with a valid checksum),
    or None: every field that opening reads, so that none of them can fail later as a TypeError or slice wrongly."""
    for key, kind in (("dtype", str), ("tokenizer_fingerprint", str), ("files", dict), ("segments", dict)):
        if not isinstance(meta.get(key), kind):
            return f"meta.json's {key!r} is missing or not a {kind.__name__}"
    for key in ("train_tokens", "val_tokens"):
        if not _count(meta.get(key)):
            return f"meta.json's {key!r} is missing or not a count"
    for name, rec in meta["files"].items():
        if (
            not isinstance(rec, dict)
            or not _count(rec.get("tokens"))
            or not isinstance(rec.get("sha256"), str)
            or not isinstance(rec.get("sample_sha256"), str)
            or isinstance(rec.get("max_id"), bool)
            or not isinstance(rec.get("max_id"), int)
        ):
            return f"meta.json's record of {name} lacks or mistypes tokens, sha256, sample_sha256 or max_id"
    for split in ("train", "val"):
        segs = meta["segments"].get(split)
        if not isinstance(segs, list) or not all(
            isinstance(g, list) and len(g) == 3 and isinstance(g[0], str) and _count(g[1]) and _count(g[2])
            for g in segs
        ):
            return f"meta.json's {split} segments are not a list of [shard, start, stop]"
        for name, _, _ in segs:
            if name not in meta["files"]:
                return f"meta.json's {split} segments name {name}, which it does not record"
    return None


def _scan(path: Path, nbytes: int, dtype: np.dtype) -> tuple:
    """(sha256 object over the first ``nbytes`` of ``path``, largest token id there or -1)."""
    h = hashlib.sha256()
    top = -1
    with open(path, "rb") as f:
        left = nbytes
        while left:
            b = f.read(min(READ_CHUNK, left))
            if not b or len(b) % dtype.itemsize:
                raise OSError(f"{path.name} ended early")
            h.update(b)
            top = max(top, int(np.frombuffer(b, dtype=dtype).max()))
            left -= len(b)
    return h, top


def _sample_blocks(nbytes: int, itemsize: int) -> list[tuple[int, int]]:
    if nbytes <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        return [(0, nbytes)]
    span = nbytes - SAMPLE_BLOCK_BYTES
    return [(k * span // (SAMPLE_BLOCKS - 1) // itemsize * itemsize, SAMPLE_BLOCK_BYTES) for k in range(SAMPLE_BLOCKS)]


def _sample_digest(path: Path, nbytes: int, dtype: np.dtype) -> tuple[str, int]:
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        for off, n in _sample_blocks(nbytes, dtype.itemsize):
            f.seek(off)
            b = f.read(n)
            if len(b) != n:
                raise OSError(f"{path.name} ended early")
            h.update(b)
            if b:
                top = max(top, int(np.frombuffer(b, dtype=dtype).max()))
    return h.hexdigest(), top


def _check_shard(path: Path, rec: dict, dtype: np.dtype, vocab: int) -> tuple[str | None, bool]:
    """(what is wrong with one shard, or None; whether its mtime moved and the full hash vouched for it)."""
    tokens = rec["tokens"]
    want = tokens * dtype.itemsize
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path.name} is missing", False
    if st.st_size != want:
        return (f"{path.name} is {st.st_size:,} bytes, meta.json records {tokens:,} tokens ({want:,} bytes)"), False
    if not -1 <= rec["max_id"] < vocab:
        return f"meta.json records token id {rec['max_id']} in {path.name}, outside the {vocab}-token vocabulary", False
    moved = st.st_mtime_ns != rec["mtime_ns"]
    try:
        if want <= FULL_CHECK_BYTES or moved:
            h, top = _scan(path, want, dtype)
            ok = h.hexdigest() == rec["sha256"]
        else:
            digest, top = _sample_digest(path, want, dtype)
            ok = digest == rec["sample_sha256"]
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})", False
    if top >= vocab:
        return f"{path.name} holds token id {top}, outside the {vocab}-token vocabulary", False
    if not ok:
        return f"{path.name} does not match its sha256 in meta.json (its bytes changed)", False
    return None, moved


def _open_verified(cache: Path, meta: dict | None = None) -> tuple[TokenData | None, str | None]:
    """The cache, opened after checking it against its manifest; or (None, what is damaged), (None, None) when
    there is no manifest yet."""
    if meta is None:
        meta, problem = _read_manifest(cache)
        if meta is None:
            return None, problem
    problem = _manifest_shape(meta)
    if problem:
        return None, problem
    try:
        dtype = np.dtype(meta["dtype"])
        try:
            tok = TextTokenizer.load(cache / "tokenizer")
        except DataError:
            return None, "tokenizer/ cannot be read"
        if tok.fingerprint() != meta["tokenizer_fingerprint"]:
            return None, "tokenizer/ is not the tokenizer the tokens were made with"
        moved = False
        for name, rec in meta["files"].items():
            if Path(name).name != name:
                return None, f"meta.json names a shard {name!r} outside the folder"
            problem, m = _check_shard(cache / name, rec, dtype, tok.vocab_size)
            if problem:
                return None, problem
            moved |= m
        parts = {}
        for split in ("train", "val"):
            parts[split] = []
            for name, lo, hi in meta["segments"][split]:
                if not 0 <= lo <= hi <= meta["files"][name]["tokens"]:
                    return None, f"meta.json's {split} segment {name}[{lo}:{hi}] is outside the shard"
                parts[split].append((cache / name, lo, hi))
        if (
            sum(hi - lo for _, lo, hi in parts["train"]) != meta["train_tokens"]
            or sum(hi - lo for _, lo, hi in parts["val"]) != meta["val_tokens"]
        ):
            return None, "meta.json's segments do not add up to its token counts"
    except (KeyError, TypeError, ValueError) as e:
        return None, f"meta.json lacks or mistypes a field ({type(e).__name__}: {e})"
    if moved:  # copied or touched, and the full hashes vouched for it: record the new mtimes (best effort)
        with contextlib.suppress(OSError):
            for name, rec in meta["files"].items():
                rec["mtime_ns"] = (cache / name).stat().st_mtime_ns
            meta["checksum"] = _checksum(meta)
            _write_json(cache / "meta.json", meta, indent=2)
    with contextlib.suppress(OSError):  # a build killed after its manifest, before removing its journal
        (cache / "progress.json").unlink(missing_ok=True)
    where = str(cache)
    train = ShardedTokens(parts["train"], dtype, tok.vocab_size, f"{where} (train split)")
    val = ShardedTokens(parts["val"], dtype, tok.vocab_size, f"{where} (validation split)")
    if train.size == 0 or val.size == 0:
        raise DataError(f"{cache}: the tokenized data is empty; remove the folder and check data.source")
    return TokenData(train, val, tok, cache, meta), None


# ---------------------------------------------------------------------------------------------- building
def _numbered(docs: Iterator[str]) -> Iterator[tuple[int, str]]:
    """(document index, item): the pieces of one document share its index."""
    i = 0
    for d in docs:
        yield i, d
        if not isinstance(d, Piece):
            i += 1


def _first_chars(docs: Iterator[str], limit: int) -> Iterator[str]:
    n = 0
    for d in docs:
        if n >= limit:
            return
        n += len(d)
        yield d


def _in_background(it: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a thread, ``depth`` items ahead: reading and parsing the next batch overlaps encoding
    this one (``encode_batch`` releases the GIL). Errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="moe-arch-data-reader")
    t.start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()


def _dtype(tok: TextTokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)


def _shard_path(cache: Path, split: str, k: int) -> Path:
    return cache / f"{split}-{k:05d}.bin"


def _remove(p: Path) -> None:
    """A file or a folder (whichever is in the way), or nothing."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _clear(cache: Path) -> None:
    """Remove a cache's files, the manifest first: a crash part-way leaves a folder that is never opened."""
    for name in ("meta.json", "progress.json"):
        _remove(cache / name)
    for p in cache.glob("*.bin"):
        _remove(p)
    _remove(cache / "tokenizer")


def _journal_shards(journal: dict, split: str) -> list[dict]:
    shards = journal["shards"][split]
    if not isinstance(shards, list) or not all(
        isinstance(r, dict) and _count(r.get("tokens")) and isinstance(r.get("sha256"), str) for r in shards
    ):
        raise TypeError("shards")
    return shards


def _resume_state(cache: Path, tok_given: TextTokenizer | None, log) -> tuple[TextTokenizer, dict, dict] | None:
    """The tokenizer, journal and verified shards of an interrupted build, or None when there is nothing
    verifiable to resume (then the build starts over). Bytes past the journal's lengths are cut away."""
    journal, problem = _read_json(cache / "progress.json")
    if journal is None:
        if problem:
            log(f"{cache}: {problem}; starting the tokenization over")
        return None
    try:
        tok = TextTokenizer.load(cache / "tokenizer")
    except DataError:
        tok = None
    why = None
    if journal.get("version") != CACHE_VERSION or tok is None or journal.get("tokenizer") != tok.fingerprint():
        why = "the tokenizer it began with is not in tokenizer/"
    elif tok_given is not None and journal.get("given_tokenizer") != tok_given.fingerprint():
        why = "it began with another tokenizer"
    elif journal.get("dtype") != _dtype(tok).name:
        why = "its token type differs"
    if why is None:
        try:
            dtype = _dtype(tok)
            shards: dict = {}
            for split in ("train", "val"):
                shards[split] = []
                for k, rec in enumerate(_journal_shards(journal, split)):
                    p, n = _shard_path(cache, split, k), rec["tokens"] * dtype.itemsize
                    if not p.is_file() or p.stat().st_size < n:
                        raise ValueError(f"{p.name} is shorter than progress.json records")
                    h, top = _scan(p, n, dtype)
                    if h.hexdigest() != rec["sha256"]:
                        raise ValueError(f"{p.name} does not match its sha256 in progress.json")
                    if p.stat().st_size > n:  # written after the last journal entry: never counted
                        os.truncate(p, n)
                    shards[split].append({"tokens": rec["tokens"], "hash": h, "max_id": top})
                for p in cache.glob(f"{split}-*.bin"):
                    if p.name not in {_shard_path(cache, split, k).name for k in range(len(shards[split]))}:
                        p.unlink()
            # Counts that are not non-negative ints would skip the wrong number of source items, or misplace
            # the document index that assigns each document its split (the split would silently change).
            for key in ("items", "chars"):
                if not _count(journal.get(key)):
                    raise TypeError(key)
            docs = journal.get("docs")
            if not isinstance(docs, dict) or not all(_count(docs.get(s)) for s in ("train", "val")):
                raise TypeError("docs")
            if journal["docs"]["train"] + journal["docs"]["val"] > journal["items"]:
                raise ValueError("progress.json counts more documents than source items")
        except (KeyError, TypeError, AttributeError, OSError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) else f"progress.json lacks or mistypes {e}"
    if why is not None:
        log(f"{cache}: cannot resume the interrupted tokenization ({why}); starting it over")
        return None
    return tok, journal, shards


def _build(
    cfg: DataConfig,
    corpus: Corpus,
    tok_given: TextTokenizer | None,
    vocab_size: int,
    cache: Path,
    log,
    progress: bool,
    damaged: bool = False,
) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(cache)
    state = None if damaged else _resume_state(cache, tok_given, log)
    if state is None:
        _clear(cache)
        if tok_given is None:
            log(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {corpus.describe()}")
            tok = train_bpe(
                _first_chars(
                    (d for i, d in _numbered(corpus.documents()) if not _is_val(i, cfg.val_fraction)), BPE_TRAIN_CHARS
                ),
                vocab_size,
            )
        else:
            tok = tok_given
        tok.save(cache / "tokenizer")
        tok = TextTokenizer.load(cache / "tokenizer")  # what every reader of the cache loads
        journal = {
            "version": CACHE_VERSION,
            "tokenizer": tok.fingerprint(),
            "given_tokenizer": tok_given.fingerprint() if tok_given is not None else None,
            "dtype": _dtype(tok).name,
            "items": 0,
            "docs": {"train": 0, "val": 0},
            "chars": 0,
            "mid_doc": False,
            "done": False,
            "shards": {"train": [], "val": []},
        }
        _write_json(cache / "progress.json", journal)  # the tokenizer is now part of the build
        state = tok, journal, {"train": [], "val": []}
    return _Builder(cfg, corpus, *state, cache, log, progress).run()


class _ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` shards of at most ``shard_tokens`` tokens each, keeping each shard's
    sha256 and largest id as it goes. ``shards`` are the verified shards of an interrupted build."""

    def __init__(self, cache: Path, split: str, dtype: np.dtype, shard_tokens: int, shards: list[dict]):
        self.cache, self.split, self.dtype, self.cap = cache, split, dtype, shard_tokens
        self.shards = shards or [self._new()]
        self.f = open(self.path(len(self.shards) - 1), "ab" if shards else "wb")

    @staticmethod
    def _new() -> dict:
        return {"tokens": 0, "hash": hashlib.sha256(), "max_id": -1}

    def path(self, k: int) -> Path:
        return _shard_path(self.cache, self.split, k)

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            last = self.shards[-1]
            room = self.cap - last["tokens"]
            if room <= 0:  # full (or data.shard_tokens lowered between a build and its resumption)
                self.f.close()
                self.shards.append(self._new())
                self.f = open(self.path(len(self.shards) - 1), "wb")
                continue
            part, tokens = tokens[:room], tokens[room:]
            raw = part.astype(self.dtype, copy=False).tobytes()
            self.f.write(raw)
            last["hash"].update(raw)
            last["max_id"] = max(last["max_id"], int(part.max()))
            last["tokens"] += part.size

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.sync()
        self.f.close()

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def journal(self) -> list[dict]:
        return [{"tokens": s["tokens"], "sha256": s["hash"].hexdigest()} for s in self.shards]


class _Builder:
    def __init__(
        self,
        cfg: DataConfig,
        corpus: Corpus,
        tok: TextTokenizer,
        journal: dict,
        shards: dict,
        cache: Path,
        log,
        progress: bool,
    ):
        self.cfg, self.corpus, self.tok, self.cache, self.log, self.progress = cfg, corpus, tok, cache, log, progress
        self.journal, self.shards = journal, shards
        self.dtype = _dtype(tok)
        self.state_path = cache / "progress.json"

    def _batches(
        self, skip: int, doc_index: int, mid_doc: bool
    ) -> Iterator[tuple[list[str], list[int], list[bool], list[bool]]]:
        """Batches of (texts, document indices, starts-a-document, ends-a-document), after ``skip`` items."""
        texts, idx, starts, ends, chars = [], [], [], [], 0
        i, starting = doc_index, not mid_doc
        for d in itertools.islice(self.corpus.documents(), skip, None):
            texts.append(str(d))
            idx.append(i)
            starts.append(starting)
            ends.append(not isinstance(d, Piece))
            chars += len(d)
            starting = ends[-1]
            if ends[-1]:
                i += 1
            if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield texts, idx, starts, ends
                texts, idx, starts, ends, chars = [], [], [], [], 0
        if texts:
            yield texts, idx, starts, ends

    def _record(self, writers: dict, **changes) -> None:
        """Journal a point every shard was fsynced at: what a resumed build may start from."""
        for w in writers.values():
            w.sync()
        self.journal = {**self.journal, **changes, "shards": {s: w.journal() for s, w in writers.items()}}
        _write_json(self.state_path, self.journal)

    def run(self) -> dict:
        cfg, tok, st = self.cfg, self.tok, self.journal
        writers = {
            s: _ShardWriter(self.cache, s, self.dtype, cfg.shard_tokens, self.shards[s]) for s in ("train", "val")
        }
        docs = dict(st["docs"])
        chars, items = st["chars"], st["items"]
        doc_index = docs["train"] + docs["val"]
        if items > 0:
            self.log(
                f"resuming the interrupted tokenization of {self.corpus.describe()} after {items:,} items "
                f"({writers['train'].total + writers['val'].total:,} tokens, verified)"
            )
        t0, last_log = time.perf_counter(), time.perf_counter()
        tokens_at_start = writers["train"].total + writers["val"].total
        bar = _Progress(self.progress, f"tokenizing {self.corpus.describe()}")
        capped = bool(st.get("capped"))
        mid_doc = bool(st.get("mid_doc"))
        try:
            batches = () if st.get("done") else _in_background(self._batches(items, doc_index, mid_doc))
            for texts, idx, starts, ends in batches:
                encoded = tok.encode_documents(texts, starts, ends)
                n_keep = len(texts)
                if cfg.max_tokens:
                    total = writers["train"].total + writers["val"].total
                    cum = np.cumsum([len(x) for x in encoded]) + total
                    hit = np.nonzero(cum >= cfg.max_tokens)[0]
                    if hit.size:  # documents are kept whole: the cap is reached at the end of a document
                        n_keep = int(hit[0]) + 1
                        while n_keep < len(texts) and not ends[n_keep - 1]:
                            n_keep += 1
                        capped = True
                for split in ("train", "val"):
                    sel = [k for k in range(n_keep) if _is_val(idx[k], cfg.val_fraction) == (split == "val")]
                    if sel:
                        n = sum(len(encoded[k]) for k in sel)
                        flat = np.fromiter(
                            itertools.chain.from_iterable(encoded[k] for k in sel), dtype=self.dtype, count=n
                        )
                        writers[split].write(flat)
                    docs[split] += sum(1 for k in sel if ends[k])
                items += n_keep
                chars += sum(len(texts[k]) for k in range(n_keep))
                mid_doc = not ends[n_keep - 1]
                self._record(writers, items=items, docs=docs, chars=chars, mid_doc=mid_doc, capped=capped)
                n_tok = writers["train"].total + writers["val"].total
                rate = (n_tok - tokens_at_start) / max(time.perf_counter() - t0, 1e-9)
                bar.update(f"{docs['train'] + docs['val']:,} documents, {n_tok:,} tokens, {rate:,.0f} tokens/s")
                if not self.progress and time.perf_counter() - last_log > 30:
                    self.log(f"  ... {docs['train'] + docs['val']:,} documents, {n_tok:,} tokens ({rate:,.0f}/s)")
                    last_log = time.perf_counter()
                if capped:
                    break
            if not st.get("done"):  # a rerun after this point re-reads nothing from the source
                self._record(writers, done=True)
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        seconds = time.perf_counter() - t0
        return self._commit(writers, docs, chars, capped, seconds, tokens_at_start)

    def _commit(
        self, writers: dict, docs: dict, chars: int, capped: bool, seconds: float, tokens_at_start: int
    ) -> dict:
        """Write the manifest: the one step that makes the cache usable. Nothing before it changed a shard."""
        cfg, tok = self.cfg, self.tok
        files, order = {}, []
        for split in ("train", "val"):
            w = writers[split]
            for k, s in enumerate(w.shards):
                p = w.path(k)
                nbytes = s["tokens"] * self.dtype.itemsize
                sample, _ = _sample_digest(p, nbytes, self.dtype)
                files[p.name] = {
                    "tokens": s["tokens"],
                    "sha256": s["hash"].hexdigest(),
                    "sample_sha256": sample,
                    "max_id": s["max_id"],
                    "mtime_ns": p.stat().st_mtime_ns,
                }
                order.append((split, p.name, s["tokens"]))
        segments: dict = {"train": [], "val": []}
        split = "documents"
        if docs["val"] < 2 or docs["train"] == 0:
            # Too few documents to split by document (e.g. one big text file): every token in one stream (train
            # then val), the last val_fraction of it held out. A cut position, not a rewrite of any shard.
            split = "tail"
            total = sum(n for _, _, n in order)
            cut = int(total * (1 - cfg.val_fraction))
            pos = 0
            for _, name, n in order:
                if min(pos + n, cut) > pos:
                    segments["train"].append([name, 0, min(pos + n, cut) - pos])
                if pos + n > max(pos, cut):
                    segments["val"].append([name, max(pos, cut) - pos, n])
                pos += n
        else:
            for s, name, n in order:
                if n:
                    segments[s].append([name, 0, n])
        n_train = sum(hi - lo for _, lo, hi in segments["train"])
        n_val = sum(hi - lo for _, lo, hi in segments["val"])
        meta = {
            "version": CACHE_VERSION,
            "source": cfg.source,
            "describe": self.corpus.describe(),
            "dtype": self.dtype.name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_docs": docs["train"],
            "val_docs": docs["val"],
            "split": split,
            "characters": chars,
            "train_shards": [name for name, _, _ in segments["train"]],
            "val_shards": [name for name, _, _ in segments["val"]],
            "tokenizer": tok.source,
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "capped": capped,
            "seconds": round(seconds, 3),
            "tokens_per_s": round((n_train + n_val - tokens_at_start) / max(seconds, 1e-9)),
            "files": files,
            "segments": segments,
        }
        meta["checksum"] = _checksum(meta)
        _write_json(self.cache / "meta.json", meta, indent=2)
        self.state_path.unlink(missing_ok=True)
        self.log(
            f"tokenized {docs['train'] + docs['val']:,} documents: {n_train:,} train / {n_val:,} validation "
            f"tokens (vocabulary {tok.vocab_size}, {meta['tokens_per_s']:,} tokens/s)"
            + (f"; stopped at data.max_tokens={cfg.max_tokens:,}" if capped else "")
        )
        return meta


class _Progress:
    """A rich status line while tokenizing (a terminal only); nothing otherwise."""

    def __init__(self, enabled: bool, title: str):
        self.p = None
        if enabled:
            console = Console(stderr=True)
            if console.is_terminal:
                self.p = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                self.p.start()
                self.task = self.p.add_task(title)
                self.title = title

    def update(self, text: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=f"{self.title}: {text}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def _check_writable(cache: Path) -> None:
    try:
        prove_writable(cache)
    except OSError as e:
        raise DataError(
            f"{cache}: cannot write the token cache there ({os_reason(e)}); choose another folder (data.cache_dir)"
        ) from None


def token_counts(tokens: ShardedTokens, vocab: int) -> np.ndarray:
    counts = np.zeros(vocab, dtype=np.int64)
    for c in tokens.chunks():
        counts += np.bincount(c, minlength=vocab)[:vocab]
    return counts


class WindowSampler:
    """Shuffled, non-overlapping training windows; every rank draws its slice of the same global batch.

    Window i covers tokens [i*T, i*T + T + extra): T inputs plus ``extra`` tokens so that every prediction
    head has a label at every position. Each epoch is a fresh permutation seeded by (seed, epoch); the
    state (epoch, cursor) is saved in checkpoints, so a resumed run reads exactly the windows an
    uninterrupted run would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, extra: int, global_batch: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.extra = extra
        self.global_batch = global_batch
        self.seed = seed
        self.n_windows = (len(tokens) - extra) // seq_len
        if self.n_windows < global_batch:
            raise DataError(
                f"the training split has {len(tokens):,} tokens: fewer than one global batch of "
                f"{global_batch} windows x {seq_len} tokens; use more data or lower train.batch_size / "
                "train.seq_len"
            )
        self.epoch = 0
        self.cursor = 0
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n_windows, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_global(self) -> torch.Tensor:
        if self.cursor + self.global_batch > self.n_windows:
            self.epoch += 1
            self.cursor = 0
        idx = self._permutation()[self.cursor : self.cursor + self.global_batch]
        self.cursor += self.global_batch
        return idx

    def batch(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The next global batch's slice for ``rank``: [global_batch / world, T + extra] int64."""
        idx = self.next_global()
        per = self.global_batch // world
        mine = idx[rank * per : (rank + 1) * per].tolist()
        L = self.seq_len + self.extra
        return torch.from_numpy(
            np.stack([np.asarray(self.tokens[i * self.seq_len : i * self.seq_len + L], dtype=np.int64) for i in mine])
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "n_windows": self.n_windows,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") != self.n_windows:
            raise DataError(
                f"the checkpoint's data position was saved for {state.get('n_windows')} windows, but this "
                f"data gives {self.n_windows}; resume with the same data and train.seq_len"
            )
        saved = state.get("global_batch", self.global_batch)
        if saved != self.global_batch:
            raise DataError(
                f"the checkpoint was saved with a global batch of {saved} sequences per micro-step, this "
                f"run has {self.global_batch} (train.batch_size x processes); set train.batch_size so that "
                f"batch_size x processes = {saved}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (input, target) windows over ``tokens``: every token after the first is predicted exactly
    once (the last window may be shorter). ``max_tokens`` > 0 stops after that many predicted tokens."""
    n = len(tokens)
    start = 0
    done = 0
    while start + 1 < n:
        end = min(start + seq_len, n - 1)
        if max_tokens and done + (end - start) > max_tokens:
            end = start + (max_tokens - done)
            if end <= start:
                break
        chunk = torch.from_numpy(np.asarray(tokens[start : end + 1], dtype=np.int64))
        yield chunk[:-1], chunk[1:]
        done += end - start
        start = end
        if max_tokens and done >= max_tokens:
            break


def eval_batches(windows: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, batch: int) -> list[list]:
    """Evaluation windows grouped for forwards: full-length windows ``batch`` at a time, then each shorter (last)
    window alone. The in-training validation and ``moe-arch eval`` batch alike, so their losses agree."""
    full = [w for w in windows if len(w[0]) == seq_len]
    return [full[i : i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w[0]) != seq_len]
