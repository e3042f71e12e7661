"""`python -m jumplora.cli` as a real child process, without paying the 6–7 s import each time.

A forkserver (one per test process) imports the CLI's run path once; every run is a fresh process forked
from it with its own argv, environment, working directory, stdout and stderr. Exit codes, SIGKILL and the
files left on disk are those of a plain `python -m jumplora.cli`, so the crash tests keep their meaning.

Limit: variables that libraries read at import time (HF_HOME, HF_HUB_OFFLINE, ...) were read when the server
started; a test that sets one must start a plain subprocess instead.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

_PRELOAD = ["jumplora.cli", "jumplora.build", "jumplora.run.trainer"]


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _child(args: list[str], env: dict[str, str], cwd: str | None, stdout: str, stderr: str) -> None:
    """Runs in the forked process: the console entry point with this argv, env and cwd."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = ["jumplora", *args]
    code: int = 0
    try:
        from jumplora.cli import main

        main()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no multiprocessing epilogue: exit as the CLI would


def run_cli(
    args: Sequence[str], *, extra_env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, -m, jumplora.cli, *args], capture_output=True, text=True)``, in this
    process's environment without armed fault points (``JUMPLORA_TEST_*``) and with ``extra_env`` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPLORA_TEST_")}
    env.update(TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    with tempfile.TemporaryDirectory(prefix="jumplora-cli-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch()
        err.touch()
        process = _context().Process(
            target=_child, args=(list(args), env, None if cwd is None else str(cwd), str(out), str(err))
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["jumplora", *args], timeout, out.read_bytes(), err.read_bytes())
        stdout, stderr = out.read_text(), err.read_text()
    return subprocess.CompletedProcess(["jumplora", *args], process.exitcode, stdout, stderr)
