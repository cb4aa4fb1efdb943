"""Where training text comes from: the embedded corpus, the user's files, or a Hugging Face dataset.

Every reader yields documents (strings). Missing, empty or unreadable data is a :class:`DataError` naming the
source and the fix; nothing here ever invents tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(RuntimeError):
    """The configured data cannot be used. One line: the source, what is wrong, the fix."""


def embedded_corpus_path() -> Path:
    return Path(str(resources.files("moe_arch") / "data" / "corpus" / "corpus.jsonl.gz"))


def _read_jsonl_lines(lines, where: str, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{where}:{lineno}: no field {text_field!r}; set data.text_field to the field that "
                            f"holds the text (keys here: {sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
        if text.strip():
            yield text


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
                                                                   or p.name.endswith(".jsonl.gz")))
    if not files:
        raise DataError(f"data.source={str(path)!r}: the folder has no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                        "files; point data.source at a text/JSONL file or a folder of them")
    return files


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                yield from _read_jsonl_lines(f, str(path), text_field)
        elif path.suffix in JSONL_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                yield from _read_jsonl_lines(f, str(path), text_field)
        else:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the path in data.source") from None


class Corpus:
    """A named source of documents with a fingerprint (for caching tokenized data)."""

    def __init__(self, source: str, text_field: str = "text"):
        self.source = source
        self.text_field = text_field
        if source == "embedded":
            self.files = [embedded_corpus_path()]
            self.kind = "embedded"
        elif source.startswith("hf:"):
            self.files = []
            self.kind = "hf"
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise DataError(f"data.source={source!r}: no such file or folder; give a text/JSONL file, a folder, "
                                "'embedded', or hf:NAME")
            self.files = _files_under(path)
            self.kind = "files"

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.source}|{self.text_field}".encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
            if self.kind == "embedded":
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        n = 0
        if self.kind == "hf":
            docs = self._hf_documents()
        else:
            docs = (d for p in self.files for d in _read_file(p, self.text_field))
        for d in docs:
            n += 1
            yield d
        if n == 0:
            raise DataError(f"data.source={self.source!r}: contains no non-empty documents; nothing to train on")

    def _hf_documents(self) -> Iterator[str]:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DataError(f"data.source={self.source!r}: the Hugging Face `datasets` package is not installed; "
                            "pip install 'moe-arch[hf]' or use a text/JSONL file") from None
        import datasets

        spec = self.source[3:]
        name, _, split = spec.partition(":")
        try:
            if Path(name).exists():
                ds = datasets.load_from_disk(name)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split or "train"]
            else:
                ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # datasets raises many types; report them in one line
            raise DataError(f"data.source={self.source!r}: could not load the dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if self.text_field not in ds.column_names:
            raise DataError(f"data.source={self.source!r}: no column {self.text_field!r} (columns: {ds.column_names}); "
                            "set data.text_field")
        for row in ds:
            text = row[self.text_field]
            if isinstance(text, str) and text.strip():
                yield text
