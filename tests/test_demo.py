"""The bundled default: the trained demo model, its image and questions, and ``make demo``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llada_export import demo, vqa_task
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.config import demo_config
from llada_export.reference import reference_generate
from llada_export.sampler import GenerationConfig

BIN = Path(sys.executable).parent


def test_bundled_image_and_answers_come_from_the_task():
    s = demo.demo_sample()
    bundled = np.asarray(Image.open(demo.DEMO_IMAGE).convert("RGB"))
    assert bundled.shape == (vqa_task.HEIGHT, vqa_task.WIDTH, 3) == (demo.DEMO_IMAGE_SIZE[1], demo.DEMO_IMAGE_SIZE[0], 3)
    assert np.array_equal(bundled, np.asarray(s.image()))
    questions = demo.demo_questions()
    kinds = [t for t, _ in demo.DEMO_KINDS]
    assert {t for t in kinds if t in vqa_task.SHORT_TYPES} and {t for t in kinds if t in vqa_task.LONG_TYPES}
    assert (s.question, s.answer) in questions  # the test sample's own question is asked
    # the ground truth, re-derived here from the scene description
    by_hand = {"What digit is shown?": "4", "What colour is the leftmost shape?": "orange",
               "Describe the image.": "3 shapes: orange circle, purple circle, red square and digit 4",
               "List the shapes from left to right.": "orange circle, red square, purple circle"}
    assert dict(questions) == by_hand
    assert s.scene.digit.value == "4" and len(s.scene.shapes) == 3
    lefts = sorted(s.scene.shapes, key=lambda o: o.cx)
    assert [(o.colour, o.shape) for o in lefts] == [("orange", "circle"), ("red", "square"), ("purple", "circle")]
    assert all(b.cx - a.cx >= vqa_task.GAP for a, b in zip(lefts, lefts[1:]))


def test_bundled_checkpoint_is_official_layout_and_small():
    files = sorted(p.name for p in demo.DEMO_MODEL.iterdir())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(files)
    assert sum(p.stat().st_size for p in demo.DEMO_MODEL.iterdir()) <= 20 * 2**20  # the limit
    index = json.loads((demo.DEMO_MODEL / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.vision_tower.") for k in index["weight_map"])
    assert any(k.startswith("model.mm_projector.") for k in index["weight_map"])
    assert "model.image_newline" in index["weight_map"] and "lm_head.weight" in index["weight_map"]
    _, tok, cfg = load_checkpoint(demo.DEMO_MODEL, dtype=torch.float32)
    ref = demo_config()
    assert cfg.text.num_hidden_layers == ref.text.num_hidden_layers
    assert cfg.text.hidden_size == ref.text.hidden_size
    assert cfg.vision.image_size == ref.vision.image_size
    assert cfg.text.vocab_size == len(tok)
    # load-time settings of transformers must not leak into the shipped tokenizer config
    conf = json.loads((demo.DEMO_MODEL / "tokenizer_config.json").read_text())
    assert "is_local" not in conf and "local_files_only" not in conf


def test_bundled_model_answers_test_questions():
    """The shipped weights are the trained ones: eager fp32 reference on 3 held-out test questions of
    every type, short and long (the training run measured 98.6% on val[:2000]; the text-only guess is
    about 22%, and about 5% on the long types)."""
    model, tok, _ = load_checkpoint(demo.DEMO_MODEL, dtype=torch.float32)
    gen = GenerationConfig(vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH)
    samples = vqa_task.balanced_split("test", 3)
    hits = [reference_generate(model, tok, s.image(), s.prompt, gen).text.strip() == s.answer for s in samples]
    assert sum(hits) >= 22, f"{sum(hits)}/24 right"
    assert sum(h for h, s in zip(hits, samples) if s.qtype in vqa_task.LONG_TYPES) >= 8  # of 9 long answers


def test_make_demo_answers_every_question_type_and_reuses_matching_engines(tmp_path, capsys):
    """`llada-demo` (what `make demo` runs): short and long answers right the exact way and the fast way
    (pruned + cache + parallel decoding, in fewer forwards), exit 0,
    nothing half-written beside the engines, and no warning on its screen. A second run reuses the
    engines (no export: the directory and its manifest stay as they were) and says so; a run with
    another checkpoint re-exports them, and an untrained one makes it fail loudly (exit 1)."""
    r = subprocess.run([str(BIN / "llada-demo"), "--workdir", str(tmp_path)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8/8 answers right" in r.stdout
    for q, truth in demo.demo_questions():
        assert f"({'long' if ' ' in truth else 'short'} answer; ground truth: {truth!r})" in r.stdout
    # per question: the exact path commits one token per forward, the fast path several for long answers
    exact = [int(m) for m in re.findall(r"  exact '.*' right: (\d+) forwards", r.stdout)]
    fast = [int(m) for m in re.findall(r"  fast  '.*' right: (\d+) forwards", r.stdout)]
    assert len(exact) == len(fast) == 4 and all(f < e for f, e in zip(fast, exact)), r.stdout
    assert exact[2] >= 22 and fast[2] <= exact[2] // 3  # the long description: >= 3x fewer forwards
    assert "WRONG" not in r.stdout and "benchmarks/" not in r.stdout
    assert "arning" not in r.stdout + r.stderr  # no Warning / warning of anyone's making
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    engines = tmp_path / "engines"
    assert f"-> {engines} (none there yet)" in r.stdout

    # the second run's export step (run_demo's own call; the answers it then gives are those above)
    before = (engines.stat().st_ino, (engines / "manifest.json").stat().st_mtime_ns)
    said: list[str] = []
    t0 = time.perf_counter()
    assert demo.export_or_reuse(demo.demo_export_options(tmp_path), say=said.append) is False
    assert time.perf_counter() - t0 < 10  # an export takes 25 s
    assert len(said) == 1 and said[0].startswith(
        f"reusing engines in {engines} (built from {demo.DEMO_MODEL.resolve()}, checkpoint sha256 ")
    assert f"prune layer {demo.DEMO_PRUNE_LAYER}, keep {demo.DEMO_KEEP} + unpruned baseline" in said[0]
    assert (engines.stat().st_ino, (engines / "manifest.json").stat().st_mtime_ns) == before

    from llada_export.synthetic.weights import random_checkpoint

    # untrained, and of the tiny preset (the same structure, smaller: its export takes 2/3 of the demo's)
    ck = random_checkpoint("tiny", tmp_path / "random-tiny", seed=3)
    # in this process (llada-demo's main, as its entry point calls it: the run above is the fresh process)
    capsys.readouterr()
    code = demo.main(["--workdir", str(tmp_path), "--model", str(ck), "--gen-length", "8"])
    r = subprocess.CompletedProcess(["llada-demo"], code, *capsys.readouterr())
    why = next((line for line in r.stdout.splitlines() if line.startswith("exporting ")), "")
    assert "(the ones there were built with a different " in why, r.stdout + r.stderr
    assert all(w in why for w in ("checkpoint (its files changed)", "checkpoint path", "gen_length")), why
    assert "reusing" not in r.stdout and engines.stat().st_ino != before[0]  # exported again, into place
    assert r.returncode == 1, r.stdout + r.stderr  # and the untrained model answers wrong
    assert "WRONG" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "llada-demo: error: an answer does not match the task's ground truth"


def test_reuse_needs_the_same_checkpoint_files_settings_and_intact_engines(tmp_path, engines):
    """What decides a reuse (no export here: the decision alone; the demo test above reuses for real)."""
    from dataclasses import replace

    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions

    ck = tmp_path / "ck"
    shutil.copytree(demo.DEMO_MODEL, ck)
    opts = ExportOptions(model=str(ck), output=str(tmp_path / "e"), prune=PruneSettings(3, 0.5), baseline=True,
                         gen_length=16, image_size=demo.DEMO_IMAGE_SIZE)
    want = demo.build_record(opts)
    assert want == json.loads(json.dumps(want))  # as the manifest gives it back
    assert demo.build_changes(want, demo.build_record(replace(opts, output="elsewhere", progress=False))) is None
    assert demo.build_changes(want, demo.build_record(replace(opts, prune=PruneSettings(3, 0.35)))) == \
        "the ones there were built with a different pruning setting"
    assert demo.build_changes(want, demo.build_record(replace(opts, image_size=(384, 384), baseline=False))) == \
        "the ones there were built with a different baseline, image_size"
    (ck / "config.json").write_text((ck / "config.json").read_text() + " ")  # same path, other contents
    assert demo.build_changes(want, demo.build_record(opts)) == \
        "the ones there were built with a different checkpoint (its files changed)"
    # the directory: none, one llada-demo did not build, an altered one (checked against its SHA-256s)
    assert demo.export_reason(tmp_path / "none", want) == "none there yet"
    assert demo.export_reason(engines, want) == "the ones there were not built by llada-demo"
    assert demo.export_reason(engines, want, rebuild=True) == "--rebuild"
    altered = tmp_path / "altered"
    shutil.copytree(engines, altered)
    victim = next(altered.rglob("*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    assert demo.export_reason(altered, want).startswith("the ones there are unusable: ")


def test_demo_help_is_plain_text():
    r = subprocess.run([str(BIN / "llada-demo"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "``" not in r.stdout and ":mod:" not in r.stdout and "`" not in r.stdout
    assert "assets/demo-model" in r.stdout and "--rebuild" in r.stdout


def test_demo_cli_rejects_a_bad_gen_length(tmp_path):
    r = subprocess.run([str(BIN / "llada-demo"), "--workdir", str(tmp_path), "--gen-length", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--gen-length must be a positive integer" in r.stderr
    assert not list(tmp_path.iterdir())
