"""Columnar inputs: parquet files, Arrow IPC files (what `datasets` writes), and hub datasets.

* ``parquet``  a ``.parquet`` file (the Hugging Face hub's format for Wikipedia, C4, FineWeb, ...);
  only the text column is read, one record batch at a time, so memory is bounded by a batch and
  one page, never the file;
* ``arrow``    an Arrow IPC file, stream (the ``.arrow`` files of a ``save_to_disk`` folder and of
  the ``datasets`` cache) or file format; read batch by batch;
* ``hf:NAME[:CONFIG][:SPLIT]`` a hub dataset: ``datasets.load_dataset`` downloads it into the local
  cache once (it needs the network unless already cached), then its cache's ``.arrow`` files are
  read like any others, so a re-run resumes from local files.

A ``save_to_disk`` folder (``state.json`` + ``dataset_info.json`` + ``data-*.arrow``) is expanded
into its data files in ``state.json``'s order; a ``DatasetDict`` folder is refused with its split
names (pass one split's folder). Metadata JSON and lock files of ``datasets`` folders are never
read as corpus files.

Bad input becomes :class:`~data_prep.documents.Skip` items like the text readers': a damaged or
truncated file (after the documents read before the damage), a missing text column (the message
lists the columns there are), a column that is not a string; a null value is ``null_text``
(counted like an empty document).

Public API::

    FORMATS = ("parquet", "arrow")
    format_of_name(name) -> "parquet" | "arrow" | None
    expand_folder(folder) -> list[str] | None        # a datasets folder's data files, else None
    parse_hub_spec("hf:NAME[:CONFIG][:SPLIT]") -> (name, config, split)
    hub_files(spec) -> list[str]                     # downloads (if online) and returns the cache's .arrow files
    read_columnar(path, fmt, text_field, max_doc_chars) -> Iterator[RawDoc | Skip]
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from data_prep.documents import RawDoc, Skip, null_text, too_large

FORMATS = ("parquet", "arrow")
HUB_PREFIX = "hf:"
# Files `datasets` writes beside the data: never corpus input.
_DATASETS_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
# Rows per record batch: the Python strings of one batch exist at once, so a small batch keeps a
# reader of long documents (Wikipedia articles: ~25 KB) near the JSONL reader's memory
# (benchmarks/prep_memory.py: 1024 rows cost ~100 MB more on 1000-row groups of articles).
_BATCH_ROWS = 64
_PARQUET_READ_BUFFER = 1 << 20   # buffered column-chunk reads: a page at a time, not a whole row group
_PARQUET_MAGIC = b"PAR1"


def format_of_name(name: str) -> str | None:
    name = name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return None


def is_datasets_metadata(path: Path) -> bool:
    """Metadata and lock files of a ``datasets`` folder or cache, and the cache's ``.map()`` results."""
    if path.name in _DATASETS_METADATA or path.name.endswith(".lock"):
        return True
    return path.name.startswith("cache-") and path.suffix == ".arrow" and (path.parent / "dataset_info.json").is_file()


def expand_folder(folder: str) -> list[str] | None:
    """The data files of a ``save_to_disk`` folder in their recorded order; None for any other folder."""
    root = Path(folder)
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except ValueError:
            splits = []
        raise ValueError(f"{folder} is a saved DatasetDict with splits {', '.join(map(str, splits)) or '(none listed)'}; "
                         f"pass one split's folder (e.g. {root / (splits[0] if splits else 'train')})")
    state = root / "state.json"
    if not state.is_file():
        return None
    try:
        data_files = [root / entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state} is not a `datasets` state file ({err}); save the dataset again with save_to_disk") from err
    absent = [str(p) for p in data_files if not p.is_file()]
    if absent:
        raise ValueError(f"{folder} is a `datasets` folder whose state.json lists missing data files: {', '.join(absent)}; "
                         "copy the whole folder, or save the dataset again with save_to_disk")
    return [str(p) for p in data_files]


# ---------------------------------------------------------------- the hub

def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> (name, config or None, split or None); an empty CONFIG is None."""
    if not spec.startswith(HUB_PREFIX):
        raise ValueError(f"{spec!r} is not a hub dataset name; write hf:NAME[:CONFIG][:SPLIT]")
    parts = spec[len(HUB_PREFIX):].split(":", 2)
    if not parts[0] or (len(parts) == 3 and ":" in parts[2] and "[" not in parts[2]):
        raise ValueError(f"{spec!r} is not hf:NAME[:CONFIG][:SPLIT] (e.g. hf:wikimedia/wikipedia:20231101.en:train)")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, (parts[2] or None) if len(parts) > 2 else None
    if split is not None and any(c in split for c in "[]%+:"):
        # A sliced split ("train[:10%]") is a view on whole cache files: reading those files would read more than asked.
        raise ValueError(f"{spec!r}: split slices are not supported (the cache files hold the whole split); "
                         "name a whole split and cut the shards instead")
    return name, config, split


def hub_files(spec: str) -> list[str]:
    """Download ``spec`` into the ``datasets`` cache (a no-op when cached) and return its ``.arrow`` files."""
    name, config, split = parse_hub_spec(spec)
    import datasets   # heavy: imported only for hub inputs

    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as err:   # network, missing dataset, bad config: one sentence naming the input
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = ("this machine is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and the dataset is not in the local cache"
                if offline else "check the name, config and split, and that the hub can be reached")
        raise ValueError(f"cannot load {spec} from the Hugging Face hub ({type(err).__name__}: {err}); {hint}. "
                         "Download it on a machine online, or pass local parquet files or a save_to_disk folder") from err
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(f"{spec} has splits {', '.join(loaded)}; name one: hf:{name}:{config or ''}:{next(iter(loaded))}")
        loaded = next(iter(loaded.values()))
    files = [entry["filename"] for entry in loaded.cache_files]
    if not files or loaded._indices is not None:
        raise ValueError(f"{spec} did not load into plain cache files; save it with save_to_disk and pass that folder")
    return files


# ---------------------------------------------------------------- reading

def read_columnar(path: str, fmt: str, text_field: str, max_doc_chars: int) -> Iterator[RawDoc | Skip]:
    """Documents of one parquet / Arrow file, batch by batch, with its problems as Skip items."""
    import pyarrow as pa

    try:
        schema, batches = _open(path, fmt, text_field)
    except (pa.ArrowException, OSError) as err:
        yield _damaged(path, fmt, err, 0)
        return
    problem = _column_problem(path, schema, text_field)
    if problem is not None:
        yield problem
        return
    ordinal = 0
    try:
        for batch in batches:
            column = batch.column(text_field)
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            # `datasets` writes 1000-row batches: make Python strings _BATCH_ROWS at a time.
            texts = (text for start in range(0, len(column), _BATCH_ROWS) for text in column.slice(start, _BATCH_ROWS).to_pylist())
            for text in texts:
                ordinal += 1
                if text is None:
                    yield null_text(path, ordinal, text_field)
                elif len(text) > max_doc_chars:
                    yield too_large(path, ordinal, len(text), max_doc_chars)
                else:
                    yield RawDoc(path, ordinal, "text", text)
    except (pa.ArrowException, OSError) as err:
        yield _damaged(path, fmt, err, ordinal)


def _open(path: str, fmt: str, text_field: str):
    """(schema, iterator of record batches) without reading the data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pf = pq.ParquetFile(path, buffer_size=_PARQUET_READ_BUFFER, pre_buffer=False)
        schema = pf.schema_arrow
        columns = [text_field] if text_field in schema.names else None
        # Row group by row group: a damaged group costs only its own documents, the ones before it are kept.
        # use_threads=False: one column gains nothing from arrow's thread pool, and its threads'
        # allocator arenas cost 5-20 MB of RSS (measured on the benchmark's 50 MB corpus).
        batches = (batch for group in range(pf.num_row_groups)
                   for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False))
        return schema, (batches if columns else iter(()))
    # Plain reads, not a memory map: a batch is read, used and freed, so resident memory stays one
    # batch whatever the file size (a map's touched pages would stay resident up to the whole file).
    source = pa.OSFile(path, "r")
    if source.read(6) == b"ARROW1":   # IPC file format (random access); `datasets` writes the stream format
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    return reader.schema, iter(reader)


def _column_problem(path: str, schema, text_field: str) -> Skip | None:
    import pyarrow as pa

    if text_field not in schema.names:
        return Skip(path, 0, "missing_column", f"{path} has no column {text_field!r} (its columns: {', '.join(schema.names)}); "
                                               "set --text-field to the column holding the text, or pass --on-error skip")
    kind = schema.field(text_field).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    string_types = [pa.types.is_string, pa.types.is_large_string] + ([pa.types.is_string_view] if hasattr(pa.types, "is_string_view") else [])
    if not any(is_type(value) for is_type in string_types):
        return Skip(path, 0, "non_string_column", f"{path}: column {text_field!r} holds {kind}, not strings; "
                                                  "set --text-field to the column holding the text, or pass --on-error skip")
    return None


def _damaged(path: str, fmt: str, err: Exception, ordinal: int) -> Skip:
    if fmt == "parquet" and _is_cut_parquet(path):
        return Skip(path, 0, "truncated_file", f"{path} starts like parquet but its footer is missing (truncated download?); "
                                                     "fetch the file again, or pass --on-error skip")
    return Skip(path, 0, "corrupt_file", f"{path} cannot be read as {fmt} ({err}) after {ordinal} documents; "
                                         "check the file, or pass --on-error skip to keep the documents before the problem")


def _is_cut_parquet(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, os.path.getsize(path) - 4))
            tail = f.read(4)
    except OSError:
        return False
    return head == _PARQUET_MAGIC and tail != _PARQUET_MAGIC
