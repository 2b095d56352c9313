"""tools/prune_sweep.py and tools/attention_analysis.py on the tiny random checkpoint, checked against
independent computations."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import load_tool
from llada_export import vqa_task
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.config import demo_config
from llada_export.contract.pruning import PruneSettings, num_kept
from llada_export.exporter.build import ExportOptions, plan_bucket
from llada_export.flops import lm_flops, request_flops
from llada_export.graphs.anyres import visual_token_count
from llada_export.reference import reference_generate
from llada_export.sampler import GenerationConfig
from llada_export.vqa_task import patch_labels

prune_sweep = load_tool("prune_sweep")
attention_analysis = load_tool("attention_analysis")


def test_prune_sweep_tiny(tiny_ckpt, tmp_path):
    res = prune_sweep.run_sweep(tiny_ckpt, n=2, layers=[1], keeps=[0.5], workdir=tmp_path / "work", progress=False)
    json.loads(json.dumps(res))  # serialisable
    assert [r["setting"] for r in res["results"]] == ["unpruned", "K=1 keep=0.5"]
    # the predictions are the eager oracles' answers to the same test questions
    model, tok, _ = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    gen = GenerationConfig(vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH)  # the tool's
    for r, prune in zip(res["results"], (None, PruneSettings(1, 0.5))):
        ref = [reference_generate(model, tok, s.image(), s.prompt, gen, prune).text
               for s in vqa_task.make_split("test", 2)]
        assert r["predictions"] == ref
        answers = [s.answer for s in vqa_task.make_split("test", 2)]
        assert r["correct"] == sum(p.strip() == a for p, a in zip(ref, answers))
        assert r["overall"] == r["correct"] / 2
    assert res["results"][1]["k"] == num_kept(0.5, res["bucket"]["max_visual_tokens"])
    md = prune_sweep.markdown(res)
    assert "| K=1 keep=0.5 |" in md and "lost / gained" in md
    base = res["results"][0]
    for r in res["results"]:  # the paired counts reconcile with the two accuracies
        assert base["correct"] - r["lost"] + r["gained"] == r["correct"]
    prune_sweep.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_flops_model_against_hand_counts():
    """The analytic model on a configuration small enough to count by hand."""
    cfg = demo_config()
    cfg.text.vocab_size = 100
    d, i = cfg.text.hidden_size, cfg.text.intermediate_size  # 192, 512
    # one layer over 10 tokens: q, k, v, o (4 d x d) + gate, up, down (3 d x i) matmuls, 2 attention products
    assert lm_flops(cfg, 10, 1) == 2 * 10 * (4 * d * d + 3 * d * i) + 2 * (2 * 10 * 10 * d)
    assert lm_flops(cfg, 10, 1, logits_rows=3) - lm_flops(cfg, 10, 1) == 2 * 3 * d * 100
    assert lm_flops(cfg, 4, 1, keys=50) - lm_flops(cfg, 4, 1) == 4 * 4 * (50 - 4) * d
    gen = GenerationConfig(8, 8, 8)
    full = request_flops(cfg, 600, 500, gen, None, 1.0, 5)
    pruned = request_flops(cfg, 600, 500, gen, 3, 0.5, 5)
    assert pruned["reduced_length"] == 600 + 8 - 500 + 250
    assert pruned["stage_b"] == lm_flops(cfg, 358, 6, 8)
    assert full["total"] - pruned["total"] == pytest.approx(
        full["stage_a"] - pruned["stage_a"] + 7 * (full["stage_b"] - pruned["stage_b"]))
    cached = request_flops(cfg, 600, 500, gen, 3, 0.5, 5, forwards=8, cached_forwards=5)
    assert cached["total"] == pytest.approx(pruned["total"] - 5 * (pruned["stage_b"] - cached["cached"]))
    assert cached["cached"] == lm_flops(cfg, 8, 6, 8, keys=358)


def test_flops_fall_as_keep_falls(tiny_ckpt):
    _, _, cfg = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    bucket = plan_bucket(ExportOptions(model="", output="", image_size=prune_sweep.IMAGE_SIZE,
                                       max_prompt_tokens=100, gen_length=8), cfg)
    gen = GenerationConfig(8, 8, 8)
    full = prune_sweep.flops_for(cfg, bucket, gen, None, 1.0)["total"]
    for layer in range(cfg.text.num_hidden_layers):
        f = [prune_sweep.flops_for(cfg, bucket, gen, layer, k)["total"] for k in (0.75, 0.5, 0.25, 0.1)]
        assert all(a > b for a, b in zip(f, f[1:])) and f[0] < full


def test_attention_analysis_tiny(tiny_ckpt, tmp_path):
    res = attention_analysis.run_analysis(tiny_ckpt, n=2, layers=[0, 1, 2, 3], keeps=[0.35], progress=False)
    json.loads(json.dumps(res))  # serialisable
    n_layers = res["n_layers"]
    assert len(res["visual_share_step1"]) == len(res["visual_share_all_steps"]) == n_layers
    # recomputed here from the per-question records: the reported means are their means
    q = res["per_question"]
    step1 = [sum(p["share_by_step"][0][k] for p in q) / len(q) for k in range(n_layers)]
    assert res["visual_share_step1"] == pytest.approx(step1)
    for p in q:
        for per_keep in p["overlap"].values():
            for series in per_keep.values():
                assert series[0] == 1.0  # step 1 overlaps itself fully
    # the answers are the eager reference's (the recording denoiser must not change the trajectory)
    model, tok, cfg = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    for p, s in zip(q, vqa_task.make_split("test", 2)):
        gen = GenerationConfig(vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH, vqa_task.GEN_LENGTH)  # the tool's
        assert p["prediction"] == reference_generate(model, tok, s.image(), s.prompt, gen).text
    # step 1's selection at every layer, recomputed here from the layers' q and k: the share of the object
    # tokens it keeps is what the tool reports, and the recommended layer is the one that keeps the most
    # (the tool breaks a tie at 3 decimals by stability, so any layer of such a tie will do)
    samples = vqa_task.make_split("test", 2)
    scores = [step1_visual_attention(model, tok, s) for s in samples]  # [question][layer] -> [n_visual]
    recall = [sum(object_recall(sc[layer], s, cfg, 0.35) for sc, s in zip(scores, samples)) / 2
              for layer in range(n_layers)]
    assert res["object_recall_step1"]["0.35"] == pytest.approx(recall, abs=1e-9)
    best = [layer for layer in range(n_layers) if round(recall[layer], 3) == round(max(recall), 3)]
    assert len(best) < n_layers  # the layers differ: the choice is a real one
    assert res["recommended_layer"] in best
    for kp, per_layer in res["object_recall_step1"].items():
        n_vis = q[0]["n_visual"]
        assert res["object_recall_chance"][kp] == pytest.approx(num_kept(float(kp), n_vis) / n_vis)
    md = attention_analysis.markdown(res)
    assert "object recall" in md and "Recommended K" not in md  # no sweep given: no final recommendation


def step1_visual_attention(model, tok, sample) -> list[torch.Tensor]:
    """Per layer [n_visual]: the attention each visual token receives at denoising step 1 (every response
    position masked), mean over heads and response queries, from the layer's q and k by hand."""
    from llada_export.reference import embed_prompt
    from llada_export.tokenizer import special_tokens

    inputs = embed_prompt(model, tok, sample.image(), sample.prompt)
    lm, g, p = model.language, vqa_task.GEN_LENGTH, inputs.length
    x = torch.cat([inputs.embeds, lm.embed_tokens(torch.full((1, g), special_tokens(tok).mask))], 1)  # [1, P+G, D]
    cos, sin = lm.rotary(torch.arange(p + g)[None])
    out = []
    with torch.no_grad():
        for layer in lm.layers:
            q, k = layer.self_attn.query_key(layer.input_layernorm(x), cos, sin)  # [1, H, L, hd]
            probs = (q[:, :, -g:] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # [1, H, G, L]
            out.append(probs[0].mean((0, 1))[:p][inputs.visual_mask[0]])  # [n_visual]
            x = layer(x, cos, sin, None)
    return out


def object_recall(scores: torch.Tensor, sample, cfg, keep: float) -> float:
    """Share of the sample's object tokens (the tool's map, checked in the test below) among the top
    round(keep * n) visual tokens by ``scores``."""
    obj = attention_analysis.object_tokens(sample.scene, cfg)  # [n_visual] bool
    top = scores.topk(round(keep * scores.numel())).indices
    return float(obj[top].sum()) / float(obj.sum())


def test_recording_denoiser_shares_are_attention_mass_on_visual_tokens(tiny):
    """The recorded step-1 share at layer 0, recomputed from the layer's q and k by hand."""
    model, tok, _ = tiny
    s = vqa_task.make_split("test", 1)[0]
    from llada_export.reference import embed_prompt
    from llada_export.tokenizer import special_tokens

    sp = special_tokens(tok)
    inputs = embed_prompt(model, tok, s.image(), s.prompt)
    den = attention_analysis.RecordingDenoiser(model, inputs, sp.mask)
    ids = torch.full((1, 8), sp.mask)
    den(ids)
    lm, g, p = model.language, 8, inputs.length
    x = torch.cat([inputs.embeds, lm.embed_tokens(ids)], 1)
    cos, sin = lm.rotary(torch.arange(p + g)[None])
    layer = lm.layers[0]
    q, k = layer.self_attn.query_key(layer.input_layernorm(x), cos, sin)
    probs = (q[:, :, -g:] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # all 8 response rows masked
    share = probs.mean(1)[0][:, :p][:, inputs.visual_mask[0]].sum(-1).mean()
    assert den.steps[0]["share"][0] == pytest.approx(float(share), rel=1e-5)


def test_object_tokens_follow_the_anyres_layout():
    cfg = demo_config()
    s = vqa_task.sample("test", 22)
    obj = attention_analysis.object_tokens(s.scene, cfg)
    assert obj.shape == (visual_token_count(vqa_task.WIDTH, vqa_task.HEIGHT, cfg),)
    t = cfg.vision.patches_per_side ** 2
    base = patch_labels(s.scene, cfg)[0][0] > 0  # [T] shape labels of the base crop
    assert torch.equal(obj[:t], torch.from_numpy(base))  # the base crop's tokens come first, unchanged
    # the grid tokens: each object covers some, the background most
    assert 0 < int(obj[t:].sum()) < 0.5 * (obj.numel() - t)


# ---------------------------------------------------------------------- tools/long_sweeps.py (issue 21)
long_sweeps = load_tool("long_sweeps")


def test_long_sweeps_driver_tiny(tiny_ckpt, tmp_path):
    """The driver end to end on the CPU (inductor engines, eager kernels): the main part's answers are the
    eager oracles', each row's graph calls add up to its forwards, and render writes the report."""
    out = tmp_path / "raw"
    assert long_sweeps.main(["run", "--ckpt", str(tiny_ckpt), "--out", str(out), "--backend", "inductor",
                             "--device", "cpu", "--parts", "main", "--main-per-type", "1", "--batch", "8",
                             "--demo-prune", "2 0.5 response"]) == 0
    raw = json.loads((out / "main.json").read_text())
    assert raw["machine"]["cpu_count"] and "main: done" in (out / "log.txt").read_text()
    samples = vqa_task.balanced_split("test", 1)
    model, tok, _ = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    gen = GenerationConfig(32, 32, 32)
    for c, prune in zip(raw["cells"], (None, PruneSettings(2, 0.5))):
        (r,) = c["results"]
        assert r["predictions"] == [reference_generate(model, tok, s.image(), s.prompt, gen, prune).text
                                    for s in samples]
        n = r["counts"]
        for i, f in enumerate(r["forwards"]):
            assert n["stage_a"][i] == (prune is not None) and n["prefill"][i] == n["cached"][i] == 0
            assert n["stage_a"][i] + n["full"][i] == f
    bench = tmp_path / "bench"
    long_sweeps.main(["render", "--from", str(out), "--out", str(bench)])
    s = json.loads((bench / "vqa2_main.json").read_text())
    assert [r["name"] for r in s["rows"]] == ["unpruned exact", "pruned exact"]
    assert s["rows"][0]["groups"]["long"]["n"] == len(vqa_task.LONG_TYPES)
    md = (bench / "vqa2_main.md").read_text()
    assert "| text-only baseline |" in md and (bench / "vqa2_main.png").stat().st_size > 0
    before = md
    long_sweeps.main(["render", "--replot", "--out", str(bench)])
    assert (bench / "vqa2_main.md").read_text() == before


def test_long_sweeps_counts_cached_forwards(cache_engines, tiny, tmp_path):
    """On engines with the cache graphs: which graph each row's forward used, as documented (stage A
    first; with refresh never, one prefill then cached steps; with refresh 1, prefills only), the answers
    unchanged by the counting, and FLOPs per answer equal to request_flops for those counts."""
    _, _, cfg = tiny
    long_sweeps._init_worker({"ckpt": "", "backend": "onnxruntime", "device": "cpu", "workdir": str(tmp_path),
                              "threads": 1})
    S = long_sweeps.setting
    settings = [S("exact", "pruned", 16, gen=16), S("never", "pruned", 16, True, "never", gen=16),
                S("every", "pruned", 16, True, "1", gen=16),
                S("par", "unpruned", 8, True, "4", "threshold 0.9", gen=16)]
    cell = long_sweeps.cell("cache", "t", {"prune": [2, 0.5, "response"], "baseline": True, "cache": True,
                                           "dtype": "float32", "batch": 3}, settings,
                            {"split": "test", "per_type": 1, "types": ["list", "digit"]}, engines=str(cache_engines))
    res = long_sweeps.run_cell(cell)
    assert "error" not in res, res.get("traceback")
    exact, never, every, par = res["results"]
    for i, f in enumerate(never["forwards"]):
        assert exact["counts"]["stage_a"][i] == 1 and exact["counts"]["full"][i] == exact["forwards"][i] - 1
        assert (never["counts"]["stage_a"][i], never["counts"]["prefill"][i], never["counts"]["cached"][i]) == \
            (1, 1, f - 2)
        assert every["counts"]["prefill"][i] == every["forwards"][i] - 1 and every["counts"]["cached"][i] == 0
        assert sum(par["counts"][k][i] for k in long_sweeps.KINDS) == par["forwards"][i]
        assert par["counts"]["stage_a"][i] == 0 and par["counts"]["prefill"][i] >= 1
    from llada_export.runtime.pipeline import EngineDenoiser, Pipeline, Request

    assert not hasattr(EngineDenoiser, "row_counts")  # the runtime's class is back
    samples = vqa_task.balanced_split("test", 1, ["list", "digit"])
    pipe = Pipeline.load(cache_engines)
    plain = pipe.generate_batch([Request(s.image(), s.prompt) for s in samples], **long_sweeps.gen_kwargs(never))
    assert never["predictions"] == [r.text for r in plain]
    # the visual features were saved for other workers: a fresh process state reads them back
    saved = dict(long_sweeps._W["vision"])
    long_sweeps._init_worker(long_sweeps._W["common"])
    long_sweeps._load_shared_vision("cpu")
    assert saved.keys() == long_sweeps._W["vision"].keys()
    assert all(torch.equal(saved[k], long_sweeps._W["vision"][k]) for k in saved)
    b = pipe.bucket
    row = long_sweeps.summarize_setting(samples, never, res["flops_per_call"]["pruned"])
    want = [request_flops(cfg, b.prefix_len, b.max_visual_tokens, GenerationConfig(16, 16, 16), 2, 0.5,
                          b.vision_batch, forwards=f, cached_forwards=f - 2)["total"] for f in never["forwards"]]
    assert row["groups"]["all"]["gflops"] == pytest.approx(sum(want) / len(want) / 1e9)


def test_attention_analysis_long_types(tiny_ckpt):
    """The attention analysis on the long question types at gen 32 (issue 21)."""
    res = attention_analysis.run_analysis(tiny_ckpt, n=3, layers=[1], keeps=[0.5], gen_length=32,
                                          types=list(vqa_task.LONG_TYPES), progress=False)
    assert sorted(q["qtype"] for q in res["per_question"]) == sorted(vqa_task.LONG_TYPES)
    assert res["generation"]["gen_length"] == 32 and all(1 <= q["steps"] <= 32 for q in res["per_question"])
