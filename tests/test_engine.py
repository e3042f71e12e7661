"""End-to-end runs of the CL engine: every strategy (dense and +JumpLoRA) on MiniLM, generative families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jumplora import ContinualTrainer
from jumplora.config import RunConfig
from jumplora.data import resolve_data_dir
from jumplora.io import read_jsonl
from jumplora.metrics.drift import answer_drift

pytestmark = pytest.mark.slow

TINY = {
    "max_train": 32,
    "max_eval": 32,
    "max_length": 64,
    "batch_size": 8,
    "eval_batch_size": 32,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def data_dir() -> str:
    return str(resolve_data_dir())


def run(tmp_path: Path, **overrides) -> dict:
    config = RunConfig.from_flat(out=str(tmp_path / "run"), **{**TINY, **overrides})
    trainer = ContinualTrainer(config, quiet=True)
    return trainer.run()


@pytest.mark.parametrize("jumplora", [False, True], ids=["dense", "jumplora"])
@pytest.mark.parametrize("strategy", ["inclora", "seqlora", "ella", "olora"])
def test_strategy_end_to_end_on_minilm(tmp_path, data_dir, strategy, jumplora):
    results = run(
        tmp_path,
        tasks=["dbpedia", "amazon"],
        data_dir=data_dir,
        strategy=strategy,
        jumplora=jumplora,
        strategy_args={"lam": 1e3} if strategy == "ella" else {},
        plots=strategy == "inclora",  # the plots are the same code for every strategy
    )
    out = tmp_path / "run"
    assert results["complete"] is True
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True and saved["accuracy_matrix"] == results["accuracy_matrix"]
    matrix = np.array(results["accuracy_matrix"])
    assert matrix.shape == (2, 2) and ((matrix >= 0) & (matrix <= 1)).all()
    assert len(results["zero_shot"]) == 2
    metrics = results["metrics"]
    assert metrics["op"] == pytest.approx(matrix[-1].mean())
    assert metrics["bwt"] == pytest.approx(matrix[1, 0] - matrix[0, 0])
    assert metrics["fwt"] == pytest.approx(matrix[0, 1] - results["zero_shot"][1])
    # learning happened on the first task (dbpedia: 14 options, zero-shot is far from perfect)
    assert matrix[0, 0] > results["zero_shot"][0]

    per_task = results["per_task"]
    assert [t["task"] for t in per_task] == ["dbpedia", "amazon"]
    for t in per_task:
        if jumplora:
            # θ starts at the LoRA budget (4.2 % here, exact: see test_adapters); ΔW keeps growing after
            # the init in a 4-step task, so the final density is only bounded, not pinned
            assert 0 < t["density"] < 0.9
            assert t["thresholds"] and all(v > 0 for v in t["thresholds"].values())
        else:
            assert t["density"] > 0.99
    assert per_task[0]["jaccard_with_earlier"] == [] and len(per_task[1]["jaccard_with_earlier"]) == 1
    assert 0 <= per_task[1]["jaccard_with_past"] <= 1
    overlap = np.array(results["overlap_matrix"])
    assert overlap.shape == (2, 2) and np.allclose(overlap, overlap.T)

    log = read_jsonl(out / "train_log.jsonl")
    assert {r["task"] for r in log} == {"dbpedia", "amazon"}
    assert all(np.isfinite(r["loss"]) for r in log)
    if jumplora:
        gammas = [r["gamma"] for r in log if r["task"] == "dbpedia"]
        assert gammas[0] == 0.0 and gammas[-1] == 1.0 and gammas == sorted(gammas)
        assert any(r["density"] is not None for r in log)
    if strategy in ("ella", "olora"):
        assert any(r["strategy_loss"] > 0 for r in log if r["task"] == "amazon")
    plotted = ("accuracy_heatmap", "accuracy_curves", "density", "overlap", "training_curves")
    for plot in plotted if strategy == "inclora" else ():
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000


@pytest.mark.parametrize("reference", ["multitask", "independent"])
def test_reference_rows(tmp_path, data_dir, reference):
    results = run(tmp_path, tasks=["dbpedia", "amazon"], data_dir=data_dir, runner=reference, save_predictions=True)
    assert results["complete"] and results["runner"] == reference
    row = results["accuracy_matrix"][0]
    assert len(row) == 2 and results["metrics"]["op"] == pytest.approx(np.mean(row))
    if reference == "independent":
        assert results["independent"] == row
    # Saved answers re-score to the row: one file after multitask, one after each independent task.
    saved = [r for f in sorted((tmp_path / "run" / "predictions").glob("0[1-9]-*.jsonl")) for r in read_jsonl(f)]
    for task, accuracy in zip(results["tasks"], row, strict=True):
        assert np.mean([r["correct"] for r in saved if r["task"] == task]) == pytest.approx(accuracy)


def test_task_option_space_ranks_only_own_options(tmp_path, data_dir):
    results = run(tmp_path, tasks=["dbpedia", "amazon"], data_dir=data_dir, option_space="task", max_train=16)
    assert results["complete"]
    assert results["config"]["stream"]["option_space"] == "task"


TOY_TASKS = {
    "polarity": (
        "Is the word positive? Choose one from the options.",
        ["yes", "no"],
        [("good", "yes"), ("great", "yes"), ("bad", "no"), ("awful", "no")],
    ),
    "colour": (
        "Is it a colour? Choose one from the options.",
        ["true", "false"],
        [("red", "true"), ("blue", "true"), ("table", "false"), ("run", "false")],
    ),
}


def write_toy_stream(folder: Path) -> Path:
    spec = {"name": "toy", "tasks": []}
    for name, (instruction, options, pairs) in TOY_TASKS.items():
        items = [{"sentence": text, "label": label} for text, label in pairs * 4]
        path = folder / f"{name}.json"
        path.write_text(json.dumps(items))
        spec["tasks"].append(
            {
                "name": name,
                "instruction": instruction,
                "options": options,
                "train": path.name,
                "test": path.name,
            }
        )
    stream = folder / "stream.json"
    stream.write_text(json.dumps(spec))
    return stream


TARGETS = {  # a tiny random model needs more than q,v to learn a toy task in a few dozen steps
    "tiny_t5": ["q", "k", "v", "o", "wi", "wo"],
    "tiny_llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("model_fixture", ["tiny_t5", "tiny_llama"])
def test_generative_families_through_the_engine(tmp_path, request, gen_tokenizer, model_fixture):
    model = request.getfixturevalue(model_fixture)
    with torch.no_grad():  # random 0.02-scale output rows cap the logits; a trained model's are larger
        model.get_output_embeddings().weight.mul_(20)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    gen_tokenizer.save_pretrained(model_dir)
    stream = write_toy_stream(tmp_path)
    torch.manual_seed(0)
    results = run(
        tmp_path,
        stream_file=str(stream),
        model=str(model_dir),
        strategy="inclora",
        jumplora=True,
        epochs=8,
        batch_size=4,
        lr=1e-2,
        max_length=48,
        targets=TARGETS[model_fixture],
        save_predictions=True,
    )
    assert results["complete"]
    assert results["config"]["model"]["name"] == str(model_dir)
    matrix = np.array(results["accuracy_matrix"])
    assert matrix.shape == (2, 2) and np.isfinite(matrix).all()  # exact match of generated answers
    log = [r for r in read_jsonl(tmp_path / "run" / "train_log.jsonl") if r["task"] == "polarity"]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # the answer-token loss falls on the toy task
    check_saved_predictions(tmp_path / "run", results)


@pytest.mark.parametrize("reference", ["multitask", "independent"])
def test_generative_reference_rows_keep_the_ranking_metric(tmp_path, tiny_llama, gen_tokenizer, reference):
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    gen_tokenizer.save_pretrained(model_dir)
    results = run(
        tmp_path, stream_file=str(write_toy_stream(tmp_path)), model=str(model_dir), runner=reference, epochs=1,
        batch_size=4, max_length=48, save_predictions=True,
    )  # fmt: skip
    row, rank_row = results["accuracy_matrix"][0], results["rank_accuracy_matrix"][0]
    assert len(rank_row) == len(row) == 2 and results["rank_metrics"] == {"op": pytest.approx(np.mean(rank_row))}
    saved = [r for f in sorted((tmp_path / "run" / "predictions").glob("0[1-9]-*.jsonl")) for r in read_jsonl(f)]
    for task, accuracy, rank_accuracy in zip(results["tasks"], row, rank_row, strict=True):
        mine = [r for r in saved if r["task"] == task]
        assert np.mean([r["correct"] for r in mine]) == pytest.approx(accuracy)
        assert np.mean([r["rank_correct"] for r in mine]) == pytest.approx(rank_accuracy)


def check_saved_predictions(out: Path, results: dict) -> None:
    """predictions/ holds every item of every evaluation once, and re-scores to R and the ranking R."""
    files = sorted((out / "predictions").iterdir())
    assert [f.name for f in files] == ["00-zero-shot.jsonl", *(f"{i + 1:02d}-after-{t}.jsonl"
                                                              for i, t in enumerate(results["tasks"]))]  # fmt: skip
    rows = [results["zero_shot"], *results["accuracy_matrix"]]
    rank_rows = [results["rank_zero_shot"], *results["rank_accuracy_matrix"]]
    for path, row, rank_row in zip(files, rows, rank_rows, strict=True):
        records = read_jsonl(path)
        for task, accuracy, rank_accuracy in zip(results["tasks"], row, rank_row, strict=True):
            mine = [r for r in records if r["task"] == task]
            assert [r["index"] for r in mine] == list(range(len(mine))) and mine
            assert np.mean([r["correct"] for r in mine]) == pytest.approx(accuracy)
            assert np.mean([r["rank_correct"] for r in mine]) == pytest.approx(rank_accuracy)
            assert all(isinstance(r["prediction"], str) and isinstance(r["rank_prediction"], str) for r in mine)
    for row in answer_drift(out):  # the drift metric's "correct" share is R's entry for that (after, task)
        after = results["tasks"].index(row["after"])
        assert row["correct"] == pytest.approx(rows[after + 1][results["tasks"].index(row["task"])])
