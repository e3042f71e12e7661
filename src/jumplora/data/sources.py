"""Where a split's rows come from: JSON, JSON Lines, CSV or parquet files, or a `datasets` spec.

Each reader returns `Rows` (the raw records plus, when the source declares them, the `ClassLabel`
names of the label column) and records a fingerprint of what it read, so a resumed run can tell
whether its data changed. `datasets` and pyarrow are optional (`pip install 'jumplora[datasets]'`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jumplora.data.safe import (
    DataError,
    brief,
    clip,
    decode_utf8,
    fingerprint_bytes,
    loads_json,
    read_bytes,
    type_name,
)

EXTRA_HINT = "pip install 'jumplora[datasets]'"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
SPEC_KEYS = ("dataset", "config", "split", "data_files", "revision")
# `datasets` builders that read local files named by `data_files` (never "pandas": it unpickles).
FILE_BUILDERS = ("csv", "json", "parquet", "arrow")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Rows:
    """Raw records of one split source, before validation."""

    rows: list[Any]
    origin: str  # the file, or a description of the datasets spec, for messages
    label_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> ClassLabel names
    lines: list[int] | None = None  # source line of each row (JSONL, CSV)
    int_strings: bool = False  # CSV: a label like "2" not among the options is an index

    def locate(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"item {i}"


def read_file_rows(path: Path, what: str, sources: dict[str, str]) -> Rows:
    """Rows of a local data file, chosen by suffix."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported {what} type {brief(suffix)}; use {', '.join(FILE_SUFFIXES)} or a datasets spec"
        )
    data = read_bytes(path, what)
    sources[str(path.resolve())] = fingerprint_bytes(data)
    if suffix == ".parquet":
        return _parquet_rows(data, path, what)
    text = decode_utf8(data, path, what)
    if suffix == ".csv":
        return _csv_rows(text, path, what)
    if suffix == ".jsonl":
        rows, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(loads_json(line, f"{path}: line {lineno}: {what}", depth=False))
                lines.append(lineno)
        return Rows(rows, str(path), lines=lines)
    return Rows(loads_json(text, f"{path}: {what}", depth=False), str(path))


def _csv_rows(text: str, path: Path, what: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: {what} has no header row (CSV needs column names on line 1)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path}: line 1: duplicate column {brief(dupes[0])} in the CSV header")
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{path}: line {reader.line_num}: {len(record)} fields, but the header has {len(header)}"
                )
            rows.append(dict(zip(header, record, strict=True)))
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: invalid CSV: {clip(str(exc))}") from None
    return Rows(rows, str(path), lines=lines, int_strings=True)


def _parquet_rows(data: bytes, path: Path, what: str) -> Rows:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading a parquet {what} needs pyarrow: {EXTRA_HINT}") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: invalid parquet {what}: {_first_line(exc)}") from None
    names: dict[str, tuple[str, ...]] = {}
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta:  # written by `datasets`: ClassLabel names of integer label columns
        try:
            features = json.loads(meta).get("info", {}).get("features", {})
        except (ValueError, AttributeError):
            features = {}
        for column, feature in features.items() if isinstance(features, dict) else ():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                names[column] = tuple(str(n) for n in feature["names"])
    return Rows(table.to_pylist(), str(path), label_names=names)


def _first_line(exc: BaseException) -> str:
    return clip(str(exc)) or type(exc).__name__


# ------------------------------------------------------------------------------------- datasets specs


def import_datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: a datasets spec needs the `datasets` package: {EXTRA_HINT}") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def check_spec(spec: dict, where: str) -> dict[str, Any]:
    """Validate the keys of `{dataset, config?, split, data_files?, revision?}`."""
    for key in spec:
        if key not in SPEC_KEYS:
            raise DataError(f"{where}: unknown key {brief(key)} (allowed: {', '.join(SPEC_KEYS)})")
    for key in ("dataset", "split"):
        if not isinstance(spec.get(key), str) or not spec[key].strip():
            raise DataError(f"{where}: field '{key}' = {brief(spec.get(key))} must be a non-empty string")
    for key in ("config", "revision"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise DataError(f"{where}: field '{key}' = {brief(spec[key])} must be a string")
    files = spec.get("data_files")
    if files is not None:
        flat = list(files.values()) if isinstance(files, dict) else [files]
        flat = [f for v in flat for f in (v if isinstance(v, list) else [v])]
        if not flat or not all(isinstance(f, str) and f.strip() for f in flat):
            raise DataError(
                f"{where}: field 'data_files' = {brief(files)} must be a path, a list or a mapping of paths"
            )
    return spec


def describe_spec(spec: dict) -> str:
    parts = [f"dataset {brief(spec['dataset'])}"]
    parts += [f"{k} {brief(spec[k])}" for k in ("config", "split") if spec.get(k)]
    return ", ".join(parts)


def read_dataset_rows(spec: dict, local: list[Path], where: str, sources: dict[str, str]) -> Rows:
    """Rows of a `datasets` spec; `local` holds its already checked local paths (data_files or the folder).

    Local files load into memory through a throw-away cache folder, so nothing lands in the user's
    cache; hub datasets use the normal cache (and HF_DATASETS_OFFLINE).
    """
    datasets = import_datasets(where)
    origin = f"{where} ({describe_spec(spec)})"
    try:
        if local and local[0].is_dir() and _saved_to_disk(local[0]):
            ds = datasets.load_from_disk(str(local[0]), keep_in_memory=True)
            if isinstance(ds, datasets.DatasetDict):
                if spec["split"] not in ds:
                    raise DataError(f"{origin}: no split {brief(spec['split'])} (splits: {', '.join(ds)})")
                ds = ds[spec["split"]]
        elif local:
            with tempfile.TemporaryDirectory(prefix="jumplora-datasets-") as cache:
                ds = _load_local(datasets, spec, local, cache)
        else:
            if not _HUB_ID.match(spec["dataset"]):
                raise DataError(
                    f"{where}: field 'dataset' = {brief(spec['dataset'])} is neither a local path nor a hub id"
                )
            ds = datasets.load_dataset(
                spec["dataset"], spec.get("config"), split=spec["split"], revision=spec.get("revision")
            )
    except DataError:
        raise
    except Exception as exc:  # a third-party loader raises many types; report one line
        raise DataError(f"{origin} could not be loaded: {_first_line(exc)}") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{origin} is a {type_name(ds)}, not one split (set field 'split')")
    for path in local:
        _fingerprint_local(path, sources)
    if not local:
        key = f"datasets:{spec['dataset']}/{spec.get('config') or ''}/{spec['split']}@{spec.get('revision') or ''}"
        sources[key] = f"fingerprint={ds._fingerprint}"
    names = {col: tuple(feat.names) for col, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)}
    return Rows(ds.to_list(), origin, label_names=names)


def _saved_to_disk(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _load_local(datasets: Any, spec: dict, local: list[Path], cache: str) -> Any:
    common = {"split": spec["split"], "cache_dir": cache, "keep_in_memory": True}
    if spec.get("data_files") is None:
        return datasets.load_dataset(str(local[0]), spec.get("config"), **common)
    files = spec["data_files"]
    if isinstance(files, dict):  # {split: path or [paths]}, paths already checked (local, in order)
        it = iter(str(p) for p in local)
        files = {k: [next(it) for _ in (v if isinstance(v, list) else [v])] for k, v in files.items()}
    else:
        files = [str(p) for p in local]
    return datasets.load_dataset(spec["dataset"], spec.get("config"), data_files=files, **common)


def _fingerprint_local(path: Path, sources: dict[str, str]) -> None:
    """Size + sha256 of every local file behind a spec (streamed: these files may exceed the read cap)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        sources[str(file.resolve())] = f"size={file.stat().st_size} sha256={digest.hexdigest()}"
