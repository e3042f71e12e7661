"""Bounded, strict reading of user files: one `DataError` line naming the file, never a traceback.

Every user file goes through here, so these limits hold everywhere: files are capped in size
(`JUMPLORA_MAX_FILE_MB`, default 64), structures in nesting depth (100), YAML may not use aliases
(a "billion laughs" expands nothing), duplicate keys are refused in YAML and JSON, and error messages
show sizes or truncated values, never a whole user structure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_DEPTH = 100
SHOW_CHARS = 60
_MAX_FILE_ENV = "JUMPLORA_MAX_FILE_MB"
_SCALARS = (str, int, float, bool, type(None))


class DataError(ValueError):
    """Bad data or data configuration; the message names the file (or argument) and the field."""


def brief(value: Any) -> str:
    """A user value for an error message: a truncated repr, or only the size of a large structure."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOW_CHARS else repr(value[:SHOW_CHARS]) + "…"
    if isinstance(value, list | tuple | dict):
        kind = "mapping" if isinstance(value, dict) else "list"
        if len(value) <= 8:  # small and flat: show it; anything else: only its size
            parts = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
            if all(isinstance(v, _SCALARS) and len(str(v)) <= SHOW_CHARS for v in parts):
                text = repr(value if isinstance(value, dict) else parts)
                if len(text) <= 2 * SHOW_CHARS:
                    return text
        return f"a {kind} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "…"


def clip(text: str, limit: int = 2 * SHOW_CHARS) -> str:
    """A message from elsewhere (a parser, a library), cut to one bounded line."""
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + "…"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def max_file_bytes() -> int:
    raw = os.environ.get(_MAX_FILE_ENV, "64")
    try:
        mb = float(raw)
    except ValueError:
        raise DataError(f"${_MAX_FILE_ENV} = {brief(raw)} must be a number of megabytes") from None
    return int(mb * 2**20)


def read_bytes(path: Path, what: str) -> bytes:
    """Read a regular file of bounded size; loops, folders, FIFOs and OS errors become DataErrors."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: {what} is a symlink loop") from None
        raise DataError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: {what} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: {what} is not a regular file")
    limit = max_file_bytes()
    if info.st_size > limit:
        raise DataError(f"{path}: {what} is {info.st_size} bytes, over the {limit} byte limit (raise ${_MAX_FILE_ENV})")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise DataError(f"{path}: {what} grew over the {limit} byte limit while being read")
    return data


def resolved(path: Path) -> Path:
    """`path.resolve()`, or the absolute path when it cannot be resolved (a symlink loop is reported on read)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def fingerprint_bytes(data: bytes) -> str:
    return f"size={len(data)} sha256={hashlib.sha256(data).hexdigest()}"


def decode_utf8(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def check_text(value: str, where: str) -> str:
    """Refuse lone surrogates (JSON allows "\\ud800"; tokenizers crash on them much later)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                f"{where} has a lone surrogate {value[exc.start]!r} at character {exc.start} (not valid Unicode)"
            ) from None
    return value


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def check_depth(data: Any, where: str) -> Any:
    """Refuse structures nested deeper than MAX_DEPTH (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DataError(f"{where}: nested too deeply (limit: {MAX_DEPTH} levels)")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return data


def loads_json(text: str, where: str, *, depth: bool = True) -> Any:
    """Strict JSON: duplicate keys and deep nesting are DataErrors; `where` prefixes every message.

    `depth=False` skips the MAX_DEPTH walk (for large row files, whose rows are only read two fields
    deep); nesting past the interpreter's recursion limit is still a DataError.
    """
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON is nested too deeply (limit: {MAX_DEPTH} levels)") from None
    except _DuplicateKey as exc:
        raise DataError(f"{where}: duplicate key {brief(exc.key)} in a JSON object") from None
    return check_depth(data, where) if depth and isinstance(data, list | dict) else data


def loads_yaml(text: str, where: str) -> Any:
    """Strict YAML (safe types only): no aliases, no duplicate keys, bounded depth."""
    import yaml  # lazy: only YAML streams need it

    try:
        return yaml.load(text, Loader=_strict_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataError(f"{where}: invalid YAML{at}: {clip(problem)}") from None


_LOADER: type | None = None


def _strict_loader() -> type:
    """A SafeLoader that refuses aliases, duplicate keys and nesting deeper than MAX_DEPTH."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ComposerError(
                    None, None, f"aliases (*{brief(event.anchor)[1:-1]}) are not allowed", event.start_mark
                )
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ComposerError(None, None, f"nested too deeply (limit: {MAX_DEPTH} levels)", mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                    except TypeError:  # unhashable: the base class raises its own clear error
                        continue
                    if duplicate:
                        raise ConstructorError(None, None, f"duplicate key {brief(key)}", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    _LOADER = StrictLoader
    return StrictLoader
