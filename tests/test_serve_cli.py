"""``llada-serve`` and ``llada-generate --server`` refusing what they cannot serve, as a shell sees it:
one line, exit 2, before any Ray cluster starts; a cluster address that does not answer, within the
connect timeout and deaf to nothing (Ctrl-C, SIGTERM); a replica that fails to load, in one line on
the console, its local cluster gone with its session folder. The served answers are in test_serve.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llada_export.demo import DEMO_IMAGE

BIN = Path(sys.executable).parent  # the console scripts pip installed beside this interpreter


def serve(*args, env=None, timeout=120):
    return subprocess.run([str(BIN / "llada-serve"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_line_error(r, rc: int = 2) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == rc and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(("llada-serve: error: ", "llada-generate: error: ")), r.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def ray_tmp():
    """Ray's temp root for one test (RAY_TMPDIR; short: Ray's socket paths live under it), removed after."""
    root = tempfile.mkdtemp(prefix="llsc_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": root}
    yield Path(root), env
    shutil.rmtree(root, ignore_errors=True)


def test_serve_refuses_what_it_cannot_serve_before_starting_ray(engines, ray_tmp):
    """A batch larger than the engines', a port in use or out of range, a backend the engines lack, a
    cluster address with nothing listening, Ray not installed, --server with local-engine flags or without
    a scheme: one line, exit 2, and no Ray cluster started (Ray's temp root stays empty: every local
    cluster writes its session folder there first)."""
    root, env = ray_tmp
    r = serve("--engines", str(engines), "--max-batch", "8", env=env)
    assert "exceeds the engines' batch size 1" in one_line_error(r) and "--batch-size 8" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = serve("--engines", str(engines), "--port", str(port), env=env)
    assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(r)
    r = serve("--engines", str(engines), "--port", "99999", env=env)
    assert "--port" in one_line_error(r) and "1 to 65535" in r.stderr
    r = serve("--engines", str(engines), "--backend", "foo", env=env)
    assert "--backend 'foo' was not built" in one_line_error(r) and "these engines have: onnxruntime" in r.stderr
    t0 = time.perf_counter()
    r = serve("--engines", str(engines), "--address", "127.0.0.1:1", env=env)  # nothing listens on port 1
    assert "no Ray cluster at --address 127.0.0.1:1" in one_line_error(r) and time.perf_counter() - t0 < 20
    r = serve("--engines", str(engines), "--address", "auto", "--metrics-port", "9100", env=env)
    assert "--metrics-port: for the local cluster" in one_line_error(r)
    r = serve("--engines", "/nonexistent", env=env)
    assert "/nonexistent" in one_line_error(r)
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None  # an install without ray\n"
                        "from llada_export.cli.serve import main; sys.exit(main(sys.argv[1:]))",
                        "--engines", str(engines)], capture_output=True, text=True, timeout=120, env=env)
    assert "pip install 'llada-export[serve]'" in one_line_error(r).replace("llada-serve: error: ", "")
    assert not list(root.iterdir()), list(root.rglob("*"))[:5]  # no cluster started by any of them

    gen = [str(BIN / "llada-generate"), "--image", str(DEMO_IMAGE), "--prompt", "hi"]
    r = subprocess.run([*gen, "--server", "http://127.0.0.1:9", "--backend", "onnxruntime"], capture_output=True,
                       text=True, timeout=120)
    assert "--backend" in one_line_error(r) and "--server" in r.stderr
    r = subprocess.run([*gen, "--server", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert "no answer from http://127.0.0.1:9" in one_line_error(r)
    t0 = time.perf_counter()  # no scheme: refused before any attempt (four retries took 3.5 s of pauses)
    r = subprocess.run([*gen, "--server", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert "use http://127.0.0.1:9" in one_line_error(r) and "no answer" not in r.stderr
    assert time.perf_counter() - t0 < 3.5


def test_an_address_that_does_not_answer_fails_in_time_and_hears_signals(engines, ray_tmp):
    """--address of a port that listens but is no Ray cluster (Ray retries it for ever, deaf to Ctrl-C for
    40 s): one line within --connect-timeout; Ctrl-C, SIGTERM and SIGHUP meanwhile act at once."""
    _, env = ray_tmp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        cmd = [str(BIN / "llada-serve"), "--engines", str(engines), "--address", address]
        t0 = time.perf_counter()
        timed = subprocess.Popen([*cmd, "--connect-timeout", "3"], stderr=subprocess.PIPE, text=True, env=env)
        signalled = {sig: subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
                     for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        time.sleep(4)  # importing, then waiting for the cluster's answer
        for sig, p in signalled.items():
            p.send_signal(sig)
        for sig, p in signalled.items():
            _, err = p.communicate(timeout=30)
            assert p.returncode == 128 + sig and err.strip().splitlines()[-1] == "llada-serve: interrupted", err
        assert time.perf_counter() - t0 < 10  # the signals acted at once
        _, err = timed.communicate(timeout=60)
        assert time.perf_counter() - t0 < 20
    r = subprocess.CompletedProcess(cmd, timed.returncode, "", err)
    assert f"no Ray cluster answered at --address {address} within 3 s" in one_line_error(r)


def test_replica_that_fails_to_load_is_one_line_and_leaves_nothing(engines, ray_tmp, tmp_path):
    """Engines whose weights were altered after export pass the driver's checks and fail in the replica
    (which verifies every hash): the replica's own error on the console in one line, exit 2, every
    process of the local cluster gone and, without --temp-dir, its session folder removed."""
    root, env = ray_tmp
    bad = tmp_path / "engines"
    shutil.copytree(engines, bad, copy_function=os.link)  # hard links: no copy of the weights
    victim = bad / "text_embeddings.safetensors"
    data = bytearray(victim.read_bytes())
    victim.unlink()  # a new file, not the shared fixture's through the link
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = serve("--engines", str(bad), "--port", str(_free_port()), "--startup-timeout", "180", env=env, timeout=300)
    line = one_line_error(r)
    assert "the replicas failed to start" in line and "text_embeddings.safetensors" in line, r.stderr[-3000:]
    assert not list((root / "ray").glob("session_*")), list(root.rglob("*"))[:10]
    deadline = time.perf_counter() + 30
    while _processes_under(str(root)):
        assert time.perf_counter() < deadline, _processes_under(str(root))
        time.sleep(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(path: str) -> list[str]:
    """Command lines that name ``path`` (Ray's processes carry their session folder in theirs)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if path in cmd:
                out.append(cmd)
    return out
