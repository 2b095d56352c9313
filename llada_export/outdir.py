"""The one place where an output directory (engines, checkpoint) is written.

``atomic_output_dir`` yields a fresh hidden directory beside ``out`` to write into and
moves it to ``out`` in one rename when the with-block succeeds, so ``out`` is either the
old directory or the complete new one, never half of each. It refuses (with a one-line
:class:`OutputDirError` naming the user's path) anything that could lose data:

* an existing file (or symlink to one) at ``out``: never renamed away;
* an existing non-empty directory that ``owned(path)`` does not recognise as written by
  this tool; one it recognises only with ``overwrite``;
* an ``out`` that is, contains or lies inside a ``protect`` path (the source checkpoint),
  compared as real paths and by inode (symlinks, relative spellings, bind mounts);
* a second writer of the same ``out`` while the first is running;
* an ``out`` that is or holds the current directory (the rename would leave the shell in a deleted folder).

Mechanism. ``out`` is resolved to its real path ``P/NAME`` (a symlink to a directory is
followed: the directory it names is replaced, the link stays). Writers of ``P/NAME`` take
an exclusive, non-blocking ``fcntl.flock`` on the sibling lock file ``P/.NAME.lock`` and
keep it until they finish; a second writer fails at once and names the holder's pid
(written into the lock file). There is no tie to break, so two writers started at the same
instant are safe too. The lock file is unlinked by its holder (while still holding it) on
the way out, and a writer that gets the lock checks that the path still names the inode it
locked (else it retries), the usual unlink-safe flock protocol. A killed run (SIGKILL,
power loss) leaves an unlocked lock file and ``P/.NAME.partial-PID-HEX`` (or, killed
between the two renames of a replacement, ``P/.NAME.old-PID-HEX``); the next writer, once
it holds the lock, knows them dead: it removes partials and either restores the old
directory (if ``out`` is missing) or removes it, reporting each through ``warn``.

Replacing an owned directory: ``out`` -> ``.NAME.old-*``, partial -> ``out`` (on failure
the old one is renamed back), then the old one is deleted. The destination is checked
again right before the renames, so a directory that appeared meanwhile is replaced only
where ``overwrite`` and ``owned`` allow it. The renames, setup and cleanup run with SIGINT,
SIGTERM and SIGHUP deferred (re-raised right after); while the with-block runs, SIGTERM and
SIGHUP (the terminal or SSH session closed) raise :class:`Terminated` (a ``KeyboardInterrupt``)
so they clean up exactly like Ctrl-C. A signal the process ignores (``nohup``) stays ignored.

Standard library only: this module is imported by the CLIs before anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["OutputDirError", "Terminated", "atomic_output_dir", "check_output_dir", "files_under", "fix_permissions",
           "refuse_unlisted"]


class OutputDirError(ValueError):
    """A refused output directory; the message says what is wrong and how to fix it, in one
    line, naming the user's path (never an internal temp path)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output directory was being written (handled like Ctrl-C);
    ``signum`` says which (a CLI exits with 128 + it)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = int(signum)


TERMINATING = (signal.SIGTERM, signal.SIGHUP)  # raise Terminated inside the with-block


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` inside the block (main thread only; a signal
    that the process ignores, or whose handler Python did not install, is left alone)."""
    if not _in_main_thread():
        yield
        return
    saved = {sig: h for sig in TERMINATING if (h := signal.getsignal(sig)) is not None and h != signal.SIG_IGN}
    for sig in saved:
        signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP that arrive inside the block are delivered right after it (to
    the handlers in force before it), so a rename pair or a cleanup is never cut in half."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, *TERMINATING):
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue
        saved[sig] = handler
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_permissions(root: str | os.PathLike, *, umask: int | None = None) -> None:
    """Give every directory and regular file under ``root`` (and ``root`` itself) the mode a
    normal one created under the umask has: files ``0o666 & ~umask`` (``0o777 & ~umask`` if
    any execute bit was set), directories ``0o777 & ~umask``. A file a library wrote 0600
    becomes 0644 under umask 022, so another account can read the output. Symlinks are not
    followed. ``umask`` defaults to the process's."""
    mask = _umask() if umask is None else umask
    dir_mode, file_mode, exe_mode = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask

    def fix(path: str) -> bool:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            want = dir_mode
        elif stat.S_ISREG(st.st_mode):
            want = exe_mode if st.st_mode & 0o111 else file_mode
        else:
            return False
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)
        return stat.S_ISDIR(st.st_mode)

    root = os.fspath(root)
    if not fix(root):
        return
    # top-down: a directory is fixed (made readable) before the walk lists it
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            fix(os.path.join(dirpath, entry))


def files_under(root: Path) -> list[str]:
    """Every non-directory under ``root`` (symlinks not followed), as a path relative to it, sorted."""
    return sorted((Path(d) / n).relative_to(root).as_posix() for d, _, names in os.walk(root) for n in names)


def refuse_unlisted(root: Path, listed: set[str], tool: str) -> None:
    """OutputDirError naming the files under ``root`` that ``listed`` (what ``tool`` wrote there) does not
    hold: the user's own, which replacing ``root`` would delete."""
    theirs = [rel for rel in files_under(root) if rel not in listed]
    if theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise OutputDirError(f"{root} holds files {tool} did not write ({shown}); --overwrite would delete "
                             "them: move them out of it, or choose another path")


def _tree_size(path: str) -> int:
    total = 0
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
    except OSError:
        pass
    return total


def _remove(path: str) -> None:
    """Remove a directory tree or a file, as far as possible (also one whose directories
    a library made read-only or unreadable)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            for dirpath, dirnames, _ in os.walk(path):
                for d in [dirpath] + [os.path.join(dirpath, n) for n in dirnames]:
                    with contextlib.suppress(OSError):
                        if not os.path.islink(d):
                            os.chmod(d, 0o700)
            shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _article(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def _default_warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


_HINTS = {
    errno.EACCES: "check the permissions of its parent directory or choose another path",
    errno.EPERM: "check the permissions of its parent directory or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free some space or choose another path",
    errno.EDQUOT: "free some space or choose another path",
}

_ABSENT, _EMPTY, _OWNED = "absent", "empty", "owned"


class _Writer:
    """The state of one ``atomic_output_dir`` call."""

    def __init__(self, out, *, overwrite, owned, protect, what, flag, warn):
        self.shown = os.fspath(out)
        if not self.shown:
            raise OutputDirError(f"the {what} path is empty; pass a directory path")
        self.overwrite, self.owned, self.what, self.flag = overwrite, owned, what, flag
        self.protect = [os.fspath(p) for p in protect]
        self.warn = _default_warn if warn is None else warn
        self.user_abs = os.path.abspath(self.shown)
        self.dest = os.path.realpath(self.user_abs)
        self.parent, self.name = os.path.split(self.dest)
        self.lock_path = os.path.join(self.parent, f".{self.name}.lock")
        self.leftover = re.compile(rf"\.{re.escape(self.name)}\.(partial|old)-\d+-[0-9a-f]{{8}}")
        self.created: list[str] = []  # parent directories this call made, top first
        self.lock_fd: int | None = None
        self.tmp: str | None = None
        self.initial = _ABSENT
        self.early_refusal: OutputDirError | OSError | None = None

    # -- errors ---------------------------------------------------------------------------

    def _fs_error(self, e: OSError, where: str | None = None, extra: str = "") -> OutputDirError:
        where = self.shown if where is None else where
        hint = _HINTS.get(e.errno, "choose another path or fix the cause")
        return OutputDirError(f"cannot write {where}: {e.strerror or e}{extra}; {hint}")

    @contextlib.contextmanager
    def fs_errors(self) -> Iterator[None]:
        """OSErrors of this module's own steps become OutputDirErrors naming ``out``."""
        try:
            yield
        except OSError as e:
            raise self._fs_error(e) from e

    def map_body_error(self, e: OSError) -> OutputDirError | None:
        """An OSError of the with-block about a path inside the temp dir, reworded to name
        the same path under ``out``, or a full disk or quota that a write() reports without a
        path (``[Errno 28] No space left on device`` alone), named as ``out``; None for any
        other OSError (left as it is)."""
        def under_tmp(fn) -> str | None:
            try:
                p = os.path.abspath(os.fsdecode(fn))
            except TypeError:
                return None
            tmp = self.tmp or ""
            if tmp and (p == tmp or p.startswith(tmp + os.sep)):
                rel = os.path.relpath(p, tmp)
                return self.shown if rel == "." else os.path.join(self.shown, rel)
            return None

        if e.filename is not None and (where := under_tmp(e.filename)) is not None:
            return self._fs_error(e, where)
        if e.filename2 is not None and (where := under_tmp(e.filename2)) is not None:
            return self._fs_error(e, where, f" ({e.filename})")
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write() names no file
            return self._fs_error(e, extra=" while it was being written")
        return None

    # -- checks ---------------------------------------------------------------------------

    def check_protect(self) -> None:
        dest = Path(self.dest)
        dest_ids = _ids_of_ancestors(self.dest)  # (dev, ino) of dest's existing parents
        dest_id = _id(self.dest)
        for shown_p in self.protect:
            if not shown_p:
                continue
            real = Path(os.path.realpath(os.path.abspath(shown_p)))
            p_id = _id(str(real))
            rel = None
            if real == dest or (p_id is not None and p_id == dest_id):
                rel = "is"
            elif real.is_relative_to(dest) or (dest_id is not None and dest_id in _ids_of_ancestors(str(real))):
                rel = "contains"
            elif dest.is_relative_to(real) or (p_id is not None and p_id in dest_ids):
                rel = "lies inside"
            if rel == "is" and str(self.shown) == str(shown_p):
                raise OutputDirError(f"{self.shown} is an input of this run (it must not be modified); "
                                     f"choose another path for the {self.what}")
            if rel is not None:
                raise OutputDirError(f"{self.shown} {rel} {shown_p}, which must not be modified; "
                                     f"choose another path for the {self.what}")

    def check_cwd(self) -> None:
        """Refuse a destination that is or holds the current directory: the rename that puts the new one in
        place leaves the process (and the user's shell) in a deleted folder, where ``.`` no longer names it."""
        try:
            cwd = Path(os.path.realpath(os.getcwd()))
        except OSError:
            return
        if cwd.is_relative_to(self.dest):
            what = "is" if cwd == Path(self.dest) else "holds"
            raise OutputDirError(f"{self.shown} {what} the current directory: writing the {self.what} replaces it, "
                                 f"which would leave this shell in a deleted folder; cd out of it (e.g. cd "
                                 f"{os.path.dirname(self.dest) or '/'}) and pass its path from there")

    def dest_state(self, late: bool = False) -> str:
        """absent, empty or owned (replace it); anything else is refused."""
        try:
            st = os.lstat(self.dest)
        except FileNotFoundError:
            return _ABSENT
        when = " (it appeared while this run was writing)" if late and self.initial == _ABSENT else ""
        if stat.S_ISLNK(st.st_mode):
            raise OutputDirError(f"{self.shown} is a symbolic link{when}; remove it or choose another path")
        if not stat.S_ISDIR(st.st_mode):
            raise OutputDirError(f"{self.shown} exists and is not a directory{when}; "
                                 f"remove it or choose another path")
        with os.scandir(self.dest) as it:
            if next(it, None) is None:
                return _EMPTY
        if not self.owned(Path(self.dest)):
            raise OutputDirError(f"{self.shown} is not {_article(self.what)} written by this tool and "
                                 f"will not be replaced{when}; choose another path")
        if not self.overwrite:
            raise OutputDirError(f"{self.shown} already holds {_article(self.what)}{when}; "
                                 f"pass {self.flag} to replace it, or choose another path")
        return _OWNED

    def check(self) -> None:
        """What can be refused before anything is created. The destination's own state is
        only looked at here, not judged: another writer may be between its two renames, so
        a refusal waits until the lock is held (or could not be taken)."""
        if not self.name or self.name in (".", ".."):
            raise OutputDirError(f"{self.shown} cannot be used as {_article(self.what)}; choose another path")
        if os.path.islink(self.user_abs) and not os.path.exists(self.user_abs):
            raise OutputDirError(f"{self.shown} is a symbolic link to a missing path; "
                                 f"remove it or choose another path")
        self.check_protect()
        self.check_cwd()
        try:
            self.initial = self.dest_state()
        except (OutputDirError, OSError) as e:
            self.early_refusal = e

    # -- steps ----------------------------------------------------------------------------

    def make_parents(self) -> None:
        missing = []
        p = self.parent
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue  # made by another process meanwhile (or a file: the next step says)
            self.created.append(d)

    def lock(self) -> None:
        while True:
            writable = True
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except PermissionError as e:
                try:  # perhaps the lock file of another user's dead run: replace it below
                    fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    raise e from None
                writable = False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _holder_pid(fd)
                    who = f"another process (pid {pid})" if pid else "another process"
                    raise OutputDirError(f"{who} is writing {self.shown}; wait for it or choose another path") from None
                st = os.fstat(fd)
                try:
                    cur = os.stat(self.lock_path)
                except FileNotFoundError:
                    cur = None
                if cur is None or (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # its holder unlinked it after we opened it: try again
                    continue
                if not writable:  # a dead run's, since we hold it: put our own in its place
                    os.unlink(self.lock_path)
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self.lock_fd = fd
            return

    def unlock(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is None:
            return
        try:
            st, cur = os.fstat(fd), os.stat(self.lock_path)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(self.lock_path)  # while still holding it (see lock())
        except OSError:
            pass
        finally:
            os.close(fd)

    def remove_dead_runs(self) -> None:
        """With the lock held, every partial or old sibling belongs to a run that died."""
        with os.scandir(self.parent) as it:
            found = sorted((m.group(1), e.name) for e in it if (m := self.leftover.fullmatch(e.name)))
        olds = [n for kind, n in found if kind == "old"]
        for n in (n for kind, n in found if kind == "partial"):
            path = os.path.join(self.parent, n)
            size = _tree_size(path)
            _remove(path)
            if os.path.lexists(path):
                self.warn(f"could not remove a partial output of an earlier run that died: {path} "
                          f"({size / 1e6:.1f} MB); remove it by hand")
            else:
                self.warn(f"removed a partial output of an earlier run that died: {path} ({size / 1e6:.1f} MB)")
        olds.sort(key=lambda n: _mtime(os.path.join(self.parent, n)), reverse=True)
        for n in olds:
            path = os.path.join(self.parent, n)
            if not os.path.lexists(self.dest) and os.path.isdir(path) and not os.path.islink(path):
                os.rename(path, self.dest)
                self.warn(f"restored {self.shown}, which an earlier run had moved aside to {path} before it died")
            else:
                size = _tree_size(path)
                _remove(path)
                self.warn(f"removed the previous output that an earlier run had replaced before it died: "
                          f"{path} ({size / 1e6:.1f} MB)")

    def setup(self) -> None:
        try:
            self.make_parents()
            self.lock()
        except OSError:
            if self.early_refusal is not None:  # e.g. a file at out in a read-only directory
                raise self.early_refusal from None
            raise
        self.remove_dead_runs()
        self.initial = self.dest_state()  # authoritative now that the lock is held
        tmp = os.path.join(self.parent, f".{self.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        self.tmp = tmp
        os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp (0700)

    def commit(self) -> None:
        assert self.tmp is not None
        fix_permissions(self.tmp)
        state = self.dest_state(late=True)
        if state == _OWNED:
            old = os.path.join(self.parent, f".{self.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(self.dest, old)
            try:
                os.rename(self.tmp, self.dest)
            except BaseException:
                os.rename(old, self.dest)
                raise
            self.tmp = None
            _remove(old)
            if os.path.lexists(old):
                self.warn(f"could not remove the previous {self.what}, moved aside to {old}; remove it by hand")
            return
        try:
            os.rename(self.tmp, self.dest)  # atomically replaces an empty directory too
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputDirError(f"{self.shown} appeared while this run was writing it and was left "
                                     f"alone; remove it or choose another path") from e
            raise
        self.tmp = None

    def cleanup(self, ok: bool) -> None:
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None
        self.unlock()
        if not ok:
            for d in reversed(self.created):
                try:
                    os.rmdir(d)
                except OSError:
                    break


def _id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ids_of_ancestors(path: str) -> set[tuple[int, int]]:
    """(dev, ino) of the existing directories among ``path``'s parents (not ``path``)."""
    ids = set()
    p = os.path.dirname(path)
    while True:
        i = _id(p)
        if i is not None:
            ids.add(i)
        up = os.path.dirname(p)
        if up == p:
            return ids
        p = up


def _mtime(path: str) -> int:
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return 0


def _holder_pid(fd: int) -> int | None:
    """The pid the lock's holder wrote into it (it may be writing it this very moment)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.005)
    return None


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    owned: Callable[[Path], bool],
    protect: Sequence[str | os.PathLike] = (),
    what: str = "output directory",
    flag: str = "--overwrite",
    warn: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out`` (same filesystem) to write into;
    when the with-block finishes without an exception, move it to ``out`` atomically.

    * ``out`` must be absent, an empty directory, or (with ``overwrite``) a directory for
      which ``owned(path)`` is true (``path`` is its real path); anything else, a file or a
      symlink to one included, is refused with :class:`OutputDirError` and left untouched.
      ``flag`` names the option to suggest (``--overwrite``, ``overwrite=True``) and
      ``what`` the kind of directory (``engines directory``) in the messages.
    * ``protect``: paths (the model being read) that ``out`` may not be, contain or lie in.
    * Missing parent directories are created, and removed again if the run fails.
    * Another process writing the same ``out`` makes this call fail at once; a dead run's
      leftovers are removed (or its moved-aside old directory restored) and reported
      through ``warn`` (default: one line on stderr).
    * On any exception (``KeyboardInterrupt``, :class:`Terminated` from SIGTERM, which is
      raised while the block runs in the main thread) the temp dir is removed and the
      exception propagates; an OSError about a path in the temp dir is re-raised as an
      OutputDirError naming the same path under ``out``.
    * Before the move, permissions are normalised to the umask's (:func:`fix_permissions`).
    """
    w = _Writer(out, overwrite=overwrite, owned=owned, protect=protect, what=what, flag=flag, warn=warn)
    with _sigterm_raises():
        ok = False
        try:
            with _signals_deferred(), w.fs_errors():
                w.check()
                w.setup()
            assert w.tmp is not None
            try:
                yield Path(w.tmp)
            except OSError as e:
                mapped = w.map_body_error(e)
                if mapped is None:
                    raise
                raise mapped from e
            with _signals_deferred(), w.fs_errors():
                w.commit()
            ok = True
        finally:
            with _signals_deferred():
                w.cleanup(ok)


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    owned: Callable[[Path], bool],
    protect: Sequence[str | os.PathLike] = (),
    what: str = "output directory",
    flag: str = "--overwrite",
) -> None:
    """The refusals of :func:`atomic_output_dir` that can be told before any work, without
    touching the filesystem (a preflight: the real decision is made again under the lock)."""
    w = _Writer(out, overwrite=overwrite, owned=owned, protect=protect, what=what, flag=flag, warn=None)
    with w.fs_errors():
        w.check()
        if isinstance(w.early_refusal, OutputDirError):
            raise w.early_refusal
