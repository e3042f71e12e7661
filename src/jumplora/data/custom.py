"""User-defined task streams from a YAML or JSON file (see `load_custom_stream` for the schema)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jumplora.data.stream import (
    SPLITS,
    DataError,
    SplitReader,
    Task,
    TaskStream,
    check_options,
    get_preset,
    load_benchmark_stream,
    parse_json_file,
    read_text,
    resolve_data_dir,
)

TOP_KEYS = ("name", "tasks")
TASK_KEYS = (
    "name", "instruction", "preset", "options", "labels_file",
    "train", "dev", "test", "text_key", "label_key", "drop_labels",
)  # fmt: skip
_SUFFIXES = (".yml", ".yaml", ".json")


def _parse_spec(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unsupported stream file type {suffix!r}; use .yaml, .yml or .json")
    if suffix == ".json":
        return parse_json_file(path, "stream file")
    text = read_text(path, "stream file")
    import yaml  # lazy: only custom streams need it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{path}: invalid YAML in stream file{at}: {problem}") from None


def _str_field(spec: dict, key: str, where: str, default: str | None = None) -> str | None:
    value = spec.get(key)
    if value is None:  # absent or explicit YAML null: both mean "use the default"
        return default
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' = {value!r} must be a non-empty string")
    return value


def load_custom_stream(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """Load a stream described by a YAML/JSON file.

    Schema: optional `name` (default: file stem) and a `tasks` list; each task has `name`, and
    `instruction`/`options` (or `labels_file`) unless `preset` names a benchmark task, split files
    `train` plus at least one of `dev`/`test` (JSON list or .jsonl, paths relative to the stream file;
    with a preset they default to the benchmark files), optional `text_key`/`label_key`, and optional
    `drop_labels` (labels meaning "no gold label", dropped and counted; a preset supplies its own).
    A preset needs the benchmark: `data_dir`, else `resolve_data_dir()` is tried.
    """
    path = Path(path)
    spec = _parse_spec(path)
    if not isinstance(spec, dict):
        raise DataError(
            f"{path}: stream file must be a mapping with a 'tasks' list, got {type(spec).__name__}"
        )
    for key in spec:
        if key not in TOP_KEYS:
            raise DataError(f"{path}: unknown key {key!r} (allowed: {', '.join(TOP_KEYS)})")
    name = _str_field(spec, "name", str(path), default=path.stem)
    raw_tasks = spec.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise DataError(f"{path}: field 'tasks' must be a non-empty list of task mappings")

    reader = SplitReader(max_train=max_train, max_eval=max_eval, seed=seed)
    base = path.parent
    resolved_dir: Path | None = None
    tasks: list[Task] = []
    for i, t in enumerate(raw_tasks):
        where = f"{path}: tasks[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{where}: must be a mapping, got {type(t).__name__}")
        for key in t:
            if key not in TASK_KEYS:
                raise DataError(f"{where}: unknown key {key!r} (allowed: {', '.join(TASK_KEYS)})")
        task_name = _str_field(t, "name", where)
        if task_name is None:
            raise DataError(f"{where}: missing required field 'name'")
        where = f"{path}: tasks[{i}] ('{task_name}')"
        if task_name in (x.name for x in tasks):
            raise DataError(f"{where}: field 'name': task {task_name!r} is listed twice")

        preset = None
        folder: Path | None = None
        preset_name = t.get("preset")
        if preset_name is not None:
            preset = get_preset(preset_name, where=f"{where}: field 'preset'")
            if resolved_dir is None:
                try:
                    resolved_dir = resolve_data_dir(data_dir)
                except DataError as exc:
                    raise DataError(f"{where}: field 'preset' needs the benchmark data dir: {exc}") from None
            folder = resolved_dir / preset.folder

        instruction = _str_field(t, "instruction", where, default=preset.instruction if preset else None)
        if instruction is None:
            raise DataError(f"{where}: missing required field 'instruction' (or a 'preset')")
        text_key = _str_field(t, "text_key", where, default="sentence")
        label_key = _str_field(t, "label_key", where, default="label")

        if "options" in t and "labels_file" in t:
            raise DataError(f"{where}: give either field 'options' or field 'labels_file', not both")
        if "options" in t:
            options = check_options(t["options"], f"{where}: field 'options'")
            options_src = f"{path} (tasks[{i}].options)"
        else:
            labels_file = _str_field(t, "labels_file", where)
            if labels_file is not None:
                labels_path = base / labels_file
            elif folder is not None:
                labels_path = folder / "labels.json"
            else:
                raise DataError(f"{where}: missing required field 'options' (or 'labels_file' or 'preset')")
            options = reader.options(labels_path)
            options_src = str(labels_path)

        drop_labels = t.get("drop_labels", list(preset.drop_labels) if preset else [])
        if not isinstance(drop_labels, list) or not all(isinstance(x, str) for x in drop_labels):
            raise DataError(f"{where}: field 'drop_labels' = {drop_labels!r} must be a list of strings")
        clash = [x for x in drop_labels if x in options]
        if clash:
            raise DataError(f"{where}: field 'drop_labels' contains option(s) {clash}; drop only non-options")

        splits: dict[str, list] = {}
        dropped: dict[str, int] = {}
        for s in SPLITS:
            rel = _str_field(t, s, where)
            if rel is not None:
                split_path = base / rel
            elif folder is not None:
                split_path = folder / f"{s}.json"
            else:
                continue
            splits[s], n = reader.split(
                split_path,
                task=task_name,
                split=s,
                options=options,
                options_src=options_src,
                text_key=text_key,
                label_key=label_key,
                drop_labels=drop_labels,
            )
            if n:
                dropped[s] = n
        if "train" not in splits:
            raise DataError(f"{where}: missing required field 'train'")
        if "dev" not in splits and "test" not in splits:
            raise DataError(f"{where}: needs field 'dev' or field 'test' (at least one evaluation split)")
        tasks.append(
            Task(name=task_name, instruction=instruction, options=options, dropped=dropped, **splits)
        )
    return TaskStream(name=name, tasks=tasks)


_ORDER_RE = re.compile(r"^(?:order)?\s*(\d+)$", re.IGNORECASE)


def load_stream(
    stream: int | str | Path,
    data_dir: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """One entry point for the CLI: an order (4, "4", "order4") or a path to a custom stream file."""
    if isinstance(stream, int) and not isinstance(stream, bool):
        order: int | None = stream
    else:
        m = _ORDER_RE.match(str(stream).strip()) if not isinstance(stream, Path) else None
        order = int(m.group(1)) if m else None
    if order is not None:
        return load_benchmark_stream(
            order, resolve_data_dir(data_dir), max_train=max_train, max_eval=max_eval, seed=seed
        )
    return load_custom_stream(
        Path(stream), data_dir=data_dir, max_train=max_train, max_eval=max_eval, seed=seed
    )
