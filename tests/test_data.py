"""Tests for jumplora.data: the real CL benchmark (when present) and small streams written to tmp_path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jumplora.data import (
    BENCHMARK_TASKS,
    LONG_ORDERS,
    ORDERS,
    STANDARD_ORDERS,
    DataError,
    Example,
    Task,
    TaskStream,
    load_benchmark_stream,
    load_custom_stream,
    load_stream,
    resolve_data_dir,
    stream_fingerprint,
)

# ------------------------------------------------------------------------------------- real benchmark


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real benchmark; skipped (with the reason) only when it cannot be found at all."""
    try:
        return resolve_data_dir()
    except DataError as exc:
        pytest.skip(f"CL benchmark not available: {exc}")


def test_order1_tasks_and_options(data_dir: Path) -> None:
    s = load_benchmark_stream(1, data_dir, max_train=20, max_eval=10, seed=0)
    assert s.name == "order1"
    assert s.task_names == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert [len(t.options) for t in s.tasks] == [14, 5, 10, 4]
    for t in s.tasks:
        labels = json.loads((data_dir / BENCHMARK_TASKS[t.name].folder / "labels.json").read_text())
        assert t.options == tuple(labels)
        assert (len(t.train), len(t.dev), len(t.test)) == (20, 10, 10)
        assert all(isinstance(e, Example) and e.label in t.options for e in t.train + t.dev + t.test)


@pytest.mark.parametrize("order", [*STANDARD_ORDERS, *LONG_ORDERS])
def test_every_order_loads(data_dir: Path, order: int) -> None:
    s = load_benchmark_stream(order, data_dir, max_train=8, max_eval=4, seed=1)
    assert s.task_names == ORDERS[order]
    assert len(s) == (4 if order in STANDARD_ORDERS else 15)


def test_orders_match_readme(data_dir: Path) -> None:
    readme = (data_dir / "README.md").read_text()
    found = {
        int(n): [x.strip() for x in names.split(",")] for n, names in re.findall(r"order (\d): (.+)", readme)
    }
    assert found == ORDERS


def test_order4_full_sizes_and_mnli_no_gold_labels(data_dir: Path) -> None:
    s = load_benchmark_stream(4, data_dir, max_train=None, max_eval=None, seed=0)
    assert len(s.tasks) == 15
    assert len(s.task("dbpedia").train) == 11194
    mnli = s.task("mnli")
    # 131 MNLI test items carry the "-" (no gold label) marker: dropped and counted, not silently kept.
    assert mnli.dropped == {"test": 131}
    assert len(mnli.test) == 1631 - 131
    assert all(not t.dropped for t in s.tasks if t.name != "mnli")


def test_prompt_format_exact(data_dir: Path) -> None:
    s = load_benchmark_stream(1, data_dir, max_train=1, max_eval=1, seed=0, tasks=["agnews"])
    assert s.tasks[0].prompt("Title: x\nText: y") == (
        "Task Instruction: What is the topic of the content? Choose one from the options.\n"
        "Options: World | Sports | Business | Science or Technology\n"
        "Text: Title: x\nText: y\n"
        "Answer:"
    )


def test_caps_deterministic_per_seed_and_keep_order(data_dir: Path) -> None:
    def load(seed: int) -> TaskStream:
        return load_benchmark_stream(1, data_dir, max_train=50, max_eval=30, seed=seed, tasks=["amazon"])

    a, b, c = load(7).tasks[0], load(7).tasks[0], load(8).tasks[0]
    assert (a.train, a.dev, a.test) == (b.train, b.dev, b.test)
    assert a.train != c.train and a.test != c.test
    assert (len(a.train), len(a.dev), len(a.test)) == (50, 30, 30)
    full = load_benchmark_stream(1, data_dir, seed=0, tasks=["amazon"]).tasks[0]
    positions = {e: i for i, e in enumerate(full.train)}
    idx = [positions[e] for e in a.train]
    assert idx == sorted(idx)  # original relative order kept


def test_option_space_union(data_dir: Path) -> None:
    s = load_benchmark_stream(4, data_dir, max_train=2, max_eval=2, seed=0)
    space = s.option_space
    assert len(space) == len(set(space))
    assert set(space) == {o for t in s.tasks for o in t.options}
    assert space[:3] == ("neutral", "entailment", "contradiction")  # mnli first, first-appearance order


def test_explicit_tasks_and_case_insensitive_names(data_dir: Path) -> None:
    s = load_benchmark_stream(9, data_dir, max_train=3, max_eval=3, seed=0, tasks=["SST-2", "cb"])
    assert s.name == "sst2,cb" and s.task_names == ["sst2", "cb"]  # a task list names the stream, not an order


def test_resolve_data_dir_env_and_explicit(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUMPLORA_DATA", str(data_dir))
    assert resolve_data_dir() == data_dir.resolve()
    assert resolve_data_dir(str(data_dir)) == data_dir.resolve()
    assert load_stream("order2", max_train=2, max_eval=2).task_names == ORDERS[2]


# ---------------------------------------------------------------------------------------- tmp files


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


ITEMS = [{"sentence": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]


@pytest.fixture
def mini_bench(tmp_path: Path) -> Path:
    """A tiny stand-in benchmark with one task (agnews) for preset and data-dir tests."""
    root = tmp_path / "bench"
    folder = root / "TC" / "agnews"
    opts = ["World", "Sports", "Business", "Science or Technology"]
    write_json(folder / "labels.json", opts)
    for split, n in (("train", 12), ("dev", 4), ("test", 5)):
        write_json(
            folder / f"{split}.json", [{"sentence": f"{split} {i}", "label": opts[i % 4]} for i in range(n)]
        )
    return root


def test_custom_yaml_stream(tmp_path: Path) -> None:
    write_json(tmp_path / "d" / "train.json", ITEMS)
    (tmp_path / "d" / "test.jsonl").write_text(
        "\n".join(json.dumps({"sentence": "a", "label": "pos"}) for _ in range(3)) + "\n\n"
    )
    (tmp_path / "d" / "xy.jsonl").write_text(json.dumps({"x": "c", "y": "meh"}) + "\n")
    write_json(tmp_path / "d" / "dev2.json", [{"x": "b", "y": "neg"}])
    cfg = tmp_path / "my-stream.yaml"
    cfg.write_text(
        "tasks:\n"
        "  - name: sentiment\n"
        "    instruction: Is it good?\n"
        "    options: [neg, pos]\n"
        "    train: d/train.json\n"
        "    test: d/test.jsonl\n"
        "    text_key: sentence\n"
        "  - name: other\n"
        "    instruction: Again?\n"
        "    options: [pos, neg, meh]\n"
        "    train: d/xy.jsonl\n"
        "    dev: d/dev2.json\n"
        "    text_key: x\n"
        "    label_key: y\n"
    )
    s = load_custom_stream(cfg, data_dir=None, max_train=4, max_eval=None, seed=3)
    assert s.name == "my-stream" and s.task_names == ["sentiment", "other"]
    t = s.tasks[0]
    assert t.options == ("neg", "pos") and len(t.train) == 4 and len(t.test) == 3 and t.dev == []
    assert t.split("test")[0] == Example("a", "pos")
    assert s.tasks[1].dev == [Example("b", "neg")]
    assert s.option_space == ("neg", "pos", "meh")
    assert load_stream(cfg, max_train=4, seed=3).tasks[0].train == t.train


def test_custom_json_stream_with_labels_file_and_preset(tmp_path: Path, mini_bench: Path) -> None:
    write_json(tmp_path / "labels.json", ["neg", "pos"])
    write_json(tmp_path / "train.json", ITEMS)
    cfg = write_json(
        tmp_path / "s.json",
        {
            "name": "mixed",
            "tasks": [
                {"name": "sent", "instruction": "Mood?", "labels_file": "labels.json", "train": "train.json",
                 "dev": "train.json"},
                {"name": "news", "preset": "agnews"},
            ],
        },
    )  # fmt: skip
    s = load_custom_stream(cfg, data_dir=mini_bench, max_train=None, max_eval=2, seed=0)
    assert s.name == "mixed" and s.task_names == ["sent", "news"]
    news = s.tasks[1]
    assert news.instruction == BENCHMARK_TASKS["agnews"].instruction
    assert news.options[0] == "World" and (len(news.train), len(news.dev), len(news.test)) == (12, 2, 2)
    assert isinstance(news, Task)


def test_benchmark_loader_on_mini_bench(mini_bench: Path) -> None:
    s = load_benchmark_stream(1, mini_bench, max_train=None, max_eval=None, seed=0, tasks=["agnews"])
    assert s.tasks[0].prompt("t").startswith("Task Instruction: What is the topic")
    folder = (mini_bench / "TC" / "agnews").resolve()
    fingerprint = stream_fingerprint(s)  # every file read, for refusing --resume on changed data
    assert sorted(fingerprint) == [str(folder / f) for f in ("dev.json", "labels.json", "test.json", "train.json")]
    assert all(v.startswith("size=") and len(v.split("sha256=")[1]) == 64 for v in fingerprint.values())
    with pytest.raises(DataError, match=r"TC/dbpedia.*folder of benchmark task 'dbpedia' not found"):
        load_benchmark_stream(1, mini_bench, max_train=None, max_eval=None, seed=0)


def one_task(fields: str) -> str:
    """A one-task YAML stream whose task has name 'a' plus `fields` (flow-mapping syntax)."""
    return "tasks:\n  - {name: a, " + fields + "}\n"


# Each case: (files to write relative to tmp_path, stream file name, substrings the message must contain).
BAD_CASES = {
    "missing_split_file": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: nope.json, dev: t.json"),
         "t.json": ITEMS},
        "s.yaml", ["nope.json", "'train'", "not found"],
    ),
    "invalid_json_split": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json, dev: bad.json"),
         "t.json": ITEMS, "bad.json": "[{\"sentence\": "},
        "s.yaml", ["bad.json", "invalid JSON", "'dev'"],
    ),
    "invalid_json_stream": ({"s.json": "{tasks: ["}, "s.json", ["s.json", "invalid JSON"]),
    "invalid_yaml": ({"s.yaml": "tasks: [\n  - name: a\n  bad"}, "s.yaml", ["s.yaml", "invalid YAML"]),
    "invalid_jsonl": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.jsonl, dev: t.jsonl"),
         "t.jsonl": "{\"sentence\": \"a\", \"label\": \"neg\"}\n{oops\n"},
        "s.yaml", ["t.jsonl", "line 2", "invalid JSON"],
    ),
    "empty_split": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json, test: e.json"),
         "t.json": ITEMS, "e.json": []},
        "s.yaml", ["e.json", "split 'test' is empty"],
    ),
    "split_not_list": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json, dev: t.json"),
         "t.json": {"sentence": "x", "label": "neg"}},
        "s.yaml", ["t.json", "split 'train' must be a list"],
    ),
    "label_not_in_options": (
        {"s.yaml": one_task("instruction: i, labels_file: l.json, train: t.json, dev: t.json"),
         "l.json": ["neg", "pos"], "t.json": [*ITEMS, {"sentence": "x", "label": "Foo"}]},
        "s.yaml", ["t.json: item 10: field 'label' = 'Foo' is not one of the options in", "l.json"],
    ),
    "missing_key": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json, dev: t.json"),
         "t.json": [{"sentence": "x", "label": "neg"}, {"text": "y", "label": "pos"}]},
        "s.yaml", ["t.json: item 1: missing field 'sentence'"],
    ),
    "missing_custom_key": (
        {"s.yaml": "tasks:\n  - {name: a, instruction: i, options: [neg, pos], train: t.json, dev: t.json,"
                   " label_key: y}\n",
         "t.json": ITEMS},
        "s.yaml", ["t.json: item 0: missing field 'y'"],
    ),
    "non_string_value": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json, dev: t.json"),
         "t.json": [{"sentence": 3, "label": "neg"}]},
        "s.yaml", ["t.json: item 0: field 'sentence' must be a string"],
    ),
    "duplicate_options": (
        {"s.yaml": one_task("instruction: i, labels_file: l.json, train: t.json, dev: t.json"),
         "l.json": ["neg", "pos", "neg"], "t.json": ITEMS},
        "s.yaml", ["l.json", "duplicate option 'neg'"],
    ),
    "yaml_bool_options": (
        {"s.yaml": one_task("instruction: i, options: [True, False], train: t.json, dev: t.json"),
         "t.json": ITEMS},
        "s.yaml", ["s.yaml: tasks[0]", "field 'options'", "quote it in YAML"],
    ),
    "unknown_task_key": (
        {"s.yaml": "tasks:\n  - {name: a, instruction: i, options: [neg, pos], train: t.json, dev: t.json}\n"
                   "  - {name: b, instructions: i, options: [neg, pos], train: t.json, dev: t.json}\n",
         "t.json": ITEMS},
        "s.yaml", ["s.yaml: tasks[1]", "unknown key 'instructions'"],
    ),
    "unknown_top_key": ({"s.yaml": "name: x\ntask: []\n"}, "s.yaml", ["s.yaml", "unknown key 'task'"]),
    "missing_instruction": (
        {"s.yaml": one_task("options: [neg, pos], train: t.json, dev: t.json"), "t.json": ITEMS},
        "s.yaml", ["s.yaml: tasks[0] ('a')", "'instruction'"],
    ),
    "no_eval_split": (
        {"s.yaml": one_task("instruction: i, options: [neg, pos], train: t.json"), "t.json": ITEMS},
        "s.yaml", ["s.yaml: tasks[0] ('a')", "'dev'", "'test'"],
    ),
    "unknown_preset": (
        {"s.yaml": one_task("preset: dbpediaa")},
        "s.yaml", ["s.yaml: tasks[0] ('a'): field 'preset'", "unknown task 'dbpediaa'"],
    ),
    "missing_stream_file": ({}, "nothere.yaml", ["nothere.yaml", "stream file not found"]),
    "bad_suffix": ({"s.txt": "tasks: []"}, "s.txt", ["s.txt", "unsupported stream file type"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_custom_inputs_raise_data_error(tmp_path: Path, case: str) -> None:
    files, stream_file, expected = BAD_CASES[case]
    for name, content in files.items():
        if isinstance(content, str):
            (tmp_path / name).write_text(content)
        else:
            write_json(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_custom_stream(tmp_path / stream_file, data_dir=None, max_train=None, max_eval=None, seed=0)
    msg = str(info.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_unknown_task_and_order(mini_bench: Path) -> None:
    with pytest.raises(DataError, match=r"argument 'tasks': unknown task 'foo'.*dbpedia"):
        load_benchmark_stream(1, mini_bench, max_train=None, max_eval=None, seed=0, tasks=["agnews", "foo"])
    with pytest.raises(DataError, match=r"argument 'order': unknown order 7"):
        load_benchmark_stream(7, mini_bench, max_train=None, max_eval=None, seed=0)
    with pytest.raises(DataError, match=r"argument 'max_train' = 0"):
        load_benchmark_stream(1, mini_bench, max_train=0, max_eval=None, seed=0, tasks=["agnews"])


def test_label_not_in_options_benchmark(mini_bench: Path) -> None:
    bad = mini_bench / "TC" / "agnews" / "dev.json"
    write_json(bad, [{"sentence": "a", "label": "World"}, {"sentence": "b", "label": "Foo"}])
    with pytest.raises(DataError) as info:
        load_benchmark_stream(1, mini_bench, max_train=None, max_eval=1, seed=0, tasks=["agnews"])
    labels = mini_bench / "TC" / "agnews" / "labels.json"
    assert str(info.value) == f"{bad}: item 1: field 'label' = 'Foo' is not one of the options in {labels}"


def test_non_benchmark_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"empty: data dir \(--data-dir\) does not look like the CL benchmark"
    ):
        resolve_data_dir(tmp_path / "empty")
    with pytest.raises(DataError, match=r"missing: data dir \(--data-dir\) does not exist.*JUMPLORA_DATA"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("JUMPLORA_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"\$JUMPLORA_DATA"):
        resolve_data_dir()
    with pytest.raises(DataError, match=r"empty: data dir \(data_dir\) does not look like"):
        load_benchmark_stream(1, tmp_path / "empty", max_train=None, max_eval=None, seed=0)


def test_resolve_data_dir_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jumplora.data.stream as stream_mod

    monkeypatch.delenv("JUMPLORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stream_mod, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DataError, match=r"--data-dir PATH or set JUMPLORA_DATA"):
        resolve_data_dir()


def test_preset_without_data_dir_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jumplora.data.stream as stream_mod

    monkeypatch.delenv("JUMPLORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stream_mod, "_REPO_ROOT", tmp_path / "repo")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(one_task("preset: amazon"))
    with pytest.raises(DataError, match=r"s\.yaml: tasks\[0\] \('a'\): field 'preset' needs the benchmark"):
        load_custom_stream(cfg, data_dir=None, max_train=None, max_eval=None, seed=0)


def test_task_split_accessor() -> None:
    t = Task(name="t", instruction="i", options=["a", "b"], train=[Example("x", "a")])
    assert t.options == ("a", "b") and t.split("train") == [Example("x", "a")] and t.split("dev") == []
    with pytest.raises(DataError, match="unknown split 'val'"):
        t.split("val")


def test_yaml_nulls_mean_defaults(tmp_path: Path) -> None:
    write_json(tmp_path / "t.json", ITEMS)
    cfg = tmp_path / "nulls.yml"
    cfg.write_text(
        "name: null\n"
        + one_task("instruction: i, options: [neg, pos], train: t.json, test: t.json, text_key: null")
    )
    s = load_custom_stream(cfg, data_dir=None, max_train=None, max_eval=None, seed=0)
    assert s.name == "nulls" and len(s.tasks[0].train) == 10
