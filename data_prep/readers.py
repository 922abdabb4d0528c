"""Corpus readers: turn input paths into a deterministic stream of raw documents.

Formats (chosen by extension unless ``input_format`` says otherwise; ``.bz2``/``.gz`` are decompressed
on the fly):

* ``txt``       plain text, documents separated by one or more blank lines;
* ``jsonl``     one JSON object per line, the document in ``text_field`` (a null there is ``null_text``,
  counted like an empty document, as in a parquet column);
* ``mediawiki`` a MediaWiki XML export (``.xml`` / ``.xml.bz2`` as Wikipedia publishes them); only
  articles (namespace 0, not redirects) are kept, their wikitext is turned into plain text later, in
  the workers (see :mod:`data_prep.cleaning`);
* ``parquet`` / ``arrow``, ``save_to_disk`` folders and ``hf:NAME[:CONFIG][:SPLIT]`` hub datasets:
  read by :mod:`data_prep.columnar`, the text in column ``text_field``.

The stream yields :class:`RawDoc` items and :class:`Skip` items (bad input found while reading); the
pipeline decides whether a skip is fatal (``on_error="fail"``) or counted. The order is fixed by the
sorted file list, so every run over the same inputs sees the same stream.

Public API::

    expand_inputs(inputs, input_format="auto") -> (files: list[tuple[str, str]], missing: list[str])
    iter_documents(files, text_field="text", max_doc_chars=...) -> Iterator[RawDoc | Skip]
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from data_prep import columnar
from data_prep.documents import RawDoc, Skip, null_text, too_large

FORMATS = ("txt", "jsonl", "mediawiki") + columnar.FORMATS
_BINARY_PROBE_BYTES = 8192


def _format_of(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    columnar_format = columnar.format_of_name(path)
    if columnar_format is not None:
        return columnar_format
    name = path.lower()
    for ext in (".bz2", ".gz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".xml"):
        return "mediawiki"
    # Wikipedia's own file names hide the format ("...articles1.xml-p10p30302.bz2"): look inside.
    try:
        with _open_binary(path) as f:
            head = f.read(512).lstrip()
    except (OSError, EOFError):
        return "txt"   # unreadable: the reader reports it with a clear message
    if head.startswith((b"<mediawiki", b"<?xml")):
        return "mediawiki"
    return "txt"


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], input_format: str = "auto") -> tuple[list[tuple[str, str]], list[str]]:
    """Files (path, format) for the given files, folders (recursive) or globs, in a fixed order.

    Returns the files and the inputs that matched nothing (the caller reports them).
    """
    if input_format != "auto" and input_format not in FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; choose one of auto, {', '.join(FORMATS)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[tuple[str, str]] = []
    missing: list[str] = []
    for item in map(str, inputs):
        if item.startswith(columnar.HUB_PREFIX):
            files.extend((p, "arrow") for p in columnar.hub_files(item))
            continue
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            found = columnar.expand_folder(item)
            if found is None:
                found = sorted(str(p) for p in Path(item).rglob("*")
                               if p.is_file() and not p.name.startswith(".") and not columnar.is_datasets_metadata(p))
                if input_format in columnar.FORMATS:   # a hub repo folder also holds README.md & co: its data files only
                    found = [p for p in found if columnar.format_of_name(p) == input_format]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            found = []
        if not found:
            missing.append(item)
        files.extend((p, _format_of(p, input_format)) for p in found)
    return files, missing


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _looks_binary(path: str) -> bool:
    try:
        with _open_binary(path) as f:
            return b"\x00" in f.read(_BINARY_PROBE_BYTES)
    except (OSError, EOFError):
        return False  # unreadable compressed data is reported by the reader with a better message


def iter_documents(files: Sequence[tuple[str, str]], text_field: str = "text", max_doc_chars: int = 10_000_000) -> Iterator[RawDoc | Skip]:
    """All documents of all files, in order, with read problems as :class:`Skip` items."""
    for path, fmt in files:
        if fmt in columnar.FORMATS:   # binary by design; the reader reports its own problems
            yield from columnar.read_columnar(path, fmt, text_field, max_doc_chars)
            continue
        if _looks_binary(path):
            yield Skip(path, 0, "binary_file", f"{path} looks like a binary file (it contains NUL bytes), not {fmt} text; "
                                               "remove it from the inputs or pass --on-error skip")
            continue
        reader = {"txt": _read_txt, "jsonl": _read_jsonl, "mediawiki": _read_mediawiki}[fmt]
        ordinal = 0
        try:
            for item in reader(path, text_field, max_doc_chars):
                ordinal = item.ordinal
                yield item
        except EOFError:
            yield Skip(path, 0, "truncated_file", f"{path} ends in the middle of its compressed stream (truncated download?) after "
                                                  f"{ordinal} documents; fetch the file again, or pass --on-error skip to keep the documents before the cut")
        except (OSError, zlib.error, ET.ParseError) as err:
            yield Skip(path, 0, "corrupt_file", f"{path} cannot be read as {fmt} ({err}) after {ordinal} documents; "
                                                "check the file, or pass --on-error skip to keep the documents before the problem")


def _decode(path: str, ordinal: int, data: bytes, max_doc_chars: int) -> RawDoc | Skip:
    if len(data) > 4 * max_doc_chars:   # cheap pre-check: a UTF-8 char is at most 4 bytes
        return too_large(path, ordinal, len(data), max_doc_chars)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return Skip(path, ordinal, "invalid_utf8", f"{path}: document {ordinal} is not valid UTF-8 ({err.reason} at byte {err.start} of the document); "
                                                   "re-encode the file as UTF-8 or pass --on-error skip")
    if len(text) > max_doc_chars:
        return too_large(path, ordinal, len(text), max_doc_chars)
    return RawDoc(path, ordinal, "text", text)


def _read_txt(path: str, text_field: str, max_doc_chars: int) -> Iterator[RawDoc | Skip]:
    ordinal = 0
    lines: list[bytes] = []
    size = 0
    oversized = False

    def flush() -> RawDoc | Skip | None:
        nonlocal ordinal
        if not lines and not oversized:
            return None
        ordinal += 1
        if oversized:
            return too_large(path, ordinal, size, max_doc_chars)
        return _decode(path, ordinal, b"".join(lines).strip(), max_doc_chars)

    with _open_binary(path) as f:
        for line in f:
            if line.strip():
                size += len(line)
                # Stop buffering a runaway document (e.g. a file without blank lines): memory stays bounded.
                if size > 4 * max_doc_chars:
                    oversized = True
                    lines.clear()
                elif not oversized:
                    lines.append(line)
                continue
            item = flush()
            if item is not None:
                yield item
            lines, size, oversized = [], 0, False
        item = flush()
        if item is not None:
            yield item


def _read_jsonl(path: str, text_field: str, max_doc_chars: int) -> Iterator[RawDoc | Skip]:
    with _open_binary(path) as f:
        ordinal = 0
        for line in f:
            if not line.strip():
                continue
            ordinal += 1
            item = _decode(path, ordinal, line, max_doc_chars)
            if isinstance(item, Skip):
                yield item
                continue
            try:
                record = json.loads(item.text)
                text = record[text_field]
                if text is None:   # a missing value, as in a parquet column: no document, counted
                    yield null_text(path, ordinal, text_field)
                    continue
                if not isinstance(text, str):
                    raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as err:
                yield Skip(path, ordinal, "bad_json", f"{path}: line {ordinal} is not a JSON object with a string field {text_field!r} ({err}); "
                                                      "fix the line, set --text-field, or pass --on-error skip")
                continue
            if len(text) > max_doc_chars:
                yield too_large(path, ordinal, len(text), max_doc_chars)
                continue
            yield RawDoc(path, ordinal, "text", text)


def _read_mediawiki(path: str, text_field: str, max_doc_chars: int) -> Iterator[RawDoc | Skip]:
    ordinal = 0
    with _open_binary(path) as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = elem.findtext("{*}ns")
            is_article = (ns is None or ns.strip() == "0") and elem.find("{*}redirect") is None
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()   # keeps memory flat on multi-GB dumps
            if not is_article:
                continue
            ordinal += 1
            if len(text) > max_doc_chars:
                yield too_large(path, ordinal, len(text), max_doc_chars)
                continue
            # The title travels on the first line; cleaning keeps it as the document's heading.
            yield RawDoc(path, ordinal, "wikitext", f"{title}\n{text}")
