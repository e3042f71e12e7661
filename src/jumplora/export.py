"""Export a finished run: the final merged model as a standard HF folder, plus every task's update.

``export_run(run_dir, out)`` writes::

    out/model.safetensors, config.json, tokenizer files   AutoModel.from_pretrained(out) loads it
    out/modules.json, 1_Pooling/, ...                      sentence-transformers files, when the base has them
    out/README.md                                          model card: stream, order, strategy, R, OP/BWT/FWT
    out/task_updates/<NNN>_<task>/                         one folder per task that left an update

Per-task updates: a JumpLoRA update is an arbitrary sparse matrix (values at the kept entries of
s·ΔW), so a rank-r LoRA cannot hold it exactly, and a full-rank LoRA factorisation (B = ΔW, A = I)
costs in² extra parameters per module and rounds on every forward. Each task folder therefore holds:

- ``update.safetensors``: the exact update in the run's checkpoint format (``<module>::mask`` +
  ``<module>::values``, or ``<module>::dense``; values already scaled, (out, in) layout), with metadata
  (base model, task, stream, strategy, scale = 1, density per module) in the safetensors header and in
  ``task_update.json``. :func:`apply_task_update` adds it (``sign=+1``) or removes it (``sign=-1``).
- ``adapter_config.json`` + ``adapter_model.safetensors``: the same update as a PEFT **SHiRA** adapter
  (PEFT's sparse high-rank adapter: values at explicit indices, scale 1). SHiRA needs one r for every
  module with r·(in+out) stored values, so each module's kept entries are padded with zero values at
  unkept positions: adding zero changes nothing, so ``PeftModel.from_pretrained(base, folder)`` and its
  ``merge_and_unload()`` give exactly base + this update, with plain PEFT and no jumplora import.
  When the update cannot fit (a dense update of a non-square or non-Linear module), only
  ``update.safetensors`` is written and ``task_update.json`` says why (``"peft": null``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from jumplora.adapters.updates import apply_update, unpack_update
from jumplora.cards import export_card_metadata, fix_adapter_card
from jumplora.export_lora import is_dense_update, write_lora_adapter
from jumplora.packaged import PACKAGED_MINILM_ID

if TYPE_CHECKING:
    from jumplora.run.directory import RunRecord

__all__ = ["ExportError", "apply_task_update", "apply_update", "export_run", "load_run_model", "model_name"]

# Files of a sentence-transformers model folder (besides the numbered module folders like 1_Pooling/).
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_ST_MODULE_DIR = re.compile(r"^\d+_\w+$")


class ExportError(ValueError):
    """The run cannot be exported (incomplete, missing files, or the output folder is taken)."""


def _config_field(config: Mapping[str, Any], section: str, key: str) -> Any:
    """``config[section][key]``: the nested config of results schema 2 (jumplora.results)."""
    return (config.get(section) or {}).get(key)


def model_name(config: Mapping[str, Any]) -> str | None:
    """The run's base model (path, hub id or short name); None means the packaged MiniLM."""
    return _config_field(config, "model", "name")


def strategy_name(config: Mapping[str, Any]) -> str:
    """The run's strategy name (``config["strategy"]["name"]``)."""
    return str(_config_field(config, "strategy", "name"))


# -- one update ----------------------------------------------------------------------------------
def update_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names an update file touches, sorted."""
    return sorted({key.split("::")[0] for key in tensors})


def apply_task_update(model: nn.Module, folder: str | Path, sign: int = 1, *, check_base: bool = True) -> nn.Module:
    """Re-apply (``sign=+1``) or remove (``sign=-1``) an exported task's update; returns ``model``.

    Everything is checked before any weight changes (all or nothing): the file, the base model it was
    made for (``check_base=False`` skips only that), every module's presence and shape, finite values."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    path = Path(folder) / "update.safetensors"
    if not path.is_file():
        raise ExportError(f"{path}: not an exported task update")
    tensors, meta = _read_update_file(path)
    if check_base:
        _check_base_model(model, meta.get("base_model"), Path(folder), path)
    _check_update_fits(model, tensors, path)
    apply_update(model, tensors, sign=sign)
    return model


def _read_update_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types (a truncated file, a bad header)
        raise ExportError(f"{path}: not a readable safetensors file ({type(err).__name__})") from err


def _check_base_model(model: nn.Module, base: str | None, folder: Path, path: Path) -> None:
    """The model must be the update's base (by name or path) or the export the update folder belongs to."""
    from jumplora.data.safe import resolved

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not base or not name:
        raise ExportError(f"{path}: made for base model {base!r}, but the model names no source "
                          "(random init?); pass check_base=False to apply it anyway")  # fmt: skip
    from jumplora.adapters.model import stable_model_name

    same = stable_model_name(name) == base or (Path(name).exists() and Path(base).exists()
                                                and resolved(Path(name)) == resolved(Path(base)))  # fmt: skip
    exported = Path(name).is_dir() and resolved(Path(name)) in resolved(folder).parents
    if not (same or exported):
        raise ExportError(f"{path}: made for base model {base[:80]!r}, not {name[:80]!r}; "
                          "pass check_base=False to apply it anyway")  # fmt: skip


def _check_update_fits(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from jumplora.adapters.targets import weight_is_transposed

    try:
        dense = unpack_update(tensors)
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from err
    modules = dict(model.named_modules())
    for name, update in dense.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ExportError(f"{path}: names module {name[:80]!r}, which the model does not have")
        shape = tuple(module.weight.shape)[:: -1 if weight_is_transposed(module) else 1]
        if tuple(update.shape) != shape:
            raise ExportError(f"{path}: the update of {name!r} has shape {tuple(update.shape)}, the weight {shape}")
        if not torch.isfinite(update).all():
            raise ExportError(f"{path}: the update of {name!r} holds NaN or inf values")


# -- the run ----------------------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> RunRecord:
    """A *complete* run with its checkpoint, validated as ``--resume`` validates it
    (``jumplora.run.directory.read_run``: checksum, schema, config.json, R, every file's hash); ExportError
    otherwise, with the error line ``--resume`` gives."""
    from jumplora.config import REFERENCE_RUNNERS
    from jumplora.run.directory import RunDirectoryError
    from jumplora.run.directory import read_run as read_validated

    run = Path(run_dir)
    try:
        record = read_validated(run)
        kind = record.results.get("runner")
        if kind in REFERENCE_RUNNERS:
            raise ExportError(f"{run}: a {kind} reference run keeps no model to export (its updates are not saved)")
        record = read_validated(run, need_checkpoint=True)
    except RunDirectoryError as err:
        raise ExportError(str(err)) from err
    if len(record.updates) != len(record.results["tasks"]):
        raise ExportError(f"{record.state_path}: does not list one update per task")
    return record


def checked_update(record: RunRecord, name: str) -> dict[str, torch.Tensor]:
    """One update file of the verified run, read only if its sha256 is the one state.json records."""
    from jumplora.run.directory import RunDirectoryError, load_checked_tensors

    try:
        return load_checked_tensors(record, name)
    except RunDirectoryError as err:
        raise ExportError(str(err)) from err


def load_base(config: Mapping[str, Any]) -> tuple[nn.Module, Any, Path]:
    """The run's base model as loaded for training (float32), its tokenizer and its folder.

    A run on a quantized base (``--quantize``) gets that base quantized as in training, then dequantised
    to plain float32 ``nn.Linear`` layers: the updates then add onto dequant(Q(W)), so the exported model
    computes what the run's model computed (quantized weight + float32 residual)."""
    from jumplora.adapters.residual import dequantize_model
    from jumplora.models import load_model

    loaded = load_model(
        model_name(config),
        _config_field(config, "model", "family"),
        trust_remote_code=bool(_config_field(config, "model", "trust_remote_code")),
        quantize=quantization(config),
    )
    dequantize_model(loaded.model)
    return loaded.model.eval(), loaded.tokenizer, Path(loaded.path)


def quantization(config: Mapping[str, Any]) -> str:
    """The run's ``--quantize`` value ('none' for runs saved before it existed)."""
    return str(_config_field(config, "model", "quantize") or "none")


def load_run_model(run_dir: str | Path) -> nn.Module:
    """The final merged model of a finished run: the base model plus every task's update, in order."""
    record = read_run(run_dir)
    model, _, _ = load_base(record.results["config"])
    for name in record.updates:
        if name is not None:
            apply_update(model, checked_update(record, name))
    return model


# -- per-task artefacts ---------------------------------------------------------------------------


def base_model_id(config: Mapping[str, Any]) -> str:
    """The base model as a user would name it: the configured name/path, or the packaged model's hub id."""
    from jumplora.adapters.model import stable_model_name

    return str(stable_model_name(model_name(config)) or PACKAGED_MINILM_ID)  # never a site-packages path


def _masks(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name in update_modules(tensors):
        if f"{name}::mask" in tensors:
            out[name] = tensors[f"{name}::mask"].bool()
        else:
            out[name] = torch.ones(tensors[f"{name}::dense"].shape, dtype=torch.bool)
    return out


def _shira_r(masks: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> tuple[int | None, str]:
    """The one SHiRA r that holds every module's kept entries, or (None, why not)."""
    bad = [n for n in masks if type(modules[n]) is not nn.Linear]
    if bad:
        return None, f"SHiRA supports nn.Linear only, not {type(modules[bad[0]]).__name__} ({bad[0]})"
    r = max(1, *(-(-int(m.sum()) // sum(m.shape)) for m in masks.values()))
    too_big = [n for n, m in masks.items() if r * sum(m.shape) > m.numel()]
    if too_big:
        return None, f"r={r} needs more entries than {too_big[0]} has (a dense update of a non-square module)"
    return r, ""


def _padded(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``mask`` plus the first unkept positions (row-major) until it has ``size`` entries."""
    padded = mask.clone().reshape(-1)
    free = (~padded).nonzero().squeeze(1)[: size - int(mask.sum())]
    padded[free] = True
    return padded.reshape(mask.shape)


def write_shira_adapter(
    base: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path, base_id: str
) -> dict[str, Any] | str:
    """Write the update as an exact PEFT SHiRA adapter; returns its description, or why it cannot be."""
    from peft import ShiraConfig, get_peft_model

    modules = dict(base.named_modules())
    masks = _masks(tensors, modules)
    r, why = _shira_r(masks, modules)
    if r is None:
        return why
    padded = {n: _padded(m, r * sum(m.shape)) for n, m in masks.items()}
    config = ShiraConfig(r=r, mask_type="exact", target_modules=sorted(padded), inference_mode=True)
    model = copy.deepcopy(base)
    by_layer = {id(model.get_submodule(n)): mask for n, mask in padded.items()}
    config.mask_fn = lambda layer, _r: by_layer[id(layer)].to(layer.weight)
    peft_model = get_peft_model(model, config)
    dense = unpack_update(dict(tensors))
    for name, mask in padded.items():
        layer = peft_model.base_model.model.get_submodule(name)
        layer.shira_weight["default"].data = dense[name][mask].to(layer.shira_weight["default"])
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    peft_model.save_pretrained(folder)
    fix_adapter_card(folder, base_id, tags=["jumplora"])  # PEFT's card names the config's path
    return {"type": "SHIRA", "r": r, "padding_entries": sum(int(p.sum() - masks[n].sum()) for n, p in padded.items())}


def _density(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name in update_modules(tensors):
        mask = tensors.get(f"{name}::mask")
        out[name] = 1.0 if mask is None else float(mask.float().mean())
    return out


def write_task_update(
    base: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """One task's folder: update.safetensors + task_update.json (+ the SHiRA adapter when exact)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    per_module = _density(tensors)
    kept = sum(int(tensors[f"{n}::mask"].sum()) if f"{n}::mask" in tensors else tensors[f"{n}::dense"].numel()
               for n in per_module)  # fmt: skip
    total = sum((tensors.get(f"{n}::mask", tensors.get(f"{n}::dense"))).numel() for n in per_module)
    meta = {**meta, "format": "jumplora-update-1", "scale": 1.0, "layout": "(out_features, in_features)",
            "modules": sorted(per_module), "density": kept / total, "density_per_module": per_module}  # fmt: skip
    writer = write_lora_adapter if is_dense_update(tensors) else write_shira_adapter  # a dense run: plain LoRA
    peft_info = writer(base, tensors, folder, meta["base_model"])
    meta["peft"] = peft_info if isinstance(peft_info, dict) else None
    if isinstance(peft_info, str):
        meta["peft_unavailable"] = peft_info
    header = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "update.safetensors"), metadata=header)
    (folder / "task_update.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# -- the merged model and its card --------------------------------------------------------------------
_CARD_KEYS = ("r", "lora_alpha", "lr", "epochs", "batch_size", "max_train", "sparsify_start", "sparsify_end",
              "target_density", "threshold_granularity", "targets", "seed")  # fmt: skip


def _find(config: Mapping[str, Any], key: str) -> Any:
    """``key`` at the top of the nested config (e.g. ``seed``) or in one of its sections."""
    if key in config and not isinstance(config[key], Mapping):
        return config[key]
    for value in config.values():
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.2f}"


def model_card(results: Mapping[str, Any], tasks: list[dict[str, Any]], base_id: str) -> str:
    """README.md of the export: stream, order, strategy, hyper-parameters, R, CL metrics, densities, loading."""
    from jumplora.metrics.report import matrix_rows, stream_label

    config = results["config"]
    sparse = _config_field(config, "adapter", "sparse")
    method = f"{strategy_name(config)} + JumpLoRA" if sparse else f"{strategy_name(config)} (dense)"
    names = list(results["tasks"])
    lines = [f"# {method} on {stream_label(results)}", "",
             f"Base model: `{base_id}`, with the merged updates of a jumplora continual-learning run.", "",
             *_quantized_note(config),
             f"- Stream: `{stream_label(results)}`; task order: {', '.join(f'`{n}`' for n in names)}",
             f"- Strategy: {method}",
             *(f"- `{k}`: {_find(config, k)}" for k in _CARD_KEYS if _find(config, k) is not None),
             "", "## Accuracy matrix R (%): row = after task i, column = task j", "",
             "| after \\ on | " + " | ".join(map(_cell, names)) + " |", "|---|" + "---:|" * len(names)]  # fmt: skip
    lines += ["| " + " | ".join([_cell(label), *(_pct(v) for v in row)]) + " |" for label, row in matrix_rows(results)]
    metrics = results.get("metrics") or {}
    lines += ["", "| OP | BWT | FWT | forgetting |", "|---:|---:|---:|---:|",
              "| " + " | ".join(_pct(metrics.get(k)) for k in ("op", "bwt", "fwt", "forgetting")) + " |",
              "", "## Per-task updates", "", "| # | task | density (%) | folder |", "|---:|---|---:|---|"]  # fmt: skip
    lines += [f"| {t['task_index']} | {_cell(t['task'])} | {_pct(t.get('density'))} | {t.get('folder') or '—'} |"
              for t in tasks]  # fmt: skip
    lines += ["", "## Loading", "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
              'model = AutoModel.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
              "Each `task_updates/<NNN>_<task>/` holds one task's exact update: "
              "`jumplora.export.apply_task_update(model, folder, sign=-1)` removes it, `sign=+1` re-applies it; "
              "where `task_update.json` lists a `peft` entry, `peft.PeftModel.from_pretrained(base, folder)` "
              "loads it onto the base model (SHiRA if sparse, LoRA if dense).", ""]  # fmt: skip
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A markdown table cell: a task named `b|c` must not split its row."""
    return str(text).replace("|", "\\|")


def _quantized_note(config: Mapping[str, Any]) -> list[str]:
    kind = quantization(config)
    if kind == "none":
        return []
    return [f"Trained on the base quantized with `--quantize {kind}`; this folder holds that base dequantised to "
            "float32 plus every task's update (kept exactly beside the quantized weights during the run).", ""]


def _copy_sentence_transformers(base: Path, out: Path) -> None:
    for name in _ST_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    for sub in base.iterdir():
        if sub.is_dir() and _ST_MODULE_DIR.match(sub.name):
            shutil.copytree(sub, out / sub.name)
    if (base / "README.md").is_file():
        shutil.copy2(base / "README.md", out / "BASE_MODEL_README.md")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "task"


def _write_export(record: RunRecord, out: Path) -> None:
    from transformers import AutoTokenizer

    from jumplora.metrics.report import stream_label

    results, updates = record.results, record.updates
    config = results["config"]
    model, _, folder = load_base(config)
    pristine = copy.deepcopy(model)
    base_id = base_model_id(config)
    per_task = results.get("per_task") or []
    tasks = []
    for index, (task, name) in enumerate(zip(results["tasks"], updates, strict=True)):
        density = per_task[index].get("density") if index < len(per_task) else None
        entry: dict[str, Any] = {"task_index": index, "task": task, "folder": None, "density": density}
        if name is not None:
            tensors = checked_update(record, name)
            apply_update(model, tensors)
            sub = Path("task_updates") / f"{index:03d}_{_slug(task)}"
            meta = {"base_model": base_id, "task": task, "task_index": index, "stream": stream_label(results),
                    "strategy": strategy_name(config), "jumplora": _is_sparse(config),
                    "tasks_in_update": list(results["tasks"][_first_unsaved(updates, index) : index + 1])}  # fmt: skip
            entry["density"] = write_task_update(pristine, tensors, out / sub, meta)["density"]
            entry["folder"] = str(sub)
        tasks.append(entry)
    model.save_pretrained(out)
    trust = bool(_config_field(config, "model", "trust_remote_code"))
    AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust).save_pretrained(out)
    _copy_sentence_transformers(folder, out)
    sparse = bool(_config_field(config, "adapter", "sparse"))
    front_matter = export_card_metadata(base_id, folder, strategy_name(config), sparse)
    (out / "README.md").write_text(front_matter + model_card(results, tasks, base_id))
    readable_by_all(out)


def readable_by_all(folder: Path) -> None:
    """Files 0644 and folders 0755, as `save_pretrained` leaves them (atomic writes create files 0600)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _first_unsaved(updates: list[str | None], index: int) -> int:
    """First task whose update is folded into task ``index``'s (a shared adapter merges several tasks)."""
    start = index
    while start > 0 and updates[start - 1] is None:
        start -= 1
    return start


def export_run(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the final merged model, its card and every task's update to ``out`` (all or nothing).

    Never writes inside the run or over it, and removes only what it created: ``--overwrite`` replaces
    an earlier export only, and an existing ``out.partial`` is refused, not deleted."""
    run, out = Path(run_dir), Path(out)
    record = read_run(run)
    tmp = out.with_name(out.name + ".partial")
    check_export_target(run, out, tmp, overwrite=overwrite)
    tmp.mkdir(parents=True)
    try:
        _write_export(record, tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"run": str(run.absolute())}) + "\n")
        if (out / EXPORT_MARKER).is_file():
            shutil.rmtree(out)  # an earlier export (checked above), replaced only once the new one is whole
        elif out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Written last into every export: ``--overwrite`` replaces a folder only when it holds this file.
EXPORT_MARKER = "jumplora_export.json"


def check_export_target(run: Path, out: Path, tmp: Path, *, overwrite: bool) -> None:
    """Refuse an output that is the run, inside it or holds it, a symlink, a non-export folder, or a
    leftover ``.partial`` (whose files may be the user's)."""
    from jumplora.data.safe import resolved

    run_real, out_real = resolved(run), resolved(out)
    if out_real == run_real or run_real in out_real.parents or out_real in run_real.parents:
        raise ExportError(f"{out}: is the run {run}, inside it or holds it; export to a folder outside the run")
    for path in (out, tmp):
        if path.is_symlink():
            raise ExportError(f"{path}: is a symlink; export to a plain folder")
    if tmp.exists():
        raise ExportError(f"{tmp}: already exists (an interrupted export, or your files); remove or rename it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty; pass --overwrite to replace it")
        if not out.is_dir() or not (out / EXPORT_MARKER).is_file():
            raise ExportError(f"{out}: is not a jumplora export (no {EXPORT_MARKER}); --overwrite replaces "
                              "exports only, so nothing was touched")  # fmt: skip


def _is_sparse(config: Mapping[str, Any]) -> bool:
    """Whether the run's adapters were sparse JumpLoRA (``adapter.sparse``; ``jumplora`` in a flat config)."""
    return bool(_config_field(config, "adapter", "sparse"))
