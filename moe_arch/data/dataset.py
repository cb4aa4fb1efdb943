"""Tokenized data on disk and the windows the trainer and evaluator read from it.

Preparation streams: documents are read from the source (``corpus.py``), tokenized in batches (``tokenizers``'
parallel ``encode_batch``, on all cores, while a reader thread fetches the next batch) and appended to sharded
memory-mapped token files, so peak memory does not grow with the corpus. Each document goes to the train or the
validation split by a hash of its index, framed as the tokenizer frames a text ([BOS] text EOS).

A build is resumable: ``progress.json`` records, after every appended batch, how many source items are done and
how long each shard is; an interrupted build truncates its shards back to that point and continues. ``meta.json``
is written last: a cache without it is never used for training.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moe_arch.config import DataConfig
from moe_arch.data.corpus import Corpus, DataError, Piece
from moe_arch.data.tokenizer import TRAIN_BPE, TextTokenizer, train_bpe
from moe_arch.utils import atomic_write_text

CACHE_VERSION = 2
BATCH_DOCS = 1024
BATCH_CHARS = 1 << 18
# train-bpe learns its merges from at most this many characters of training text (the first documents): word
# statistics settle long before, and a second full pass over a corpus of terabytes would cost as much as the
# tokenization itself.
BPE_TRAIN_CHARS = 1 << 30


class ShardedTokens:
    """Token shards (memory-mapped files) read as one 1-D array: ``len``, ``size`` and slices that may cross a
    shard boundary. Nothing is loaded until a slice is read."""

    def __init__(self, paths: list[Path], dtype):
        self.dtype = np.dtype(dtype)
        self.shards = [np.memmap(p, dtype=self.dtype, mode="r") for p in paths if p.stat().st_size]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.size = int(self.starts[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = int(key) + (self.size if key < 0 else 0)
            i = int(np.searchsorted(self.starts, key, side="right")) - 1
            return self.shards[i][key - self.starts[i]]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        j = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        if i == j:
            return self.shards[i][start - self.starts[i]:stop - self.starts[i]]
        parts = [self.shards[k][max(start - self.starts[k], 0):min(stop - self.starts[k], len(self.shards[k]))]
                 for k in range(i, j + 1)]
        return np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self[0:self.size]
        return out.astype(dtype) if dtype is not None else np.asarray(out)

    def chunks(self, n: int = 1 << 24) -> Iterator[np.ndarray]:
        for s in self.shards:
            for a in range(0, len(s), n):
                yield s[a:a + n]


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
    return Corpus(cfg.source, cfg.text_field, hf_config=cfg.hf_config, split=cfg.split, streaming=cfg.streaming,
                  max_documents=cfg.max_documents)


def cache_folder(cfg: DataConfig, corpus: Corpus, tok: TextTokenizer | None, vocab_size: int) -> Path:
    tok_key = tok.fingerprint() if tok is not None else f"train-bpe-{vocab_size}"
    key = hashlib.sha256(f"{CACHE_VERSION}|{corpus.fingerprint()}|{tok_key}|{cfg.val_fraction}|{cfg.max_tokens}"
                         .encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / f"{corpus.kind}-{key}"


def prepare_data(cfg: DataConfig, vocab_size: int, log=print, tokenizer: TextTokenizer | None = None,
                 progress: bool = False) -> TokenData:
    """Tokenize ``cfg``'s source once (cached) and open it. ``tokenizer`` (e.g. a checkpoint's) replaces
    data.tokenizer; with neither, a byte-level BPE of ``vocab_size`` is trained on the training split."""
    corpus = open_corpus(cfg)
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(cfg)
    cache = cache_folder(cfg, corpus, tok, vocab_size)
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return _open(cache, meta, TextTokenizer.load(cache / "tokenizer"))
    if tokenizer is not None:
        # A run that trained its BPE keyed its cache before the tokenizer existed ("train-bpe-V"): a checkpoint's
        # copy of that tokenizer (moe-arch eval, resuming) finds the same tokens there instead of re-tokenizing.
        trained = cache_folder(cfg, corpus, None, vocab_size)
        if (trained / "meta.json").is_file():
            meta = json.loads((trained / "meta.json").read_text())
            if meta.get("tokenizer") == tokenizer.fingerprint():
                return _open(trained, meta, TextTokenizer.load(trained / "tokenizer"))
    _check_writable(cache)  # before tokenizing, which can take long
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if (cache / "tokenizer" / "tokenizer.json").is_file():  # a resumed build keeps the tokenizer it began with
            tok = TextTokenizer.load(cache / "tokenizer")
        elif tok is None:
            log(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {corpus.describe()}")
            tok = train_bpe(_first_chars((d for i, d in _numbered(corpus.documents())
                                          if not _is_val(i, cfg.val_fraction)), BPE_TRAIN_CHARS), vocab_size)
            tok.save(cache / "tokenizer")
        else:
            tok.save(cache / "tokenizer")
        meta = _Builder(cfg, corpus, tok, cache, log, progress).run()
    except OSError as e:  # meta.json is written last, so a half-written cache is never used
        raise DataError(f"{cache}: cannot write the token cache ({e.strerror or e}); free space or set "
                        "data.cache_dir to another folder") from None
    return _open(cache, meta, TextTokenizer.load(cache / "tokenizer"))


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


class _ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` shards of at most ``shard_tokens`` tokens each."""

    def __init__(self, cache: Path, split: str, dtype, shard_tokens: int, sizes: list[int]):
        self.cache, self.split, self.dtype, self.cap = cache, split, np.dtype(dtype), shard_tokens
        self.sizes = list(sizes) or [0]
        # Resuming: cut every shard back to what progress.json vouches for; later shards never counted.
        for k, n in enumerate(self.sizes):
            p = self.path(k)
            if p.exists() and p.stat().st_size != n * self.dtype.itemsize:
                os.truncate(p, n * self.dtype.itemsize)
        for p in cache.glob(f"{split}-*.bin"):
            if int(p.stem.split("-")[1]) >= len(self.sizes):
                p.unlink()
        self.f = open(self.path(len(self.sizes) - 1), "ab")

    def path(self, k: int) -> Path:
        return self.cache / f"{self.split}-{k:05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            room = self.cap - self.sizes[-1]
            if room == 0:
                self.f.close()
                self.sizes.append(0)
                self.f = open(self.path(len(self.sizes) - 1), "ab")
                room = self.cap
            part, tokens = tokens[:room], tokens[room:]
            part.astype(self.dtype, copy=False).tofile(self.f)
            self.sizes[-1] += part.size

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.sync()
        self.f.close()

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def paths(self) -> list[Path]:
        return [self.path(k) for k in range(len(self.sizes))]


class _Builder:
    def __init__(self, cfg: DataConfig, corpus: Corpus, tok: TextTokenizer, cache: Path, log, progress: bool):
        self.cfg, self.corpus, self.tok, self.cache, self.log, self.progress = cfg, corpus, tok, cache, log, progress
        self.dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        self.state_path = cache / "progress.json"

    def _state(self) -> dict:
        fresh = {"items": 0, "docs": {"train": 0, "val": 0}, "shards": {"train": [], "val": []}, "mid_doc": False,
                 "chars": 0, "dtype": np.dtype(self.dtype).name, "tokenizer": self.tok.fingerprint()}
        if not self.state_path.is_file():
            return fresh
        try:
            st = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            return fresh
        if st.get("dtype") != fresh["dtype"] or st.get("tokenizer") != fresh["tokenizer"]:
            return fresh
        return st

    def _batches(self, skip: int, doc_index: int, mid_doc: bool) -> Iterator[tuple[list[str], list[int], list[bool], list[bool]]]:
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

    def run(self) -> dict:
        cfg, tok = self.cfg, self.tok
        st = self._state()
        resumed = st["items"] > 0
        writers = {s: _ShardWriter(self.cache, s, self.dtype, cfg.shard_tokens, st["shards"][s]) for s in ("train", "val")}
        docs = dict(st["docs"])
        chars, items = st["chars"], st["items"]
        doc_index = docs["train"] + docs["val"]
        if resumed:
            self.log(f"resuming the interrupted tokenization of {self.corpus.describe()} after {items:,} items "
                     f"({writers['train'].total + writers['val'].total:,} tokens)")
        t0, last_log = time.perf_counter(), time.perf_counter()
        tokens_at_start = writers["train"].total + writers["val"].total
        bar = _Progress(self.progress, f"tokenizing {self.corpus.describe()}")
        capped = False
        mid_doc = bool(st.get("mid_doc"))
        try:
            for texts, idx, starts, ends in _in_background(self._batches(items, doc_index, mid_doc)):
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
                        flat = np.fromiter(itertools.chain.from_iterable(encoded[k] for k in sel), dtype=self.dtype,
                                           count=n)
                        writers[split].write(flat)
                    docs[split] += sum(1 for k in sel if ends[k])
                items += n_keep
                chars += sum(len(texts[k]) for k in range(n_keep))
                mid_doc = not ends[n_keep - 1]
                for w in writers.values():
                    w.sync()
                st = {**st, "items": items, "docs": docs, "chars": chars, "mid_doc": mid_doc,
                      "shards": {s: w.sizes for s, w in writers.items()}}
                atomic_write_text(self.state_path, json.dumps(st))
                n_tok = writers["train"].total + writers["val"].total
                rate = (n_tok - tokens_at_start) / max(time.perf_counter() - t0, 1e-9)
                bar.update(f"{docs['train'] + docs['val']:,} documents, {n_tok:,} tokens, {rate:,.0f} tokens/s")
                if not self.progress and time.perf_counter() - last_log > 30:
                    self.log(f"  ... {docs['train'] + docs['val']:,} documents, {n_tok:,} tokens ({rate:,.0f}/s)")
                    last_log = time.perf_counter()
                if capped:
                    break
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        seconds = time.perf_counter() - t0
        split = "documents"
        if docs["val"] < 2 or docs["train"] == 0:
            # Too few documents to split by document (e.g. one big text file): hold out the tail of the tokens.
            self._tail_split(writers)
            split = "tail"
        n_train, n_val = writers["train"].total, writers["val"].total
        meta = {"version": CACHE_VERSION, "source": self.cfg.source, "describe": self.corpus.describe(),
                "dtype": np.dtype(self.dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                "train_docs": docs["train"], "val_docs": docs["val"], "split": split, "characters": chars,
                "train_shards": [p.name for p in writers["train"].paths()],
                "val_shards": [p.name for p in writers["val"].paths()],
                "tokenizer": tok.source, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                "capped": capped, "seconds": round(seconds, 3),
                "tokens_per_s": round((n_train + n_val - tokens_at_start) / max(seconds, 1e-9))}
        atomic_write_text(self.cache / "meta.json", json.dumps(meta, indent=2))
        self.state_path.unlink(missing_ok=True)
        self.log(f"tokenized {docs['train'] + docs['val']:,} documents: {n_train:,} train / {n_val:,} validation "
                 f"tokens (vocabulary {tok.vocab_size}, {meta['tokens_per_s']:,} tokens/s)"
                 + (f"; stopped at data.max_tokens={cfg.max_tokens:,}" if capped else ""))
        return meta

    def _tail_split(self, writers: dict[str, _ShardWriter]) -> None:
        """Every token into one stream (train then val), the last val_fraction of it becomes the validation split."""
        stream = ShardedTokens(writers["train"].paths() + writers["val"].paths(), self.dtype)
        cut = int(stream.size * (1 - self.cfg.val_fraction))
        tail = self.cache / "val-tail.bin"
        with open(tail, "wb") as f:
            for a in range(cut, stream.size, 1 << 24):
                np.asarray(stream[a:min(a + (1 << 24), stream.size)]).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        del stream
        for p in writers["val"].paths():
            p.unlink()
        # Train keeps its first `cut` tokens.
        left = cut
        for k, n in enumerate(writers["train"].sizes):
            keep = min(n, left)
            os.truncate(writers["train"].path(k), keep * np.dtype(self.dtype).itemsize)
            writers["train"].sizes[k] = keep
            left -= keep
        os.replace(tail, writers["val"].path(0))
        writers["val"].sizes = [int((writers["val"].path(0).stat().st_size) // np.dtype(self.dtype).itemsize)]


class _Progress:
    """A rich status line while tokenizing (a terminal only); nothing otherwise."""

    def __init__(self, enabled: bool, title: str):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=console, transient=True)
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
    from moe_arch.training.run_dir import RunFolderError, writable_dir

    try:
        writable_dir(cache, "token cache")
    except RunFolderError as e:
        raise DataError(f"{e} (data.cache_dir)") from None


def _open(cache: Path, meta: dict, tok: TextTokenizer) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    train = ShardedTokens([cache / n for n in meta["train_shards"]], dtype)
    val = ShardedTokens([cache / n for n in meta["val_shards"]], dtype)
    if train.size == 0 or val.size == 0:
        raise DataError(f"{cache}: the tokenized data is empty; remove the folder and check data.source")
    return TokenData(train, val, tok, cache, meta)


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
            raise DataError(f"the training split has {len(tokens):,} tokens: fewer than one global batch of "
                            f"{global_batch} windows x {seq_len} tokens; use more data or lower train.batch_size / "
                            "train.seq_len")
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
        idx = self._permutation()[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        return idx

    def batch(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The next global batch's slice for ``rank``: [global_batch / world, T + extra] int64."""
        idx = self.next_global()
        per = self.global_batch // world
        mine = idx[rank * per:(rank + 1) * per].tolist()
        L = self.seq_len + self.extra
        return torch.from_numpy(np.stack([np.asarray(self.tokens[i * self.seq_len:i * self.seq_len + L],
                                                     dtype=np.int64) for i in mine]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") != self.n_windows:
            raise DataError(f"the checkpoint's data position was saved for {state.get('n_windows')} windows, but this "
                            f"data gives {self.n_windows}; resume with the same data and train.seq_len")
        saved = state.get("global_batch", self.global_batch)
        if saved != self.global_batch:
            raise DataError(f"the checkpoint was saved with a global batch of {saved} sequences per micro-step, this run "
                            f"has {self.global_batch} (train.batch_size x processes); set train.batch_size so that "
                            f"batch_size x processes = {saved}")
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
        chunk = torch.from_numpy(np.asarray(tokens[start:end + 1], dtype=np.int64))
        yield chunk[:-1], chunk[1:]
        done += end - start
        start = end
        if max_tokens and done >= max_tokens:
            break


def eval_batches(windows: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, batch: int) -> list[list]:
    """Evaluation windows grouped for forwards: full-length windows ``batch`` at a time, then each shorter (last)
    window alone. The in-training validation and ``moe-arch eval`` batch alike, so their losses agree."""
    full = [w for w in windows if len(w[0]) == seq_len]
    return ([full[i:i + batch] for i in range(0, len(full), batch)]
            + [[w] for w in windows if len(w[0]) != seq_len])
