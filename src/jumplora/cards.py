"""Model-card metadata (YAML front matter the Hub and ``huggingface_hub.ModelCard`` read) for what jumplora
writes: the export's card and the README.md that PEFT writes beside every saved adapter.

PEFT fills ``base_model`` from the model config's ``_name_or_path``, which for the packaged MiniLM is an
absolute site-packages path: meaningless on any other machine. These helpers put the stable id there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: What a JUMPLORA adapter's card says about loading it (PEFT alone fails with ``KeyError: 'JUMPLORA'``).
JUMPLORA_LOADING_NOTE = (
    "## Loading this adapter needs jumplora\n\n"
    "This is a JumpLoRA adapter (`peft_type: JUMPLORA`), a PEFT method that the `jumplora` package "
    "registers. Install and import it before loading (without it PEFT stops with `KeyError: 'JUMPLORA'`):\n\n"
    "```python\n# pip install jumplora\nimport jumplora  # registers the JUMPLORA method with PEFT\n"
    'from peft import AutoPeftModel\n\nmodel = AutoPeftModel.from_pretrained("path/to/this/folder")\n```\n'
)


def fix_adapter_card(folder: str | Path, base_model: str | None, *, tags: list[str] = (),
                     note: str | None = None) -> None:  # fmt: skip
    """Rewrite the README.md PEFT wrote in ``folder``: ``base_model`` (and its ``base_model:adapter:`` tag)
    set to ``base_model``, ``tags`` added, and ``note`` put first in the text once. No card: nothing."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return
    card = ModelCard.load(path)
    if base_model:
        card.data.base_model = base_model
    kept = [t for t in card.data.tags or [] if not str(t).startswith("base_model:adapter:")]
    adapter_tag = [f"base_model:adapter:{base_model}"] if base_model else []
    card.data.tags = sorted({*kept, *adapter_tag, *tags})
    if note and note not in card.text:
        card.text = f"\n{note}\n{card.text.lstrip()}"
    card.save(path)


def export_card_metadata(base_model: str, base_folder: Path | None, strategy: str, sparse: bool) -> str:
    """YAML front matter of an export's model card (with the ``---`` lines)."""
    from huggingface_hub import ModelCardData

    base_card = _base_card_data(base_folder)
    sentence_transformers = base_folder is not None and (base_folder / "modules.json").is_file()
    tags = ["jumplora", "continual-learning", strategy, "sparse-lora" if sparse else "lora"]
    if sentence_transformers:
        tags.append("sentence-transformers")
    data: dict[str, Any] = {
        "base_model": base_model,
        "library_name": "sentence-transformers" if sentence_transformers else "transformers",
        "tags": tags,
    }
    if base_card.get("license"):
        data["license"] = base_card["license"]
    if base_card.get("language"):
        data["language"] = base_card["language"]
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n"


def _base_card_data(base_folder: Path | None) -> dict[str, Any]:
    """The base model's own card metadata (license, language), when its folder has a README.md."""
    if base_folder is None or not (base_folder / "README.md").is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(base_folder / "README.md").data.to_dict()
    except (ValueError, OSError):
        return {}
