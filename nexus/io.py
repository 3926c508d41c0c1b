"""Atomic writes (every artifact appears whole or not at all: temp file + rename), output locks, and
the checks that keep an output off the inputs it is made from.

A temporary's name carries its writer's pid and host (``.NAME.XXXX.pid<pid>@<host>.tmp``), so that
one a killed process left behind is removed by the next write into the same directory on that host.
A write that fails for lack of room (a full disk, a quota, a file-size limit) raises
:class:`~nexus.errors.OutputWriteError` naming the file and the errno; the temporary is removed and
whatever the output held before is kept.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nexus.errors import NexusError, OutputLockedError, OutputWriteError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so that it is never changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- failed writes -------------------------------------------------------------------------------------------------

NO_ROOM = (errnos.ENOSPC, errnos.EFBIG, errnos.EDQUOT)  # the errnos of a write that found no room
_ERRNO_IN_TEXT = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)


def no_room_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it is a write that found no room (:data:`NO_ROOM`), else None.

    Looks at ``OSError.errno``, then at the text (safetensors' ``SafetensorError`` says ``(os error
    27)``, pyarrow ``[errno 27]``), then at the exception's cause and context.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            return exc.errno
        for match in _ERRNO_IN_TEXT.finditer(str(exc)):
            if int(match.group(1)) in NO_ROOM:
                return int(match.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _newest_file(directory: Path) -> Path | None:
    """The most recently modified file under ``directory`` (the one a failed write was writing)."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def _no_room_error(exc: BaseException, path: Path, tmp: Path) -> OutputWriteError | None:
    """``exc`` as an :class:`OutputWriteError` about ``path`` (a file or directory being written
    through the temporary ``tmp``), with temporary names mapped to final ones; None when ``exc``
    is not a write that found no room."""
    code = exc.errno if isinstance(exc, OutputWriteError) else no_room_errno(exc)
    if code is None:
        return None
    file = getattr(exc, "path", None) or getattr(exc, "filename", None)
    if file is None and tmp.is_dir():
        file = _newest_file(tmp)
    file = Path(file) if file is not None else tmp
    try:
        file = path / file.relative_to(tmp) if file != tmp else path
    except ValueError:  # a file outside the temporary: name it as it is
        pass
    return OutputWriteError(file, code)


# --- temporaries ---------------------------------------------------------------------------------------------------

_TEMPORARY = re.compile(r"^\..+\.pid(\d+)@([A-Za-z0-9_-]+)\.tmp$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


def _temporary_suffix() -> str:
    return f".pid{os.getpid()}@{_host_tag()}.tmp"


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``directory`` left by processes of this host that no longer run.

    Temporaries of live processes, of other hosts, and of this process are never touched.

    :return: what was removed.
    """
    removed = []
    host, me = _host_tag(), os.getpid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match.group(2) != host or int(match.group(1)) == me or _pid_alive(int(match.group(1))):
            continue
        path = Path(entry.path)
        try:
            shutil.rmtree(path) if entry.is_dir(follow_symlinks=False) else path.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as exc:
            log.warning("could not remove %s, left by process %s: %s", path, match.group(1), exc.strerror)
            continue
        log.info("removed %s, left behind by process %s, which no longer runs", path, match.group(1))
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    :raises OutputWriteError: the block failed for lack of room (the file and errno named).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_temporary_suffix(), dir=path.parent)
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}; choose a writable output location") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 and some writers (safetensors) replace the file with their own 0600 one:
        # the artifact gets the user's usual mode
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as exc:
        error = _no_room_error(exc, path, Path(tmp))
        if error is None:
            raise
        raise error from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save ``tensors`` (contiguous copies) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes the metadata keys in a random order (a hash map), so two writes of the same
    tensors and metadata would differ in bytes; sorted, an artifact depends on its content only. The
    header keeps its length (same entries, same compact JSON), so the tensor data is untouched.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # not the compact JSON safetensors writes: leave the file as it is
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


class _WriteRecorder:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write (torch reports
    only "unexpected pos", losing the errno)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        return self.file.flush()


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically; a write that found no room raises :class:`OutputWriteError`."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        recorder = _WriteRecorder(file)
        try:
            torch.save(obj, recorder)
        except RuntimeError as exc:
            if recorder.error is not None:
                raise recorder.error from exc
            raise


def _restore_interrupted_replacement(path: Path, old: Path) -> None:
    """Put back ``path`` from ``old`` when a process was killed between moving the previous output
    aside and moving the new one in (the new one was never complete as far as anyone knew); drop a
    leftover ``old`` whose replacement finished."""
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)
        log.warning("restored %s, which an interrupted replacement had moved aside to %s", path, old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    :raises OutputWriteError: the block failed for lack of room (the file and errno named).
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        _restore_interrupted_replacement(path, old)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_temporary_suffix(), dir=path.parent))
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}; choose a writable output location") from exc
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as exc:
        error = _no_room_error(exc, path, tmp)
        if error is None:
            raise
        raise error from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output directory or file: ``.<name>.lock`` beside it (so that replacing
    the output atomically, or clearing it with ``--overwrite``, leaves the lock in place)."""
    output = Path(output).expanduser().absolute()
    return output.parent / f".{output.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(path: Path) -> tuple[int | None, str]:
    try:
        holder = json.loads(path.read_text())
        return int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, enabled: bool = True):
    """Hold the lock of ``output`` (a directory or file a stage writes) for the duration of the block.

    The lock is a file created with ``O_CREAT | O_EXCL`` holding this process's pid and host. A lock
    left by a process that no longer runs on this host is taken over with a warning. Nested use on
    the same output in one process is allowed. Under a launcher, only the main process should lock
    (``enabled=False`` elsewhere).

    :raises OutputLockedError: a live process (or one on another host) holds the lock.
    :raises NexusError: the lock cannot be written (the output location is not writable).
    """
    if not enabled:
        yield None
        return
    path = lock_path(output)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    host = socket.gethostname()
    created = []  # directories made here for the lock, removed again when the stage left them empty
    missing = path.parent
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NexusError(f"cannot write {output}: {exc.strerror}; choose a writable output location") from exc
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, holder_host = _read_holder(path)
            if pid is not None and holder_host == host and not _pid_alive(pid):
                log.warning("taking over the stale lock %s of process %d, which no longer runs", path, pid)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            who = f"process {pid} on host {holder_host}" if pid is not None else "another process"
            raise OutputLockedError(
                f"{output} is in use by {who} (lock file {path}); wait for it to finish, or delete the lock file "
                f"if that process is gone"
            ) from None
        except OSError as exc:
            raise NexusError(f"cannot write {output}: {exc.strerror}; choose a writable output location") from exc
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": host}) + "\n")
        break
    else:
        raise OutputLockedError(f"could not take the lock {path} of {output}; another process keeps taking it")
    _HELD[path] = 1
    try:
        yield path
    finally:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty


def check_writable_output(path: str | os.PathLike, directory: bool, what: str = "--output") -> Path:
    """Refuse, before any work, an output location that cannot be written.

    :param path: where a command will write (it may not exist yet).
    :param directory: whether the output is a directory (else a file).
    :param what: how the user named it, for the message (``--output``, ``RUN_DIR/plots``...).
    :return: ``path`` with ``~`` expanded.
    :raises NexusError: ``path`` is a file where a directory is needed (or the reverse), a file
        stands where a parent directory should be, or the nearest existing directory is not writable.
    """
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != directory:
        kind, need = ("a file", "a directory") if directory else ("a directory", "a file path")
        raise NexusError(f"{what} {path} is {kind}; give {need}")
    existing = path if path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NexusError(f"cannot write {what} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise NexusError(
            f"cannot write {what} {path}: {existing} is not writable ({exc.strerror}); choose a writable location"
        ) from exc
    return path


INPUT_NAMES = {
    "--model": "the base model", "--adapter": "the adapter", "--selection": "the selection",
    "--stats": "the router statistics", "--data": "the data", "--kd-data": "the distillation data",
    "--eval-data": "the evaluation data", "--teacher": "the teacher", "--tokenizer": "the tokenizer",
}
"""What :func:`refuse_output_over_inputs` calls each input flag in its messages."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same(a: Path, b: Path) -> bool:
    """Whether two resolved paths name the same file (also through hard links and bind mounts)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def refuse_output_over_inputs(output: str | os.PathLike | None, inputs: dict[str, str | os.PathLike | list | None],
                              flag: str = "--output") -> None:
    """Refuse an output that would write over or into what a stage reads, even with ``--overwrite``.

    Paths are compared resolved (``~``, ``..``, symlinks, relative or absolute, hard links). An
    output is refused when it is an input, contains one (replacing or clearing it would delete the
    input), or lies inside an input directory (it would change the input). Call it before any
    work and before anything is deleted.

    :param output: the file or directory the stage writes (None: nothing to check).
    :param inputs: how the user named each input (``--model``...) -> its path, or a list of paths
        (the files of one input); None entries (an input not given, ``self``, a dataset name) are
        skipped. Flags of :data:`INPUT_NAMES` are named by what they hold; any other key is used as
        the name as it is.
    :param flag: how the user named the output, for the message.
    :raises NexusError: naming the output, the input and its flag.
    """
    if output is None:
        return
    out = _resolved(output)
    named = [(name, one) for name, given in inputs.items()
             for one in (given if isinstance(given, (list, tuple)) else [given]) if one is not None]
    for name, given in named:
        path = _resolved(given)
        if _same(out, path):
            relation = "is"
        elif any(_same(out, parent) for parent in path.parents):
            relation = "contains"
        elif any(_same(parent, path) for parent in out.parents):
            relation = "lies inside"
        else:
            continue
        what = f"{INPUT_NAMES[name]} ({name} {given})" if name in INPUT_NAMES else f"{name} ({given})"
        raise NexusError(f"{flag} {output} {relation} {what}; a stage never writes over or into what it reads, "
                         f"even with --overwrite: choose another {flag}")


def local_data_path(data: str | os.PathLike | None) -> Path | None:
    """The local file or directory a data argument reads (``DATA``, ``DATA@train``...), for
    :func:`refuse_output_over_inputs`; None without data or for a dataset name (nothing local)."""
    if data is None:
        return None
    from nexus.data_sources import parse_source

    try:
        source = parse_source(data)
    except NexusError:  # a path that does not exist: the stage reports it where it reads the data
        return None
    return source.path if source.local else None


def locks_output(argument: str = "output", subpath: str | None = None, before=None):
    """Decorator: hold :func:`output_lock` on the function's ``argument`` (joined with ``subpath``)
    while it runs; nothing is locked when that argument is None.

    :param argument: the name of the parameter holding the output directory or file, or
        ``parameter.attribute`` (e.g. ``config.output``).
    :param subpath: what the function writes under that path (e.g. ``plots`` under a run directory).
    :param before: ``check(arguments)``, called before the lock is taken (so that it refuses before
        anything is written, the lock file included) with the function's arguments as a dict,
        defaults filled in.
    """
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            if before is not None:
                bound.apply_defaults()
                before(dict(bound.arguments))
            name, _, attribute = argument.partition(".")
            target = bound.arguments.get(name)
            if attribute and target is not None:
                target = getattr(target, attribute)
            if target is None:
                return fn(*args, **kwargs)
            with output_lock(Path(target, subpath) if subpath else target):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
