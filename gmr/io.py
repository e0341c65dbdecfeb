"""File input and output. Every result is written to a temporary file beside its target and renamed
(atomic), so an interrupted run never leaves a partial or corrupt file where a finished one is expected.

The temporary files are named `.tmp-<target name>-<random>`; one left behind by a killed process (kill -9
gives no chance to remove it) is removed by the next command that writes the same output, under its lock
(`remove_stale_temps`, `gmr.locks`). Files get the permissions of the user's umask, as `open` would give
them. A full disk (or quota) while writing raises `DiskFullError` with one line naming the file; the
temporary file is removed and the previous version of the target, if any, is kept.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

TMP_PREFIX = ".tmp-"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing a result; the CLI reports it in one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(err: BaseException, folder: Path) -> bool:
    """True when `err` comes from a full disk. torch.save reports a failed write as a RuntimeError of
    its zip writer without errno ("unexpected pos"); for those the free space of `folder` decides."""
    if isinstance(err, OSError):
        return err.errno in _FULL
    text = str(err)
    if not (isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def full_error(path: Path) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"cannot write {path}: no space left on the device; free space (or "
                         "choose another --out) and run the command again")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` when the block succeeds."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp gives 0600: results others may read
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        if disk_full(err, path.parent):
            raise full_error(path) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files of `atomic_path` left in `folder` by a killed writer: those of the
    target file names `names` (every one when None). Call it only while holding the lock of what
    writes there (`gmr.locks`), so that no live writer's file is removed. Returns the paths removed."""
    folder = Path(folder)
    prefixes = None if names is None else tuple(f"{TMP_PREFIX}{n}-" for n in names)
    removed = []
    for p in folder.glob(f"{TMP_PREFIX}*") if folder.is_dir() else []:
        if p.is_file() and (prefixes is None or p.name.startswith(prefixes)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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


def _given_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; an empty one is refused (Path("") is ".", the working directory, which nobody
    means by an empty option)."""
    if not os.fspath(path).strip():
        raise ValueError(f"{what} is empty; give a path")
    return Path(path)


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_folder_path(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder that exists or can be created, checked without creating anything (a ValueError of one
    line otherwise): not empty, not a file, and under a writable folder when it is still to be made."""
    path = _given_path(path, what)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder; give a folder path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder; choose another path")
    if base != path and not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {what} {path}: {base} is not writable; choose another path")
    return path


def ensure_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create `path` (a folder) or raise a ValueError naming why it cannot be written (nothing is
    created when the path itself is wrong)."""
    path = check_folder_path(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: two commands may probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {path}: {err.strerror}; choose another {what}") from None
    return path


def check_writable_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check that a file can be created at `path`, creating nothing (not even its folder); raise a
    ValueError of one line otherwise."""
    path = _given_path(path, what)
    if path.is_dir() or not path.name or path.name in (".", ".."):
        raise ValueError(f"{what} {path} is a folder; give a file path")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {base}; choose another {what}")
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """`check_writable_file`, then create the file's folder (the file itself is not created)."""
    path = check_writable_file(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create folder {path.parent}: {err.strerror}; choose another {what}") from None
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
