"""The demo VQA task (llada_export.vqa_task) and its trainer (tools/train_demo.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from llada_export import vqa_task
from llada_export.config import PRESETS, LLaDAVConfig, demo_config
from llada_export.graphs.anyres import crops_uint8, normalize_crops, preprocess, visual_token_count
from llada_export.vqa_task import demo_tokenizer, derive_answer, make_split, patch_labels, sample, text_only_baseline

from helpers import load_tool


# ---------------------------------------------------------------------- generator
def test_deterministic_per_seed():
    a, b = make_split("train", 12), make_split("train", 12)
    assert [s.scene for s in a] == [s.scene for s in b]
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert [vqa_task.image_digest(s.image()) for s in a] == [vqa_task.image_digest(s.image()) for s in b]
    # random access gives the same sample as the split
    assert sample("train", 7) == a[7]
    assert make_split("train", 3, start=5) == a[5:8]


def test_splits_do_not_overlap():
    digests = {name: {vqa_task.image_digest(s.image()) for s in make_split(name, 60)} for name in ("train", "val", "test")}
    assert all(len(d) == 60 for d in digests.values())  # no duplicates inside a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    with pytest.raises(ValueError, match="unknown split"):
        sample("dev", 0)


def _independent_answer(s: vqa_task.Sample) -> str:
    """The answer re-derived from the scene description without derive_answer."""
    shapes = s.scene.shapes
    if s.qtype == "count":
        return str(len([o for o in shapes if o.shape == s.arg]))
    if s.qtype == "colour":
        (only,) = [o for o in shapes if o.shape == s.arg]
        return only.colour
    if s.qtype == "top":
        return min(shapes, key=lambda o: o.cy).shape
    if s.qtype == "left":
        return min(shapes, key=lambda o: o.cx).colour
    if s.qtype == "list":
        return ", ".join(o.colour + " " + o.shape for o in sorted(shapes, key=lambda o: o.cx))
    if s.qtype == "describe":
        by_shape = {"circle": 0, "square": 1, "triangle": 2}
        names = [o.colour + " " + o.shape for o in sorted(shapes, key=lambda o: (by_shape[o.shape], o.colour))]
        noun = "shape" if len(names) == 1 else "shapes"
        return f"{len(names)} {noun}: {', '.join(names)} and digit {s.scene.digit.value}"
    if s.qtype == "number":
        return "".join(d.value for d in sorted(s.scene.number, key=lambda d: d.x))
    return s.scene.digit.value


def test_answers_consistent_with_scene():
    samples = make_split("val", 300)
    assert set(s.qtype for s in samples) == set(vqa_task.QTYPES)
    for s in samples:
        assert s.answer == _independent_answer(s) == derive_answer(s.scene, s.qtype, s.arg)
        assert s.question == vqa_task.question_text(s.qtype, s.arg)
        assert s.prompt == "<image>\n" + s.question
        if s.qtype == "count":
            assert 1 <= int(s.answer) <= vqa_task.MAX_COUNT
        if s.qtype in ("top", "left"):  # a clear winner
            key = (lambda o: o.cy) if s.qtype == "top" else (lambda o: o.cx)
            ks = sorted(key(o) for o in s.scene.shapes)
            assert len(ks) == 1 or ks[1] - ks[0] >= vqa_task.GAP
        if s.qtype == "list":  # every neighbour clearly to the right of the previous one
            xs = sorted(o.cx for o in s.scene.shapes)
            assert 2 <= len(xs) <= 4 and all(b - a >= vqa_task.GAP for a, b in zip(xs, xs[1:]))
        if s.qtype == "number":
            assert 4 <= len(s.answer) <= 5 and s.answer.isdigit() and s.answer[0] != "0"
            assert s.scene.digit is None and len(s.scene.number) == len(s.answer)
        else:
            assert s.scene.number == ()
        assert len(s.scene.shapes) <= vqa_task.MAX_OBJECTS


def test_long_answers_are_several_tokens_of_the_demo_tokenizer():
    """Task v2: the long types answer in 3 to 30 tokens of the bundled model's tokenizer (a
    4-digit number with the merged pair '42' is 3), the short ones in one."""
    from llada_export.tokenizer import load_tokenizer

    tok = load_tokenizer(vqa_task.__file__.rsplit("/", 1)[0] + "/assets/demo-model")
    lengths: dict[str, list[int]] = {t: [] for t in vqa_task.QTYPES}
    for s in make_split("test", 400):
        ids = tok(s.answer, add_special_tokens=False).input_ids
        assert tok.decode(ids) == s.answer
        lengths[s.qtype].append(len(ids))
    for t in vqa_task.SHORT_TYPES:
        assert set(lengths[t]) == {1}, t
    for t in vqa_task.LONG_TYPES:
        assert lengths[t] and 3 <= min(lengths[t]) and max(lengths[t]) <= 30, (t, sorted(set(lengths[t])))
    assert max(lengths["list"]) >= 10 and max(lengths["describe"]) >= 15  # long, not only longer
    # every answer with its eot fits the evaluation response length
    assert max(max(v) for v in lengths.values()) + 1 <= vqa_task.GEN_LENGTH


def test_answer_f1_and_score():
    f1 = vqa_task.answer_f1
    assert f1("red circle, blue square", "red circle, blue square") == 1.0
    assert f1("red circle", "red circle, blue square") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # p 1, r 1/2
    assert f1("4719", "4718") == pytest.approx(0.75)  # a number is scored digit by digit
    assert f1("", "red") == 0.0 and f1("", "") == 1.0 and f1("green", "red") == 0.0
    samples = vqa_task.balanced_split("test", 3)
    assert [s.qtype for s in samples].count("list") == 3 and len(samples) == 3 * len(vqa_task.QTYPES)
    assert samples == sorted(samples, key=lambda s: s.index)  # in split order
    preds = [s.answer if s.qtype != "list" else "" for s in samples]
    table = vqa_task.score(samples, preds)
    assert table["per_type"]["list"] == 0.0 and table["per_type"]["colour"] == 1.0
    assert table["per_length"] == {"short": 1.0, "long": pytest.approx(6 / 9)}
    assert table["per_length_f1"]["long"] == pytest.approx(6 / 9) and table["n"] == 24


def test_scene_geometry_and_pixels():
    for s in make_split("test", 40):
        glyphs = ([s.scene.digit] if s.scene.digit else []) + list(s.scene.number)
        boxes = [o.box for o in s.scene.shapes] + [d.box for d in glyphs]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= vqa_task.WIDTH and 0 <= y0 < y1 <= vqa_task.HEIGHT
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not vqa_task._overlaps(boxes[i], boxes[j], 0)
        img = np.asarray(s.image())
        assert img.shape == (vqa_task.HEIGHT, vqa_task.WIDTH, 3)
        for o in s.scene.shapes:  # the centre pixel has the shape's colour
            assert tuple(img[o.cy + o.size // 4 if o.shape == "triangle" else o.cy, o.cx]) == o.rgb
        for d in glyphs:  # ink is drawn in each digit's box
            x0, y0, x1, y1 = d.box
            assert (img[y0:y1, x0:x1] == d.rgb).all(-1).any()


def test_answers_balanced_and_text_only_baseline_low():
    samples = make_split("val", 1000)
    per_type = Counter(s.qtype for s in samples)
    assert min(per_type.values()) > 90  # 8 types, 125 each on average
    base = text_only_baseline(samples)
    assert base["n"] == 1000
    assert base["overall"] < 0.35, base
    assert all(v < 0.5 for v in base["per_type"].values()), base
    # a perfect image reader would score 1; the baseline is far from it, and above chance
    assert base["overall"] > 0.1
    assert text_only_baseline("val", 200)["n"] == 200


# ---------------------------------------------------------------------- demo preset
def test_demo_preset_structure():
    cfg = PRESETS["demo"]()
    assert cfg.vision.image_size == 192 and cfg.vision.patches_per_side == 12
    assert cfg.text.head_dim == 32 and cfg.vision.hidden_size // cfg.vision.num_attention_heads == 32
    assert cfg.image_grid_pinpoints[0] == (192, 192) and cfg.image_grid_pinpoints[-1] == (1152, 1152)
    # the task's images go through the anyres path as a 2x2 grid plus the base crop
    assert visual_token_count(vqa_task.WIDTH, vqa_task.HEIGHT, cfg) == 594
    img = sample("val", 0).image()
    pixels, size = preprocess(img, cfg)
    assert tuple(pixels.shape) == (5, 3, 192, 192) and size == (384, 288)
    # round trip through config.json
    from llada_export.synthetic.tokenizer import build_tokenizer

    cfg.text.vocab_size = len(build_tokenizer("tiny"))
    again = LLaDAVConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


def test_demo_model_size():
    from llada_export.checkpoint.io import expected_shapes

    cfg = demo_config()
    cfg.text.vocab_size = 398
    shapes = expected_shapes(cfg)
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n * 4 < 20 * 2**20  # fp32 well under 20 MB
    layers = {k.split(".")[6] for k in shapes if ".encoder.layers." in k}
    assert len(layers) == cfg.vision.num_hidden_layers - 1  # official: the last layer is not stored


# ---------------------------------------------------------------------- trainer
def train_demo():
    return load_tool("train_demo")


def test_training_pieces_match_the_inference_path():
    td = train_demo()
    from llada_export.reference import embed_prompt

    model, tok, cfg = td.build_model(0)
    model.eval()
    bt = td.Batcher(model, tok, 32)
    samples = [sample("val", i, qtype=t) for i, t in ((0, "describe"), (3, "colour"))]  # a long and a short answer,
    # questions of different lengths: padding in the batch
    assert len(bt.after_ids(samples[0].question)) != len(bt.after_ids(samples[1].question))
    crops = torch.from_numpy(np.stack([crops_uint8(s.image(), cfg) for s in samples]))
    for k, s in enumerate(samples):
        assert torch.equal(normalize_crops(crops[k], cfg), preprocess(s.image(), cfg)[0])
    resp = bt.targets([s.answer for s in samples], "cpu")
    sp = bt.sp
    # answer + eot, padded with eot: the sampler suppresses EOS at masked positions, so EOS padding
    # would be a target the inference path can never produce
    assert (resp == sp.eos).sum() == 0 and resp[0, -1] == sp.eot
    for k, s in enumerate(samples):
        ids = tok(s.answer, add_special_tokens=False).input_ids
        assert (len(ids) == 1) == (s.qtype in vqa_task.SHORT_TYPES)  # short answers are one token
        assert resp[k, : len(ids)].tolist() == ids and (resp[k, len(ids):] == sp.eot).all()
    assert bt.needed([s.answer for s in samples]).tolist() == [len(tok(samples[0].answer).input_ids) + 1, 2]
    # per-sample response lengths 24 and 4 in 32 static slots: the unused slots are masked keys,
    # so each sample sees exactly the unpadded inference sequence of its own length
    glens = torch.tensor([24, 4])
    lay = bt.layout([s.question for s in samples], glens, "cpu")
    assert lay["real"].sum(1).tolist() == [24, 4]
    noisy = torch.where(lay["real"], resp, torch.full_like(resp, sp.mask))
    noisy[:, 0] = sp.mask  # the answer slot still to be predicted
    with torch.no_grad():
        got = bt.forward(bt.visual(crops), lay, noisy)
        for k, s in enumerate(samples):
            g = int(glens[k])
            inp = embed_prompt(model, tok, s.image(), s.prompt)
            pos = torch.arange(inp.length + g)[None]
            want = model.denoise(inp.embeds, noisy[k:k + 1, :g], pos)[0]
            torch.testing.assert_close(got[k, :g], want, atol=1e-4, rtol=1e-4)


def test_demo_tokenizer_answers_are_single_tokens():
    tok = demo_tokenizer()
    for a in vqa_task.all_answers():
        ids = tok(a, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == a
    assert tok.decode(tok("What colour is the circle?", add_special_tokens=False).input_ids) == "What colour is the circle?"
    assert len(tok) < 500


def test_train_smoke_writes_loadable_checkpoint(tmp_path):
    td = train_demo()
    from llada_export.checkpoint.loader import load_checkpoint

    out = tmp_path / "demo"
    assert td.main(["--steps", "3", "--batch", "1", "--device", "cpu", "--out", str(out), "--eval-n", "1",
                    "--fast-eval-n", "1", "--eval-every", "0", "--log-every", "1"]) == 0
    model, tok, cfg = load_checkpoint(out)
    assert cfg.vision.image_size == 192 and cfg.text.num_hidden_layers == demo_config().text.num_hidden_layers
    assert len(model.model.vision_tower.vision_tower.vision_model.encoder.layers) == cfg.vision.num_hidden_layers - 1
    log = json.loads((out / "train_log.json").read_text())
    assert log["train"]["steps"] == 3 and len(log["history"]) == 3
    assert all(np.isfinite(h["loss"]) for h in log["history"])
    ev = log["eval"]
    assert ev["reference_generate"]["n"] == 1 and ev["batched_sampler"]["n"] == 1
    assert ev["text_only_baseline"]["val_2000"]["overall"] < 0.35
    assert all(0.0 <= h["aux_patch_acc"] <= 1.0 for h in log["history"])

    # fine-tuning from that checkpoint, with the tower pretraining stage: every part moves
    again = tmp_path / "again"
    assert td.main(["--init", str(out), "--vision-pretrain-steps", "2", "--steps", "2", "--batch", "1", "--device",
                    "cpu", "--out", str(again), "--eval-n", "1", "--fast-eval-n", "1", "--eval-every", "0"]) == 0
    before, after = model.state_dict(), load_checkpoint(again)[0].state_dict()
    for key in ("lm_head.weight", "model.mm_projector.0.weight",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_easy_scenes_have_no_distractors():
    for i in range(60):
        s = sample("train", i, easy=True)
        assert s.answer == _independent_answer(s) == derive_answer(s.scene, s.qtype, s.arg)
        n_shapes = len(s.scene.shapes)
        if s.qtype == "colour":
            assert n_shapes == 1 and s.scene.digit is None
        elif s.qtype == "count":
            assert n_shapes == int(s.answer) and all(o.shape == s.arg for o in s.scene.shapes)
        elif s.qtype in ("top", "left", "list"):
            assert n_shapes == 2 and s.scene.digit is None
        elif s.qtype == "describe":
            assert n_shapes == 1 and s.scene.digit is not None
        elif s.qtype == "number":
            assert n_shapes == 0 and len(s.answer) == 4
        else:
            assert n_shapes == 0 and s.scene.digit.value == s.answer
    # a forced type is a scene of its own too; every type can be asked of any index
    forced = [sample("train", 5, qtype=t) for t in vqa_task.QTYPES]
    assert [s.qtype for s in forced] == list(vqa_task.QTYPES)
    assert all(s.answer == _independent_answer(s) for s in forced)
    with pytest.raises(ValueError, match="unknown question type"):
        sample("train", 5, qtype="colours")
    # an easy sample is a scene of its own, not a cut-down copy of the regular one
    assert sample("train", 5, easy=True).scene != sample("train", 5).scene


def test_label_image_matches_the_drawing():
    samples = make_split("val", 20) + [sample("val", i, qtype="number") for i in range(3)]
    assert any(s.scene.number for s in samples)
    for s in samples:
        img, shape_ids, colour_ids = (np.asarray(s.image()), np.asarray(vqa_task.label_image(s.scene, "shape")),
                                      np.asarray(vqa_task.label_image(s.scene, "colour")))
        bg = (img == np.asarray(s.scene.background, dtype=np.uint8)).all(-1)
        for o in s.scene.shapes:  # the pixels drawn in a shape's colour carry its labels
            drawn = (img == np.asarray(o.rgb, dtype=np.uint8)).all(-1)
            x0, y0, x1, y1 = o.box
            box = np.zeros_like(drawn)
            box[y0:y1, x0:x1] = True
            assert (shape_ids[drawn & box] == vqa_task.SHAPE_LABELS.index(o.shape)).all()
            assert (colour_ids[drawn & box] == vqa_task.COLOUR_LABELS.index(o.colour)).all()
        for d in ([s.scene.digit] if s.scene.digit else []) + list(s.scene.number):  # a glyph box is its digit's label
            x0, y0, x1, y1 = d.box
            assert (shape_ids[y0:y1, x0:x1] == vqa_task.SHAPE_LABELS.index(f"digit {d.value}")).all()
            bg[y0:y1, x0:x1] = False
        assert (shape_ids[bg] == 0).all() and (colour_ids[bg] == 0).all()


def test_patch_labels_follow_the_crops():
    from PIL import Image

    cfg = demo_config()
    ps, p = cfg.vision.patch_size, cfg.vision.patches_per_side
    for s in make_split("val", 4):
        lab = patch_labels(s.scene, cfg)
        assert lab.shape == (2, 5, p * p)
        # independent: the label maps cut like the pixels (crops_uint8 of a label image), then
        # per patch the majority non-background label with >= 1/4 of the pixels
        for k, what in enumerate(("shape", "colour")):
            m = vqa_task.label_image(s.scene, what)
            base = np.asarray(m.resize((192, 192), Image.Resampling.NEAREST))
            padded = np.zeros((384, 384), np.uint8)
            padded[48:336] = np.asarray(m)  # 384x288 is pasted unscaled, centred in 384x384
            crops = [base] + [padded[y:y + 192, x:x + 192] for y in (0, 192) for x in (0, 192)]
            for c, crop in enumerate(crops):
                for t in range(p * p):
                    r, q = divmod(t, p)
                    vals, counts = np.unique(crop[r * ps:(r + 1) * ps, q * ps:(q + 1) * ps], return_counts=True)
                    counts[vals == 0] = 0
                    want = vals[counts.argmax()] if counts.max() >= ps * ps / 4 else 0
                    assert lab[k, c, t] == want, (s.index, what, c, t)
