"""Writing outputs safely, for every command: whole or not at all, one run per output, nothing
left behind when stopped.

- An output is written into a hidden folder beside it (`.NAME.partial-*`), fsynced and renamed
  into place only when complete; an error or an interruption removes the folder.
- While a run writes an output it holds an advisory lock (`flock` on `.NAME.lock` beside it), so
  a second run to the same output stops at once with a clear error. The kernel drops the lock
  when the process dies, however it dies, so a lock is never stale.
- The partial folder records its owner (pid, boot id, process start time). Folders whose owner
  is gone (SIGKILL, a power cut) are removed by the next run to that output, which reports the
  bytes reclaimed through the `on_stale` callback of its `command_scope`.
- Inside `command_scope`, SIGINT, SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt)
  in the main thread, so the same `finally` blocks that undo an error undo a `kill` or a closed
  terminal. Renaming outputs into place and removing partial folders are never cut in half: a
  signal arriving then is raised when they are done.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:       # not POSIX: no locks, the owner records still guard partial folders
    fcntl = None

from nemoq.errors import NemoqError

OWNER = ".nemoq-owner"    # inside a partial folder: "pid boot-id start-time" of the run writing it
FREE_MARGIN = 64 * 1024 * 1024
RESEND_DELAY = 0.02       # seconds; see _on_unraisable
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal turned into an exception; the CLI exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------------------------
# a command's scope: signals as exceptions, and what the CLI is told


@dataclass
class Scope:
    on_stale: Callable[[Path, int, int], None] | None = None   # (output, folders removed, bytes)
    written: list[Path] = field(default_factory=list)          # outputs renamed into place so far
    raised: int | None = None          # the signal already raised; later ones are ignored
    pending: int | None = None         # a signal that arrived while deferred
    deferring: int = 0


_scope: Scope | None = None


@contextmanager
def command_scope(on_stale: Callable[[Path, int, int], None] | None = None) -> Iterator[Scope]:
    """Run a command: stop signals raise Interrupted (main thread only; the previous handlers are
    restored after), stale partial folders removed on the way are reported to `on_stale`."""
    global _scope
    scope, previous_scope = Scope(on_stale), _scope
    handlers, previous_hook = {}, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:   # nohup and background jobs stay immune
                handlers[s] = signal.signal(s, _on_signal)
        sys.unraisablehook = functools.partial(_on_unraisable, previous_hook)
    _scope = scope
    try:
        yield scope
    finally:
        _scope = previous_scope
        for s, handler in handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if handlers:
            sys.unraisablehook = previous_hook


def _on_signal(signum: int, frame) -> None:
    scope = _scope
    if scope is None:
        raise Interrupted(signum)
    if scope.raised is not None:    # cleaning up after the first one: let it finish
        return
    if scope.deferring:
        scope.pending = scope.pending or signum
        return
    scope.raised = signum
    raise Interrupted(signum)


def _on_unraisable(previous_hook, unraisable) -> None:
    # A signal handled while C code calls back into Python (llama.cpp's log callback, through
    # ctypes) raises where nobody can catch it: ctypes prints and drops the exception. Send the
    # signal again a moment later, when this hook has returned; it is raised once Python runs
    # outside a callback.
    scope, e = _scope, unraisable.exc_value
    if scope is not None and isinstance(e, Interrupted) and scope.raised == e.signum:
        scope.raised = None
        again = threading.Timer(RESEND_DELAY, os.kill, (os.getpid(), e.signum))
        again.daemon = True
        again.start()
        return
    previous_hook(unraisable)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """A stop signal arriving inside is raised on the way out, so the block runs to its end."""
    scope = _scope
    if scope is None:
        yield
        return
    scope.deferring += 1
    try:
        yield
    finally:
        scope.deferring -= 1
        if not scope.deferring and scope.pending is not None and scope.raised is None:
            scope.raised, scope.pending = scope.pending, None
            raise Interrupted(scope.raised)


# --------------------------------------------------------------------------------------------
# checks before writing


def refuse_to_clobber(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if p.exists():
            raise NemoqError("output already exists; pass --force to overwrite it", p)


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed + FREE_MARGIN > free:
        raise NemoqError(f"not enough free disk space: need {needed / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB free", directory)


# --------------------------------------------------------------------------------------------
# who owns a partial folder


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "-"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "-": with the pid and the
    boot id it names one process, even once its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return stat.rsplit(")", 1)[1].split()[19]   # field 22; fields 1-2 end at the ")" of the name


def _owner_record() -> str:
    return f"{os.getpid()} {_boot_id()} {_start_time(os.getpid())}\n"


def _owner_alive(folder: Path, locked: bool) -> bool:
    try:
        pid_text, boot, start = (folder / OWNER).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        # Its run died before writing the record (or was an older nemoq) - or, where nothing
        # could be locked, is about to write it.
        return not locked
    if boot != _boot_id():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass           # alive, another user's
    return start == "-" or _start_time(pid) in ("-", start)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_stale_partials(out: Path, locked: bool) -> tuple[int, int]:
    """Remove the partial folders of `out` whose run is gone; returns (folders, bytes) removed.
    `locked`: the caller holds `out`'s lock, so no live run can be starting one of them."""
    prefix = f".{out.name}.partial-"
    folders = nbytes = 0
    with os.scandir(out.parent) as entries:
        stale = [Path(e.path) for e in entries
                 if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False) and not _owner_alive(Path(e.path), locked)]
    for folder in stale:
        size = _tree_bytes(folder)
        with _signals_deferred():
            shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            folders, nbytes = folders + 1, nbytes + size
    return folders, nbytes


# --------------------------------------------------------------------------------------------
# one run per output


@dataclass
class _Lock:
    path: Path
    fd: int | None
    count: int = 1


_held: dict[Path, _Lock] = {}


def _lock(out: Path) -> _Lock:
    path = out.parent / f".{out.name}.lock"
    if fcntl is None:
        return _Lock(path, None)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise NemoqError(f"cannot write in this folder ({e.strerror})", out.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise NemoqError(f"another nemoq run{who} is writing this output; wait for it to finish "
                             f"or choose another output name", out) from None
        except OSError:          # a filesystem without flock: go on unlocked
            os.close(fd)
            with suppress(OSError):
                os.unlink(path)
            return _Lock(path, None)
        try:   # the previous holder unlinks the file as it lets go: lock the one at the path
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return _Lock(path, fd)


def _unlock(lock: _Lock) -> None:
    if lock.fd is None:
        return
    with suppress(OSError):
        os.unlink(lock.path)     # while still holding it: see _lock
    os.close(lock.fd)


@contextmanager
def claim_output(out: Path, force: bool) -> Iterator[Path]:
    """Hold `out` for this run (re-entrant): refuse an existing output without `force` and an
    output another run is writing, and remove the partial folders that dead runs left beside it.
    Commands that work long before writing claim their outputs first."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise NemoqError("output folder does not exist", out.parent)
    refuse_to_clobber([out], force)
    lock = _held.get(out)
    if lock is not None:
        lock.count += 1
    else:
        lock = _held[out] = _lock(out)
        try:
            folders, nbytes = remove_stale_partials(out, locked=lock.fd is not None)
        except BaseException:
            del _held[out]
            _unlock(lock)
            raise
        if folders and _scope is not None and _scope.on_stale is not None:
            _scope.on_stale(out, folders, nbytes)
    try:
        yield out
    finally:
        lock.count -= 1
        if not lock.count:
            del _held[out]
            with _signals_deferred():
                _unlock(lock)


@contextmanager
def claim_outputs(paths: Iterable[Path], force: bool) -> Iterator[None]:
    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(claim_output(p, force))
        yield


# --------------------------------------------------------------------------------------------
# atomic outputs


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_outputs(out: Path, force: bool, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary path standing for `out`; every file written beside it is renamed next to
    `out` once the block completes, and deleted if it does not. `needed`: bytes to check free
    (after stale partial folders are reclaimed)."""
    with claim_output(out, force) as out:
        if needed:
            check_free_space(out.parent, needed)
        tmp_dir: Path | None = None
        try:
            with _signals_deferred():   # a signal the moment the folder exists still finds it to remove
                tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
            (tmp_dir / OWNER).write_text(_owner_record())
            yield tmp_dir / out.name
            produced = sorted(p for p in tmp_dir.iterdir() if p.name != OWNER)
            refuse_to_clobber([out.parent / p.name for p in produced], force)
            for p in produced:
                _fsync(p)
            with _signals_deferred():
                for p in produced:
                    os.replace(p, out.parent / p.name)
                    if _scope is not None:
                        _scope.written.append(out.parent / p.name)
                _fsync(out.parent)
        finally:
            if tmp_dir is not None:
                with _signals_deferred():
                    shutil.rmtree(tmp_dir, ignore_errors=True)
