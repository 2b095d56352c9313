"""Smoke tests of tools/prune_sweep.py and tools/attention_analysis.py on the tiny random checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import attention_analysis  # noqa: E402
import prune_sweep  # noqa: E402

from llada_export.checkpoint import load_checkpoint  # noqa: E402
from llada_export.config import demo_config  # noqa: E402
from llada_export.graphs.anyres import visual_token_count  # noqa: E402
from llada_export.graphs.pruning import num_kept  # noqa: E402


def _in01(x: float) -> bool:
    return 0.0 <= x <= 1.0 + 1e-6


def test_prune_sweep_tiny(tiny_ckpt, tmp_path):
    res = prune_sweep.run_sweep(tiny_ckpt, n=2, layers=[1], keeps=[0.5], workdir=tmp_path / "work", progress=False)
    json.loads(json.dumps(res))  # serialisable
    assert [r["setting"] for r in res["results"]] == ["unpruned", "K=1 keep=0.5"]
    for r in res["results"]:
        assert r["n"] == 2 and len(r["predictions"]) == 2
        assert _in01(r["overall"]) and all(_in01(v) for v in r["per_type"].values())
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["overall"] <= hi <= 1.0
        assert r["flops"]["total"] > 0
    assert res["results"][1]["flops"]["total"] < res["results"][0]["flops"]["total"]
    assert res["results"][1]["k"] == round(0.5 * res["bucket"]["max_visual_tokens"])
    md = prune_sweep.markdown(res)
    assert "| K=1 keep=0.5 |" in md and "lost / gained" in md
    base = res["results"][0]
    for r in res["results"]:  # the paired counts reconcile with the two accuracies
        assert base["correct"] - r["lost"] + r["gained"] == r["correct"]
    prune_sweep.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0

    # FLOPs fall as keep falls, at every layer (analytic, no export needed).
    _, _, cfg = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    bucket = prune_sweep.plan_bucket(prune_sweep.ExportOptions(model="", output="", image_size=prune_sweep.IMAGE_SIZE,
                                                               max_prompt_tokens=100, gen_length=8), cfg)
    gen = prune_sweep.GenerationConfig(8, 8, 8)
    full = prune_sweep.flops_for(cfg, bucket, gen, None, 1.0)["total"]
    for layer in range(cfg.text.num_hidden_layers):
        f = [prune_sweep.flops_for(cfg, bucket, gen, layer, k)["total"] for k in (0.75, 0.5, 0.25, 0.1)]
        assert all(a > b for a, b in zip(f, f[1:])) and f[0] < full


def test_attention_analysis_tiny(tiny_ckpt, tmp_path):
    res = attention_analysis.run_analysis(tiny_ckpt, n=2, layers=[1, 3], keeps=[0.35], progress=False)
    json.loads(json.dumps(res))  # serialisable
    n_layers = res["n_layers"]
    assert len(res["visual_share_step1"]) == len(res["visual_share_all_steps"]) == n_layers
    assert all(_in01(v) for v in res["visual_share_step1"] + res["visual_share_all_steps"])
    assert _in01(res["uniform_visual_share"]) and res["recommended_layer"] in (1, 3)
    assert all(_in01(v) for v in res["stability_mean"].values())
    assert _in01(res["accuracy"]) and res["mean_steps"] >= 1
    for kp, per_layer in res["object_recall_step1"].items():
        assert len(per_layer) == n_layers and all(_in01(v) for v in per_layer)
        n_vis = res["per_question"][0]["n_visual"]
        assert res["object_recall_chance"][kp] == pytest.approx(num_kept(float(kp), n_vis) / n_vis)
    md = attention_analysis.markdown(res)
    assert "object recall" in md and "Recommended K" not in md  # no sweep given: no final recommendation


def test_object_tokens_follow_the_anyres_layout():
    from train_demo import patch_labels
    import vqa_task

    cfg = demo_config()
    s = vqa_task.sample("test", 22)
    obj = attention_analysis.object_tokens(s.scene, cfg)
    assert obj.shape == (visual_token_count(vqa_task.WIDTH, vqa_task.HEIGHT, cfg),)
    t = cfg.vision.patches_per_side ** 2
    base = patch_labels(s.scene, cfg)[0][0] > 0  # [T] shape labels of the base crop
    assert torch.equal(obj[:t], torch.from_numpy(base))  # the base crop's tokens come first, unchanged
    # the grid tokens: each object covers some, the background most
    assert 0 < int(obj[t:].sum()) < 0.5 * (obj.numel() - t)
