"""What a run ran on (results.json's ``environment``): versions, device, threads, processes, batch.

Two runs of one config can differ in their numbers because of the library versions, the thread count
(CPU reductions), the number of processes or the effective batch; recording them lets ``jumplora
report`` keep apart what should not be pooled and say when pooled runs differ.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Packages whose versions are recorded (a missing one is recorded as None).
PACKAGES: tuple[str, ...] = ("jumplora", "torch", "transformers", "peft", "accelerate")
#: Environment keys that say nothing about the computation (left out of ``report``'s comparison).
INFORMATIONAL_KEYS: frozenset[str] = frozenset({"hostname", "warnings"})


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout jumplora is imported from (``+dirty`` with local edits); None outside git."""
    here = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def single_process_launch_warning(world_size: int) -> str | None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` starts ONE plain process: it sets
    MASTER_ADDR but no WORLD_SIZE. Say so, since nothing else in the run would."""
    if world_size == 1 and os.environ.get("MASTER_ADDR") and not os.environ.get("WORLD_SIZE"):
        return (
            "this is a single process although MASTER_ADDR is set: `accelerate launch --num_processes N` "
            "without --multi_gpu (or a config with distributed_type MULTI_GPU/MULTI_CPU) runs one process"
        )
    return None


def run_environment(accelerator: Any, config: Any, model: Any = None) -> dict[str, Any]:
    """The ``environment`` block of results.json for a run on ``accelerator`` with ``config``."""
    import torch

    world = int(accelerator.num_processes)
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
    param = next(iter(model.parameters()), None) if model is not None else None
    warnings = [w for w in [single_process_launch_warning(world)] if w]
    return {
        **{f"{pkg}_version": package_version(pkg) for pkg in PACKAGES},
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": device.type,
        "device_name": name,
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "mixed_precision": str(accelerator.mixed_precision),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "per_device_batch_size": config.optim.batch_size,
        "grad_accum": config.optim.grad_accum,
        "effective_batch_size": config.optim.batch_size * config.optim.grad_accum * world,
        "hostname": platform.node(),
        "warnings": warnings,
    }


def environment_differences(environments: list[dict[str, Any] | None]) -> list[str]:
    """Keys whose values differ among runs (informational keys left out; a run without a block counts)."""
    known = [e for e in environments if e is not None]
    if not known:
        return []
    keys = sorted({k for e in known for k in e} - INFORMATIONAL_KEYS)
    differing = [k for k in keys if len({repr(e.get(k)) for e in known}) > 1]
    if len(known) < len(environments):
        differing.insert(0, "(not recorded in some runs)")
    return differing
