"""The items every corpus reader yields: a raw document, or a piece of bad input found while reading.

Kept apart from the readers so that the text readers (:mod:`data_prep.readers`) and the columnar
ones (:mod:`data_prep.columnar`) share them without importing each other.
"""
from __future__ import annotations

from typing import NamedTuple


class RawDoc(NamedTuple):
    source: str      # file it came from
    ordinal: int     # 1-based document number within that file
    kind: str        # "text" (ready to tokenize) or "wikitext" (cleaned in the workers)
    text: str


class Skip(NamedTuple):
    source: str
    ordinal: int     # document number within the file, 0 for a whole-file problem
    # invalid_utf8 | bad_json | too_large | binary_file | truncated_file | corrupt_file | missing_path | empty
    # | null_text | missing_column | non_string_column
    reason: str
    message: str     # a sentence for the user: what is wrong and what to do


def too_large(path: str, ordinal: int, size: int, limit: int) -> Skip:
    return Skip(path, ordinal, "too_large", f"{path}: document {ordinal} is larger than the limit ({size} > max_doc_chars={limit}); "
                                            "split it, raise --max-doc-chars, or pass --on-error skip")


def null_text(path: str, ordinal: int, text_field: str) -> Skip:
    # A missing value is no document at all: counted like an empty one, never fatal (see pipeline.ALWAYS_SKIPPED).
    return Skip(path, ordinal, "null_text", f"{path}: document {ordinal} has no value (null) in {text_field!r}")
