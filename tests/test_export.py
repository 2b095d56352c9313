"""Artifacts: ONNX graphs in ONNX Runtime vs PyTorch, AOTInductor packages, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llada_export.exporter.bucket import Bucket
from llada_export.exporter.manifest import read_manifest
from llada_export.graphs.pruning import num_kept
from llada_export.reference import PruneSettings, build_prompt, pruned_forward
from llada_export.runtime.pipeline import layout_bucket
from llada_export.tokenizer import SpecialTokens

from conftest import KEEP, PROMPTS, PRUNE_LAYER


def _session(path):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def request_inputs(tiny, engines, images):
    """A real request laid out in the engines' bucket, plus the unpadded prompt."""
    model, tok, _ = tiny
    m = read_manifest(engines)
    bucket = Bucket.from_dict(m["bucket"])
    req = build_prompt(model, tok, images["380x250"], PROMPTS["short"])
    nb, nv = len(req.ids_before), req.n_visual
    e = req.embeds[0]
    return bucket, req, layout_bucket(bucket, e[:nb], e[nb:nb + nv], e[nb + nv:], 16)


def test_manifest_and_graph_shapes(engines):
    m = read_manifest(engines)
    assert set(m["artifacts"]["onnxruntime"]) == {"vision", "stage_a", "stage_b", "full"}
    assert m["pruning"] == {"enabled": True, "layer": PRUNE_LAYER, "keep": KEEP, "score_from": "response",
                            "k_static": m["bucket"]["k_static"]}
    for name, rel in m["artifacts"]["onnxruntime"].items():
        model = onnx.load(str(engines / rel))
        onnx.checker.check_model(model)
        for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            dims = v.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{name}: {v.name} has a dynamic dimension"
        for v in list(model.graph.input) + list(model.graph.output):  # fp32 / int64 / bool I/O only
            assert v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                    onnx.TensorProto.BOOL)


def test_stage_a_has_topk_with_constant_k(engines):
    m = read_manifest(engines)
    model = onnx.load(str(engines / m["artifacts"]["onnxruntime"]["stage_a"]))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    assert topk[0].input[1] in consts, "TopK's K is not a constant"
    assert int(np.asarray(consts[topk[0].input[1]]).reshape(-1)[0]) == m["bucket"]["k_static"]
    stage_b = onnx.load(str(engines / m["artifacts"]["onnxruntime"]["stage_b"]))
    assert not [n for n in stage_b.graph.node if n.op_type == "TopK"]


def test_onnx_stage_a_and_b_match_pytorch(tiny, engines, request_inputs):
    model, tok, _ = tiny
    sp = SpecialTokens.from_tokenizer(tok)
    bucket, req, x = request_inputs
    m = read_manifest(engines)
    g = bucket.gen_length
    resp = torch.full((1, g), sp.mask)
    n_keep = torch.tensor([num_kept(KEEP, req.n_visual)])
    feeds = dict(prefix_embeds=x.prefix_embeds, response_ids=resp, position_ids=x.position_ids,
                 key_mask=x.key_mask, visual_mask=x.visual_mask, num_keep=n_keep)
    sess = _session(engines / m["artifacts"]["onnxruntime"]["stage_a"])
    logits, index, alive = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        ref, ref_index, ref_alive = pruned_forward(
            model, x.prefix_embeds, resp, x.position_ids, x.key_mask, x.visual_mask, n_keep,
            PruneSettings(PRUNE_LAYER, KEEP), bucket.k_static, sp.mask)
    assert np.array_equal(index, ref_index.numpy()) and np.array_equal(alive, ref_alive.numpy())
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))

    # stage B on the reduced sequence vs the eager denoiser with the same inputs
    p_red = index.shape[1] - g
    idx = torch.from_numpy(index[0])
    resp2 = resp.clone()
    resp2[0, :4] = torch.tensor([11, 12, 13, 14])
    fb = dict(prefix_embeds=x.prefix_embeds[:, idx[:p_red]], response_ids=resp2,
              position_ids=x.position_ids[:, idx], key_mask=torch.from_numpy(alive))
    (lb,) = _session(engines / m["artifacts"]["onnxruntime"]["stage_b"]).run(None, {k: v.numpy() for k, v in fb.items()})
    with torch.no_grad():
        refb = model.denoise(**fb)
    np.testing.assert_allclose(lb, refb.numpy(), rtol=0, atol=1e-4 * max(1.0, float(refb.abs().max())))


def test_onnx_vision_matches_pytorch(tiny, engines):
    model, _, cfg = tiny
    m = read_manifest(engines)
    n = m["bucket"]["vision_batch"]
    s = cfg.vision.image_size
    pixels = torch.rand(n, 3, s, s) * 2 - 1
    (feats,) = _session(engines / m["artifacts"]["onnxruntime"]["vision"]).run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        ref = model.encode_images(pixels)
    np.testing.assert_allclose(feats, ref.numpy(), rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_aoti_packages_load_and_match_pytorch(tiny, aoti_engines, images):
    from torch._inductor import aoti_load_package

    model, tok, _ = tiny
    sp = SpecialTokens.from_tokenizer(tok)
    m = read_manifest(aoti_engines)
    assert set(m["artifacts"]) == {"aoti"}
    bucket = Bucket.from_dict(m["bucket"])
    req = build_prompt(model, tok, images["384x384"], PROMPTS["short"])
    nb, nv = len(req.ids_before), req.n_visual
    e = req.embeds[0]
    g = bucket.gen_length
    x = layout_bucket(bucket, e[:nb], e[nb:nb + nv], e[nb + nv:], g)
    resp = torch.full((1, g), sp.mask)
    n_keep = torch.tensor([num_kept(0.35, nv)])
    stage_a = aoti_load_package(str(aoti_engines / m["artifacts"]["aoti"]["stage_a"]))
    logits, index, alive = stage_a(x.prefix_embeds, resp, x.position_ids, x.key_mask, x.visual_mask, n_keep)
    with torch.no_grad():
        ref, ref_index, ref_alive = pruned_forward(
            model, x.prefix_embeds, resp, x.position_ids, x.key_mask, x.visual_mask, n_keep,
            PruneSettings(1, 0.35), bucket.k_static, sp.mask)
    assert torch.equal(index, ref_index) and torch.equal(alive, ref_alive)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))
    stage_b = aoti_load_package(str(aoti_engines / m["artifacts"]["aoti"]["stage_b"]))
    p_red = index.shape[1] - g
    fb = (x.prefix_embeds[:, index[0, :p_red]], resp, x.position_ids[:, index[0]], alive)
    (lb,) = stage_b(*fb) if isinstance(stage_b(*fb), (list, tuple)) else (stage_b(*fb),)
    with torch.no_grad():
        refb = model.denoise(*fb)
    torch.testing.assert_close(lb, refb, rtol=0, atol=1e-4 * max(1.0, float(refb.abs().max())))


def test_tensorrt_engines_build_or_skip(tiny_ckpt, tmp_path):
    from llada_export.exporter.backends import tensorrt_status

    reason = tensorrt_status()
    if reason:
        pytest.skip(f"TensorRT path not testable here: {reason}")
    from llada_export.exporter.build import ExportOptions, export_engines

    out = export_engines(ExportOptions(model=str(tiny_ckpt), output=str(tmp_path / "trt"), prune_layer=1,
                                       backends=("tensorrt",), gen_length=8, block_length=8, steps=8,
                                       max_prompt_tokens=160, device="cuda", progress=False))
    assert set(read_manifest(out)["artifacts"]["tensorrt"]) == {"vision", "stage_a", "stage_b"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llada_export.cli.export", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_exports_tiny_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "engines"
    t0 = time.perf_counter()
    r = _cli("--model", str(tiny_ckpt), "--prune-layer", "2", "--keep", "0.35", "-o", str(out), "-q")
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (out / "manifest.json").is_file()
    print(f"llada-export (ONNX Runtime, tiny checkpoint, default bucket): {took:.1f} s")
    r = _cli("--model", str(tiny_ckpt), "--prune-layer", "2", "-o", str(out), "-q")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--prune-layer", "9"], "out of range"),
    (["--keep", "0"], "--keep must be in"),
    (["--keep", "1.5"], "--keep must be in"),
    (["--gen-length", "10", "--block-length", "4"], "not a multiple of block_length"),
    (["--gen-length", "16", "--steps", "3", "--block-length", "8"], "not divisible"),
    (["--backend", "tensorrt", "--max-visual-tokens", "12000", "--keep", "0.5", "--prune-layer", "1"], "TopK"),
])
def test_cli_bad_input_is_one_line_exit_2_and_leaves_nothing(tiny_ckpt, tmp_path, args, msg):
    out = tmp_path / "engines"
    r = _cli("--model", str(tiny_ckpt), "-o", str(out), "-q", *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".engines*"))


def test_cli_missing_and_foreign_checkpoint(tmp_path):
    r = _cli("--model", str(tmp_path / "nope"), "-o", str(tmp_path / "e"), "-q")
    assert r.returncode == 2 and "nope: no such checkpoint directory" in r.stderr
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = _cli("--model", str(foreign), "-o", str(tmp_path / "e"), "-q")
    assert r.returncode == 2 and "llava_llada" in r.stderr
    assert not (tmp_path / "e").exists()


def test_aoti_weights_from_checkpoint(tiny, tiny_ckpt, tmp_path, images):
    """Packages built without their weights load them from the checkpoint, shared by all graphs."""
    from llada_export.exporter.build import ExportOptions, export_engines
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.runtime.sampler import preset

    out = export_engines(ExportOptions(model=str(tiny_ckpt), output=str(tmp_path / "e"), prune_layer=1, keep=0.35,
                                       backends=("aoti",), compiled_weights="checkpoint", gen_length=8, block_length=8,
                                       steps=8, max_prompt_tokens=160, progress=False))
    m = read_manifest(out)
    side = sum(v["bytes"] for k, v in m["files"].items() if k.endswith(".constants.safetensors"))
    weight_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert side < 0.01 * weight_bytes  # only small non-checkpoint constants travel beside the packages
    assert m["constants_from_checkpoint"]["aoti"]["stage_b"]["lm_head.weight"] == "lm_head.weight"
    pipe = Pipeline.load(out)
    a = pipe.runners["stage_a"].model, pipe.runners["stage_b"].model
    assert a[0] is not a[1]
    model, tok, _ = tiny
    ref = reference_generate(model, tok, images["384x384"], PROMPTS["long"], preset("mc"), PruneSettings(1, 0.35))
    got = pipe.generate(images["384x384"], PROMPTS["long"], preset="mc")
    assert got.ids == ref.ids and got.kept_visual == ref.kept_visual


def test_inductor_programs_from_checkpoint(tiny, tiny_ckpt, tmp_path, images):
    """The Inductor backend: ExportedProgram archives without their weights (meta tensors mapped to
    checkpoint keys), compiled with torch.compile at load time; token-exact against the eager
    pruned reference."""
    from llada_export.exporter.build import ExportOptions, export_engines
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.runtime.sampler import preset

    out = export_engines(ExportOptions(model=str(tiny_ckpt), output=str(tmp_path / "e"), prune_layer=1, keep=0.35,
                                       backends=("inductor",), compiled_weights="checkpoint", fuse_sampler=True,
                                       gen_length=8, block_length=8, steps=8, max_prompt_tokens=160,
                                       progress=False))
    m = read_manifest(out)
    assert set(m["artifacts"]) == {"inductor"} and m["artifacts"]["inductor"]["stage_b"] == "programs/stage_b.pt2"
    # the same export with the weights inside holds every graph's weights in its archive: the
    # stripped archives are smaller by at least one copy of the model
    packed = read_manifest(export_engines(ExportOptions(
        model=str(tiny_ckpt), output=str(tmp_path / "packed"), prune_layer=1, keep=0.35, backends=("inductor",),
        compiled_weights="package", fuse_sampler=True, gen_length=8, block_length=8, steps=8, max_prompt_tokens=160,
        progress=False)))

    def archives(man):
        return sum(v["bytes"] for k, v in man["files"].items() if k.startswith("programs/"))

    weight_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert archives(packed) - archives(m) > weight_bytes
    assert packed["constants_from_checkpoint"] is None
    assert "lm_head.weight" in m["constants_from_checkpoint"]["inductor"]["stage_a"].values()
    ep = torch.export.load(str(out / "programs" / "stage_b.pt2"))
    assert {t.device.type for t in ep.state_dict.values()} == {"meta"}
    with pytest.raises(RuntimeError, match="no weight for"):
        from llada_export.engines.runners import InductorRunner

        InductorRunner(out / "programs" / "stage_b.pt2", [], [])
    pipe = Pipeline.load(out)
    assert pipe.backend == "inductor"
    model, tok, _ = tiny
    for name in ("short", "long"):
        gen = preset("mc", gen_length=8, block_length=8, steps=8)
        ref = reference_generate(model, tok, images["384x384"], PROMPTS[name], gen, PruneSettings(1, 0.35))
        got = pipe.generate(images["384x384"], PROMPTS[name], gen_length=8, block_length=8, steps=8)
        assert got.ids == ref.ids and got.kept_visual == ref.kept_visual
