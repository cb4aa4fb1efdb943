"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``): trained on the training split, or loaded from a
``tokenizer.json`` the user points to."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_arch.data.corpus import DataError
from moe_arch.utils import atomic_write_text

EOS = "<|endoftext|>"


class TextTokenizer:
    def __init__(self, tok: Tokenizer, source: str):
        self.tok = tok
        self.source = source
        eos = tok.token_to_id(EOS)
        if eos is None:
            # Foreign tokenizers name their end-of-text token differently; take the first special token.
            specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
            if not specials:
                raise DataError(f"{source}: the tokenizer has no end-of-text token ({EOS!r} or another special "
                                "token); documents need a separator")
            eos = tok.token_to_id(specials[0])
        self.eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.tok.to_str())

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: no such file; give a tokenizer.json or 'auto'")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"data.tokenizer={str(path)!r}: not a Hugging Face tokenizer.json "
                            f"({str(e).splitlines()[0]})") from None
        return cls(tok, str(path))


def train_bpe(documents: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Deterministic for the same documents in the same order and the same vocabulary size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return TextTokenizer(tok, f"bpe-{vocab_size}")
