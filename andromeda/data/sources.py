"""Readers that turn user inputs into a stream of documents, one piece of text at a time.

- `resolve_sources(paths, field)`: each path -> a `Source` (text/markdown file, folder of them
  searched recursively, JSON Lines, Parquet, a `datasets` `save_to_disk` folder, or a hub
  dataset named explicitly as `hf:NAME[:SPLIT]`).
- `stdlib_sources()`: the running Python's standard-library .py files, the embedded default
  corpus (present on every machine, so `prepare` works offline).
- `iter_pieces(sources)`: `(starts_document, text)` pairs; a long text file comes in pieces
  cut after a newline so memory stays bounded, every other document as one piece.
- `file_record(path)`: size and sha256 of a source file, for meta.json.

Bad input (binary files, undecodable UTF-8, a JSONL record without the field) raises
`UserError` naming the file and line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from andromeda.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
HUB_PREFIX = "hf:"
READ_CHUNK = 1 << 20  # bytes read at a time from a text file

Piece = tuple[bool, str]  # (this piece starts a new document, text)


@dataclass
class Source:
    """One input. `kind` is text | jsonl | parquet | hf_disk | hf_hub; `files` are the files
    read (a text source may hold many, one document each); `strict` False skips unreadable
    text files instead of failing (used for the default corpus only)."""

    label: str
    kind: str
    files: list[Path]
    field: str = "text"
    strict: bool = True


def _kind_of_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _walk(folder: Path) -> list[Path]:
    """Files under `folder` with a known suffix, sorted, hidden names skipped."""
    known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(part.startswith(".") for part in rel) or not path.is_file():
            continue
        if path.suffix.lower() in known:
            out.append(path)
    return out


def resolve_sources(paths: list[str], field: str = "text") -> list[Source]:
    sources: list[Source] = []
    for raw in paths:
        if raw.startswith(HUB_PREFIX):
            sources.append(Source(raw, "hf_hub", [], field))
            continue
        path = Path(raw)
        if not path.exists():
            raise UserError(f"data path not found: {raw} (a hub dataset is written {HUB_PREFIX}NAME[:SPLIT])")
        if path.is_dir() and any((path / m).exists() for m in HF_DISK_MARKERS):
            files = sorted(p for p in path.rglob("*") if p.is_file())
            sources.append(Source(raw, "hf_disk", files, field))
        elif path.is_dir():
            files = _walk(path)
            if not files:
                raise UserError(f"no text, markdown, JSONL or Parquet files under {raw}")
            # A folder may mix kinds; each file becomes its own source, in sorted order.
            sources.extend(Source(str(f), _kind_of_file(f), [f], field) for f in files)
        else:
            sources.append(Source(raw, _kind_of_file(path), [path], field))
    return sources


def stdlib_sources() -> list[Source]:
    """The standard library's .py files (site-packages and caches left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages", "__pycache__") or p.startswith(".") for p in rel):
            continue
        files.append(path)
    if not files:
        raise UserError(f"no standard-library sources found under {root}")
    return [Source(f"stdlib:{root}", "text", files, strict=False)]


def file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest()}


def iter_pieces(sources: list[Source], on_file: Optional[Callable[[Path], None]] = None) -> Iterator[Piece]:
    """All documents of all sources in order. `on_file(path)` is told of each file once its
    first document has been taken, so a consumer that stops early (a size limit) does not
    record a file it never used."""
    on_file = on_file or (lambda path: None)
    readers = {"jsonl": _jsonl_pieces, "parquet": _parquet_pieces,
               "hf_disk": _hf_disk_pieces, "hf_hub": _hf_hub_pieces}
    for source in sources:
        if source.kind == "text":  # one document per file
            for path in source.files:
                read = _strict_file if source.strict else _lenient_file
                yield from _announce_after_first(read(path), [path], on_file)
        else:
            yield from _announce_after_first(readers[source.kind](source), source.files, on_file)


def _announce_after_first(pieces: Iterator[Piece], files: list[Path], on_file) -> Iterator[Piece]:
    announced = False
    for piece in pieces:
        yield piece
        if not announced:  # runs only when the consumer asks for more, i.e. it kept this piece
            for path in files:
                on_file(path)
            announced = True


def _lenient_file(path: Path) -> Iterator[Piece]:
    """Default corpus: skip the standard library's deliberately malformed test files."""
    data = path.read_bytes()
    if b"\0" in data:
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    yield True, text


def _strict_file(path: Path) -> Iterator[Piece]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    first, pending, offset = True, "", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise UserError(f"{path} looks binary (NUL byte at offset {offset + nul}); "
                                "only UTF-8 text files can be prepared")
            try:
                pending += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (bad byte at offset {offset + e.start})") from None
            offset += len(chunk)
            if not chunk:
                break
            cut = pending.rfind("\n") + 1  # pieces end after a newline, so words stay whole
            if cut > 0:
                yield first, pending[:cut]
                first, pending = False, pending[cut:]
    if first or pending:
        yield first, pending


def _jsonl_pieces(source: Source) -> Iterator[Piece]:
    path = source.files[0]
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or source.field not in record:
                raise UserError(f"{path}:{lineno}: record has no field {source.field!r} (choose one with --field)")
            text = record[source.field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {source.field!r} is {type(text).__name__}, not text")
            yield True, text


def _texts_from_batches(batches, field: str, where: str) -> Iterator[Piece]:
    row = 0
    for texts in batches:
        for text in texts:
            if not isinstance(text, str):
                raise UserError(f"{where}: row {row} has no text in column {field!r}")
            yield True, text
            row += 1


def _parquet_pieces(source: Source) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet input needs the optional `data` extra: pip install pyarrow") from None
    path = source.files[0]
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise UserError(f"cannot read Parquet file {path}: {e}") from None
    names = pf.schema_arrow.names
    if source.field not in names:
        raise UserError(f"{path} has no column {source.field!r} (columns: {', '.join(names)}); use --field")
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=1024, columns=[source.field]))
    yield from _texts_from_batches(batches, source.field, str(path))


def _load_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets input needs the optional `data` extra: pip install datasets") from None
    return datasets


def _dataset_texts(ds, field: str, where: str) -> Iterator[Piece]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        names = list(ds.keys())
        if "train" not in names and len(names) != 1:
            raise UserError(f"{where} holds splits {names}; name one as {HUB_PREFIX}NAME:SPLIT or save one split")
        ds = ds["train" if "train" in names else names[0]]
    columns = ds.column_names or []
    if columns and field not in columns:
        raise UserError(f"{where} has no column {field!r} (columns: {', '.join(columns)}); use --field")
    batches = (batch[field] for batch in ds.iter(batch_size=1024))
    yield from _texts_from_batches(batches, field, where)


def _hf_disk_pieces(source: Source) -> Iterator[Piece]:
    datasets = _load_datasets()
    try:
        ds = datasets.load_from_disk(source.label)
    except Exception as e:  # datasets raises FileNotFoundError and its own errors
        raise UserError(f"cannot load dataset folder {source.label}: {e}") from None
    yield from _dataset_texts(ds, source.field, source.label)


def _hf_hub_pieces(source: Source) -> Iterator[Piece]:
    datasets = _load_datasets()
    name, _, split = source.label[len(HUB_PREFIX):].partition(":")
    try:  # streaming, so a large hub dataset is read document by document
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # network and naming errors come in many types
        raise UserError(f"cannot load hub dataset {name!r}: {e}") from None
    yield from _dataset_texts(ds, source.field, source.label)
