"""tools/official_gpu.py, the official-code timing script: it ships with the project, takes the user's
own checkout of the official LLaDA-V code, and refuses a path that does not hold it in one line.
(Running it needs the official package and its pinned transformers, which the tests do not have.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "official_gpu.py"
official_gpu = load_tool("official_gpu")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def fake_checkout(root: Path, hook: bool = True) -> Path:
    """The official repository's layout, as far as the script looks (files empty: nothing imports)."""
    for rel in ("train/llava/__init__.py", "train/llava/model/language_model/llava_llada.py",
                *(["train/llava/hooks/fast_dllm_hook.py"] if hook else [])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


def test_help_says_what_to_bring():
    r = run_tool("--help")
    assert r.returncode == 0, r.stderr
    assert "--official" in r.stdout and "transformers 4.39.1" in r.stdout and "f8b02ce" in r.stdout
    assert "``" not in r.stdout and "../shared" not in r.stdout


@pytest.mark.parametrize("case", ["missing", "not_a_checkout", "no_flag", "no_hook"])
def test_a_path_without_the_official_code_is_one_line_exit_2(tmp_path, case):
    out = tmp_path / "o.json"
    args = {"missing": ["--official", str(tmp_path / "nope")],
            "not_a_checkout": ["--official", str(tmp_path)],
            "no_flag": [],
            "no_hook": ["--official", str(fake_checkout(tmp_path / "ck", hook=False))]}[case]
    r = run_tool(*args, "--out", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("official_gpu.py: error: "), r.stderr
    assert {"missing": "no such directory", "not_a_checkout": "no official llava package",
            "no_flag": "--official", "no_hook": "fast_dllm_hook.py is missing"}[case] in lines[0]
    assert not out.exists()


def test_the_checkout_is_found_from_its_root_train_or_llava_folder(tmp_path):
    ck = fake_checkout(tmp_path / "LLaDA-V")
    for given in (ck, ck / "train", ck / "train" / "llava"):
        assert official_gpu.official_root(str(given), ["vanilla", "fast_dllm"]) == (ck / "train").resolve()
    # without the hook, vanilla alone is still served
    bare = fake_checkout(tmp_path / "bare", hook=False)
    assert official_gpu.official_root(str(bare), ["vanilla"]) == (bare / "train").resolve()


def test_a_checkout_that_does_not_import_is_one_line_exit_2(tmp_path):
    """The layout is there but the package's modules are not (or their dependencies are missing)."""
    r = run_tool("--official", str(fake_checkout(tmp_path / "ck")), "--modes", "vanilla", "--out",
                 str(tmp_path / "o.json"))
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("official_gpu.py: error: the official code in ") and "does not import" in last
    assert not (tmp_path / "o.json").exists()
