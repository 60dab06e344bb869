"""Reading text that users write: strict UTF-8 and strict YAML, errors as file:line:column.

- Text files are decoded strictly as UTF-8; a leading byte-order mark (Windows editors write
  one) is accepted and dropped. A byte that is not UTF-8 is reported as ``file:line:column``.
- YAML is read with ``yaml.SafeLoader`` plus one rule: a key given twice in one mapping is an
  error naming both lines (plain YAML silently keeps the last value). :func:`yaml_key_lines`
  maps every dotted key of a document to its line, so later errors about a key can name it.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import re
from pathlib import Path

import yaml


class InputError(ValueError):
    """A text file that cannot be read as asked (one line: file:line[:column]: what)."""


def decode_utf8(raw: bytes, source: str | Path, error: type[Exception] = InputError) -> str:
    """`raw` as UTF-8 text, without a leading BOM; a bad byte raises `error` naming line and column."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[line_start : e.start].decode("utf-8", errors="replace")) + 1
        raise error(f"{source}:{line}:{column}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") \
            from None


def read_text(path: str | Path, error: type[Exception] = InputError) -> str:
    return decode_utf8(Path(path).read_bytes(), path, error)


def log_records(path: str | Path, error: type[Exception] = InputError) -> list[tuple[str, dict]]:
    """(line, record) of each record of a JSONL log a run appends to (metrics.jsonl,
    samples.jsonl). A last line cut short (the process killed, or the disk filled, while writing
    it) is left out; a damaged line before the last is an `error` naming its file and line."""
    import json

    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    out = []
    for j, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if j < len(lines) - 1:
                raise error(f"{path}:{i}: not a JSON record ({e.msg}); remove the line") from None
            continue
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(step, int | float) or isinstance(step, bool):  # JSON, but not a record a run wrote
            what = f"'step' is {step!r}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise error(f"{path}:{i}: not a record of this log ({what}, not an object with a numeric step); "
                        f"remove the line")
        out.append((line, record))
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges are not duplicates
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool) or key is None:  # ([a, b]: 1, null: 1: no recipe key)
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name, got {key!r} (a {type(key).__name__})", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key]}, again at line {line})",
                key_node.start_mark)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml(text: str, source: str | Path, error: type[Exception] = InputError):
    """Parse YAML strictly (duplicate keys refused); errors as ``source:line: ...``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise error(f"{source}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def yaml_key_lines(text: str) -> dict[str, int]:
    """{'ppo.model.name_or_path': 12, ...}: the line of every key of the document's mappings."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = prefix + str(key_node.value)
            lines.setdefault(key, key_node.start_mark.line + 1)
            walk(value, key + ".")

    walk(root, "")
    return lines


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}
"""What a disk that cannot be written says (:func:`disk_errors` names the path for these only)."""


def _nearly_full(path: Path) -> bool:
    """Whether the file system holding `path` has (almost) no room left: what a C++ writer that
    failed without an errno most likely met."""
    import shutil

    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return shutil.disk_usage(p).free < 16 * 2**20
    return False


WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "basic_ios::clear", "iostream error")
"""torch's writer failing on a full disk: with a Python file the OSError is its context; with a
file name (DeepSpeed's engine checkpoints) no errno comes with it."""


@contextlib.contextmanager
def disk_errors(path: Path):
    """Writes under `path` whose disk fails (full, read-only, ...) raise an OSError with its errno
    and a path, which the CLI turns into one line (:func:`rlhf.stages.unwritable`): a file
    object's OSError carries no path, and safetensors reports "os error N" in an error of its own."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in DISK_ERRNOS:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        n = None
        if "unexpected pos" in str(e) or "PytorchStreamWriter failed" in str(e):  # torch's writer, failing again
            cause = e.__context__  # while the disk's OSError unwinds
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            n = cause.errno if cause is not None else None
        found = re.search(r"\(os error (\d+)\)", str(e))  # safetensors
        n = n if n is not None else int(found.group(1)) if found else None
        if n is None and any(k in str(e) for k in WRITER_FAILURES) and _nearly_full(path):
            n = errno.ENOSPC  # (torch.save to a file name, as DeepSpeed's engine saves: C++'s stream says no more)
        if n not in DISK_ERRNOS:  # (anything else is a bug, or not the disk's: left as it is)
            raise
        raise OSError(n, os.strerror(n), str(path)) from e
