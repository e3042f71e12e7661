"""`jumplora export`: the final merged model as an HF folder, per-task updates (exact, PEFT SHiRA), model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from results_v2 import run_results
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from typer.testing import CliRunner

from jumplora import ContinualTrainer
from jumplora.cli import app
from jumplora.config import RunConfig
from jumplora.export import apply_task_update, export_run
from jumplora.results import CONFIG_SECTIONS
from jumplora.run.directory import Progress, RunDirectory

DATA = "/work/shared/cl_benchmark"
runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model: str):
    """A tiny sparse CL run (cb, rte) through the Python API, its trainer, and its export."""
    if not Path(DATA).is_dir():
        pytest.skip("benchmark data not available")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    config = RunConfig.from_flat(
        out=str(root / "run"), tasks=["cb", "rte"], max_train=16, max_eval=8, data_dir=DATA, model=tiny_model,
        jumplora=True, batch_size=2, sparsify_start=0.5, sparsify_end=1.0, target_density=0.1, cpu=True,
    )  # fmt: skip
    trainer = ContinualTrainer(config, quiet=True)
    results = trainer.run()
    result = runner.invoke(app, ["export", str(root / "run"), str(root / "export")])
    assert result.exit_code == 0, result.output
    return trainer, results, root / "run", root / "export"


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1000, 1024).reshape(2, 12)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def _base_plus(base_path: str, updates: list[Path]) -> torch.nn.Module:
    """Base model + the given checkpoint updates, rebuilt here from the file format (not via export.py)."""
    model = AutoModel.from_pretrained(base_path)
    weights = dict(model.named_parameters())
    for path in updates:
        tensors = load_file(path)
        for key in tensors:
            name, kind = key.split("::")
            weight = weights[f"{name}.weight"]
            with torch.no_grad():
                if kind == "dense":
                    weight += tensors[key]
                elif kind == "mask":
                    delta = torch.zeros_like(weight)
                    delta[tensors[key]] = tensors[f"{name}::values"]
                    weight += delta
    return model


def test_export_equals_final_model(finished, tiny_model: str) -> None:
    trainer, results, run, out = finished
    exported = AutoModel.from_pretrained(out)
    final = _hidden(trainer.setup.base_model)  # the run's own final model (updates merged in place)
    assert not torch.equal(final, _hidden(AutoModel.from_pretrained(tiny_model)))  # training changed it
    assert torch.equal(_hidden(exported), final)
    rebuilt = _base_plus(tiny_model, sorted((run / "checkpoint").glob("update_*.safetensors")))
    assert torch.equal(_hidden(exported), _hidden(rebuilt))
    setup = trainer.setup
    assert setup.evaluator.evaluate_all(exported, setup.tasks, "exported")["accuracy"] == results["accuracy_matrix"][-1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}


def test_task_update_remove_and_reapply(finished, tiny_model: str) -> None:
    _, results, run, out = finished
    folders = sorted((out / "task_updates").iterdir())
    assert [f.name for f in folders] == ["000_cb", "001_rte"]
    updates = sorted((run / "checkpoint").glob("update_*.safetensors"))
    for k, folder in enumerate(folders):
        model = AutoModel.from_pretrained(out)
        apply_task_update(model, folder, sign=-1)
        without_k = _base_plus(tiny_model, [u for i, u in enumerate(updates) if i != k])
        torch.testing.assert_close(_hidden(model), _hidden(without_k))
        apply_task_update(model, folder, sign=+1)
        torch.testing.assert_close(_hidden(model), _hidden(AutoModel.from_pretrained(out)))
        meta = json.loads((folder / "task_update.json").read_text())
        assert meta["task"] == results["tasks"][k] and meta["task_index"] == k and meta["scale"] == 1.0
        assert meta["base_model"] == tiny_model and meta["stream"] == "cb,rte" and meta["strategy"] == "inclora"
        assert meta["density"] == pytest.approx(results["per_task"][k]["density"])
        assert 0 < min(meta["density_per_module"].values()) < 1
        with safe_open(folder / "update.safetensors", "pt") as f:
            assert f.metadata()["task"] == results["tasks"][k] and f.metadata()["scale"] == "1.0"


def test_task_update_loads_with_plain_peft(finished, tiny_model: str) -> None:
    _, _, run, out = finished
    for k, folder in enumerate(sorted((out / "task_updates").iterdir())):
        assert json.loads((folder / "task_update.json").read_text())["peft"]["type"] == "SHIRA"
        peft_model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), folder)
        expected = _base_plus(tiny_model, [run / "checkpoint" / f"update_{k:03d}.safetensors"])
        assert torch.equal(_hidden(peft_model), _hidden(expected))  # unmerged forward
        merged = peft_model.merge_and_unload()
        for (name, a), b in zip(merged.state_dict().items(), expected.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    # A fresh interpreter with PEFT only: SHiRA is PEFT's own method, no jumplora import needed.
    code = (
        "import sys, torch, peft; from transformers import AutoModel; from safetensors.torch import load_file\n"
        f"base, folder = {tiny_model!r}, {str(out / 'task_updates' / '001_rte')!r}\n"
        "merged = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder).merge_and_unload()\n"
        "w = merged.encoder.layer[1].attention.self.value.weight - AutoModel.from_pretrained(base).encoder.layer[1]"
        ".attention.self.value.weight\n"
        "u = load_file(folder + '/update.safetensors'); m = u['encoder.layer.1.attention.self.value::mask']\n"
        "assert torch.allclose(w[m], u['encoder.layer.1.attention.self.value::values']) and (w[~m] == 0).all()\n"
        "assert not any(name.startswith('jumplora') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_card(finished) -> None:
    _, results, _, out = finished
    card = (out / "README.md").read_text()
    assert "# inclora + JumpLoRA on cb,rte" in card and "task order: `cb`, `rte`" in card
    assert "| after \\ on | cb | rte |" in card and "| zero-shot |" in card
    row = results["accuracy_matrix"][-1]
    assert f"| after rte | {100 * row[0]:.2f} | {100 * row[1]:.2f} |" in card
    assert f"| {100 * results['metrics']['op']:.2f} |" in card
    assert f"| 1 | rte | {100 * results['per_task'][1]['density']:.2f} | task_updates/001_rte |" in card
    assert "AutoModel.from_pretrained" in card and "`target_density`: 0.1" in card


def commit_run(run: Path, config: dict, rows: list[list[float]], updates: list[dict | None], **extra) -> None:
    """A finished run's checkpoint and results, written as a run writes them (checksum, hashes)."""
    config = {"runner": "continual", **{section: {} for section in CONFIG_SECTIONS}, **config}  # schema 2
    rundir = RunDirectory(run, config, len(rows), {})
    rundir.start()
    progress = Progress(zero_shot=[0.1] * len(rows))
    rundir.commit(progress)
    for i, (row, update) in enumerate(zip(rows, updates, strict=True)):
        progress.rows.append(row)
        progress.per_task.append({"task": "ab"[i], "density": None})
        progress.next_task = i + 1
        rundir.commit(progress, update=update, support={"q": torch.ones(1, dtype=torch.bool)})
    results = run_results(config, stream="my-stream", tasks=list("ab"[: len(rows)]), accuracy_matrix=rows,
                          zero_shot=progress.zero_shot, per_task=progress.per_task, **extra)  # fmt: skip
    (run / "results.json").write_text(json.dumps(results))


def _synthetic_run(root: Path, model_path: str, update: dict | None = None) -> Path:
    """A finished run on MiniLM with one hand-made update (no training): exercises the packaging only."""
    run = root / "run"
    mask = torch.zeros(384, 384, dtype=torch.bool)
    mask[::7, ::5] = True
    update = update or {
        "encoder.layer.0.attention.self.query::mask": mask,
        "encoder.layer.0.attention.self.query::values": torch.full((int(mask.sum()),), 0.01),
        "encoder.layer.1.attention.self.value::dense": torch.full((384, 384), -0.001),
    }
    config = {"model": {"name": model_path}, "strategy": {"name": "seqlora", "args": {}}, "adapter": {"sparse": False}}
    commit_run(run, config, [[0.5, 0.1], [0.4, 0.6]], [None, update])
    return run


def test_sentence_transformers_files_and_configs(tmp_path: Path, minilm_path: str) -> None:
    run = _synthetic_run(tmp_path, str(minilm_path))
    out = export_run(run, tmp_path / "out")
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "BASE_MODEL_README.md"):  # fmt: skip
        assert (out / name).read_bytes() == (Path(minilm_path) / name.replace("BASE_MODEL_", "")).read_bytes()
    folders = [p.name for p in (out / "task_updates").iterdir()]
    assert folders == ["001_b"]  # a shared adapter: task a's update is part of task b's
    meta = json.loads((out / "task_updates" / "001_b" / "task_update.json").read_text())
    assert meta["tasks_in_update"] == ["a", "b"] and meta["strategy"] == "seqlora"
    assert meta["density_per_module"]["encoder.layer.1.attention.self.value"] == 1.0
    assert "# seqlora (dense) on my-stream" in (out / "README.md").read_text()
    expected = _base_plus(minilm_path, [run / "checkpoint" / "update_001.safetensors"])
    assert torch.equal(_hidden(AutoModel.from_pretrained(out)), _hidden(expected))


def test_incomplete_run_is_refused(tmp_path: Path, minilm_path: str) -> None:
    run = _synthetic_run(tmp_path, str(minilm_path))
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "complete": False}))
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "incomplete" in result.output and result.output.count("error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written
    (run / "results.json").write_text(json.dumps(results))
    shutil.rmtree(run / "checkpoint")
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "state.json" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / "results.json").write_text(json.dumps({**results, "runner": "multitask"}))
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "multitask reference run" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_output_folder_not_overwritten(tmp_path: Path, minilm_path: str) -> None:
    run = _synthetic_run(tmp_path, str(minilm_path))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_sparse_export_is_labelled_sparse(finished) -> None:
    """Issue 29: export read config.get("jumplora") from the nested config; the flag is adapter.sparse."""
    _, _, _, out = finished
    for folder in sorted((out / "task_updates").iterdir()):
        assert json.loads((folder / "task_update.json").read_text())["jumplora"] is True
        with safe_open(str(folder / "update.safetensors"), framework="pt") as handle:
            assert handle.metadata()["jumplora"] == "true"
    assert (out / "jumplora_export.json").is_file()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_task_update_checks_everything_before_changing_a_weight(finished, tiny_model: str, tmp_path) -> None:
    """A mismatched model, a random-init model and NaN values are refused with no weight changed."""
    from transformers import BertConfig, BertModel

    from jumplora.export import ExportError

    _, _, _, out = finished
    folder = sorted((out / "task_updates").iterdir())[0]
    base = AutoModel.from_pretrained(tiny_model)
    config = BertConfig.from_pretrained(tiny_model)
    wider = BertModel(BertConfig(**{**config.to_dict(), "num_hidden_layers": 3, "hidden_size": 64,
                                    "intermediate_size": 64}))  # fmt: skip
    wider.config._name_or_path = tiny_model  # same name, other shapes: the shape check must catch it
    before = _weights(wider)
    with pytest.raises(ExportError, match="has shape"):
        apply_task_update(wider, folder)
    assert _same(_weights(wider), before)
    random_init = BertModel(config)
    before = _weights(random_init)
    with pytest.raises(ExportError, match="names no source"):
        apply_task_update(random_init, folder)
    assert _same(_weights(random_init), before)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(folder, poisoned)
    with safe_open(str(folder / "update.safetensors"), framework="pt") as handle:
        tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118
    last = sorted(k for k in tensors if k.endswith(("::values", "::dense")))[-1]
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[-1] = float("nan")
    save_file(tensors, str(poisoned / "update.safetensors"), metadata=meta)
    before = _weights(base)
    with pytest.raises(ExportError, match="NaN or inf"):
        apply_task_update(base, poisoned)
    assert _same(_weights(base), before)
    (poisoned / "update.safetensors").write_bytes((folder / "update.safetensors").read_bytes()[:64])
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        apply_task_update(base, poisoned)
    apply_task_update(base, folder)  # the right base model: applied
    assert not _same(_weights(base), before)


def test_export_overwrites_an_earlier_export_only(finished, tmp_path) -> None:
    _, _, run, out = finished
    again = tmp_path / "again"
    shutil.copytree(out, again)
    result = runner.invoke(app, ["export", str(run), str(again), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "again.partial").exists() and (again / "jumplora_export.json").is_file()


def test_export_metadata_parses_and_names_no_local_path(tmp_path: Path, minilm_path: str) -> None:
    """Model card front matter the Hub's parser reads; the per-task adapter card names the hub id; 0644 files."""
    from huggingface_hub import ModelCard

    out = export_run(_synthetic_run(tmp_path, str(minilm_path)), tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.library_name == "sentence-transformers" and card.data.license == "apache-2.0"
    assert {"jumplora", "continual-learning", "seqlora"} <= set(card.data.tags)
    assert "# seqlora (dense) on my-stream" in card.text
    adapter_card = ModelCard.load(out / "task_updates" / "001_b" / "README.md")
    assert adapter_card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in (out / "task_updates" / "001_b" / "README.md").read_text()
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_saved_jumplora_adapter_card_says_how_to_load(tmp_path: Path, minilm_path: str) -> None:
    import peft
    from huggingface_hub import ModelCard

    from jumplora import JumpLoraConfig

    model = peft.get_peft_model(AutoModel.from_pretrained(minilm_path), JumpLoraConfig(target_modules=["query"]))
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert "pip install jumplora" in text and "import jumplora" in text and "site-packages" not in text
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and "jumplora" in card.data.tags


def test_dense_run_exports_a_plain_lora_adapter(tmp_path: Path, minilm_path: str) -> None:
    """A dense run's update (rank ≤ r product) comes back as the LoRA adapter it is, not a dense-size SHiRA."""
    torch.manual_seed(0)
    update = {f"encoder.layer.{i}.attention.self.{m}::dense": 0.01 * torch.randn(384, 4) @ torch.randn(4, 384)
              for i in (0, 1) for m in ("query", "value")}  # fmt: skip
    run = _synthetic_run(tmp_path, str(minilm_path), update=update)
    out = export_run(run, tmp_path / "out")
    folder = out / "task_updates" / "001_b"
    meta = json.loads((folder / "task_update.json").read_text())
    assert meta["peft"]["type"] == "LORA" and meta["peft"]["r"] == 4 and set(meta["peft"]["ranks"].values()) == {4}
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * (folder / "update.safetensors").stat().st_size
    merged = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), folder).merge_and_unload()
    base = AutoModel.from_pretrained(minilm_path)
    for key, delta in update.items():
        name = key.removesuffix("::dense")
        got = merged.get_submodule(name).weight - base.get_submodule(name).weight
        torch.testing.assert_close(got, delta, rtol=0, atol=1e-6)


def test_export_quiet_prints_nothing_of_its_own_and_no_bars_when_redirected(tmp_path: Path, minilm_path: str) -> None:
    run = _synthetic_run(tmp_path, str(minilm_path))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}

    def export(out: str, *flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "jumplora.cli", "export", str(run), str(tmp_path / out), *flags]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    loud, quiet = export("loud"), export("quiet", "-q")
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr[-2000:]
    assert "exported" in loud.stdout and quiet.stdout == ""
    assert "UserWarning" not in quiet.stderr and "peft" not in quiet.stderr, quiet.stderr[-2000:]
    assert "Writing" not in loud.stderr and "\r" not in loud.stderr  # redirected: no progress bars


def test_model_card_escapes_a_pipe_in_task_names() -> None:
    """Issue 29: a task named `b|c` split its row of the card's tables."""
    from jumplora.export import model_card

    results = {"config": {"strategy": {"name": "inclora", "args": {}}, "adapter": {"sparse": True}},
               "tasks": ["a", "b|c"], "accuracy_matrix": [[0.5, 0.1], [0.4, 0.6]], "zero_shot": [0.1, 0.2],
               "metrics": {"op": 0.5}, "stream": "s"}  # fmt: skip
    card = model_card(results, [{"task_index": 1, "task": "b|c", "density": 0.04, "folder": None}], "base")
    rows = [line for line in card.splitlines() if line.startswith("|") and "b\\|c" in line]
    assert len(rows) == 3  # R's header, R's row after b|c, the per-task table
