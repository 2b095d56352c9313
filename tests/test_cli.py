"""The installed CLIs from a shell's point of view: answers, JSON, --version, one-line user errors."""

from __future__ import annotations

from dataclasses import replace
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli_here
from llada_export import __version__
from llada_export.demo import DEMO_IMAGE

BIN = Path(sys.executable).parent  # the console scripts pip installed beside this interpreter


def _gen(engines, *args, timeout=600):
    return subprocess.run([str(BIN / "llada-generate"), "--engines", str(engines), *args],
                          capture_output=True, text=True, timeout=timeout)


def _gen_here(capfd, engines, *args):
    """``llada-generate --engines ENGINES ARGS`` in this process (helpers.cli_here)."""
    from llada_export.cli.generate import main

    return cli_here(main, "llada-generate", capfd, "--engines", str(engines), *args)


def test_generate_json_and_compare_unpruned(engines, tiny, images, tmp_path, capfd):
    """Both answers of a sampled request (temperature, seed, random remasking) against their eager oracles:
    the pruned one (and its kept tokens) against the pruned reference, the unpruned one against the plain
    model. The JSON alone reproduces the answer: its settings, given back to llada-generate as flags (that
    second run in this process: helpers.cli_here)."""
    from llada_export.contract.pruning import PruneSettings, num_kept
    from llada_export.reference import reference_generate
    from llada_export.sampler import GenerationConfig

    q, image = "What colour is the circle?", tmp_path / "photo.png"
    images["384x384"].save(image)
    r = _gen(engines, "--image", str(image), "--prompt", q, "--preset", "chartqa", "--temperature", "0.9",
             "--seed", "7", "--remasking", "random", "--compare-unpruned", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res, s = out["result"], out["result"]["settings"]
    assert (s["gen_length"], s["block_length"], s["steps"], s["temperature"], s["remasking"], s["seed"]) == \
        (16, 16, 16, 0.9, "random", 7)
    assert res["pruning"] == {"layer": 2, "keep": 0.5, "score_from": "response"} and out["unpruned"]["pruning"] is None
    assert {**out["unpruned"]["settings"], "unpruned": False} == s and out["unpruned"]["settings"]["unpruned"]
    model, tok, _ = tiny
    gen = GenerationConfig(s["gen_length"], s["block_length"], s["steps"], s["temperature"], s["remasking"],
                           s["cfg_scale"], factor=s["factor"], threshold=s["threshold"], cache=s["cache"])
    ref = reference_generate(model, tok, out["image"], out["prompt"], gen, seed=s["seed"], system=s["system"])
    ref_pruned = reference_generate(model, tok, out["image"], out["prompt"], gen, PruneSettings(**res["pruning"]),
                                    seed=s["seed"], system=s["system"])
    assert out["unpruned"]["ids"] == ref.ids  # the unpruned graph's answer, as the eager model's
    assert res["ids"] == ref_pruned.ids and res["kept_visual"] == ref_pruned.kept_visual  # the pruned one, too
    assert res["ids"] != ref.ids  # pruning changed this answer: the two checks above are not one
    assert len(res["kept_visual"]) == num_kept(0.5, res["n_visual"]) and res["n_visual"] > 0
    assert {"vision", "stage_a_per_call", "stage_b_per_call", "total"} <= set(res["timings"])
    assert res["finish_reason"] in ("stop", "length") and out["speedup"] > 0
    flags = ["--gen-length", s["gen_length"], "--block-length", s["block_length"], "--steps", s["steps"],
             "--temperature", s["temperature"], "--remasking", s["remasking"], "--cfg-scale", s["cfg_scale"],
             "--seed", s["seed"], "--no-cache", "--backend", out["backend"]]
    again = _gen_here(capfd, out["engines"], "--image", out["image"], "--prompt", out["prompt"], *map(str, flags),
                      "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["result"]["ids"] == res["ids"]


def test_generate_plain_text_output(engines, tiny):
    from llada_export.contract.pruning import PruneSettings
    from llada_export.reference import reference_generate
    from llada_export.sampler import preset

    r = _gen(engines, "--image", str(DEMO_IMAGE), "--prompt", "What is here?", "--preset", "chartqa")
    assert r.returncode == 0, r.stderr
    model, tok, _ = tiny
    # the CLI's default sampler: the threshold rule at 0.9 (README, "Defaults")
    ref = reference_generate(model, tok, DEMO_IMAGE, "What is here?", replace(preset("chartqa"), threshold=0.9),
                             PruneSettings(2, 0.5))
    assert r.stdout == ref.text.rstrip("\ufffd") + "\n"  # the answer alone (a partial last character cut)
    # and how long it took, one line on stderr
    assert re.fullmatch(rf"llada-generate: {len(ref.ids)} tokens \((stop|length)\) in [0-9.]+ s: vision [0-9.]+ s, "
                        r"\d+ forwards [0-9.]+ s \(onnxruntime on cpu\)\n", r.stderr), r.stderr


def test_literal_backslash_n_prompt_as_typed_in_bash(engines, capfd):
    """`--prompt "<image>\\nWhat is here?"` in bash passes a backslash and an n: read as the newline. (The
    argv strings bash would pass, to llada-generate's main in this process: helpers.cli_here.)"""
    typed = _gen_here(capfd, engines, "--image", str(DEMO_IMAGE), "--prompt", "<image>\\nWhat is here?", "--preset",
                      "chartqa", "--json")
    meant = _gen_here(capfd, engines, "--image", str(DEMO_IMAGE), "--prompt", "<image>\nWhat is here?", "--preset",
                      "chartqa", "--json")
    plain = _gen_here(capfd, engines, "--image", str(DEMO_IMAGE), "--prompt", "What is here?", "--preset", "chartqa",
                      "--json")
    assert typed.returncode == meant.returncode == plain.returncode == 0, typed.stderr + meant.stderr
    ids = [json.loads(r.stdout)["result"]["ids"] for r in (typed, meant, plain)]
    assert ids[0] == ids[1] == ids[2]


@pytest.mark.parametrize("args, msg", [
    (["--image", "{bad}", "--prompt", "x"], "cannot decode image"),
    (["--image", "{missing}", "--prompt", "x"], "not found"),
    (["--prompt", "<image>\nWhat is shown?"], "but no image was given"),
    (["--image", str(DEMO_IMAGE), "--prompt", "<image> <image> x"], "2 <image> markers"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--gen-length", "10", "--block-length", "4"],
     "not a multiple of block_length"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--gen-length", "16", "--block-length", "8",
      "--steps", "3"], "not divisible"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--gen-length", "0"], "must be a positive integer"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--steps", "0"], "must be a positive integer"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--block-length", "0"], "must be a positive integer"),
    pytest.param(["--image", str(DEMO_IMAGE), "--prompt", "x", "--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--device", "tpu"], "unknown device"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--cache"], "re-export with --cache"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--refresh", "4"], "refresh applies to the prefix cache"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--factor", "1", "--threshold", "0.9"], "not allowed with"),
    # one rule for values (as the Python API and the HTTP server): finite numbers, seeds 0 .. 2**63 - 1
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--temperature", "inf"], "temperature must be a finite number"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--cfg-scale", "nan"], "cfg_scale must be a finite number"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--factor", "inf"], "factor must be a finite number"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--threshold", "nan"], "threshold must be a finite number"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--seed", "-1"], "seed must be from 0 to 2**63 - 1"),
    (["--image", str(DEMO_IMAGE), "--prompt", "x", "--seed", str(2**63)], "seed must be from 0 to 2**63 - 1"),
    (["--image", str(DEMO_IMAGE), "--prompt", os.fsdecode(b"caf\xe9?")], "not valid UTF-8 text: the byte 0xe9"),
    (["--image", str(DEMO_IMAGE), "--prompt", ""], "prompt is empty"),
    (["--image", str(DEMO_IMAGE), "--prompt", " \\n "], "prompt is empty"),
    (["--image", "{dir}", "--prompt", "x"], "is a directory, not an image file"),
])
def test_generate_user_errors_are_one_line(engines, tmp_path, capfd, args, msg):
    """Run in this process (helpers.cli_here, with what native code writes to stderr); the refusal of
    test_generate_on_a_directory_without_manifest runs the installed script."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    args = [a.replace("{bad}", str(bad)).replace("{missing}", str(tmp_path / "nope.jpg")).replace("{dir}", str(tmp_path))
            for a in args]
    r = _gen_here(capfd, engines, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("llada-generate: error: ")


def test_generate_on_a_directory_without_manifest(tmp_path):
    r = _gen(tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = _gen(tmp_path / "nope", "--prompt", "hi")
    assert r.returncode == 2 and "no such engines directory" in r.stderr


def test_json_into_a_closed_pipe_is_quiet(engines):
    """`llada-generate --json | head -1`: the reader goes away; no 'Broken pipe' error, exit 0."""
    cmd = (f"{BIN / 'llada-generate'} --engines {engines} --image {DEMO_IMAGE} --prompt hi --preset mc --json "
           "| head -c 1 >/dev/null; exit ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("tool", ["llada-export", "llada-generate", "llada-compare", "llada-checkpoint", "llada-demo",
                                  "llada-serve"])
def test_version_and_help(tool):
    r = subprocess.run([str(BIN / tool), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"{tool} {__version__} (llada-export)"
    h = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "100"})
    assert h.returncode == 0 and h.stdout.startswith("usage: ")
    assert max(len(line) for line in h.stdout.splitlines()) <= 120  # descriptions are wrapped


def test_help_is_fast_and_imports_no_torch():
    """--help must not pay for torch: the CLIs import it only once there is work to do."""
    code = ("import sys, llada_export.cli.export, llada_export.cli.generate, llada_export.cli.compare, "
            "llada_export.cli.checkpoint, llada_export.cli.serve, llada_export.serve.client; "
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False False", r.stderr


def test_checkpoint_help_names_every_preset():
    from llada_export.config import PRESETS

    h = subprocess.run([str(BIN / "llada-checkpoint"), "--help"], capture_output=True, text=True, timeout=120)
    for name in PRESETS:
        assert f"'{name}'" in h.stdout
    assert "overwrite=True" not in h.stdout
