"""Core data types and the benchmark loader.

Everything is validated when a stream is loaded, so a bad file fails in seconds with one message that
names the file and the field, instead of crashing hours into training.
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jumplora.data.presets import BENCHMARK_TASKS, ORDERS, TaskPreset
from jumplora.data.safe import (
    DataError,
    brief,
    check_text,
    decode_utf8,
    fingerprint_bytes,
    loads_json,
    read_bytes,
    resolved,
    type_name,
)
from jumplora.data.sources import Rows, read_dataset_rows, read_file_rows

_INT = re.compile(r"^-?\d+$")

SPLITS: tuple[str, ...] = ("train", "dev", "test")
ENV_VAR = "JUMPLORA_DATA"
DEFAULT_REL_DIR = Path("..") / "shared" / "cl_benchmark"
# src/jumplora/data/stream.py -> parents[3] is the repository root (the folder that holds src/).
_REPO_ROOT = Path(__file__).resolve().parents[3]
_DIR_HINT = (
    f"pass --data-dir PATH or set {ENV_VAR}=PATH to the benchmark folder "
    "(the one that holds <group>/<task>/labels.json)"
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled input; `label` is always one of its task's options."""

    text: str
    label: str


@dataclass
class Task:
    """A classification task phrased as instruction-following generation (O-LoRA / JumpLoRA prompts)."""

    name: str
    instruction: str
    options: tuple[str, ...]
    train: list[Example] = field(default_factory=list)
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    # Items dropped per split because their label is a "no gold label" marker (e.g. MNLI's "-").
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = tuple(self.options)

    def prompt(self, text: str) -> str:
        """The paper's prompt; the model is trained to continue it with the option string."""
        return (
            f"Task Instruction: {self.instruction}\n"
            f"Options: {' | '.join(self.options)}\n"
            f"Text: {text}\n"
            "Answer:"
        )

    def split(self, name: str) -> list[Example]:
        """Examples of split `name` ("train", "dev" or "test"); a missing optional split is empty."""
        if name not in SPLITS:
            raise DataError(f"task '{self.name}': unknown split {brief(name)} (expected one of {', '.join(SPLITS)})")
        return getattr(self, name)


@dataclass
class TaskStream:
    """The ordered sequence of tasks a continual learner sees."""

    name: str
    tasks: list[Task]
    # What the stream was read from: resolved path (or datasets spec) -> fingerprint; see stream_fingerprint.
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def option_space(self) -> tuple[str, ...]:
        """Union of all tasks' options in order of first appearance (shared label vocabulary)."""
        return tuple(dict.fromkeys(o for t in self.tasks for o in t.options))

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise DataError(f"stream '{self.name}': no task named {brief(name)} (tasks: {', '.join(self.task_names)})")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)


# --------------------------------------------------------------------------------------------- helpers


def parse_json_file(path: Path, what: str, sources: dict[str, str] | None = None) -> Any:
    """Parse a bounded JSON file (or JSON Lines when the suffix is .jsonl), recording its fingerprint."""
    data = read_bytes(path, what)
    if sources is not None:
        sources[str(path.resolve())] = fingerprint_bytes(data)
    text = decode_utf8(data, path, what)
    if path.suffix.lower() == ".jsonl":
        lines = enumerate(text.splitlines(), 1)
        return [loads_json(line, f"{path}: line {n}: {what}") for n, line in lines if line.strip()]
    return loads_json(text, f"{path}: {what}")


def check_options(value: Any, where: str) -> tuple[str, ...]:
    """Options must be a non-empty list of distinct non-empty strings (they are the generation targets)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: options must be a non-empty list of strings, got {type_name(value)}")
    seen: set[str] = set()
    for i, opt in enumerate(value):
        if not isinstance(opt, str) or not opt.strip():
            hint = " (quote it in YAML)" if isinstance(opt, bool | int | float) else ""
            raise DataError(f"{where}: option {i} = {brief(opt)} must be a non-empty string{hint}")
        check_text(opt, f"{where}: option {i}")
        if opt in seen:
            raise DataError(f"{where}: duplicate option {brief(opt)}")
        seen.add(opt)
    return tuple(value)


def check_cap(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"argument '{name}' = {brief(value)} must be a positive integer or None")
    return value


def sample_cap(items: Sequence[T], cap: int | None, *, seed: int, task: str, split: str) -> list[T]:
    """Seeded subsample without replacement, original order kept; the same on every machine.

    The RNG is seeded from crc32(seed, task, split), not from Python's salted hash(), so subsets are
    reproducible across processes and machines and independent across tasks/splits.
    """
    if cap is None or len(items) <= cap:
        return list(items)
    rng = random.Random(zlib.crc32(f"{seed}\x1f{task}\x1f{split}".encode()))
    keep = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in keep]


@dataclass(frozen=True)
class SplitSpec:
    """How to read one split: the source, its fields, and the task's label vocabulary."""

    task: str
    split: str
    options: tuple[str, ...]
    options_src: str
    text_key: str = "sentence"
    label_key: str = "label"
    drop_labels: Sequence[str] = ()


class SplitReader:
    """Reads each source once per load, validates every item, then applies the caps.

    `sources` collects the fingerprint (size + sha256, or a datasets fingerprint) of everything read.
    """

    def __init__(self, *, max_train: int | None, max_eval: int | None, seed: int) -> None:
        self.caps = {
            "train": check_cap("max_train", max_train),
            "dev": check_cap("max_eval", max_eval),
            "test": check_cap("max_eval", max_eval),
        }
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"argument 'seed' = {brief(seed)} must be an integer")
        self.seed = seed
        self.sources: dict[str, str] = {}
        self._cache: dict[str, Rows] = {}

    def options(self, labels_path: Path) -> tuple[str, ...]:
        return check_options(parse_json_file(labels_path, "labels file", self.sources), str(labels_path))

    def file_rows(self, path: Path, what: str) -> Rows:
        key = f"file:{resolved(path)}"
        if key not in self._cache:
            self._cache[key] = read_file_rows(path, what, self.sources)
        return self._cache[key]

    def dataset_rows(self, spec: dict, local: list[Path], where: str) -> Rows:
        key = f"datasets:{json.dumps(spec, sort_keys=True)}"
        if key not in self._cache:
            self._cache[key] = read_dataset_rows(spec, local, where, self.sources)
        return self._cache[key]

    def split(self, rows: Rows, spec: SplitSpec) -> tuple[list[Example], int]:
        """Validated, capped examples of one split, and how many `drop_labels` items were dropped."""
        data, origin, split = rows.rows, rows.origin, spec.split
        if not isinstance(data, list):
            raise DataError(f"{origin}: split '{split}' must be a list of objects, got {type_name(data)}")
        if not data:
            raise DataError(f"{origin}: split '{split}' is empty")
        drop = set(spec.drop_labels)
        n_dropped = 0
        pairs: list[tuple[str, str]] = []
        for i, item in enumerate(data):
            try:  # the location is only formatted for a bad item: this loop runs over every row
                text, label = _item_fields(item, spec)
                if str(label) in drop:
                    n_dropped += 1
                    continue
                pairs.append((text, _label(label, rows, spec)))
            except DataError as exc:
                raise DataError(f"{origin}: {rows.locate(i)}: {exc}") from None
        if not pairs:
            raise DataError(f"{origin}: split '{split}' has no items left after dropping labels {brief(sorted(drop))}")
        kept = sample_cap(pairs, self.caps[split], seed=self.seed, task=spec.task, split=split)
        return [Example(text, label) for text, label in kept], n_dropped


def _item_fields(item: Any, spec: SplitSpec) -> tuple[str, str | int]:
    """The text (a valid Unicode string) and the raw label (a string or an integer index) of one item."""
    text_key, label_key = spec.text_key, spec.label_key
    if not isinstance(item, dict):
        raise DataError(f"expected an object with fields '{text_key}' and '{label_key}', got {type_name(item)}")
    for key in (text_key, label_key):
        if key not in item:
            raise DataError(f"missing field {brief(key)}")
    text, label = item[text_key], item[label_key]
    if not isinstance(text, str):
        raise DataError(f"field {brief(text_key)} must be a string, got {type_name(text)}")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DataError(f"field {brief(label_key)} must be a string or an integer index, got {type_name(label)}")
    check_text(text, f"field {brief(text_key)}")
    if isinstance(label, str):
        check_text(label, f"field {brief(label_key)}")
    return text, label


def _label(raw: str | int, rows: Rows, spec: SplitSpec) -> str:
    """Map an integer label through the source's ClassLabel names, else the options (index -> option)."""
    key = spec.label_key
    if isinstance(raw, str) and rows.int_strings and raw not in spec.options and _INT.match(raw):
        raw = int(raw)
    if isinstance(raw, int):
        names = rows.label_names.get(key)
        src = f"ClassLabel names of {rows.origin}" if names else f"options in {spec.options_src}"
        names = names or spec.options
        if not 0 <= raw < len(names):
            raise DataError(f"field {brief(key)} = {raw} is out of range for the {len(names)} {src}")
        raw = names[raw]
    if raw not in spec.options:
        raise DataError(f"field {brief(key)} = {brief(raw)} is not one of the options in {spec.options_src}")
    return raw


# ------------------------------------------------------------------------------------------ data dir


def looks_like_benchmark(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*/*/labels.json"))


def _checked_dir(path: Path, source: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: data dir ({source}) does not exist; {_DIR_HINT}")
    if not path.is_dir():
        raise DataError(f"{path}: data dir ({source}) is not a folder; {_DIR_HINT}")
    if not looks_like_benchmark(path):
        raise DataError(
            f"{path}: data dir ({source}) does not look like the CL benchmark "
            f"(no <group>/<task>/labels.json inside); {_DIR_HINT}"
        )
    return path.resolve()


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """Find the benchmark: explicit > $JUMPLORA_DATA > ./../shared/cl_benchmark > <repo>/../shared/...

    The data is never copied into the repository, so it is looked up next to the checkout by default.
    """
    if explicit is not None and str(explicit) != "":
        return _checked_dir(Path(explicit).expanduser(), "--data-dir")
    env = os.environ.get(ENV_VAR)
    if env:
        return _checked_dir(Path(env).expanduser(), f"${ENV_VAR}")
    candidates = [Path.cwd() / DEFAULT_REL_DIR, _REPO_ROOT / DEFAULT_REL_DIR]
    for cand in candidates:
        if cand.exists():
            return _checked_dir(cand, "default location")
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(f"benchmark data dir not found (${ENV_VAR} unset; looked in {looked}); {_DIR_HINT}")


# ----------------------------------------------------------------------------------------- benchmark


def get_preset(name: str, where: str = "argument 'tasks'") -> TaskPreset:
    """Look up a benchmark task; case and '-'/'_' are ignored so 'SST-2' finds 'sst2'."""
    key = name.strip().lower().replace("-", "").replace("_", "") if isinstance(name, str) else None
    if key not in BENCHMARK_TASKS:
        raise DataError(f"{where}: unknown task {brief(name)} (benchmark tasks: {', '.join(BENCHMARK_TASKS)})")
    return BENCHMARK_TASKS[key]


def load_preset_task(preset: TaskPreset, data_dir: Path, reader: SplitReader) -> Task:
    folder = data_dir / preset.folder
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of benchmark task '{preset.name}' not found in data dir {data_dir}")
    labels_path = folder / "labels.json"
    options = reader.options(labels_path)
    splits: dict[str, list[Example]] = {}
    dropped: dict[str, int] = {}
    for s in SPLITS:
        spec = SplitSpec(preset.name, s, options, str(labels_path), drop_labels=preset.drop_labels)
        splits[s], n = reader.split(reader.file_rows(folder / f"{s}.json", f"'{s}' split file"), spec)
        if n:
            dropped[s] = n
    return Task(name=preset.name, instruction=preset.instruction, options=options, dropped=dropped, **splits)


def load_benchmark_stream(
    order: int,
    data_dir: Path,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
) -> TaskStream:
    """Load benchmark order `order` (1-6), or the explicit `tasks` list (then `order` only names it)."""
    if tasks is None:
        if isinstance(order, bool) or order not in ORDERS:
            raise DataError(
                f"argument 'order': unknown order {brief(order)} (standard orders: 1, 2, 3; long orders: 4, 5, 6)"
            )
        names = ORDERS[order]
    else:
        if isinstance(tasks, str) or not list(tasks):
            raise DataError(f"argument 'tasks' = {brief(tasks)} must be a non-empty list of task names")
        names = list(tasks)
    presets = [get_preset(n) for n in names]
    dupes = sorted({p.name for p in presets if sum(q.name == p.name for q in presets) > 1})
    if dupes:
        raise DataError(f"argument 'tasks': task(s) listed twice: {', '.join(dupes)}")
    reader = SplitReader(max_train=max_train, max_eval=max_eval, seed=seed)
    data_dir = _checked_dir(Path(data_dir), "data_dir")
    loaded = [load_preset_task(p, data_dir, reader) for p in presets]
    name = f"order{order}" if tasks is None else ",".join(p.name for p in presets)  # a task list names itself
    return TaskStream(name=name, tasks=loaded, sources=reader.sources)


def stream_fingerprint(stream: TaskStream) -> dict[str, str]:
    """Per file the stream read (resolved path): "size=N sha256=HEX"; per hub datasets spec its fingerprint.

    Store it with a run and compare on `--resume`: any difference means the data changed.
    """
    return dict(sorted(stream.sources.items()))
