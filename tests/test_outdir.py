"""atomic_output_dir: real files, real processes, real signals (no mocks).

Child processes load llada_export/outdir.py by its path (standard library only), so each
starts in tens of milliseconds instead of importing the whole package.
"""

from __future__ import annotations

import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llada_export import outdir
from llada_export.outdir import OutputDirError, Terminated, atomic_output_dir, fix_permissions

OUTDIR_PY = Path(outdir.__file__).resolve()

PRELUDE = f"""
import importlib.util, os, sys, time, signal
from pathlib import Path
_spec = importlib.util.spec_from_file_location("outdir", {str(OUTDIR_PY)!r})
outdir = importlib.util.module_from_spec(_spec)
sys.modules["outdir"] = outdir
_spec.loader.exec_module(outdir)

def owned(p):
    return (p / "manifest.json").is_file()
"""

# argv: out, tag, nbytes. Prints "ready", waits for a line (the barrier), enters the
# with-block, writes, prints "inside", waits for a line, then finishes.
WRITER = """
out, tag, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
try:
    with outdir.atomic_output_dir(out, overwrite=True, owned=owned, what="engines directory") as tmp:
        (tmp / "manifest.json").write_text(tag)
        (tmp / "big.bin").write_bytes(b"x" * nbytes)
        print("inside", flush=True)
        sys.stdin.readline()
except outdir.OutputDirError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt as e:
    print(f"interrupted {type(e).__name__}", flush=True)
    sys.exit(130)
print("done", flush=True)
"""


class Child:
    """A Python child process whose stdout lines can be awaited with a timeout."""

    def __init__(self, code: str, *args: str | os.PathLike):
        self.p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_line(self, word: str, timeout: float = 10.0) -> bool:
        """True once a stdout line equal to ``word`` arrived; False if stdout closed first."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while word not in self.lines:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.pid} did not print {word!r} in {timeout} s: {self.lines}")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            self.buf += chunk
            *done, self.buf = self.buf.split(b"\n")
            self.lines += [d.decode() for d in done]
        return True

    def send(self, line: str = "go") -> None:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def finish(self, timeout: float = 10.0) -> tuple[int, str, str]:
        out, err = self.p.communicate(timeout=timeout)
        self.lines += [ln for ln in (self.buf + out).decode().split("\n") if ln]
        self.buf = b""
        return self.p.returncode, "\n".join(self.lines), err.decode()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


@pytest.fixture
def spawn():
    children: list[Child] = []

    def make(code: str, *args) -> Child:
        c = Child(code, *args)
        children.append(c)
        return c

    yield make
    for c in children:
        c.kill()


def owned(p: Path) -> bool:
    return (p / "manifest.json").is_file()


def make_owned(path: Path, tag: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(tag)
    (path / "old.bin").write_bytes(b"o" * 10)
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden siblings of ``parent/name`` that a run may create (.name.partial-*, .name.old-*,
    .name.lock)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def check_message(e: BaseException, shown: str, *parts: str) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    assert shown in msg, msg
    assert ".partial" not in msg and ".old-" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def write(out, **kw) -> Path:
    kw.setdefault("owned", owned)
    kw.setdefault("overwrite", False)
    with atomic_output_dir(out, **kw) as tmp:
        (tmp / "manifest.json").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a" * 100)
    return Path(out)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- success and overwrite ------------------------------------------------------------------------

def test_success_moves_contents_and_leaves_nothing(tmp_path):
    out = tmp_path / "eng"
    with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and tmp != out
        assert not out.exists()
        (tmp / "manifest.json").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a" * 100)
    assert tree(out) == {"manifest.json": b"new", "sub/a.bin": b"a" * 100}
    assert not tmp.exists()
    assert leftovers(tmp_path, "eng") == []
    assert sorted(os.listdir(tmp_path)) == ["eng"]


def test_overwrite_replaces_an_owned_dir(tmp_path):
    out = make_owned(tmp_path / "eng")
    write(out, overwrite=True)
    assert tree(out) == {"manifest.json": b"new", "sub/a.bin": b"a" * 100}
    assert leftovers(tmp_path, "eng") == []


@pytest.mark.parametrize("flag", ["--overwrite", "overwrite=True"])
def test_owned_dir_without_overwrite_is_refused(tmp_path, flag):
    out = make_owned(tmp_path / "eng")
    before = tree(out)
    with pytest.raises(OutputDirError) as ei:
        write(out, flag=flag, what="engines directory")
    check_message(ei.value, str(out), f"pass {flag}", "engines directory")
    assert tree(out) == before
    assert leftovers(tmp_path, "eng") == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_not_owned_dir_is_never_replaced(tmp_path, overwrite):
    out = tmp_path / "stuff"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputDirError) as ei:
        write(out, overwrite=overwrite, what="engines directory")
    msg = check_message(ei.value, str(out), "is not an engines directory written by this tool",
                        "will not be replaced", "choose another path")
    assert "--overwrite" not in msg
    assert tree(out) == {"notes.txt": b"precious"}
    assert leftovers(tmp_path, "stuff") == []


def test_empty_dir_is_used_without_overwrite(tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    write(out)
    assert tree(out)["manifest.json"] == b"new"
    assert leftovers(tmp_path, "eng") == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_at_out_is_always_refused(tmp_path, overwrite, kind):
    target = tmp_path / "data.txt"
    target.write_text("keep me")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me too")
    else:
        out.symlink_to(target)
    with pytest.raises(OutputDirError) as ei:
        write(out, overwrite=overwrite, owned=lambda p: True)
    check_message(ei.value, str(out), "not a directory")
    assert out.read_text() in ("keep me too", "keep me") and target.read_text() == "keep me"
    assert out.is_symlink() == (kind == "symlink")
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "data.txt") == []
    assert not any(".old" in n or ".partial" in n for n in os.listdir(tmp_path))


def test_dangling_symlink_is_refused(tmp_path):
    out = tmp_path / "eng"
    out.symlink_to(tmp_path / "missing")
    with pytest.raises(OutputDirError) as ei:
        write(out, overwrite=True)
    check_message(ei.value, str(out), "symbolic link to a missing path")
    assert out.is_symlink() and not (tmp_path / "missing").exists()


def test_symlink_to_owned_dir_replaces_the_target_and_keeps_the_link(tmp_path):
    real = make_owned(tmp_path / "real")
    link = tmp_path / "eng"
    link.symlink_to(real)
    write(link, overwrite=True)
    assert link.is_symlink() and tree(real)["manifest.json"] == b"new"
    assert leftovers(tmp_path, "real") == [] and leftovers(tmp_path, "eng") == []


def test_body_exception_removes_partial_and_keeps_old(tmp_path):
    out = make_owned(tmp_path / "eng")
    before = tree(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, overwrite=True, owned=owned) as tmp:
            (tmp / "manifest.json").write_text("new")
            raise RuntimeError("boom")
    assert tree(out) == before
    assert not tmp.exists() and leftovers(tmp_path, "eng") == []


def test_body_exception_without_old_creates_nothing(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# -- the destination changing during the run ------------------------------------------------------

def test_not_owned_dir_appearing_during_the_run_is_left_alone(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(OutputDirError) as ei:
        with atomic_output_dir(out, overwrite=True, owned=owned) as tmp:
            (tmp / "manifest.json").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    check_message(ei.value, str(out), "appeared while this run was writing")
    assert tree(out) == {"theirs.txt": b"theirs"}
    assert leftovers(tmp_path, "eng") == []


def test_file_appearing_during_the_run_is_left_alone(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(OutputDirError) as ei:
        with atomic_output_dir(out, overwrite=True, owned=lambda p: True) as tmp:
            (tmp / "manifest.json").write_text("new")
            out.write_text("theirs")
    check_message(ei.value, str(out), "appeared while this run was writing")
    assert out.read_text() == "theirs" and leftovers(tmp_path, "eng") == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_owned_dir_appearing_during_the_run_needs_overwrite(tmp_path, overwrite):
    out = tmp_path / "eng"
    with pytest.raises(OutputDirError) if not overwrite else _nothing():
        with atomic_output_dir(out, overwrite=overwrite, owned=owned) as tmp:
            (tmp / "manifest.json").write_text("new")
            make_owned(out, "theirs")
    assert (out / "manifest.json").read_text() == ("new" if overwrite else "theirs")
    assert leftovers(tmp_path, "eng") == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- protected paths ------------------------------------------------------------------------------

@pytest.fixture
def par(tmp_path, monkeypatch):
    """tmp/par/ck (a model being read) and a bystander tmp/par/notes.txt; cwd = tmp."""
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "par" / "ck"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    (ck / "manifest.json").write_text("looks owned")
    (tmp_path / "par" / "notes.txt").write_text("bystander")
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("out, protect, rel", [
    ("par", "par/ck", "contains"),               # the reported bug: -o par with model par/ck
    ("par/", "./par/ck", "contains"),
    ("par/ck", "par/ck", "is"),
    ("./par/../par/ck", "par/ck", "is"),
    ("par/ck/engines", "par/ck", "lies inside"),
    ("par/ck/sub/engines", "par/ck", "lies inside"),
    ("par", "ABS:par/ck", "contains"),
    ("ABS:par/ck", "par/ck/", "is"),
    ("par", "link_to_ck", "contains"),           # protected path given through a symlink
    ("link_to_par", "par/ck", "contains"),       # out given through a symlink
    ("link_to_par/ck", "link_to_ck", "is"),
])
def test_protected_paths_are_never_touched(par, out, protect, rel):
    (par / "link_to_ck").symlink_to(par / "par" / "ck")
    (par / "link_to_par").symlink_to(par / "par")
    out = str(par / out[4:]) if out.startswith("ABS:") else out
    protect = str(par / protect[4:]) if protect.startswith("ABS:") else protect
    before = _snapshot(par)
    with pytest.raises(OutputDirError) as ei:
        write(out, overwrite=True, owned=lambda p: True, protect=[protect])
    check_message(ei.value, out, rel, protect, "must not be modified")
    assert _snapshot(par) == before  # nothing deleted, nothing created


def test_a_sibling_of_a_protected_path_is_fine(par):
    write("par/eng", protect=["par/ck"])
    assert tree(par / "par" / "eng")["manifest.json"] == b"new"
    assert (par / "par" / "notes.txt").read_text() == "bystander"
    assert (par / "par" / "ck" / "config.json").exists()


# -- concurrency ----------------------------------------------------------------------------------

LOCKED = r"another process \(pid {pid}\) is writing {out}; wait for it or choose another path"


def test_two_writers_started_together_exactly_one_proceeds(tmp_path, spawn):
    for round_ in range(3):
        out = tmp_path / f"eng{round_}"
        a, b = spawn(WRITER, out, "A", 1000), spawn(WRITER, out, "B", 1000)
        assert a.wait_line("ready") and b.wait_line("ready")
        a.send()
        b.send()  # both enter atomic_output_dir within microseconds
        inside = {c: c.wait_line("inside") for c in (a, b)}
        assert sorted(inside.values()) == [False, True], (a.lines, b.lines)
        winner, loser = (a, b) if inside[a] else (b, a)
        rc, _, err = loser.finish()
        assert rc == 2, err
        assert err.count("\n") == 1
        assert re.fullmatch("error: " + LOCKED.format(pid=winner.pid, out=re.escape(str(out))) + "\n", err), err
        assert len([n for n in leftovers(tmp_path, out.name) if ".partial-" in n]) == 1  # the winner's, intact
        winner.send()
        rc, lines, err = winner.finish()
        assert rc == 0 and "done" in lines, err
        assert (out / "manifest.json").read_text() == ("A" if winner is a else "B")
        assert leftovers(tmp_path, out.name) == []


def test_threads_racing_for_one_out(tmp_path):
    n = 8
    for round_ in range(5):
        out = tmp_path / f"eng{round_}"
        barrier, refused_all = threading.Barrier(n), threading.Event()
        won, refused, other = [], [], []

        def run(i):
            barrier.wait()
            try:
                with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
                    won.append(i)
                    (tmp / "manifest.json").write_text(str(i))
                    refused_all.wait(10)
            except OutputDirError as e:
                refused.append(str(e))
                if len(refused) == n - 1:
                    refused_all.set()
            except BaseException as e:  # noqa: BLE001 - reported below
                other.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert other == [] and len(won) == 1 and len(refused) == n - 1, (won, refused, other)
        assert all(re.fullmatch(LOCKED.format(pid=os.getpid(), out=re.escape(str(out))), m) for m in refused)
        assert (out / "manifest.json").read_text() == str(won[0])
        assert leftovers(tmp_path, out.name) == []


def test_second_writer_while_the_first_is_mid_write_fails_at_once(tmp_path, spawn):
    out = make_owned(tmp_path / "eng")
    a = spawn(WRITER, out, "A", 100_000)
    assert a.wait_line("ready")
    a.send()
    assert a.wait_line("inside")
    t0 = time.monotonic()
    with pytest.raises(OutputDirError) as ei:
        with atomic_output_dir(out, overwrite=True, owned=owned):
            pytest.fail("the second writer entered the with-block")
    assert time.monotonic() - t0 < 1.0
    assert re.fullmatch(LOCKED.format(pid=a.pid, out=re.escape(str(out))), str(ei.value))
    assert (out / "manifest.json").read_text() == "old"  # untouched so far
    partials = [n for n in leftovers(tmp_path, "eng") if ".partial-" in n]
    assert partials and partials[0].startswith(f".eng.partial-{a.pid}-")  # not removed as stale
    a.send()
    rc, lines, err = a.finish()
    assert rc == 0, err
    assert (out / "manifest.json").read_text() == "A"
    assert leftovers(tmp_path, "eng") == []

# argv: out, marker, seconds. Writes `out` over and over; inside the with-block it holds
# `marker` (O_EXCL): two writers inside at once would collide on it.
HAMMER = """
out, marker, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
wins = refusals = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with outdir.atomic_output_dir(out, overwrite=True, owned=owned, warn=lambda m: None) as tmp:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                print("OVERLAP", flush=True)
                sys.exit(3)
            (tmp / "manifest.json").write_text(str(os.getpid()))
            os.close(fd)
            os.unlink(marker)
        wins += 1
    except outdir.OutputDirError as e:
        assert "another process" in str(e), e
        refusals += 1
print(f"wins {wins} refusals {refusals}", flush=True)
"""


def test_writers_hammering_one_out_never_overlap(tmp_path, spawn):
    out, marker = tmp_path / "eng", tmp_path / "inside.marker"
    kids = [spawn(HAMMER, out, marker, 1.5) for _ in range(4)]
    for k in kids:
        assert k.wait_line("ready")
    for k in kids:
        k.send()
    wins = 0
    for k in kids:
        rc, lines, err = k.finish(timeout=20)
        assert rc == 0 and "OVERLAP" not in lines, (rc, lines, err)
        wins += int(re.search(r"wins (\d+)", lines).group(1))
    assert wins > 10
    assert (out / "manifest.json").is_file() and leftovers(tmp_path, "eng") == []


# -- signals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, exc", [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt"),
                                      (signal.SIGHUP, "Terminated")])  # SIGHUP: the terminal or SSH session closed
def test_signal_in_the_with_block_cleans_up(tmp_path, spawn, sig, exc):
    out = tmp_path / "deep" / "a" / "b" / "eng"  # parents created by the run, removed again
    c = spawn(WRITER, out, "A", 1_000_000)
    assert c.wait_line("ready")
    c.send()
    assert c.wait_line("inside")
    assert list((tmp_path / "deep" / "a" / "b").glob(".eng.partial-*"))
    os.kill(c.pid, sig)
    rc, lines, err = c.finish()
    assert rc == 130 and f"interrupted {exc}" in lines, (rc, lines, err)
    assert os.listdir(tmp_path) == []


def test_sigterm_keeps_an_old_owned_dir(tmp_path, spawn):
    out = make_owned(tmp_path / "eng")
    before = tree(out)
    c = spawn(WRITER, out, "A", 1000)
    assert c.wait_line("ready")
    c.send()
    assert c.wait_line("inside")
    os.kill(c.pid, signal.SIGTERM)
    rc, lines, err = c.finish()
    assert rc == 130 and "interrupted Terminated" in lines, err
    assert tree(out) == before and leftovers(tmp_path, "eng") == []


def test_sigterm_handler_is_restored_and_threads_work(tmp_path):
    prev = signal.getsignal(signal.SIGTERM)
    with atomic_output_dir(tmp_path / "eng", overwrite=False, owned=owned):
        assert signal.getsignal(signal.SIGTERM) is not prev
    assert signal.getsignal(signal.SIGTERM) is prev
    errors = []

    def in_thread():
        try:
            write(tmp_path / "eng2")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(10)
    assert errors == [] and (tmp_path / "eng2" / "manifest.json").read_text() == "new"
    assert signal.getsignal(signal.SIGTERM) is prev
    assert issubclass(Terminated, KeyboardInterrupt)


def test_sigterm_in_process_raises_terminated(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(Terminated):
        with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
            (tmp / "x").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
            pytest.fail("SIGTERM did not interrupt the with-block")
    assert os.listdir(tmp_path) == []


def test_sigkill_leaves_a_stale_partial_that_the_next_run_removes(tmp_path, spawn, capsys):
    out = tmp_path / "eng"
    for warn_to in ("list", "stderr"):
        c = spawn(WRITER, out, "A", 2_100_000)
        assert c.wait_line("ready")
        c.send()
        assert c.wait_line("inside")
        c.p.kill()
        c.p.wait()
        partials = list(tmp_path.glob(".eng.partial-*"))
        assert len(partials) == 1 and (partials[0] / "big.bin").stat().st_size == 2_100_000
        warnings: list[str] = []
        if warn_to == "list":
            write(out, warn=warnings.append)
        else:
            capsys.readouterr()
            write(out, overwrite=True)
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            warnings = [err.strip()]
        assert len(warnings) == 1, warnings
        assert "removed a partial output of an earlier run that died" in warnings[0]
        assert str(partials[0]) in warnings[0] and "2.1 MB" in warnings[0]
        assert tree(out)["manifest.json"] == b"new"
        assert leftovers(tmp_path, "eng") == []


def test_old_dir_of_a_run_killed_between_the_renames_is_restored(tmp_path):
    out = tmp_path / "eng"
    stale_old = make_owned(tmp_path / ".eng.old-12345-deadbeef", "previous")
    warnings: list[str] = []
    with pytest.raises(OutputDirError, match="pass --overwrite"):
        write(out, warn=warnings.append)
    assert len(warnings) == 1 and "restored" in warnings[0] and str(stale_old) in warnings[0]
    assert (out / "manifest.json").read_text() == "previous"
    assert leftovers(tmp_path, "eng") == []


def test_a_live_lock_is_not_mistaken_for_a_dead_run(tmp_path, spawn):
    """While a writer is alive, a refused second writer removes nothing of it."""
    out = tmp_path / "eng"
    a = spawn(WRITER, out, "A", 1000)
    assert a.wait_line("ready")
    a.send()
    assert a.wait_line("inside")
    warnings: list[str] = []
    for _ in range(3):
        with pytest.raises(OutputDirError, match="another process"):
            write(out, overwrite=True, warn=warnings.append)
    assert warnings == []
    a.send()
    assert a.finish()[0] == 0 and (out / "manifest.json").read_text() == "A"


# -- parents --------------------------------------------------------------------------------------

def test_failed_run_removes_the_parents_it_created(tmp_path):
    (tmp_path / "deep").mkdir()
    out = tmp_path / "deep" / "a" / "b" / "eng"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
            assert (tmp_path / "deep" / "a" / "b").is_dir()
            (tmp / "x").write_text("x")
            raise RuntimeError("fail")
    assert os.listdir(tmp_path / "deep") == []  # deep existed before: kept; a/b removed


def test_refused_run_removes_the_parents_it_created(tmp_path):
    out = tmp_path / "deep" / "a" / "eng"
    with pytest.raises(OutputDirError):
        with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
            (tmp / "manifest.json").write_text("new")
            out.write_text("appeared")  # refused at the end
    assert out.read_text() == "appeared"  # theirs: kept, and so its parents
    assert os.listdir(out.parent) == ["eng"]


def test_successful_run_keeps_the_parents_it_created(tmp_path):
    out = write(tmp_path / "deep" / "a" / "eng")
    assert tree(out)["manifest.json"] == b"new"
    assert os.listdir(tmp_path / "deep" / "a") == ["eng"]


# -- permissions ----------------------------------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_output_gets_the_umask_permissions(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    out = tmp_path / "eng"
    with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
        fd = os.open(tmp / "text_embeddings.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # like a library
        os.close(fd)
        (tmp / "manifest.json").write_text("{}")
        (tmp / "tool").write_text("#!/bin/sh\n")
        os.chmod(tmp / "tool", 0o700)
        (tmp / "private").mkdir(mode=0o700)
        (tmp / "private" / "ro.bin").write_bytes(b"x")
        os.chmod(tmp / "private" / "ro.bin", 0o400)
        os.symlink("manifest.json", tmp / "link")
    mode = lambda p: stat.S_IMODE(os.lstat(p).st_mode)  # noqa: E731
    assert mode(out) == dir_mode  # not the 0700 of tempfile.mkdtemp
    assert mode(out / "text_embeddings.safetensors") == file_mode
    assert mode(out / "manifest.json") == file_mode
    assert mode(out / "tool") == dir_mode  # executable: 0777 & ~umask
    assert mode(out / "private") == dir_mode
    assert mode(out / "private" / "ro.bin") == file_mode
    assert (out / "link").is_symlink()


def test_fix_permissions_directly(tmp_path):
    root = tmp_path / "r"
    root.mkdir(mode=0o700)
    (root / "d").mkdir(mode=0o000)  # even an unreadable directory is walked into
    os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o600))
    fix_permissions(root, umask=0o022)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "f").stat().st_mode) == 0o644


# -- filesystem errors ----------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
@pytest.mark.parametrize("sub", ["eng", "deeper/eng"])
def test_read_only_parent_names_out(tmp_path, sub):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / sub
        with pytest.raises(OutputDirError) as ei:
            write(out)
        check_message(ei.value, str(out), "Permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user (see the test above)")
def test_read_only_parent_names_out_as_unprivileged_child(spawn):
    """Running as root: the same check in a child that drops to user nobody."""
    base = Path(tempfile.mkdtemp(prefix="outdir-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        (ro / "stuff").mkdir()
        (ro / "stuff" / "notes.txt").write_text("bystander")
        ro.chmod(0o555)
        c = spawn("""
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            for out in sys.argv[1:]:
                try:
                    with outdir.atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
                        (tmp / "x").write_text("x")
                    print("WROTE", out)
                except outdir.OutputDirError as e:
                    print(e)
            """, ro / "eng", ro / "deeper" / "eng", ro / "stuff")
        rc, lines, err = c.finish()
        assert rc == 0, err
        msgs = lines.splitlines()
        assert len(msgs) == 3, msgs
        for msg, sub in zip(msgs, ["eng", "deeper/eng"]):
            assert msg.startswith(f"cannot write {ro / sub}: Permission denied; "), msg
            assert ".partial" not in msg
        # a refusal that does not depend on the lock keeps its own message
        assert msgs[2] == (f"{ro / 'stuff'} is not an output directory written by this tool and will not be "
                           f"replaced; choose another path"), msgs[2]
        assert os.listdir(ro) == ["stuff"] and os.listdir(ro / "stuff") == ["notes.txt"]
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_stale_lock_file_of_another_user_is_replaced(spawn):
    """A dead run of root left its lock file; user nobody (who may write the directory) can
    still write the output."""
    base = Path(tempfile.mkdtemp(prefix="outdir-lock-", dir="/tmp"))
    try:
        base.chmod(0o777)
        (base / ".eng.lock").write_text("1\n")
        (base / ".eng.lock").chmod(0o644)
        c = spawn("""
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            with outdir.atomic_output_dir(sys.argv[1], overwrite=False, owned=owned) as tmp:
                (tmp / "manifest.json").write_text("new")
            print("WROTE")
            """, base / "eng")
        rc, lines, err = c.finish()
        assert rc == 0 and "WROTE" in lines, err
        assert (base / "eng" / "manifest.json").read_text() == "new"
        assert leftovers(base, "eng") == []
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_parent_that_is_a_file_names_out(tmp_path):
    (tmp_path / "f.txt").write_text("file")
    out = tmp_path / "f.txt" / "eng"
    with pytest.raises(OutputDirError) as ei:
        write(out)
    check_message(ei.value, str(out), "Not a directory")
    assert (tmp_path / "f.txt").read_text() == "file"


def test_os_error_in_the_block_about_the_temp_dir_names_out(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(OutputDirError) as ei:
        with atomic_output_dir(out, overwrite=False, owned=owned) as tmp:
            open(tmp / "sub" / "x.bin", "wb")  # noqa: SIM115 - sub does not exist
    check_message(ei.value, str(out / "sub" / "x.bin"), "No such file or directory")
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    assert os.listdir(tmp_path) == []


def test_other_os_errors_in_the_block_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        with atomic_output_dir(tmp_path / "eng", overwrite=False, owned=owned):
            open(tmp_path / "missing-input.bin", "rb")  # noqa: SIM115
    assert "missing-input.bin" in str(ei.value)
    assert os.listdir(tmp_path) == []


def test_module_is_import_light():
    code = PRELUDE + "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'numpy', 'llada_export'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


CLI_WAIT = """
import signal, sys, time
if sys.argv[1] == "nohup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
from llada_export.cli.common import user_errors
with user_errors("llada-x"):
    print("ready", flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("mode", ["plain", "nohup"])
def test_cli_sighup_is_an_interrupt_unless_ignored(mode):
    """A closed terminal (SIGHUP) ends a CLI like Ctrl-C: the cleanup runs, "interrupted", exit 129 (it used
    to kill the process outright, leaving a half-written export to the next run). Under nohup it is ignored."""
    p = subprocess.Popen([sys.executable, "-c", CLI_WAIT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGHUP)
        if mode == "nohup":
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(timeout=1)  # still running
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
        assert (p.returncode, err.strip()) == (143 if mode == "nohup" else 129, "llada-x: interrupted")
    finally:
        p.kill()
        p.wait()
