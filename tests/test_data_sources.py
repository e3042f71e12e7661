"""Split sources (JSON, JSONL, CSV, parquet, `datasets` specs), integer labels, strict bounded parsing,
outside paths, the one stream resolver and the data fingerprint. Nothing is downloaded."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest

from jumplora.data import (
    DataError,
    Example,
    load_custom_stream,
    load_stream,
    resolve_stream_source,
    stream_fingerprint,
)
from jumplora.data.safe import brief

OPTIONS = ["neg", "pos"]
ROWS = [{"sentence": f"text {i}", "label": OPTIONS[i % 2]} for i in range(6)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode, also for libraries imported earlier (they read the variables at import): a hub id then
    fails at once instead of after huggingface_hub's ~23 s of retries (tests/test_bad_inputs.py keeps one
    case that waits them out)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in ("huggingface_hub.constants", "datasets.config"):
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(sys.modules.get(module), name):
                monkeypatch.setattr(sys.modules[module], name, True)


def stream_file(folder: Path, train: object, test: object | None = None, **task: object) -> Path:
    """A one-task JSON stream (task 'a'; options neg/pos unless overridden) whose splits are `train`/`test`."""
    spec = {"name": "a", "instruction": "Mood?", "options": OPTIONS, "train": train, "test": test or train}
    spec.update(task)
    path = folder / "stream.json"
    path.write_text(json.dumps({"tasks": [spec]}))
    return path


def load(path: Path, **kwargs: object):
    return load_custom_stream(path, max_train=None, max_eval=None, seed=0, **kwargs)


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def labelled_dataset():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "y": datasets.ClassLabel(names=OPTIONS)})
    return datasets.Dataset.from_dict({"text": ["bad", "good", "fine"], "y": [0, 1, 1]}, features=features)


# ----------------------------------------------------------------------------------------- file formats


def test_csv_with_string_and_integer_labels(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", [{"sentence": "a, quoted", "label": "pos"}, {"sentence": "b", "label": "0"}])
    s = load(stream_file(tmp_path, "train.csv"))
    assert s.tasks[0].train == [Example("a, quoted", "pos"), Example("b", "neg")]


def test_json_integer_labels_index_the_options(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"sentence": "x", "label": 1}, {"sentence": "y", "label": 0}]))
    assert [e.label for e in load(stream_file(tmp_path, "t.json")).tasks[0].train] == ["pos", "neg"]


def test_parquet_plain_and_with_classlabel_names(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": ["x", "y"], "label": ["pos", "neg"]}), tmp_path / "plain.parquet")
    labelled_dataset().to_parquet(str(tmp_path / "hf.parquet"))
    s = load(stream_file(tmp_path, "plain.parquet"))
    assert s.tasks[0].train == [Example("x", "pos"), Example("y", "neg")]
    # ClassLabel names (neg, pos) win over the options' order (pos, neg): 0 -> "neg".
    s = load(stream_file(tmp_path, "hf.parquet", options=["pos", "neg"], text_key="text", label_key="y"))
    assert [e.label for e in s.tasks[0].train] == ["neg", "pos", "pos"]


def test_datasets_save_to_disk_and_csv_builder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": labelled_dataset()}).save_to_disk(str(tmp_path / "saved"))
    write_csv(tmp_path / "x.csv", [{"text": "ok", "y": "pos"}, {"text": "meh", "y": "neg"}])
    train = {"dataset": "./saved", "split": "train"}
    test = {"dataset": "csv", "data_files": "x.csv", "split": "train"}
    s = load(stream_file(tmp_path, train, test, text_key="text", label_key="y"))
    t = s.tasks[0]
    assert t.train == [Example("bad", "neg"), Example("good", "pos"), Example("fine", "pos")]
    assert t.test == [Example("ok", "pos"), Example("meh", "neg")]
    fp = stream_fingerprint(s)
    assert str((tmp_path / "x.csv").resolve()) in fp
    assert any(k.startswith(str((tmp_path / "saved").resolve())) for k in fp)


def test_datasets_spec_errors(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    labelled_dataset().save_to_disk(str(tmp_path / "one"))
    cases = [
        ({"dataset": "./one", "split": "train", "revison": "x"}, "unknown key 'revison'"),
        ({"dataset": "./missing", "split": "train"}, "dataset folder not found"),
        ({"dataset": "text", "data_files": "x.txt", "split": "train"}, "must be a file builder"),
        ({"dataset": "csv", "data_files": "nope.csv", "split": "train"}, "data file not found"),
        ({"dataset": "./one", "split": "train"}, "missing field 'sentence'"),  # default text_key
        ({"dataset": "no such/dataset!", "split": "train"}, "neither a local path nor a hub id"),
        ({"dataset": "glue", "config": "rte", "split": "train"}, "dataset 'glue', config 'rte', split 'train'"),
    ]
    for spec, needle in cases:
        with pytest.raises(DataError) as info:
            load(stream_file(tmp_path, spec))
        assert needle in str(info.value) and "\n" not in str(info.value), (needle, str(info.value))


def test_missing_datasets_extra_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"field 'train': a datasets spec needs .*pip install 'jumplora\[datasets\]'"):
        load(stream_file(tmp_path, {"dataset": "glue", "config": "rte", "split": "validation"}))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("sentence,label\nx,neg,extra\n", "line 2: 3 fields, but the header has 2"),
        ("sentence,sentence\nx,neg\n", "line 1: duplicate column 'sentence'"),
        ("", "has no header row"),
        ("sentence,label\nx,7\n", "line 2: field 'label' = 7 is out of range for the 2 options"),
        ("sentence,label\nx,-1\n", "= -1 is out of range"),
        ('sentence,label\n"x"y,neg\n', "line 2: invalid CSV: ',' expected after '\"'"),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError) as info:
        load(stream_file(tmp_path, "t.csv"))
    assert str(info.value).startswith(str(tmp_path / "t.csv")) and needle in str(info.value)


def test_int_label_out_of_range_and_bool_label(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"sentence": "x", "label": 2}]))
    with pytest.raises(DataError, match=r"t\.json: item 0: field 'label' = 2 is out of range for the 2 options"):
        load(stream_file(tmp_path, "t.json"))
    (tmp_path / "t.json").write_text(json.dumps([{"sentence": "x", "label": True}]))
    with pytest.raises(DataError, match=r"item 0: field 'label' must be a string or an integer index, got bool"):
        load(stream_file(tmp_path, "t.json"))


def test_int_labels_can_be_dropped(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"sentence": "x", "label": -1}, {"sentence": "y", "label": 1}]))
    task = load(stream_file(tmp_path, "t.json", drop_labels=["-1"])).tasks[0]
    assert task.train == [Example("y", "pos")] and task.dropped == {"train": 1, "test": 1}


# -------------------------------------------------------------------------------- strict, bounded input


def test_billion_laughs_yaml_fails_fast_in_one_short_line(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "s.yaml"
    path.write_text("\n".join(lines) + "\nname: *a9\ntasks: []\n")
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load(path)
    assert time.perf_counter() - start < 2
    assert "aliases (*a0) are not allowed" in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize(("name", "text"), [("s.json", "[" * 100_000), ("s.yaml", "[" * 100_000),
                                            ("s.json", "[" * 101 + "]" * 101)])  # fmt: skip
def test_deep_nesting_is_a_data_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=r"nested too deeply \(limit: 100 levels\)"):
        load(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("s.yaml", "name: x\ntasks: []\nname: y\n", "line 3 column 1: duplicate key 'name'"),
        ("s.json", '{"name": "x", "tasks": [], "name": "y"}', "duplicate key 'name'"),
    ],
)
def test_duplicate_keys_refused(tmp_path: Path, name: str, text: str, needle: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as info:
        load(tmp_path / name)
    assert str(info.value).startswith(str(tmp_path / name)) and needle in str(info.value)


def test_bad_files_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.symlink(tmp_path / "loop2.json", tmp_path / "loop1.json")
    os.symlink(tmp_path / "loop1.json", tmp_path / "loop2.json")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "latin1.json").write_bytes(b'[{"sentence": "caf\xe9", "label": "neg"}]')
    (tmp_path / "big.json").write_text(json.dumps(ROWS * 200))
    cases = {
        "loop1.json": "symlink loop",
        "dir.json": "is a folder, not a file",
        "latin1.json": "is not UTF-8 text (byte 18",
        "big.json": "over the 1048 byte limit",
    }
    monkeypatch.setenv("JUMPLORA_MAX_FILE_MB", "0.001")
    for name, needle in cases.items():
        with pytest.raises(DataError) as info:
            load(stream_file(tmp_path, name), allow_outside_paths=name == "loop1.json")
        assert str(tmp_path / name) in str(info.value) and needle in str(info.value), str(info.value)


def test_lone_surrogate_names_file_item_and_field(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('[{"sentence": "ok", "label": "neg"}, {"sentence": "a\\ud800b", "label": "pos"}]')
    with pytest.raises(DataError, match=r"t\.json: item 1: field 'sentence' has a lone surrogate '\\ud800'"):
        load(stream_file(tmp_path, "t.json"))


def test_error_messages_truncate_user_values(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": ["x"] * 10_000, "tasks": []}))
    with pytest.raises(DataError, match=r"field 'name' = a list of 10000 items must be"):
        load(path)
    assert brief("y" * 1000) == repr("y" * 60) + "…"
    assert brief({"k": 1}) == "{'k': 1}" and brief([[1]] * 3) == "a list of 3 items"


# ---------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("rel", ["../outside.json", "/etc/passwd", "link.json"])
def test_paths_may_not_leave_the_stream_folder(tmp_path: Path, rel: str) -> None:
    folder = tmp_path / "stream"
    folder.mkdir()
    (tmp_path / "outside.json").write_text(json.dumps(ROWS))
    os.symlink(tmp_path / "outside.json", folder / "link.json")
    with pytest.raises(DataError, match=r"field 'train' = .* is outside the stream file's folder .*--allow-outside"):
        load(stream_file(folder, rel))
    if rel != "/etc/passwd":
        assert len(load(stream_file(folder, rel), allow_outside_paths=True).tasks[0].train) == len(ROWS)


# --------------------------------------------------------------------------------- resolver, fingerprint


def test_stream_with_tasks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--stream and --tasks conflict"):
        resolve_stream_source(1, tmp_path / "s.yaml", ["cb"])
    with pytest.raises(DataError, match="--stream and --tasks conflict"):
        load_stream(tmp_path / "s.yaml", tasks=["cb"])
    assert resolve_stream_source(1, None, ["cb"]).tasks == ("cb",)
    assert resolve_stream_source(4, "s.yaml", None).stream_file == Path("s.yaml")


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps(ROWS))
    path = stream_file(tmp_path, "t.json")
    before = stream_fingerprint(load(path))
    assert set(before) == {str(path.resolve()), str((tmp_path / "t.json").resolve())}
    assert before[str(path.resolve())].startswith(f"size={path.stat().st_size} sha256=")
    assert stream_fingerprint(load(path)) == before
    (tmp_path / "t.json").write_text(json.dumps(ROWS[::-1]))
    after = stream_fingerprint(load(path))
    assert after[str((tmp_path / "t.json").resolve())] != before[str((tmp_path / "t.json").resolve())]


def test_unreadable_and_special_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jumplora.data.safe as safe

    os.mkfifo(tmp_path / "fifo.json")  # reading it would block forever
    with pytest.raises(DataError, match=r"fifo\.json: 'train' split file is not a regular file"):
        load(stream_file(tmp_path, "fifo.json"))
    (tmp_path / "t.json").write_text(json.dumps(ROWS))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safe, "open", denied, raising=False)  # root reads any file: simulate chmod 000
    with pytest.raises(DataError, match=r"stream\.json: cannot read stream file: Permission denied"):
        load(stream_file(tmp_path, "t.json"))
