"""Crash-safe file writing that never replaces what is not ours.

A run can be killed at any moment, so nothing is ever written in place: every file goes to a temporary
sibling first and is renamed over the target (rename is atomic on POSIX). Directories (checkpoints,
exports, tokenizers, data shards) are built under a temporary name and renamed into place when complete.
Files and their directories are fsynced before and after the rename, so a power loss cannot leave a
renamed but empty checkpoint, and what we write gets the user's umask (not the 0600 / 0700 of temp files).

"Ours": every directory `atomic_dir` creates carries a marker file, `.nanoseek` (MARKER). A path that
already exists may only be replaced when it is an empty directory or a directory holding that marker; a
file, or a directory of the user's without the marker, is refused with a `UserError` before anything is
written. A run directory is ours when it holds our `config.toml` (`check_run_target`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nanoseek.errors import UserError

MARKER = ".nanoseek"           # in every directory artefact nanoseek writes: proof that we may replace it
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # tempfile's `.{name}.XXXXXXXX.tmp` siblings


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_ours(path: str | os.PathLike) -> bool:
    """Whether `path` may be replaced: absent, an empty directory, or a directory carrying MARKER."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MARKER).is_file() or not any(path.iterdir())


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse, before any work, an output directory we could not write or must not replace: a file, a path
    under a file, an unwritable location, or an existing directory that is not ours (see `is_ours`)."""
    path = Path(path)
    _check_writable_location(path, what)
    if not is_ours(path):
        kind = "a file" if path.is_file() or path.is_symlink() else f"a directory nanoseek did not write (no {MARKER})"
        raise UserError(f"{what} {path} is {kind}; refusing to replace it: choose a new path or remove it yourself")


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output file path that is a directory, under a file, or not writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; pass a file path such as {path / 'result.json'}")
    _check_writable_location(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable; choose another path")


def check_output_location(path: str | os.PathLike, what: str = "--out") -> None:
    """A directory a command will create or add files to: not a file, not under a file, in a writable place.
    (What it then writes is atomic: files replace only our own names, directories only ours.)"""
    path = Path(path)
    _check_writable_location(path, what)
    if path.is_symlink() and not path.exists() or (path.exists() and not path.is_dir()):
        raise UserError(f"{what} {path} is a file; pass a directory")


def _check_writable_location(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory (else mkdir would fail later)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path} lies under {parent}, which is a file; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{what} {path}: {parent} is not writable; choose another path")
            return


def check_run_target(out: str | os.PathLike, resume: bool) -> None:
    """A run directory `out` may be written when it is absent or empty; with `resume` also when it holds our
    `config.toml` (the run's own config), carries MARKER (a pipeline stage directory, `mark_ours`), or holds
    only directories we wrote (a stage that copied its data in first). Anything else (a file, the user's own folder) is refused, so no run trains into and exports over
    a user's files."""
    out = Path(out)
    check_output_location(out, "--out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not ((out / "config.toml").is_file() or (out / MARKER).is_file()
            or all((p / MARKER).is_file() for p in out.iterdir())):
        raise UserError(f"--resume: {out} holds files but no config.toml, so it is not a nanoseek run directory; "
                        "pass the run's own directory, or choose a new --out")


def mark_ours(path: str | os.PathLike) -> Path:
    """Create directory `path` (if needed) carrying MARKER: a directory nanoseek owns, e.g. a pipeline stage's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        (path / MARKER).write_text("written by nanoseek; nanoseek may replace this directory\n", encoding="utf-8")
    return path


def clean_stale_tmp(root: str | os.PathLike) -> None:
    """Delete the temporary files and directories (`.name.XXXXXXXX.tmp`, `.name.old`) that a killed run left
    inside run directory `root`; called when a run starts or resumes, before anything else is written."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if _TMP.match(name) or (name.startswith(".") and name.endswith(".old")):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
        for name in filenames:
            if _TMP.match(name):
                Path(dirpath, name).unlink(missing_ok=True)


def _finish_tree(root: Path) -> None:
    """Give the tree the user's umask, mark it ours, and fsync every file and directory in it."""
    mask = _umask()
    (root / MARKER).write_text("written by nanoseek; nanoseek may replace this directory\n", encoding="utf-8")
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, 0o666 & ~mask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


def link_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tree `src` into the directory `dst`, hard-linking each file where the file system allows (else a
    copy): for finished outputs nobody writes again — a stage's shards, a final model exported beside the run
    (eight models of 3.6 GB each on the `small` preset) — the copy then costs neither time nor disk."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=link)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory that replaces `path` only if the block finishes without error.

    `path` must be ours (`is_ours`): checked before the block runs, so a refused target costs no work and
    changes nothing."""
    path = Path(path)
    check_output_dir(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _finish_tree(tmp)
        if path.exists():
            if not is_ours(path):          # appeared while we worked
                raise UserError(f"{path} was created by someone else meanwhile; refusing to replace it")
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. A kill mid-write can leave a partial last line; `read_jsonl` skips it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a metrics-style JSONL file, tolerating a torn final line left by a killed run; anything else that
    is not a JSON object per line (garbage bytes, a line in the middle) is a UserError naming the line."""
    lines = Path(path).read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):   # ValueError: JSON, or ints over 4300 digits
            if i == last:              # the torn line of a kill mid-append
                continue
            raise UserError(f"{path} line {i + 1} is not JSON; restore the file or delete that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {i + 1} is not a JSON object; restore the file or delete that line")
        out.append(record)
    return out


def iter_jsonl(path: str | os.PathLike):
    """(line number, parsed JSON) for every non-blank line of a user's data file, read strictly: a file that is
    not UTF-8, a line that is not JSON, or a number past Python's 4,300-digit limit is a UserError naming
    file:line (training data is never silently skipped, unlike a torn line of our own metrics)."""
    path = Path(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}); fix or delete that line") from None
            except (ValueError, RecursionError):
                raise UserError(f"{where}: a number of more than 4300 digits or nesting too deep; fix that line") from None
