"""Hand-made results.json content in schema 2 (jumplora.results), for report / export tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jumplora.config import flat_fields
from jumplora.results import CONFIG_SECTIONS, RESULTS_FIELDS, SCHEMA_VERSION


def nested_config(**options: Any) -> dict[str, Any]:
    """A nested config from option names (``strategy="ella"``, ``jumplora=True``, ``order=1``, ``model="m"``);
    every section is present, holding only the options given (plus the strategy's name and args)."""
    index = flat_fields()
    config: dict[str, Any] = {"runner": "continual", **{section: {} for section in CONFIG_SECTIONS}}
    config["strategy"] = {"name": "inclora", "args": {}}
    for name, value in options.items():
        section, field = index[name]
        (config if section is None else config[section])[field] = value
    return config


def run_results(config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Every schema-2 field (None unless given); ``runner`` and ``stream`` from the config unless given."""
    stream = config["stream"]  # the stream's name as a run records it: its file, its tasks or its order
    if stream.get("stream_file"):
        name = Path(stream["stream_file"]).stem
    elif stream.get("tasks"):
        name = ",".join(stream["tasks"])
    else:
        name = f"order{stream.get('order', 1)}"
    results: dict[str, Any] = dict.fromkeys(RESULTS_FIELDS)
    results.update(
        schema=SCHEMA_VERSION,
        complete=True,
        runner=config["runner"],
        label="",
        stream=name,
        per_task=[],
        overlap_matrix=[],
        wall_time_s=0.0,
        dropped_eval_items={},
        plots=[],
        tasks_done=0,
    )
    results.update(config=config, **fields)
    return results
