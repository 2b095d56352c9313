"""The bundled default: the trained demo model, its image and questions, and ``make demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import vqa_task  # noqa: E402

from llada_export import demo  # noqa: E402
from llada_export.checkpoint import load_checkpoint  # noqa: E402
from llada_export.config import demo_config  # noqa: E402
from llada_export.reference import reference_generate  # noqa: E402
from llada_export.runtime.sampler import GenerationConfig  # noqa: E402

# DEMO_QUESTIONS as (question type, shape named) of the task generator
DEMO_KINDS = (("colour", "square"), ("digit", None))


def test_bundled_image_and_answers_come_from_the_task():
    s = vqa_task.sample("test", 22)
    bundled = np.asarray(Image.open(demo.DEMO_IMAGE).convert("RGB"))
    assert bundled.shape == (vqa_task.HEIGHT, vqa_task.WIDTH, 3) == (demo.DEMO_IMAGE_SIZE[1], demo.DEMO_IMAGE_SIZE[0], 3)
    assert np.array_equal(bundled, np.asarray(s.image()))
    assert demo.DEMO_QUESTIONS[0] == (s.question, s.answer)
    for (q, truth), (qtype, arg) in zip(demo.DEMO_QUESTIONS, DEMO_KINDS):
        assert q == vqa_task.question_text(qtype, arg)
        assert truth == vqa_task.derive_answer(s.scene, qtype, arg)


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
    """The shipped weights are the trained ones: eager fp32 reference on 24 held-out test questions
    (the training run measured 99.3% on val[:300]; the text-only guess is about 30%)."""
    model, tok, _ = load_checkpoint(demo.DEMO_MODEL, dtype=torch.float32)
    gen = GenerationConfig(8, 8, 8)
    samples = vqa_task.make_split("test", 24, start=100)
    hits = [reference_generate(model, tok, s.image(), s.prompt, gen).text.strip() == s.answer for s in samples]
    assert sum(hits) >= 21, f"{sum(hits)}/24 right"


def test_make_demo_answers_right_pruned_and_unpruned(tmp_path):
    pipe, answers = demo.run_demo(tmp_path, progress=False)
    assert pipe.pruned and pipe.has_unpruned
    assert pipe.manifest["pruning"]["layer"] == demo.DEMO_PRUNE_LAYER
    for a in answers:
        assert a.right == (True, True), (a.question, a.truth, a.pruned.text, a.unpruned.text)
        assert len(a.pruned.kept_visual) < a.pruned.n_visual
    # the run leaves its engines and nothing half-written beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_demo_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--workdir", "unused", "--preset", "nope"])
    assert e.value.code == 2
    assert "unknown preset" in capsys.readouterr().err
