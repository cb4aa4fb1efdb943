"""Tokenizers: a byte-level BPE trained on the training split (``train-bpe``), a ``tokenizer.json``, or a Hugging
Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json`` / ``special_tokens_map.json``, as
``save_pretrained`` writes and the hub ships).

Encoding is always Hugging Face ``tokenizers`` (Rust, parallel ``encode_batch``). What a document looks like in
the token stream follows the tokenizer's own configuration, as ``AutoTokenizer`` would apply it: the
end-of-document token is the config's ``eos_token``; a BOS is put before each document exactly when the tokenizer
itself adds one (Llama: ``<s>``; GPT-2 and Qwen: none). The special tokens travel with the tokenizer into the
token cache and every checkpoint, so a checkpoint decodes and evaluates without the original folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_arch.data.corpus import DataError
from moe_arch.utils import atomic_write_text

EOS = "<|endoftext|>"
TRAIN_BPE = ("train-bpe", "auto")  # "auto" is the older spelling, still accepted
# Only a bare tokenizer.json (no config beside it) falls back to these names, in this order; an unknown
# tokenizer without a config is an error asking for data.eos_token, never a guess at "the first special token".
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
VOCAB_MULTIPLE = 64


def padded_vocab(n: int) -> int:
    """The model's vocabulary for a tokenizer of ``n`` tokens: rounded up to a multiple of 64 (tensor-core and
    kernel friendly; the extra rows are never a target)."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _token_name(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens that frame a document."""

    def __init__(
        self,
        tok: Tokenizer,
        source: str,
        eos_token: str | None = None,
        bos_token: str | None = None,
        add_bos: bool | None = None,
    ):
        self.tok = tok
        self.source = source
        if eos_token is None:
            eos_token = next((t for t in KNOWN_EOS if tok.token_to_id(t) is not None), None)
            if eos_token is None:
                raise DataError(
                    f"{source}: no end-of-document token: no tokenizer_config.json names an eos_token "
                    f"and none of {list(KNOWN_EOS)} is in the vocabulary; give the tokenizer's folder "
                    "(with tokenizer_config.json) or set data.eos_token"
                )
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise DataError(
                f"{source}: the end-of-document token {eos_token!r} is not in the vocabulary; check "
                "eos_token in tokenizer_config.json or data.eos_token"
            )
        self.eos_token, self.eos_id = eos_token, eos
        self.bos_token = bos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        if bos_token and self.bos_id is None:
            raise DataError(
                f"{source}: the BOS token {bos_token!r} is not in the vocabulary; check bos_token in "
                "tokenizer_config.json"
            )
        if add_bos is None:
            # Whether the tokenizer itself puts a BOS in front of a text (its post-processor), as AutoTokenizer does.
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.add_bos = bool(add_bos and self.bos_id is not None and self.bos_id != self.eos_id)

    # ------------------------------------------------------------------ identity
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def specials(self) -> dict:
        return {"eos_token": self.eos_token, "bos_token": self.bos_token, "add_bos_token": self.add_bos}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tok.to_str().encode())
        h.update(json.dumps(self.specials(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no document framing (prompts, lm-eval contexts)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_documents(
        self, texts: list[str], starts: list[bool] | None = None, ends: list[bool] | None = None
    ) -> list[list[int]]:
        """Documents as they go into the token stream: [BOS] text EOS. A large document read in pieces has
        ``ends`` False on all but its last piece (no EOS after it) and ``starts`` False on all but its first."""
        # encode_batch_fast: the same ids without computing character offsets (not needed here).
        out = [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        for k, ids in enumerate(out):
            if self.add_bos and (starts is None or starts[k]):
                ids.insert(0, self.bos_id)
            if ends is None or ends[k]:
                ids.append(self.eos_id)
        return out

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for (0 for special tokens), for bits-per-byte.

        Byte-level BPE (GPT-2, Llama 3, Qwen, ours): each character of a token is one byte, exact. SentencePiece
        style (Llama 2, Mistral): ``<0xNN>`` byte-fallback tokens are one byte, ``\u2581`` is a space. Anything
        else: the UTF-8 length of the token decoded alone."""
        n = self.vocab_size
        out = np.zeros(n, dtype=np.int64)
        spec = json.loads(self.tok.to_str())
        kinds = _decoder_kinds(spec.get("decoder"))
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        vocab = self.tok.get_vocab(with_added_tokens=True)
        for token, i in vocab.items():
            if token in specials or i >= n:
                continue
            if "ByteLevel" in kinds:
                out[i] = len(token)
            elif "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = 1
            elif "Metaspace" in kinds or "Replace" in kinds:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
            else:
                out[i] = len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """A Hugging Face tokenizer folder: tokenizer.json + tokenizer_config.json (AutoTokenizer reads it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.tok.to_str())
        atomic_write_text(
            folder / "tokenizer_config.json",
            json.dumps({**self.specials(), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2),
        )

    def checkpoint_entries(self) -> dict:
        return {"tokenizer_json": self.tok.to_str(), "tokenizer_specials": self.specials()}

    @classmethod
    def from_checkpoint(cls, state: dict, where: str) -> "TextTokenizer":
        if "tokenizer_json" not in state:
            raise DataError(f"{where}: the checkpoint carries no tokenizer (no 'tokenizer_json')")
        sp = state.get("tokenizer_specials") or {}  # checkpoints before the specials were stored: our own BPE
        return cls(
            Tokenizer.from_str(state["tokenizer_json"]),
            f"{where} (tokenizer)",
            sp.get("eos_token"),
            sp.get("bos_token"),
            sp.get("add_bos_token"),
        )

    @classmethod
    def load(cls, path: str | Path, eos_token: str = "") -> "TextTokenizer":
        """A tokenizer.json file or a tokenizer folder. ``eos_token`` (data.eos_token) overrides the config's."""
        path = Path(path).expanduser()
        where = f"data.tokenizer={str(path)!r}"
        if path.is_dir():
            return _load_folder(path, where, eos_token)
        if not path.is_file():
            raise DataError(
                f"{where}: no such file or folder; give a tokenizer.json, a Hugging Face tokenizer "
                "folder, or 'train-bpe'"
            )
        tok = _read_tokenizer_json(path, where)
        # A tokenizer.json inside a downloaded folder still has its config next to it.
        cfg = _read_tokenizer_config(path.parent) if (path.parent / "tokenizer_config.json").is_file() else {}
        return cls(tok, str(path), eos_token or cfg.get("eos_token"), cfg.get("bos_token"), cfg.get("add_bos_token"))


def tokenizer_difference(a: TextTokenizer, b: TextTokenizer) -> str:
    """How tokenizer ``b`` differs from ``a``, in a few words for an error message."""
    if a.specials() != b.specials():
        return f"special tokens {a.specials()} before, {b.specials()} now"
    va, vb = a.tok.get_vocab(with_added_tokens=True), b.tok.get_vocab(with_added_tokens=True)
    if len(va) != len(vb):
        return f"{len(va)} tokens before, {len(vb)} now"
    ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
    moved = sorted(i for i in ia if ia[i] != ib.get(i))
    if moved:
        i = moved[0]
        return f"{len(moved)} ids stand for other tokens now, e.g. id {i}: {ia[i]!r} before, {ib.get(i)!r} now"
    return "the same vocabulary with other merges, normalisation or pre-tokenization"


def _decoder_kinds(spec) -> set[str]:
    if not spec:
        return set()
    kinds = {spec.get("type")}
    for d in spec.get("decoders") or []:
        kinds |= _decoder_kinds(d)
    return kinds


def _read_tokenizer_json(path: Path, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"{where}: {path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None


def _read_tokenizer_config(folder: Path) -> dict:
    """eos/bos token names and add_bos_token from tokenizer_config.json, completed by special_tokens_map.json."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins, as in transformers
        f = folder / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: not valid JSON ({e}); re-download the tokenizer") from None
        for key in ("eos_token", "bos_token"):
            if key in cfg:
                out[key] = _token_name(cfg[key])
        if isinstance(cfg.get("add_bos_token"), bool):
            out["add_bos_token"] = cfg["add_bos_token"]
    return out


def _load_folder(folder: Path, where: str, eos_token: str) -> TextTokenizer:
    cfg = _read_tokenizer_config(folder)
    if (folder / "tokenizer.json").is_file():
        tok = _read_tokenizer_json(folder / "tokenizer.json", where)
        return TextTokenizer(
            tok, str(folder), eos_token or cfg.get("eos_token"), cfg.get("bos_token"), cfg.get("add_bos_token")
        )
    # Only the slow files (vocab.json + merges.txt, a SentencePiece model): transformers converts them to a fast
    # tokenizer, offline. Its backend tokenizer is what we encode with from then on.
    try:
        from transformers import AutoTokenizer  # lazy: an optional extra (moe-arch[hf]), heavy; slow files only
    except ImportError:
        raise DataError(
            f"{where}: the folder has no tokenizer.json; converting its other files needs transformers "
            "(pip install 'moe-arch[hf]')"
        ) from None
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as e:
        raise DataError(
            f"{where}: transformers could not read the tokenizer folder ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"{where}: transformers gives no fast tokenizer for this folder; save it with "
            "tokenizer.save_pretrained() to get a tokenizer.json"
        )
    return TextTokenizer(
        backend,
        str(folder),
        eos_token or hf.eos_token or cfg.get("eos_token"),
        hf.bos_token or cfg.get("bos_token"),
        cfg.get("add_bos_token"),
    )


def train_bpe(documents: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Deterministic for the same documents in the same order and the same vocabulary size. ``documents`` is
    streamed: the trainer keeps word counts, not the text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(documents, trainer)
    return TextTokenizer(tok, f"bpe-{vocab_size}", EOS)
