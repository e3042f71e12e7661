"""Tests for jumplora.metrics: CL scores, support overlap, plots and run aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from results_v2 import nested_config, run_results
from rich.console import Console

from jumplora.metrics import (
    aggregate,
    average_accuracy,
    bwt,
    cl_metrics,
    density,
    density_per_module,
    forgetting,
    fwt,
    fwt_vs_independent,
    jaccard,
    learning_accuracy,
    load_results,
    load_runs,
    overlap_matrix,
    plot_accuracy_curves,
    plot_accuracy_heatmap,
    plot_bars,
    plot_density,
    plot_overlap,
    plot_training_curves,
    render_table,
    setting_key,
    to_markdown,
)

# R[i, j]: accuracy on task j after training task i. R[1, 0] > R[0, 0] so forgetting != -BWT.
R3 = np.array(
    [
        [0.80, 0.10, 0.20],
        [0.85, 0.90, 0.30],
        [0.50, 0.70, 0.95],
    ]
)
ZS3 = [0.10, 0.05, 0.10]
IND3 = [0.85, 0.80, 0.90]
TASKS3 = ["dbpedia", "amazon", "yahoo"]


# ----------------------------------------------------------------------------- cl.py


def test_cl_metrics_by_hand() -> None:
    assert average_accuracy(R3) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert bwt(R3) == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)  # -0.25
    assert fwt(R3, ZS3) == pytest.approx(((0.10 - 0.05) + (0.30 - 0.10)) / 2)  # 0.125
    assert fwt_vs_independent(R3, IND3) == pytest.approx(((0.80 - 0.85) + (0.90 - 0.80) + (0.95 - 0.90)) / 3)
    # j=0: max(R[0,0], R[1,0]) = 0.85 -> 0.85 - 0.50; j=1: max(R[1,1]) = 0.90 -> 0.90 - 0.70
    assert forgetting(R3) == pytest.approx(((0.85 - 0.50) + (0.90 - 0.70)) / 2)  # 0.275
    assert learning_accuracy(R3) == pytest.approx((0.80 + 0.90 + 0.95) / 3)


def test_cl_metrics_dict() -> None:
    m = cl_metrics(R3.tolist(), ZS3, IND3)
    assert set(m) == {"op", "bwt", "fwt", "fwt_vs_independent", "forgetting", "learning_accuracy"}
    assert m["bwt"] == pytest.approx(-0.25)
    assert m["fwt"] == pytest.approx(0.125)
    assert m["forgetting"] == pytest.approx(0.275)
    assert all(isinstance(v, float) for v in m.values())

    partial = cl_metrics(R3)
    assert partial["fwt"] is None and partial["fwt_vs_independent"] is None
    assert partial["op"] == pytest.approx(m["op"])


def test_cl_metrics_single_task() -> None:
    m = cl_metrics([[0.7]], zero_shot=[0.2], independent=[0.6])
    assert m["op"] == pytest.approx(0.7)
    assert m["learning_accuracy"] == pytest.approx(0.7)
    assert m["fwt_vs_independent"] == pytest.approx(0.1)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None
    with pytest.raises(ValueError):
        bwt([[0.7]])


@pytest.mark.parametrize("bad", [[[0.1, 0.2]], [0.1, 0.2], [], np.zeros((2, 3)), np.zeros((2, 2, 2))])
def test_cl_metrics_bad_matrix(bad: object) -> None:
    with pytest.raises(ValueError, match="square"):
        cl_metrics(bad)  # type: ignore[arg-type]


def test_cl_metrics_bad_vectors() -> None:
    with pytest.raises(ValueError, match="zero_shot"):
        cl_metrics(R3, zero_shot=[0.1, 0.2])
    with pytest.raises(ValueError, match="independent"):
        cl_metrics(R3, independent=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="zero_shot"):
        cl_metrics([[0.5]], zero_shot=[0.1, 0.2])  # validated even when FWT is None


# ----------------------------------------------------------------------------- overlap.py


def _t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


A = {"m1": _t([[1, 1, 0], [0, 0, 0]]), "m2": _t([1, 0, 1, 1])}
B = {"m1": _t([[1, 0, 0], [0, 1, 0]]), "m3": _t([1, 1])}


def test_jaccard_by_hand() -> None:
    # m1: inter 1, union 3; m2 only in A: union 3; m3 only in B: union 2 -> 1 / 8
    assert jaccard(A, B) == pytest.approx(1 / 8)
    assert jaccard(B, A) == pytest.approx(1 / 8)
    assert jaccard(A, A) == pytest.approx(1.0)
    empty = {"m1": torch.zeros(2, 3, dtype=torch.bool)}
    assert jaccard(empty, empty) == 0.0
    assert jaccard({}, {}) == 0.0
    assert jaccard(A, {}) == 0.0


def test_jaccard_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="m1"):
        jaccard(A, {"m1": torch.ones(3, 2, dtype=torch.bool)})


def test_overlap_matrix_symmetric() -> None:
    C = {"m2": _t([1, 1, 1, 1])}
    empty = {"m1": torch.zeros(2, 3, dtype=torch.bool)}
    M = overlap_matrix([A, B, C, empty])
    assert M.shape == (4, 4)
    np.testing.assert_allclose(M, M.T)
    np.testing.assert_allclose(np.diag(M), [1.0, 1.0, 1.0, 0.0])
    assert M[0, 1] == pytest.approx(1 / 8)
    # A vs C: m2 inter 3, union 4; m1 only in A: union 2 -> 3 / 6
    assert M[0, 2] == pytest.approx(0.5)
    assert M[1, 2] == pytest.approx(0.0)


def test_density() -> None:
    assert density(A) == pytest.approx(5 / 10)
    assert density_per_module(A) == pytest.approx({"m1": 2 / 6, "m2": 3 / 4})
    assert density({}) == 0.0


# ----------------------------------------------------------------------------- plots.py


def _is_png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 0 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path: Path) -> None:
    paths = [
        plot_accuracy_heatmap(R3, TASKS3, tmp_path / "heat.png", title="R"),
        plot_accuracy_curves(R3, TASKS3, tmp_path / "curves.png"),
        plot_density([0.05, 0.04, None], TASKS3, tmp_path / "density.png"),
        plot_overlap(overlap_matrix([A, B, A]), TASKS3, tmp_path / "sub" / "overlap.png"),
        plot_bars(
            [
                {"label": "inclora", "mean": 0.5, "std": 0.05},
                {"label": "inclora+jumplora", "mean": 0.6, "std": 0.0},
            ],
            "op",
            tmp_path / "bars.png",
        ),
        plot_bars(
            [
                {"label": "inclora", "group": "order1", "mean": 0.5, "std": 0.05},
                {"label": "inclora", "group": "order2", "mean": 0.55, "std": 0.01},
                {"label": "jump", "group": "order1", "op_mean": 0.6, "op_std": 0.02},
            ],
            "op",
            tmp_path / "bars_grouped.png",
        ),
    ]
    for p in paths:
        assert _is_png(Path(p)), p


def test_plot_training_curves(tmp_path: Path) -> None:
    recs = []
    for t, name in enumerate(["dbpedia", "amazon"]):
        for s in range(5):
            recs.append(
                {
                    "task": name,
                    "task_index": t,
                    "step": s,
                    "global_step": 5 * t + s,
                    "loss": 2.0 - 0.1 * s,
                    "strategy_loss": 0.01 * s,
                    "gamma": 0.3,
                    "theta": {} if s == 0 else {"global": 1e-3 * (s + 1), "attn": 2e-3},
                    "density": None if s == 0 else 0.05,
                }
            )
    assert _is_png(plot_training_curves(recs, tmp_path / "train.png"))
    assert _is_png(plot_training_curves([], tmp_path / "empty.png"))


def test_plot_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_accuracy_heatmap(R3, ["a", "b"], tmp_path / "x.png")


# ----------------------------------------------------------------------------- metrics/report/


def _write_run(
    root: Path,
    name: str,
    *,
    strategy: str,
    jumplora: bool,
    seed: int,
    metrics: dict,
    densities: list,
    jac: list,
    jac_past: list,
    wall: float,
    complete: bool = True,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    res = run_results(
        nested_config(strategy=strategy, jumplora=jumplora, order=1, seed=seed, model="tiny", out=str(d)),
        complete=complete,
        tasks=["dbpedia", "amazon"],
        accuracy_matrix=[[0.8, 0.1], [0.7, 0.9]],
        zero_shot=[0.1, 0.1],
        metrics=metrics,
        per_task=[
            {"task": t, "density": dn, "jaccard_with_earlier": je, "jaccard_with_past": jp}
            for t, dn, je, jp in zip(["dbpedia", "amazon"], densities, jac, jac_past, strict=True)
        ],
        wall_time_s=wall,
    )
    (d / "results.json").write_text(json.dumps(res))
    return d


def _m(op: float, b: float, f: float, fg: float) -> dict:
    return {
        "op": op,
        "bwt": b,
        "fwt": f,
        "fwt_vs_independent": None,
        "forgetting": fg,
        "learning_accuracy": 0.8,
    }


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    jl = {"strategy": "inclora", "jumplora": True}
    return [
        _write_run(tmp_path, "a0", **jl, seed=0, metrics=_m(0.6, -0.1, 0.00, 0.1),
                   densities=[0.04, 0.06], jac=[[], [0.2]], jac_past=[None, 0.1], wall=100.0),
        _write_run(tmp_path, "a1", **jl, seed=1, metrics=_m(0.7, -0.2, 0.02, 0.3),
                   densities=[0.02, 0.04], jac=[[], [0.4]], jac_past=[None, 0.3], wall=200.0),
        _write_run(tmp_path, "b0", strategy="seq", jumplora=False, seed=0, metrics=_m(0.4, -0.3, 0.01, 0.35),
                   densities=[None, None], jac=[[], []], jac_past=[None, None], wall=50.0),
        _write_run(tmp_path, "a2_incomplete", **jl, seed=2, metrics=_m(0.0, -0.9, 0.0, 0.9),
                   densities=[1.0, 1.0], jac=[[], [1.0]], jac_past=[None, 1.0], wall=1.0, complete=False),
    ]  # fmt: skip


def test_load_results_errors(tmp_path: Path, runs: list[Path]) -> None:
    assert load_results(runs[0])["config"]["seed"] == 0
    assert load_results(runs[0] / "results.json")["run_dir"] == str(runs[0])
    with pytest.raises(ValueError, match="incomplete"):
        load_results(runs[3])
    with pytest.raises(ValueError, match="not found"):
        load_results(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.results\.json"):
        load_results(bad)


def test_setting_key_ignores_per_run_keys() -> None:
    base = {"strategy": "inclora", "jumplora": True, "order": 1, "model": "m"}
    k = setting_key(nested_config(**base, seed=0, out="/runs/a") | {"resume": False})
    assert k == setting_key(nested_config(**base, seed=3, out="/runs/b") | {"resume": True})
    assert k != setting_key(nested_config(**{**base, "order": 2}, seed=0))


def test_aggregate(runs: list[Path]) -> None:
    results, skipped = load_runs(runs)
    assert len(results) == 3
    assert [Path(d).name for d, _ in skipped] == ["a2_incomplete"]

    rows = aggregate(results)
    assert [r["label"] for r in rows] == ["inclora+jumplora / order1", "seq / order1"]
    a, b = rows
    assert a["n"] == 2 and sorted(a["seeds"]) == [0, 1]
    # two seeds: the sample std (ddof=1) is √2 × the population std
    assert a["op_mean"] == pytest.approx(0.65) and a["op_std"] == pytest.approx(0.05 * 2**0.5)
    assert a["bwt_mean"] == pytest.approx(-0.15) and a["bwt_std"] == pytest.approx(0.05 * 2**0.5)
    assert a["fwt_mean"] == pytest.approx(0.01) and a["fwt_std"] == pytest.approx(0.01 * 2**0.5)
    assert a["forgetting_mean"] == pytest.approx(0.2) and a["forgetting_std"] == pytest.approx(0.1 * 2**0.5)
    assert a["density_mean"] == pytest.approx(0.04) and a["density_std"] == pytest.approx(0.01 * 2**0.5)
    assert a["jaccard_mean"] == pytest.approx(0.3) and a["jaccard_std"] == pytest.approx(0.1 * 2**0.5)
    assert a["jaccard_past_mean"] == pytest.approx(0.2) and a["jaccard_past_std"] == pytest.approx(0.1 * 2**0.5)
    assert a["wall_time_s_mean"] == pytest.approx(150.0) and a["wall_time_s_std"] == pytest.approx(50.0 * 2**0.5)
    assert a["fwt_vs_independent_mean"] is None

    assert b["n"] == 1 and b["op_mean"] == pytest.approx(0.4) and b["op_std"] is None  # one run: no std
    assert b["density_mean"] is None and b["jaccard_mean"] is None

    # Passing raw results including an incomplete one: it is skipped, not averaged.
    raw = [json.loads((d / "results.json").read_text()) for d in runs]
    rows_raw = aggregate(raw)
    assert rows_raw[0]["n"] == 2 and rows_raw[0]["op_mean"] == pytest.approx(0.65)


def test_markdown_and_table(runs: list[Path]) -> None:
    rows = aggregate(load_runs(runs)[0])
    md = to_markdown(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 4  # header, separator, two settings
    row_a = next(line for line in lines if "inclora+jumplora / order1" in line)
    for expected in ["65.00 ± 7.07", "-15.00 ± 7.07", "1.00 ± 1.41", "20.00 ± 14.14",
                     "4.00 ± 1.41", "30.00 ± 14.14", "150.0 ± 70.7"]:  # fmt: skip
        assert expected in row_a, expected
    row_b = next(line for line in lines if "seq / order1" in line)
    assert "| 40.00 |" in row_b and "±" not in row_b.split("|")[3] and "—" in row_b

    console = Console(record=True, width=250)
    console.print(render_table(rows))
    text = console.export_text()
    assert "65.00 ± 7.07" in text and "seq / order1" in text


def test_aggregate_disambiguates_labels() -> None:
    def res(model: str) -> dict:
        config = nested_config(strategy="inclora", jumplora=True, order=1, seed=0, model=model)
        return run_results(config, tasks=["t"], accuracy_matrix=[[0.5]], metrics={"op": 0.5, "bwt": None})

    rows = aggregate([res("small"), res("big")])
    assert len(rows) == 2
    assert {r["label"] for r in rows} == {
        "inclora+jumplora / order1 [model=big]",
        "inclora+jumplora / order1 [model=small]",
    }
    assert rows[0]["op_mean"] == pytest.approx(0.5)  # the recorded metrics
    assert rows[0]["bwt_mean"] is None
