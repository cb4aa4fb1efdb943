"""Tokenized data on disk and the windows the trainer and evaluator read from it.

Documents are split into train/validation by a hash of their index (so both splits see every source), tokenized
once into memory-mapped ``uint16``/``uint32`` token files with an end-of-text token after each document, and
cached under ``data.cache_dir`` keyed by the corpus fingerprint and tokenizer. ``meta.json`` is written last:
a cache without it is incomplete and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moe_arch.config import DataConfig
from moe_arch.data.corpus import Corpus, DataError
from moe_arch.data.tokenizer import TextTokenizer, train_bpe
from moe_arch.utils import atomic_path, atomic_write_text

CACHE_VERSION = 1


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: TextTokenizer
    cache_dir: Path
    meta: dict


def _is_val(i: int, frac: float) -> bool:
    return int(hashlib.sha1(str(i).encode()).hexdigest()[:8], 16) % 100_000 < frac * 100_000


def _write_tokens(path: Path, docs: list[str], tok: TextTokenizer, dtype) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for s in range(0, len(docs), 256):
            arrays = [np.asarray(ids + [tok.eos_id], dtype=dtype) for ids in tok.encode_batch(docs[s:s + 256])]
            block = np.concatenate(arrays)
            block.tofile(f)
            n += block.size
    return n


def prepare_data(cfg: DataConfig, vocab_size: int, log=print) -> TokenData:
    corpus = Corpus(cfg.source, cfg.text_field)
    tok_spec = "auto" if cfg.tokenizer == "auto" else str(Path(cfg.tokenizer).resolve())
    key = hashlib.sha256(f"{CACHE_VERSION}|{corpus.fingerprint()}|{tok_spec}|{vocab_size}|{cfg.val_fraction}"
                         .encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser() / f"{corpus.kind}-{key}"
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        tok = TextTokenizer.load(cache / "tokenizer.json")
        return _open(cache, meta, tok)

    log(f"preparing data from {cfg.source} -> {cache}")
    _check_writable(cache)  # before tokenizing, which can take long
    docs = list(corpus.documents())
    val_docs = [d for i, d in enumerate(docs) if _is_val(i, cfg.val_fraction)]
    train_docs = [d for i, d in enumerate(docs) if not _is_val(i, cfg.val_fraction)]
    split = "documents"
    if len(val_docs) < 2 or not train_docs:
        # Too few documents to split by document (e.g. one big text file): hold out the tail of the text.
        joined = "\n\n".join(docs)
        cut = int(len(joined) * (1 - cfg.val_fraction))
        train_docs, val_docs, split = [joined[:cut]], [joined[cut:]], "tail"
    if cfg.tokenizer == "auto":
        tok = train_bpe(train_docs, vocab_size)
    else:
        tok = TextTokenizer.load(cfg.tokenizer)
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: the tokenizer has {tok.vocab_size} tokens but "
                        f"model.vocab_size={vocab_size}; set --model.vocab_size {tok.vocab_size}")
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tok.save(cache / "tokenizer.json")
        n_train = _write_tokens(cache / "train.bin", train_docs, tok, dtype)
        n_val = _write_tokens(cache / "val.bin", val_docs, tok, dtype)
    except OSError as e:  # meta.json is written last, so a half-written cache is never used
        raise DataError(f"{cache}: cannot write the token cache ({e.strerror or e}); free space or set "
                        "data.cache_dir to another folder") from None
    meta = {"version": CACHE_VERSION, "source": cfg.source, "dtype": np.dtype(dtype).name, "train_tokens": n_train,
            "val_tokens": n_val, "train_docs": len(train_docs), "val_docs": len(val_docs), "split": split,
            "tokenizer": tok.source, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    log(f"tokenized {len(docs)} documents: {n_train:,} train / {n_val:,} validation tokens "
        f"(vocabulary {tok.vocab_size})")
    return _open(cache, meta, tok)


def _check_writable(cache: Path) -> None:
    from moe_arch.training.run_dir import RunFolderError, writable_dir

    try:
        writable_dir(cache, "token cache")
    except RunFolderError as e:
        raise DataError(f"{e} (data.cache_dir)") from None


def _open(cache: Path, meta: dict, tok: TextTokenizer) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r")
    if train.size == 0 or val.size == 0:
        raise DataError(f"{cache}: the tokenized data is empty; remove the folder and check data.source")
    return TokenData(train, val, tok, cache, meta)


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
