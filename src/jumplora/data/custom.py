"""User-defined task streams from a YAML or JSON file (see `load_custom_stream` for the schema),
and `load_stream`, the one resolver from (order, stream file, task list) to a `TaskStream`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jumplora.data.presets import TaskPreset
from jumplora.data.safe import (
    DataError,
    brief,
    check_text,
    decode_utf8,
    fingerprint_bytes,
    loads_json,
    loads_yaml,
    read_bytes,
    type_name,
)
from jumplora.data.sources import FILE_BUILDERS, Rows, check_spec
from jumplora.data.stream import (
    SPLITS,
    SplitReader,
    SplitSpec,
    Task,
    TaskStream,
    check_options,
    get_preset,
    load_benchmark_stream,
    resolve_data_dir,
)

TOP_KEYS = ("name", "tasks")
TASK_KEYS = (
    "name", "instruction", "preset", "options", "labels_file",
    "train", "dev", "test", "text_key", "label_key", "drop_labels",
)  # fmt: skip
_SUFFIXES = (".yml", ".yaml", ".json")
_OUTSIDE_HINT = "pass --allow-outside-paths (allow_outside_paths=True) to allow it"


def _str_field(spec: dict, key: str, where: str, default: str | None = None) -> str | None:
    value = spec.get(key)
    if value is None:  # absent or explicit YAML null: both mean "use the default"
        return default
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' = {brief(value)} must be a non-empty string")
    return check_text(value, f"{where}: field '{key}'")


@dataclass
class _Context:
    """What every task of one stream file shares: its folder, the reader, the benchmark dir."""

    path: Path
    reader: SplitReader
    data_dir: str | Path | None
    allow_outside: bool
    _resolved_dir: Path | None = field(default=None, init=False)

    @property
    def base(self) -> Path:
        return self.path.parent

    def local(self, rel: str, where: str) -> Path:
        """`rel` relative to the stream file; refused if it leaves the stream's folder (symlinks resolved)."""
        path = self.base / rel
        if self.allow_outside:
            return path
        try:
            real, root = path.resolve(), self.base.resolve()
        except (OSError, RuntimeError):
            raise DataError(f"{where} = {brief(rel)}: {path} is a symlink loop") from None
        if not real.is_relative_to(root):
            raise DataError(f"{where} = {brief(rel)} is outside the stream file's folder {root}; {_OUTSIDE_HINT}")
        return path

    def benchmark_folder(self, preset: TaskPreset, where: str) -> Path:
        if self._resolved_dir is None:
            try:
                self._resolved_dir = resolve_data_dir(self.data_dir)
            except DataError as exc:
                raise DataError(f"{where}: field 'preset' needs the benchmark data dir: {exc}") from None
        return self._resolved_dir / preset.folder


def _parse_spec(path: Path, reader: SplitReader) -> Any:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unsupported stream file type {brief(suffix)}; use .yaml, .yml or .json")
    data = read_bytes(path, "stream file")
    reader.sources[str(path.resolve())] = fingerprint_bytes(data)
    text = decode_utf8(data, path, "stream file")
    if suffix == ".json":
        return loads_json(text, f"{path}: stream file")
    return loads_yaml(text, f"{path}: stream file")


def load_custom_stream(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    allow_outside_paths: bool = False,
) -> TaskStream:
    """Load a stream described by a YAML/JSON file.

    Schema: optional `name` (default: file stem) and a `tasks` list; each task has `name`, and
    `instruction`/`options` (or `labels_file`) unless `preset` names a benchmark task, split sources
    `train` plus at least one of `dev`/`test`, optional `text_key`/`label_key`, and optional
    `drop_labels` (labels meaning "no gold label", dropped and counted; a preset supplies its own).
    A split source is a file (.json list, .jsonl, .csv with a header, .parquet) relative to the stream
    file, or a `datasets` spec mapping `{dataset, config, split, data_files, revision}` (a hub id, a
    local folder, or a file builder such as "csv" with `data_files`). Integer labels are indexes into
    the source's ClassLabel names, else into `options`. Paths may not leave the stream file's folder
    unless `allow_outside_paths`. A preset needs the benchmark: `data_dir`, else `resolve_data_dir()`.
    """
    path = Path(path)
    reader = SplitReader(max_train=max_train, max_eval=max_eval, seed=seed)
    spec = _parse_spec(path, reader)
    if not isinstance(spec, dict):
        raise DataError(f"{path}: stream file must be a mapping with a 'tasks' list, got {type_name(spec)}")
    for key in spec:
        if key not in TOP_KEYS:
            raise DataError(f"{path}: unknown key {brief(key)} (allowed: {', '.join(TOP_KEYS)})")
    name = _printable_name(_str_field(spec, "name", str(path), default=path.stem), f"{path}: field 'name'")
    raw_tasks = spec.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise DataError(f"{path}: field 'tasks' must be a non-empty list of task mappings")
    ctx = _Context(path, reader, data_dir, allow_outside_paths)
    tasks: list[Task] = []
    for i, t in enumerate(raw_tasks):
        task = _load_task(ctx, t, f"{path}: tasks[{i}]")
        if task.name in (x.name for x in tasks):
            raise DataError(f"{path}: tasks[{i}] ('{task.name}'): field 'name': task is listed twice")
        tasks.append(task)
    return TaskStream(name=name, tasks=tasks, sources=reader.sources)


def _printable_name(name: str | None, where: str) -> str | None:
    """Names go into terminals, file names and tables: no control characters (ESC, newline, tab)."""
    if name is not None and not name.isprintable():
        raise DataError(f"{where} = {brief(name)} holds a control character (names must be printable text)")
    return name


def _load_task(ctx: _Context, t: Any, where: str) -> Task:
    if not isinstance(t, dict):
        raise DataError(f"{where}: must be a mapping, got {type_name(t)}")
    for key in t:
        if key not in TASK_KEYS:
            raise DataError(f"{where}: unknown key {brief(key)} (allowed: {', '.join(TASK_KEYS)})")
    task_name = _str_field(t, "name", where)
    if task_name is None:
        raise DataError(f"{where}: missing required field 'name'")
    _printable_name(task_name, f"{where}: field 'name'")
    where = f"{where} ({brief(task_name)})"
    preset = get_preset(t["preset"], where=f"{where}: field 'preset'") if t.get("preset") is not None else None
    folder = ctx.benchmark_folder(preset, where) if preset else None
    instruction = _str_field(t, "instruction", where, default=preset.instruction if preset else None)
    if instruction is None:
        raise DataError(f"{where}: missing required field 'instruction' (or a 'preset')")
    options, options_src = _task_options(ctx, t, where, folder)
    drop_labels = t.get("drop_labels", list(preset.drop_labels) if preset else [])
    if not isinstance(drop_labels, list) or not all(isinstance(x, str) for x in drop_labels):
        raise DataError(f"{where}: field 'drop_labels' = {brief(drop_labels)} must be a list of strings")
    clash = [x for x in drop_labels if x in options]
    if clash:
        raise DataError(f"{where}: field 'drop_labels' contains option(s) {brief(clash)}; drop only non-options")
    splits: dict[str, list] = {}
    dropped: dict[str, int] = {}
    for s in SPLITS:
        rows = _split_rows(ctx, t, s, where, folder)
        if rows is None:
            continue
        spec = SplitSpec(
            task_name, s, options, options_src,
            text_key=_str_field(t, "text_key", where, default="sentence"),
            label_key=_str_field(t, "label_key", where, default="label"),
            drop_labels=drop_labels,
        )  # fmt: skip
        splits[s], n = ctx.reader.split(rows, spec)
        if n:
            dropped[s] = n
    if "train" not in splits:
        raise DataError(f"{where}: missing required field 'train'")
    if "dev" not in splits and "test" not in splits:
        raise DataError(f"{where}: needs field 'dev' or field 'test' (at least one evaluation split)")
    return Task(name=task_name, instruction=instruction, options=options, dropped=dropped, **splits)


def _task_options(ctx: _Context, t: dict, where: str, folder: Path | None) -> tuple[tuple[str, ...], str]:
    """The task's options and where they came from (for messages)."""
    if "options" in t and "labels_file" in t:
        raise DataError(f"{where}: give either field 'options' or field 'labels_file', not both")
    if "options" in t:
        return check_options(t["options"], f"{where}: field 'options'"), f"{where}: field 'options'"
    labels_file = _str_field(t, "labels_file", where)
    if labels_file is not None:
        labels_path = ctx.local(labels_file, f"{where}: field 'labels_file'")
    elif folder is not None:
        labels_path = folder / "labels.json"
    else:
        raise DataError(f"{where}: missing required field 'options' (or 'labels_file' or 'preset')")
    return ctx.reader.options(labels_path), str(labels_path)


def _split_rows(ctx: _Context, t: dict, split: str, where: str, folder: Path | None) -> Rows | None:
    """The raw rows of one split: a file, a datasets spec, the preset's file, or None when absent."""
    raw = t.get(split)
    what = f"'{split}' split file"
    if raw is None:
        return ctx.reader.file_rows(folder / f"{split}.json", what) if folder is not None else None
    at = f"{where}: field '{split}'"
    if isinstance(raw, str) and raw.strip():
        return ctx.reader.file_rows(ctx.local(raw, at), what)
    if not isinstance(raw, dict):
        raise DataError(f"{at} = {brief(raw)} must be a file path or a datasets spec mapping")
    spec = check_spec(raw, at)
    return ctx.reader.dataset_rows(spec, _spec_paths(ctx, spec, at), at)


def _spec_paths(ctx: _Context, spec: dict, at: str) -> list[Path]:
    """Local paths of a datasets spec (its data_files, or the dataset folder), checked; [] for a hub id."""
    files = spec.get("data_files")
    if files is not None:
        if spec["dataset"] not in FILE_BUILDERS:
            raise DataError(
                f"{at}: field 'dataset' = {brief(spec['dataset'])} with 'data_files' must be a file builder "
                f"({', '.join(FILE_BUILDERS)})"
            )
        values = list(files.values()) if isinstance(files, dict) else [files]
        rels = [f for v in values for f in (v if isinstance(v, list) else [v])]
        paths = [ctx.local(rel, f"{at}: field 'data_files'") for rel in rels]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: {at}: data file not found")
        return paths
    name = spec["dataset"]
    if name.startswith((".", "/")) or (ctx.base / name).exists():
        path = ctx.local(name, f"{at}: field 'dataset'")
        if not path.exists():
            raise DataError(f"{path}: {at}: dataset folder not found")
        return [path]
    return []


# ------------------------------------------------------------------------------------- one resolver


@dataclass(frozen=True)
class StreamSource:
    """Which stream a run uses: a custom stream file, an explicit benchmark task list, or an order."""

    order: int | str | None = None
    stream_file: Path | None = None
    tasks: tuple[str, ...] | None = None


def resolve_stream_source(
    order: int | str | None = None, stream_file: str | Path | None = None, tasks: list[str] | None = None
) -> StreamSource:
    """Check the stream options do not conflict (a stream file lists its own tasks); nothing is read."""
    if stream_file and tasks:
        raise DataError(
            "options --stream and --tasks conflict: a stream file lists its own tasks "
            "(drop --tasks, or list the tasks in the stream file)"
        )
    if stream_file:
        return StreamSource(stream_file=Path(stream_file))
    return StreamSource(order=order, tasks=tuple(tasks) if tasks is not None else None)


_ORDER_RE = re.compile(r"^(?:order)?\s*(\d+)$", re.IGNORECASE)


def load_stream(
    stream: int | str | Path | StreamSource,
    data_dir: str | Path | None = None,
    *,
    tasks: list[str] | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    allow_outside_paths: bool = False,
) -> TaskStream:
    """The one stream resolver: an order (4, "4", "order4"; with `tasks`, the tasks name the stream)
    or a path to a custom stream file (a `Path` is always a file). A file with `tasks` is refused."""
    if not isinstance(stream, StreamSource):
        is_order = isinstance(stream, int) and not isinstance(stream, bool)
        m = None if is_order or isinstance(stream, Path) else _ORDER_RE.match(str(stream).strip())
        order = stream if is_order else int(m.group(1)) if m else None
        stream = resolve_stream_source(order, None if is_order or m else Path(stream), tasks)
    caps = {"max_train": max_train, "max_eval": max_eval, "seed": seed}
    if stream.stream_file is not None:
        return load_custom_stream(
            stream.stream_file, data_dir=data_dir, allow_outside_paths=allow_outside_paths, **caps
        )
    tasks_list = list(stream.tasks) if stream.tasks is not None else None
    return load_benchmark_stream(stream.order, resolve_data_dir(data_dir), tasks=tasks_list, **caps)
