"""Core data types and the benchmark loader.

Everything is validated when a stream is loaded, so a bad file fails in seconds with one message that
names the file and the field, instead of crashing hours into training.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jumplora.data.presets import BENCHMARK_TASKS, ORDERS, TaskPreset

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


class DataError(ValueError):
    """Bad data or data configuration; the message names the file (or argument) and the field."""


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
            raise DataError(
                f"task '{self.name}': unknown split {name!r} (expected one of {', '.join(SPLITS)})"
            )
        return getattr(self, name)


@dataclass
class TaskStream:
    """The ordered sequence of tasks a continual learner sees."""

    name: str
    tasks: list[Task]

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
        raise DataError(f"stream '{self.name}': no task named {name!r} (tasks: {', '.join(self.task_names)})")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)


# --------------------------------------------------------------------------------------------- helpers


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_text(path: Path, what: str) -> str:
    """Read a UTF-8 file, turning every OS problem into a DataError naming the file."""
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what}: {exc}") from None


def parse_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file (or JSON Lines when the suffix is .jsonl)."""
    text = read_text(path, what)
    if path.suffix.lower() == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: invalid JSON in {what}: {exc.msg}") from None
        return items
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON in {what} at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def check_options(value: Any, where: str) -> tuple[str, ...]:
    """Options must be a non-empty list of distinct non-empty strings (they are the generation targets)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: options must be a non-empty list of strings, got {_type_name(value)}")
    seen: set[str] = set()
    for i, opt in enumerate(value):
        if not isinstance(opt, str) or not opt.strip():
            hint = " (quote it in YAML)" if isinstance(opt, bool | int | float) else ""
            raise DataError(f"{where}: option {i} = {opt!r} must be a non-empty string{hint}")
        if opt in seen:
            raise DataError(f"{where}: duplicate option {opt!r}")
        seen.add(opt)
    return tuple(value)


def check_cap(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"argument '{name}' = {value!r} must be a positive integer or None")
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


class SplitReader:
    """Parses each file once per load, validates every item, then applies the caps."""

    def __init__(self, *, max_train: int | None, max_eval: int | None, seed: int) -> None:
        self.caps = {
            "train": check_cap("max_train", max_train),
            "dev": check_cap("max_eval", max_eval),
            "test": check_cap("max_eval", max_eval),
        }
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"argument 'seed' = {seed!r} must be an integer")
        self.seed = seed
        self._cache: dict[Path, Any] = {}

    def _parse(self, path: Path, what: str) -> Any:
        key = path.resolve()
        if key not in self._cache:
            self._cache[key] = parse_json_file(path, what)
        return self._cache[key]

    def options(self, labels_path: Path) -> tuple[str, ...]:
        return check_options(self._parse(labels_path, "labels file"), str(labels_path))

    def split(
        self,
        path: Path,
        *,
        task: str,
        split: str,
        options: tuple[str, ...],
        options_src: str,
        text_key: str = "sentence",
        label_key: str = "label",
        drop_labels: Sequence[str] = (),
    ) -> tuple[list[Example], int]:
        """Validated, capped examples of one split file, and how many `drop_labels` items were dropped."""
        data = self._parse(path, f"'{split}' split file")
        if not isinstance(data, list):
            raise DataError(f"{path}: split '{split}' must be a list of objects, got {_type_name(data)}")
        if not data:
            raise DataError(f"{path}: split '{split}' is empty")
        allowed = set(options)
        drop = set(drop_labels)
        n_dropped = 0
        pairs: list[tuple[str, str]] = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise DataError(
                    f"{path}: item {i}: expected an object with fields '{text_key}' and '{label_key}', "
                    f"got {_type_name(item)}"
                )
            for key in (text_key, label_key):
                if key not in item:
                    raise DataError(f"{path}: item {i}: missing field '{key}'")
                if not isinstance(item[key], str):
                    raise DataError(
                        f"{path}: item {i}: field '{key}' must be a string, got {_type_name(item[key])}"
                    )
            label = item[label_key]
            if label in drop:
                n_dropped += 1
                continue
            if label not in allowed:
                raise DataError(
                    f"{path}: item {i}: field '{label_key}' = {label!r} is not one of the options in "
                    f"{options_src}"
                )
            pairs.append((item[text_key], label))
        if not pairs:
            raise DataError(f"{path}: split '{split}' has no items left after dropping labels {sorted(drop)}")
        kept = sample_cap(pairs, self.caps[split], seed=self.seed, task=task, split=split)
        return [Example(text, label) for text, label in kept], n_dropped


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
        raise DataError(f"{where}: unknown task {name!r} (benchmark tasks: {', '.join(BENCHMARK_TASKS)})")
    return BENCHMARK_TASKS[key]


def load_preset_task(preset: TaskPreset, data_dir: Path, reader: SplitReader) -> Task:
    folder = data_dir / preset.folder
    if not folder.is_dir():
        raise DataError(
            f"{folder}: folder of benchmark task '{preset.name}' not found in data dir {data_dir}"
        )
    labels_path = folder / "labels.json"
    options = reader.options(labels_path)
    splits: dict[str, list[Example]] = {}
    dropped: dict[str, int] = {}
    for s in SPLITS:
        splits[s], n = reader.split(
            folder / f"{s}.json",
            task=preset.name,
            split=s,
            options=options,
            options_src=str(labels_path),
            drop_labels=preset.drop_labels,
        )
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
                f"argument 'order': unknown order {order!r} (standard orders: 1, 2, 3; long orders: 4, 5, 6)"
            )
        names = ORDERS[order]
    else:
        if isinstance(tasks, str) or not list(tasks):
            raise DataError(f"argument 'tasks' = {tasks!r} must be a non-empty list of task names")
        names = list(tasks)
    presets = [get_preset(n) for n in names]
    dupes = sorted({p.name for p in presets if sum(q.name == p.name for q in presets) > 1})
    if dupes:
        raise DataError(f"argument 'tasks': task(s) listed twice: {', '.join(dupes)}")
    reader = SplitReader(max_train=max_train, max_eval=max_eval, seed=seed)
    data_dir = _checked_dir(Path(data_dir), "data_dir")
    return TaskStream(name=f"order{order}", tasks=[load_preset_task(p, data_dir, reader) for p in presets])
