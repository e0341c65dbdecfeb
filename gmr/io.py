"""File input and output. Every result is written to a temporary file beside its target and renamed
(atomic), so an interrupted run never leaves a partial or corrupt file where a finished one is expected."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (a folder) or raise a ValueError naming why it cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {path}: {err.strerror}; choose another --out") from None
    return path


def ensure_writable_file(path: str | os.PathLike) -> Path:
    """Check that a file can be created at `path` without creating it; raise a ValueError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create folder {parent}: {err.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent}; choose another --out")
    return path


# --------------------------------------------------------------------------------------------------
# CSV rows. Hand-written rather than pandas: a probe table is a list of row dicts whose columns may
# differ between rows, and readers want floats back without pandas' dtype guessing.

def rows_to_csv(rows: Sequence[dict]) -> str:
    """CSV text of row dicts: the union of their keys as columns (first-seen order); floats written
    exactly (repr), NaN and None as empty cells."""
    buf = io.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def _csv_cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return "" if v is None else v


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    write_text(path, rows_to_csv(rows))


def read_csv(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """Rows of a CSV file with numbers as floats, empty cells as NaN and other text as is."""
    with open(path, newline="") as fh:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _parse_cell(v: str | None):
    if v is None or v == "":
        return float("nan")
    try:
        return float(v)
    except ValueError:
        return v
