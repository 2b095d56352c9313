"""llada-generate and llada-checkpoint from the command line: answers, JSON, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llada_export.demo import DEMO_IMAGE


def _gen(engines, *args):
    return subprocess.run([sys.executable, "-m", "llada_export.cli.generate", "--engines", str(engines), *args],
                          capture_output=True, text=True, timeout=600)


def test_generate_json_and_compare_unpruned(engines):
    r = _gen(engines, "--image", str(DEMO_IMAGE), "--prompt", "<image>\nWhat colour is the circle?",
             "--preset", "mc", "--compare-unpruned", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res = out["result"]
    assert len(res["ids"]) <= 2 and res["n_visual"] > 0 and 0 < len(res["kept_visual"]) < res["n_visual"]
    assert {"vision", "stage_a", "stage_b_per_step", "total"} <= set(res["timings"])
    assert "unpruned" in out and out["speedup"] > 0


def test_generate_plain_text_output(engines):
    r = _gen(engines, "--image", str(DEMO_IMAGE), "--prompt", "<image>\nWhat is here?", "--preset", "mc")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--image", "{bad}", "--prompt", "<image>\nx"], "cannot decode image"),
    (["--image", "{missing}", "--prompt", "<image>\nx"], "not found"),
    (["--image", str(DEMO_IMAGE), "--prompt", "What is shown?"], "no <image> marker"),
    (["--prompt", "<image>\nWhat is shown?"], "<image>"),
    (["--image", str(DEMO_IMAGE), "--prompt", "<image>\nx", "--gen-length", "10", "--block-length", "4"],
     "not a multiple of block_length"),
    (["--image", str(DEMO_IMAGE), "--prompt", "<image>\nx", "--gen-length", "16", "--block-length", "8",
      "--steps", "3"], "not divisible"),
])
def test_generate_user_errors_are_one_line(engines, tmp_path, args, msg):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    args = [a.replace("{bad}", str(bad)).replace("{missing}", str(tmp_path / "nope.jpg")) for a in args]
    r = _gen(engines, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_on_a_directory_without_manifest(tmp_path):
    r = _gen(tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr
