"""Where training text comes from: the embedded corpus, local files (text, JSONL, parquet, arrow, CSV, compressed,
globs, folders, a saved ``datasets`` folder) or a Hugging Face dataset (hub or local, optionally streamed).

Every reader is a generator over documents: nothing here holds the corpus in memory, so a corpus larger than RAM
streams through. The formats are read by the libraries that own them (pyarrow for parquet / arrow / CSV and for
zstd, ``datasets`` for hub datasets and saved folders); only JSONL and text are read line by line here, because
their error messages (file:line, the field that is missing) are part of what this module gives the user.

Missing, empty or unreadable data is a :class:`DataError` naming the source and the fix; nothing ever invents
tokens.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".arrow", ".csv")
COMPRESSED = (".gz", ".zst", ".zstd")
TEXT_PIECE_CHARS = 4 << 20  # a text file is read in pieces of ~4M characters, cut at a line break
TABLE_BATCH_ROWS = 1024


class DataError(RuntimeError):
    """The configured data cannot be used. One line: the source, what is wrong, the fix."""


class Piece(str):
    """Part of a document that continues in the next item (a large text file read in pieces): no end-of-document
    token follows it."""


def embedded_corpus_path() -> Path:
    return Path(str(resources.files("moe_arch") / "data" / "corpus" / "corpus.jsonl.gz"))


def _need_pyarrow(where: str):
    try:
        import pyarrow  # lazy: an optional extra (moe-arch[data]), only for parquet / arrow / CSV sources
    except ImportError:
        raise DataError(f"{where}: reading this format needs pyarrow; pip install 'moe-arch[data]'") from None
    return pyarrow


# ---------------------------------------------------------------------------------------------- file readers
def _format(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or '') of a file name: data.jsonl.zst -> ('.jsonl', '.zst')."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else ""
    fmt = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not comp else "")
    return fmt, comp


def _open_text(path: Path, comp: str):
    if comp == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if comp in (".zst", ".zstd"):
        pa = _need_pyarrow(str(path))
        return io.TextIOWrapper(pa.input_stream(str(path), compression="zstd"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path, comp: str, text_field: str) -> Iterator[str]:
    with _open_text(path, comp) as lines:
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(
                    f"{path}:{lineno}: no field {text_field!r}; set data.text_field to the field that "
                    "holds the text (keys here: "
                    f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
            if text.strip():
                yield text


def _read_text(path: Path, comp: str, text_field: str) -> Iterator[str]:
    """The whole file is one document; a large one arrives in pieces (each cut after a line break), so memory
    stays bounded whatever its size."""
    with _open_text(path, comp) as f:
        carry, prev, pieces = "", None, 0
        while block := f.read(TEXT_PIECE_CHARS):
            block = carry + block
            cut = block.rfind("\n") + 1 or len(block)
            carry = block[cut:]
            if prev is not None:
                pieces += 1
                yield Piece(prev)
            prev = block[:cut]
        last = (prev or "") + carry
        if last.strip() or pieces:  # after pieces, the tail (even blank) is what ends the document
            yield last


def _check_column(names: list[str], text_field: str, path) -> None:
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names[:12]}); set data.text_field")


def _strings(values: list, text_field: str, path) -> Iterator[str]:
    for v in values:
        if v is None:
            continue
        if not isinstance(v, str):
            raise DataError(
                f"{path}: column {text_field!r} holds {type(v).__name__}, expected strings; set "
                "data.text_field to the text column"
            )
        if v.strip():
            yield v


def _read_parquet(path: Path, comp: str, text_field: str) -> Iterator[str]:
    _need_pyarrow(str(path))
    import pyarrow.parquet as pq  # lazy: optional extra, checked by _need_pyarrow

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    _check_column(pf.schema_arrow.names, text_field, path)
    for batch in pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[text_field]):
        yield from _strings(batch.column(0).to_pylist(), text_field, path)


def _read_arrow(path: Path, comp: str, text_field: str) -> Iterator[str]:
    """Arrow IPC, file or stream format (``datasets`` writes the stream format), memory-mapped."""
    pa = _need_pyarrow(str(path))
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        names = reader.schema.names
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not an Arrow IPC file or stream ({str(e).splitlines()[0]})") from None
        batches, names = iter(reader), reader.schema.names
    _check_column(names, text_field, path)
    for batch in batches:
        col = batch.column(names.index(text_field))
        for s in range(0, len(col), TABLE_BATCH_ROWS):
            yield from _strings(col.slice(s, TABLE_BATCH_ROWS).to_pylist(), text_field, path)


def _read_csv(path: Path, comp: str, text_field: str) -> Iterator[str]:
    pa = _need_pyarrow(str(path))
    import pyarrow.csv as pcsv  # lazy: optional extra, checked by _need_pyarrow

    stream = pa.input_stream(str(path), compression="detect")
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=4 << 20),
            convert_options=pcsv.ConvertOptions(column_types={text_field: pa.string()}),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a readable CSV file ({str(e).splitlines()[0]})") from None
    _check_column(reader.schema.names, text_field, path)
    i = reader.schema.names.index(text_field)
    for batch in reader:
        yield from _strings(batch.column(i).to_pylist(), text_field, path)


FILE_READERS: dict[str, Callable[[Path, str, str], Iterator[str]]] = {
    **{s: _read_text for s in TEXT_SUFFIXES},
    **{s: _read_jsonl for s in JSONL_SUFFIXES},
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
    ".csv": _read_csv,
}
KNOWN = "/".join(FILE_READERS) + " (text, JSONL and CSV also .gz/.zst)"


def _readable(path: Path) -> bool:
    fmt, comp = _format(path)
    return fmt in FILE_READERS and not (comp and fmt in (".parquet", ".arrow"))


def _first_bad_utf8(path: Path, comp: str) -> tuple[int, int, str] | None:
    """(line, byte offset, reason) of the first bytes of ``path`` (decompressed) that are not UTF-8; None when
    it cannot be re-read. Only called on the way to an error, so one more pass costs nothing that matters."""
    try:
        if comp == ".gz":
            f = gzip.open(path, "rb")
        elif comp in (".zst", ".zstd"):
            f = _need_pyarrow(str(path)).input_stream(str(path), compression="zstd")
        else:
            f = open(path, "rb")
        with f:
            dec, done, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
            while block := f.read(1 << 20):
                try:
                    dec.decode(block)
                except UnicodeDecodeError as e:
                    # the decoder may hold back up to 3 bytes of a sequence begun in the previous block
                    held = len(e.object) - len(block)
                    at = done - held + e.start
                    return lines + e.object[: e.start].count(b"\n"), at, e.reason
                done += len(block)
                lines += block.count(b"\n")
            try:
                dec.decode(b"", final=True)
            except UnicodeDecodeError as e:
                return lines, done - len(e.object) + e.start, e.reason
    except Exception:  # noqa: BLE001 - only the position of an error already being reported is lost
        return None
    return None


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    fmt, comp = _format(path)
    try:
        yield from FILE_READERS[fmt](path, comp, text_field)
    except UnicodeDecodeError as e:
        # e.start counts from the start of the decoder's last buffer, not of the file: find the real place.
        where = _first_bad_utf8(path, comp)
        if where is None:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8") from None
        line, offset, reason = where
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({reason} at byte {offset:,}"
            f"{' of the decompressed data' if comp else ''}); convert it to UTF-8"
        ) from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}); check the file") from None


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _files_under(path: Path, source: str) -> list[Path]:
    if path.is_file():
        if not _readable(path):
            raise DataError(f"data.source={source!r}: {path.name} is not a format this reads; use {KNOWN}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _readable(p))
    if not files:
        raise DataError(
            f"data.source={source!r}: the folder has no {KNOWN} files; point data.source at such "
            "a file, a folder or glob of them, or hf:NAME"
        )
    return files


# ---------------------------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class HFSpec:
    name: str
    config: str | None
    split: str
    streaming: bool


def parse_hf(source: str, hf_config: str = "", split: str = "", streaming: bool = False) -> HFSpec:
    """``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``; data.hf_config / data.split fill or override."""
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(
            f"data.source={source!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
            "(or data.hf_config / data.split)"
        )
    name = parts[0]
    cfg = parts[1] if len(parts) == 3 else None
    spl = parts[-1] if len(parts) >= 2 else None
    return HFSpec(name, hf_config or cfg or None, split or spl or "train", bool(streaming))


class Corpus:
    """A named source of documents with a fingerprint (the token cache's key)."""

    def __init__(
        self,
        source: str,
        text_field: str = "text",
        *,
        hf_config: str = "",
        split: str = "",
        streaming: bool = False,
        max_documents: int = 0,
    ):
        self.source = source
        self.text_field = text_field
        self.max_documents = max_documents
        self.hf: HFSpec | None = None
        self.saved: Path | None = None
        self.files: list[Path] = []
        if source == "embedded":
            self.files, self.kind = [embedded_corpus_path()], "embedded"
        elif source.startswith("hf:"):
            self.hf = parse_hf(source, hf_config, split, streaming)
            local = Path(self.hf.name).expanduser()
            self.kind = "hf"
            if is_saved_dataset(local):
                self.saved = local
            elif local.exists():  # a local folder of data files given to load_dataset (its builder infers the format)
                self.files = _files_under(local, source)
        elif any(c in source for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(Path(source).expanduser()), recursive=True))
            self.files = [p for p in matches if p.is_file() and _readable(p)]
            if not self.files:
                raise DataError(f"data.source={source!r}: the pattern matches no {KNOWN} file")
            self.kind = "files"
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise DataError(
                    f"data.source={source!r}: no such file or folder; give a file, a folder or a glob "
                    f"of {KNOWN} files, 'embedded', or hf:NAME"
                )
            if is_saved_dataset(path):
                self.saved, self.kind = path, "saved"
                self.hf = HFSpec(str(path), None, split or "train", False)
            else:
                self.files, self.kind = _files_under(path, source), "files"

    def describe(self) -> str:
        if self.hf is not None and self.kind == "hf":
            h = self.hf
            return (
                f"hf:{h.name}"
                + (f" config {h.config}" if h.config else "")
                + f" split {h.split}"
                + (" (streaming)" if h.streaming else "")
            )
        if self.saved is not None:
            return f"saved dataset {self.saved}"
        return self.source if len(self.files) != 1 or self.kind == "embedded" else str(self.files[0])

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.source}|{self.text_field}|{self.hf}|{self.max_documents}".encode())
        files = list(self.files)
        if self.saved is not None:
            files += sorted(p for p in self.saved.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
            if self.kind == "embedded":
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        """Documents in a fixed order (the same every time, so a build can resume by counting). ``Piece`` items
        continue in the next one; they count towards data.max_documents only when the document ends."""
        n = 0
        docs = (
            self._hf_documents()
            if self.hf is not None
            else (d for p in self.files for d in _read_file(p, self.text_field))
        )
        for d in docs:
            yield d
            if not isinstance(d, Piece):
                n += 1
                if self.max_documents and n >= self.max_documents:
                    return
        if n == 0:
            raise DataError(f"data.source={self.source!r}: contains no non-empty documents; nothing to train on")

    def _hf_documents(self) -> Iterator[str]:
        try:
            import datasets  # lazy: an optional extra (moe-arch[data]), heavy, only for hub / saved datasets
        except ImportError:
            raise DataError(
                f"data.source={self.source!r}: the Hugging Face `datasets` package is not installed; "
                "pip install 'moe-arch[data]' or use a local file"
            ) from None

        h = self.hf
        try:
            if self.saved is not None:
                ds = datasets.load_from_disk(str(self.saved))
                if isinstance(ds, datasets.DatasetDict):
                    if h.split not in ds:
                        raise DataError(
                            f"data.source={self.source!r}: no split {h.split!r} (splits: {list(ds)}); set data.split"
                        )
                    ds = ds[h.split]
            else:
                ds = datasets.load_dataset(h.name, h.config, split=h.split, streaming=h.streaming)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types; report them in one line
            raise DataError(
                f"data.source={self.source!r}: could not load the dataset ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check the name, data.hf_config and "
                "data.split"
            ) from None
        names = list(ds.column_names or []) if ds.column_names is not None else None
        if names is not None and self.text_field not in names:
            raise DataError(
                f"data.source={self.source!r}: no column {self.text_field!r} (columns: {names}); set data.text_field"
            )
        where = f"data.source={self.source!r}"
        for batch in ds.iter(batch_size=TABLE_BATCH_ROWS):
            if self.text_field not in batch:
                raise DataError(f"{where}: no column {self.text_field!r} (columns: {list(batch)}); set data.text_field")
            yield from _strings(batch[self.text_field], self.text_field, where)
