"""Artifacts: ONNX graphs in ONNX Runtime vs PyTorch (one shared weights file), AOTInductor packages,
Inductor archives, CLI errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import KEEP, PROMPTS, PRUNE_LAYER, cli_here, export
from llada_export.contract.layout import layout_bucket, reduce_inputs
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings, num_kept
from llada_export.reference import embed_prompt, pruned_forward
from llada_export.tokenizer import special_tokens


def _session(path):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def request_inputs(tiny, engines, images):
    """A real request laid out in the engines' bucket, plus the unpadded prompt."""
    model, tok, _ = tiny
    bucket = Manifest.read(engines).bucket
    req = embed_prompt(model, tok, images["380x250"], PROMPTS["short"])
    return bucket, req, layout_bucket(bucket, [req.parts()], 16)


def test_manifest_and_graph_shapes(engines):
    m = Manifest.read(engines)
    assert set(m.artifacts["onnxruntime"]) == {"vision", "stage_a", "stage_b", "unpruned"}
    assert m.pruning == PruneSettings(PRUNE_LAYER, KEEP, "response")
    assert m.bucket.k_static == num_kept(KEEP, m.bucket.max_visual_tokens)
    for name, rel in m.artifacts["onnxruntime"].items():
        model = onnx.load(str(engines / rel))
        io = m.graphs[name]
        assert [i.name for i in model.graph.input] == io.input_names
        assert [o.name for o in model.graph.output] == io.output_names
        assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == \
            [list(t.shape) for t in io.inputs]
        onnx.checker.check_model(model)
        for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            dims = v.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{name}: {v.name} has a dynamic dimension"
        for v in list(model.graph.input) + list(model.graph.output):  # fp32 / int64 / bool I/O only
            assert v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                    onnx.TensorProto.BOOL)


def test_onnx_graphs_share_one_weights_file(engines, tiny):
    """Every graph's initializers live in onnx/weights.bin, each distinct tensor once: the directory
    holds the weights about once, not once per graph (four graphs here)."""
    m = Manifest.read(engines)
    weights = m.files["onnx/weights.bin"].bytes
    model_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert weights < 1.1 * model_bytes  # stage A, stage B and unpruned share the decoder weights
    assert not [k for k in m.files if k.endswith(".data")]
    inline = 0
    for rel in m.artifacts["onnxruntime"].values():
        proto = onnx.load(str(engines / rel), load_external_data=False)
        big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and {e.value for t in big for e in t.external_data if e.key == "location"} == {"weights.bin"}
        inline += sum(len(t.raw_data) for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert inline < 0.01 * model_bytes  # the graph files hold no weights of their own


def test_stage_a_has_topk_with_constant_k(engines):
    m = Manifest.read(engines)
    model = onnx.load(str(engines / m.artifacts["onnxruntime"]["stage_a"]))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    assert topk[0].input[1] in consts, "TopK's K is not a constant"
    assert int(np.asarray(consts[topk[0].input[1]]).reshape(-1)[0]) == m.bucket.k_static
    stage_b = onnx.load(str(engines / m.artifacts["onnxruntime"]["stage_b"]))
    assert not [n for n in stage_b.graph.node if n.op_type == "TopK"]


def test_onnx_stage_a_and_b_match_pytorch(tiny, engines, request_inputs):
    model, tok, _ = tiny
    sp = special_tokens(tok)
    bucket, req, x = request_inputs
    m = Manifest.read(engines)
    g = bucket.gen_length
    resp = torch.full((1, g), sp.mask)
    feeds = x.stage_a_feeds(resp, KEEP)
    n_keep = feeds["num_keep"]
    assert n_keep.tolist() == [num_kept(KEEP, req.n_visual)]
    sess = _session(engines / m.artifacts["onnxruntime"]["stage_a"])
    logits, index, alive = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        ref, ref_index, ref_alive = pruned_forward(
            model, x.prefix_embeds, resp, x.position_ids, x.key_mask, x.visual_mask, n_keep,
            PruneSettings(PRUNE_LAYER, KEEP), bucket.k_static, sp.mask)
    assert np.array_equal(index, ref_index.numpy()) and np.array_equal(alive, ref_alive.numpy())
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))

    # stage B on the reduced sequence vs the eager denoiser with the same inputs
    resp2 = resp.clone()
    resp2[0, :4] = torch.tensor([11, 12, 13, 14])
    fb = reduce_inputs(x, torch.from_numpy(index), torch.from_numpy(alive)).denoiser_feeds(resp2)
    (lb,) = _session(engines / m.artifacts["onnxruntime"]["stage_b"]).run(None, {k: v.numpy() for k, v in fb.items()})
    with torch.no_grad():
        refb = model.denoise(**fb)
    np.testing.assert_allclose(lb, refb.numpy(), rtol=0, atol=1e-4 * max(1.0, float(refb.abs().max())))


def test_onnx_vision_matches_pytorch(tiny, engines):
    model, _, cfg = tiny
    m = Manifest.read(engines)
    n = m.bucket.vision_batch
    s = cfg.vision.image_size
    pixels = torch.rand(n, 3, s, s) * 2 - 1
    (feats,) = _session(engines / m.artifacts["onnxruntime"]["vision"]).run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        ref = model.encode_images(pixels)
    np.testing.assert_allclose(feats, ref.numpy(), rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_aoti_packages_load_and_match_pytorch(tiny, aoti_engines, images):
    from torch._inductor import aoti_load_package

    model, tok, _ = tiny
    sp = special_tokens(tok)
    m = Manifest.read(aoti_engines)
    assert set(m.artifacts) == {"aoti"}
    bucket = m.bucket
    req = embed_prompt(model, tok, images["384x384"], PROMPTS["short"])
    g = bucket.gen_length
    x = layout_bucket(bucket, [req.parts()], g)
    resp = torch.full((1, g), sp.mask)
    feeds = x.stage_a_feeds(resp, 0.35)
    stage_a = aoti_load_package(str(aoti_engines / m.artifacts["aoti"]["stage_a"]))
    logits, index, alive = stage_a(*feeds.values())
    with torch.no_grad():
        ref, ref_index, ref_alive = pruned_forward(model, *feeds.values(), PruneSettings(1, 0.35), bucket.k_static,
                                                   sp.mask)
    assert torch.equal(index, ref_index) and torch.equal(alive, ref_alive)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))
    stage_b = aoti_load_package(str(aoti_engines / m.artifacts["aoti"]["stage_b"]))
    fb = reduce_inputs(x, index, alive).denoiser_feeds(resp)
    out = stage_b(*fb.values())
    (lb,) = out if isinstance(out, (list, tuple)) else (out,)
    with torch.no_grad():
        refb = model.denoise(**fb)
    torch.testing.assert_close(lb, refb, rtol=0, atol=1e-4 * max(1.0, float(refb.abs().max())))


def test_tensorrt_engines_build_or_skip(tiny_ckpt, tmp_path):
    from llada_export.engines.tensorrt import tensorrt_status

    reason = tensorrt_status()
    if reason:
        pytest.skip(f"TensorRT path not testable here: {reason}")
    out = export(tiny_ckpt, tmp_path / "trt", prune=PruneSettings(1, 0.35), backends=("tensorrt",), gen_length=8,
                 max_prompt_tokens=160, device="cuda")
    assert set(Manifest.read(out).artifacts["tensorrt"]) == {"vision", "stage_a", "stage_b"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llada_export.cli.export", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def _cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """``llada-export ARGS`` run in this process (helpers.cli_here): for the refusals. (The export in
    test_cli_exports_tiny_checkpoint and the interrupted one of the SIGTERM test, which ends through
    the same one-line error handling, run in a real process, as test_cli's --help and --version do.)"""
    from llada_export.cli.export import main

    return cli_here(main, "llada-export", capsys, *args)


def test_cli_exports_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "engines"
    t0 = time.perf_counter()
    r = _cli("--model", str(tiny_ckpt), "--prune-layer", "2", "--keep", "0.35", "--image-size", "384x384",
             "-o", str(out), "-q")
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "onnxruntime (vision, stage_a, stage_b)" in r.stdout
    assert Manifest.read(out).pruning == PruneSettings(2, 0.35)
    print(f"llada-export (ONNX Runtime, tiny checkpoint): {took:.1f} s")
    r = _cli_here(capsys, "--model", str(tiny_ckpt), "--prune-layer", "2", "--image-size", "384x384", "-o", str(out),
                  "-q")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--prune-layer", "9"], "out of range"),
    (["--prune-layer", "-1"], "prune layer must be an integer >= 0"),
    (["--keep", "0"], "must be in (0, 1]"),
    (["--keep", "1.5"], "must be in (0, 1]"),
    (["--gen-length", "0"], "must be a positive integer"),
    (["--steps", "0"], "must be a positive integer"),
    (["--block-length", "0"], "must be a positive integer"),
    (["--max-visual-tokens", "0"], "must be a positive integer"),
    (["--max-prompt-tokens", "20", "--prune-layer", "1"], "does not hold the chat template"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(["--device", "cuda"], "no CUDA GPU is visible", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA GPU is visible here: --device cuda is valid")),
    # the schedule's errors name the flags and the valid values (QA pass: "100 steps per block exceed block_length 16")
    (["--gen-length", "10", "--block-length", "4"], "--block-length 4 must divide --gen-length 10 (e.g. --block-length 2"),
    (["--gen-length", "16", "--steps", "3", "--block-length", "8"],
     "--steps 3 must be a multiple of the 2 block(s) (--gen-length 16 / --block-length 8) from 2 to 16"),
    (["--gen-length", "16", "--steps", "100"], "--steps 100 must be a multiple of the 1 block(s) (--gen-length 16 / "
                                               "--block-length 16) from 1 to 16"),
    (["--backend", "tensorrt", "--max-visual-tokens", "12000", "--keep", "0.5", "--prune-layer", "1"], "TopK"),
])
def test_cli_bad_input_is_one_line_exit_2_and_leaves_nothing(tiny_ckpt, tmp_path, capsys, args, msg):
    out = tmp_path / "engines"
    r = _cli_here(capsys, "--model", str(tiny_ckpt), "-o", str(out), "-q", *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".engines*"))


def test_a_prompt_bucket_without_room_for_the_default_system_prompt_is_noted(tmp_path):
    """The demo tokenizer's template takes 17 tokens with an empty system prompt and 52 with the default one
    (counted with the tokenizer, not by this code): 40 slots export, but the manifest notes that llada-generate
    and llada-compare (which send the default system prompt) will refuse every prompt; 72 slots get no note."""
    from llada_export.demo import DEMO_MODEL
    from llada_export.exporter.build import ExportOptions, preflight
    from llada_export.tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt, load_tokenizer

    tok = load_tokenizer(DEMO_MODEL)
    default = sum(map(len, encode_prompt(tok, "", has_image=True, system=DEFAULT_SYSTEM_PROMPT)))
    assert sum(map(len, encode_prompt(tok, "", has_image=True, system=""))) < 40 <= default < 72
    notes = {}
    for slots in (40, 72):
        opts = ExportOptions(str(DEMO_MODEL), str(tmp_path / f"e{slots}"), PruneSettings(3, 0.5), max_prompt_tokens=slots)
        preflight(opts)
        preflight(opts)  # a second check does not repeat it
        notes[slots] = [n for n in opts.notes if n.startswith("--max-prompt-tokens")]
    assert len(notes[40]) == 1 and f"at least {default + 16}" in notes[40][0] and "llada-generate" in notes[40][0]
    assert notes[72] == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, msg", [
    (["--keep", "nan"], "argument --keep:"),
    (["--keep", "inf"], "argument --keep:"),
    (["--image-size", "384x288", "--max-visual-tokens", "100"],
     "--max-visual-tokens 100 is fewer than the"),
    (["--no-prune", "--keep", "0.2"], "--no-prune builds unpruned engines only: --keep would be ignored"),
    (["--no-prune", "--prune-layer", "1", "--score-from", "text"],
     "--prune-layer, --score-from would be ignored; drop them or --no-prune"),
    (["--no-prune", "--baseline"], "--baseline would be ignored"),
    (["--compile-cache"], "--compile-cache applies to inductor builds only"),
    (["--no-compile-cache", "--backend", "aoti"], "--no-compile-cache applies to inductor builds only"),
    (["--precompile"], "--precompile applies to inductor builds only"),
    (["--no-precompile", "--backend", "aoti"], "--no-precompile applies to inductor builds only"),
    (["--batch-size", str(10**8)], "these engines need at least"),
], ids=["keep-nan", "keep-inf", "image-size-vs-slots", "no-prune-keep", "no-prune-layer-score", "no-prune-baseline",
        "compile-cache-onnx", "no-compile-cache-aoti", "precompile-onnx", "no-precompile-aoti", "batch-size-memory"])
def test_cli_refuses_conflicting_ignored_or_unbuildable_flags(tiny_ckpt, tmp_path, capsys, args, msg):
    """Flags the export would ignore, contradict or cannot hold (issue 20): one line, exit 2, before any
    weight is read, nothing written. In-process: the CLI's own argument handling and preflight."""
    from llada_export.cli.export import main

    out = tmp_path / "engines"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_ckpt), "-o", str(out), "-q", "--prune-layer", "1", *args]
             if "--no-prune" not in args else ["--model", str(tiny_ckpt), "-o", str(out), "-q", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_batch_size_beyond_memory_names_a_batch_size_that_fits(tiny_ckpt, tmp_path):
    """`--batch-size 100000` on the default bucket (every image size): refused before anything is allocated
    (it ended in an out-of-memory traceback), naming a batch size this machine can hold; that one passes."""
    import re

    from llada_export.exporter.build import ExportError, ExportOptions, preflight

    opts = ExportOptions(str(tiny_ckpt), str(tmp_path / "e"), prune=PruneSettings(1, 0.35), batch_size=100_000_000)
    with pytest.raises(ExportError, match=r"and cpu has [\d.]+ [GM]iB free: use --batch-size \d+ or less") as e:
        preflight(opts)
    fits = int(re.search(r"use --batch-size (\d+) or less", str(e.value)).group(1))
    assert preflight(ExportOptions(str(tiny_ckpt), str(tmp_path / "e"), prune=PruneSettings(1, 0.35),
                                   batch_size=fits // 2)).batch_size == fits // 2
    assert not (tmp_path / "e").exists()


OOM_SCRIPT = """
import resource, sys
import onnx, onnxruntime, torch, torch.onnx  # mapped before the limit
from llada_export.cli.export import main
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))  # 1 GiB more address space
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_out_of_memory_while_building_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path):
    """An allocation that fails during the build (a process limited to 1 GiB more address space, a batch
    whose example inputs alone exceed it, under the memory estimate of a machine with several GiB
    free): one line naming the batch size, exit 2, no output and no partial directory left."""
    from llada_export.checkpoint.loader import read_config
    from llada_export.exporter.build import ExportError, ExportOptions, check_memory, plan_bucket

    args = ["--model", str(tiny_ckpt), "-o", str(tmp_path / "e"), "-q", "--prune-layer", "1", "--image-size",
            "384x384", "--max-prompt-tokens", "64", "--gen-length", "16", "--batch-size", "20000"]
    opts = ExportOptions(str(tiny_ckpt), str(tmp_path / "e"), prune=PruneSettings(1, 0.35), image_size=(384, 384),
                         max_prompt_tokens=64, gen_length=16, batch_size=20000)
    cfg = read_config(tiny_ckpt)
    try:  # the estimate must pass here, or the refusal before the build is what would be tested
        check_memory(opts, plan_bucket(opts, cfg), cfg, weights_loaded=False)
    except ExportError as e:
        pytest.skip(f"the memory estimate refuses first on this machine: {e}")
    r = subprocess.run([sys.executable, "-c", OOM_SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.strip().splitlines() if "Warning" not in line and "pbar" not in line]
    assert err[-1].startswith("llada-export: error: out of memory on cpu while building the engines (batch size "
                              "20000, in ") and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"\(batch size 20000, in \w+ \(\w+\.py:\d+\)\)", err[-1]), err[-1]  # where in the build
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_and_foreign_checkpoint(tmp_path, capsys):
    r = _cli_here(capsys, "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "e"), "-q")
    assert r.returncode == 2 and "nope: no such checkpoint directory" in r.stderr
    (tmp_path / "a_file").write_text("x")
    r = _cli_here(capsys, "--model", str(tmp_path / "a_file"), "-o", str(tmp_path / "e"), "-q")
    assert r.returncode == 2 and "a_file: a file, not a checkpoint directory" in r.stderr
    (tmp_path / "a_file").unlink()
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = _cli_here(capsys, "--model", str(foreign), "-o", str(tmp_path / "e"), "-q")
    assert r.returncode == 2 and "llava_llada" in r.stderr and str(foreign / "config.json") in r.stderr
    assert not (tmp_path / "e").exists()


def test_aoti_weights_from_checkpoint(tiny, tiny_ckpt, tmp_path, images):
    """Packages built without their weights load them from the checkpoint, once, shared by all graphs
    (the same storage: scaling the loaded lm_head in place changes what both stages compute)."""
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline, Request
    from llada_export.sampler import preset

    out = export(tiny_ckpt, tmp_path / "e", prune=PruneSettings(1, 0.35), backends=("aoti",),
                 compiled_weights="checkpoint", gen_length=8, max_prompt_tokens=160)
    m = Manifest.read(out)
    side = sum(f.bytes for k, f in m.files.items() if k.endswith(".constants.safetensors"))
    weight_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert side < 0.01 * weight_bytes  # only small non-checkpoint constants travel beside the packages
    assert m.constants_from_checkpoint["aoti"]["stage_b"]["lm.lm_head.weight"] == "lm_head.weight"
    pipe = Pipeline.load(out)
    model, tok, _ = tiny
    ref = reference_generate(model, tok, images["384x384"], PROMPTS["long"], preset("mc"), PruneSettings(1, 0.35))
    got = pipe.generate(images["384x384"], PROMPTS["long"], fixed_schedule=True, preset="mc")
    assert got.ids == ref.ids and got.kept_visual == ref.kept_visual

    x = pipe._layout([Request(images["384x384"], PROMPTS["long"])], 8)[0]
    resp = torch.full((1, 8), pipe.tokens.mask)
    a = pipe.run("stage_a", **x.stage_a_feeds(resp, 0.35))
    b = pipe.run("stage_b", **reduce_inputs(x, a["kept_index"], a["kept_alive"]).denoiser_feeds(resp))
    head = pipe.weights["lm_head.weight"]
    with torch.no_grad():
        head.mul_(2.0)
        try:
            a2 = pipe.run("stage_a", **x.stage_a_feeds(resp, 0.35))
            b2 = pipe.run("stage_b", **reduce_inputs(x, a["kept_index"], a["kept_alive"]).denoiser_feeds(resp))
        finally:
            head.div_(2.0)
    torch.testing.assert_close(a2["logits"], 2 * a["logits"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b2["logits"], 2 * b["logits"], rtol=1e-5, atol=1e-4)


def test_inductor_programs_from_checkpoint(tiny, tiny_ckpt, tmp_path, images):
    """The Inductor backend: ExportedProgram archives without their weights (meta tensors mapped to
    checkpoint keys), compiled with torch.compile at load time, every graph on the same weight
    tensors; token-exact against the eager pruned reference."""
    from llada_export.engines.inductor import runner
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.sampler import preset

    kw = dict(prune=PruneSettings(1, 0.35), backends=("inductor",), fuse_sampler=True, gen_length=8,
              max_prompt_tokens=160)
    out = export(tiny_ckpt, tmp_path / "e", compiled_weights="checkpoint", **kw)
    m = Manifest.read(out)
    assert set(m.artifacts) == {"inductor"} and m.artifacts["inductor"]["stage_b"] == "programs/stage_b.pt2"
    # the same export with the weights inside holds every graph's weights in its archive: the
    # stripped archives are smaller by at least one copy of the model
    packed = Manifest.read(export(tiny_ckpt, tmp_path / "packed", compiled_weights="package", **kw))

    def archives(man):
        return sum(f.bytes for k, f in man.files.items() if k.startswith("programs/"))

    weight_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert archives(packed) - archives(m) > weight_bytes
    assert packed.constants_from_checkpoint is None
    assert "lm_head.weight" in m.constants_from_checkpoint["inductor"]["stage_a"].values()
    ep = torch.export.load(str(out / "programs" / "stage_b.pt2"))
    assert {t.device.type for t in ep.state_dict.values()} == {"meta"}
    with pytest.raises(RuntimeError, match="no weight for"):
        runner(out / "programs" / "stage_b.pt2", m.graphs["stage_b"])
    pipe = Pipeline.load(out)
    assert pipe.backend == "inductor"
    head = pipe.weights["lm_head.weight"]
    for name in ("stage_a", "stage_b"):
        params = dict(pipe.runners[name].module.named_parameters())
        assert any(p.data_ptr() == head.data_ptr() for p in params.values()), f"{name} has its own lm_head"
    model, tok, _ = tiny
    for name in ("short", "long"):
        gen = preset("mc", gen_length=8, block_length=8, steps=8)
        ref = reference_generate(model, tok, images["384x384"], PROMPTS[name], gen, PruneSettings(1, 0.35))
        got = pipe.generate(images["384x384"], PROMPTS[name], fixed_schedule=True, gen_length=8, block_length=8, steps=8)
        assert got.ids == ref.ids and got.kept_visual == ref.kept_visual


def test_inductor_compile_cache_is_saved_and_loaded(compile_cache_engines, tmp_path):
    """--compile-cache: the export compiles each graph and saves the compiler's cache; a fresh process
    with an empty Inductor cache loads it and compiles every graph from it (cache hits, no misses); a
    cache made for another torch is ignored (and says so). (conftest's compile_cache_engines: unpruned
    Inductor engines and the fresh process's load, shared with test_compile_cache_unpruned.)"""
    import shutil

    out = compile_cache_engines / "g16"
    m = Manifest.read(out)
    assert m.compile_cache == {"inductor": "programs/compile_cache.bin"}
    assert {"programs/compile_cache.bin", "programs/compile_cache.json"} <= set(m.files)

    warm = json.loads((compile_cache_engines / "load.json").read_text())
    assert warm["returncode"] == 0, warm["stderr"]
    assert warm["cache"] == "loaded"
    assert warm["hits"] >= len(m.artifacts["inductor"]) and warm["misses"] == 0
    print(f"tiny inductor load on this CPU from the compile cache: {warm['seconds']:.1f} s")
    from llada_export.engines.inductor import load_cache

    programs = tmp_path / "programs"  # a copy: the shared engines stay as exported
    programs.mkdir()
    for name in ("compile_cache.bin", "compile_cache.json"):
        shutil.copy(out / "programs" / name, programs / name)
    info = programs / "compile_cache.json"
    saved = json.loads(info.read_text())
    info.write_text(json.dumps(saved | {"torch": "0.0.0"}))
    said = load_cache(programs / "compile_cache.bin", "cpu")
    assert said.startswith(f"ignored: made for another machine (torch 0.0.0 (here {torch.__version__})"), said
    info.write_text(json.dumps(saved | {"cpu_threads": saved["cpu_threads"] + 1}))  # CPU kernels are per count
    assert "cpu_threads" in load_cache(programs / "compile_cache.bin", "cpu")


def test_cli_never_touches_the_checkpoint_or_a_bystander(tiny_ckpt, tmp_path, capsys):
    """`-o` that is the checkpoint, contains it (its parent, beside a bystander file) or is a file:
    refused with one line and exit 2 even with --overwrite; nothing is touched, no .old copy is left.
    (Lying inside it and the other refusals are tests/test_outdir.py's, on the module every CLI
    writes through.)"""
    import shutil

    par = tmp_path / "par"
    shutil.copytree(tiny_ckpt, par / "ck")
    (par / "notes.txt").write_text("mine")
    (tmp_path / "o_file").write_text("a file")
    before = {p: p.read_bytes() for p in par.rglob("*") if p.is_file()}
    ck = str(par / "ck")
    for out, msg in [(par, f"contains {ck}, which must not be modified"), (par / "ck", f"{ck} is an input of this run (it must not be modified)"),
                     (tmp_path / "o_file", "exists and is not a directory")]:
        r = _cli_here(capsys, "--model", str(par / "ck"), "-o", str(out), "--overwrite", "-q")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (out, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (msg, r.stderr)
    assert {p: p.read_bytes() for p in par.rglob("*") if p.is_file()} == before
    assert (tmp_path / "o_file").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o_file", "par"]  # no .old / .partial / .lock left


def test_cli_second_export_to_one_dir_is_refused_and_sigterm_cleans_up(tiny_ckpt, tmp_path, capsys):
    """Two llada-export runs into one -o: the second fails at once naming the first; SIGTERM to the
    first (mid-export) exits 143 and leaves nothing: no -o, no hidden partial, no lock."""
    import signal

    out = tmp_path / "eng"
    args = ["--model", str(tiny_ckpt), "--prune-layer", "2", "-o", str(out), "-q"]
    first = subprocess.Popen([sys.executable, "-m", "llada_export.cli.export", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while not list(tmp_path.glob(".eng.partial-*")):  # the first holds the lock and is writing
        assert first.poll() is None and time.perf_counter() - t0 < 120, first.communicate()
        time.sleep(0.2)
    second = _cli_here(capsys, *args)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "interrupted" in err, err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- issue 20: paths never run through engines
TINY_EXPORT = dict(gen_length=8, max_prompt_tokens=160)  # the smallest bucket the chat template and presets fit
GEN8 = dict(gen_length=8, block_length=8, steps=8)


@pytest.fixture(scope="module")
def unpruned_all(tiny_ckpt, tmp_path_factory):
    """`--no-prune --backend all` of the tiny checkpoint, with the "auto" weights threshold (2 GiB) lowered
    to 1 MiB, under the tiny model's 2.5 MB: the compiled backends take the real switch to checkpoint
    weights. One export for three checks."""
    from llada_export.engines.registry import backend_names

    return export(tiny_ckpt, tmp_path_factory.mktemp("all") / "e", prune=None, backends=tuple(backend_names()),
                  external_weights_above=2**20, **TINY_EXPORT)


def test_unpruned_engines_refuse_compare_unpruned_and_unknown_backends(unpruned_all, capfd):
    """--compare-unpruned on --no-prune engines would time the unpruned graph against itself: exit 2, one line.
    A backend name that does not exist is not 're-export with --backend bogus': the message lists the real ones."""
    from llada_export.cli.generate import main
    from llada_export.contract.manifest import ManifestError
    from llada_export.runtime.pipeline import Pipeline

    r = cli_here(main, "llada-generate", capfd, "--engines", str(unpruned_all), "--image", "llada_export/assets/demo.png",
                 "--prompt", "What is shown?", "--backend", "onnxruntime", "--compare-unpruned")
    assert r.returncode == 2 and "holds unpruned engines only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ManifestError, match="backends: .*onnxruntime") as e:
        Pipeline.load(unpruned_all, backend="bogus")
    assert "re-export" not in str(e.value)
    # plain llada-generate on inductor engines: the answer and one timing line, no load bar where stderr is no terminal
    r = cli_here(main, "llada-generate", capfd, "--engines", str(unpruned_all), "--image", "llada_export/assets/demo.png",
                 "--prompt", "What is shown?", "--backend", "inductor", "--gen-length", "8", "--steps", "8",
                 "--block-length", "8")
    assert r.returncode == 0 and r.stderr.strip().splitlines()[-1].startswith("llada-generate: "), r.stderr
    assert "load inductor" not in r.stderr, r.stderr


def test_backend_all_writes_every_installed_backend_and_each_loads(unpruned_all):
    """--backend all: onnxruntime, aoti and inductor (always installed with torch) written and loadable;
    TensorRT, where its package or a GPU is missing, skipped with the reason in the manifest's notes."""
    import importlib.util

    from llada_export.runtime.pipeline import Pipeline

    m = Manifest.read(unpruned_all)
    installed = {"onnxruntime", "aoti", "inductor"}
    trt = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    assert set(m.artifacts) == installed | ({"tensorrt"} if trt else set())
    for b in m.artifacts:
        assert set(m.artifacts[b]) == {"vision", "unpruned"}
        pipe = Pipeline.load(unpruned_all, backend=b, warmup=False)  # inductor compiles at its first call
        assert pipe.backend == b and set(pipe.runners) == {"vision", "unpruned"}
    if not trt:
        (note,) = [n for n in m.notes if "tensorrt" in n]
        assert note.startswith("not built: ") and ("package is not installed" in note or "cuda" in note), note


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_no_prune_engines_match_the_eager_unpruned_oracle(tiny, unpruned_all, images, backend):
    """--no-prune engines (only the unpruned graph; nothing kept or dropped) generate token-exact what the
    eager unpruned model does, with an image and without."""
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.sampler import preset

    model, tok, _ = tiny
    pipe = Pipeline.load(unpruned_all, backend=backend)
    assert not pipe.pruned and "stage_a" not in pipe.runners
    for image, prompt in ((images["380x250"], PROMPTS["long"]), (None, "What is two plus two?")):
        ref = reference_generate(model, tok, image, prompt, preset("mc", **GEN8), prune=None)
        got = pipe.generate(image, prompt, fixed_schedule=True, preset="mc", **GEN8)
        assert got.ids == ref.ids and got.kept_visual is None


def test_auto_switch_to_checkpoint_weights(tiny, tiny_ckpt, unpruned_all, aoti_engines, images):
    """compiled_weights="auto" above its threshold: the aoti and inductor graphs hold no weights and map
    each constant to a checkpoint key, loaded once from the source checkpoint (the manifest says so); the
    ONNX graphs keep their weights file. Below the threshold (the session's aoti engines, default 2 GiB)
    the packages hold them. The aoti engines run correctly on the checkpoint's tensors."""
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline, Request
    from llada_export.runtime.weights import parts_of
    from llada_export.sampler import preset

    m = Manifest.read(unpruned_all)
    weight_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert m.source_checkpoint == str(tiny_ckpt.resolve())
    assert set(m.constants_from_checkpoint) == {"aoti", "inductor"}
    decoder = {k for k in tiny[0].state_dict() if k.startswith("model.layers.")}
    for b in ("aoti", "inductor"):
        assert "from the source checkpoint" in m.weights[b]
        assert m.constants_from_checkpoint[b]["unpruned"]["lm.lm_head.weight"] == "lm_head.weight"
        mapped = {p for k in m.constants_from_checkpoint[b]["unpruned"].values() for p in parts_of(k)}
        assert decoder <= mapped  # every decoder weight mapped (q/k/v and gate/up through their fused cat(...) keys)
    ep = torch.export.load(str(unpruned_all / m.artifacts["inductor"]["unpruned"]))
    assert {t.device.type for t in ep.state_dict.values()} == {"meta"}  # the archive holds none of them
    assert m.files["onnx/weights.bin"].bytes > 0.9 * weight_bytes and m.weights["onnxruntime"].startswith("ONNX")
    packed = Manifest.read(aoti_engines)
    assert packed.constants_from_checkpoint is None and "from the source checkpoint" not in packed.weights["aoti"]

    ind = Pipeline.load(unpruned_all, backend="inductor", warmup=False)  # no compile: its parameters are checked
    head = ind.weights["lm_head.weight"]  # loaded once from the checkpoint, shared by the graphs
    assert any(p.data_ptr() == head.data_ptr() for p in ind.runners["unpruned"].module.parameters())
    pipe = Pipeline.load(unpruned_all, backend="aoti")
    head = pipe.weights["lm_head.weight"]
    model, tok, _ = tiny
    ref = reference_generate(model, tok, images["384x384"], PROMPTS["short"], preset("mc", **GEN8), prune=None)
    assert pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc", **GEN8).ids == ref.ids  # aoti's
    with torch.no_grad():  # the aoti graphs compute with those very tensors: doubling lm_head doubles the logits
        x = pipe._layout([Request(images["384x384"], PROMPTS["short"])], 8)[0]
        feeds = x.denoiser_feeds(torch.full((1, 8), pipe.tokens.mask))
        before = pipe.run("unpruned", **feeds)["logits"]
        head.mul_(2.0)
        try:
            after = pipe.run("unpruned", **feeds)["logits"]
        finally:
            head.div_(2.0)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def text_scored(tiny_ckpt, tmp_path_factory):
    """Pruned ONNX engines whose stage A ranks the visual tokens by the attention of all text
    (--score-from text), through the FX pruning pass."""
    return export(tiny_ckpt, tmp_path_factory.mktemp("text") / "e", prune=PruneSettings(PRUNE_LAYER, KEEP, "text"),
                  **TINY_EXPORT)


def test_score_from_text_through_the_fx_pass(tiny, text_scored, images):
    """The engine's stage A keeps exactly the slots the eager pruned oracle keeps for score_from="text",
    which here differ from those the response queries choose (so the setting reaches the graph); the
    whole generation then matches the eager reference."""
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline, Request
    from llada_export.sampler import preset

    model, tok, _ = tiny
    sp = special_tokens(tok)
    pipe = Pipeline.load(text_scored)
    assert pipe.manifest.pruning == PruneSettings(PRUNE_LAYER, KEEP, "text")
    x = pipe._layout([Request(images["384x384"], PROMPTS["long"])], 8)[0]
    resp = torch.full((1, 8), sp.mask)
    feeds = x.stage_a_feeds(resp, KEEP)
    got = pipe.run("stage_a", **feeds)
    with torch.no_grad():
        oracle = {s: pruned_forward(model, *feeds.values(), PruneSettings(PRUNE_LAYER, KEEP, s), pipe.bucket.k_static,
                                    sp.mask) for s in ("text", "response")}
    kept = {s: set(o[1][o[2]].tolist()) for s, o in oracle.items()}
    assert kept["text"] != kept["response"], "this input does not tell the two score sources apart"
    assert torch.equal(got["kept_alive"], oracle["text"][2])
    assert torch.equal(got["kept_index"][got["kept_alive"]], oracle["text"][1][oracle["text"][2]])
    ref = reference_generate(model, tok, images["384x384"], PROMPTS["long"], preset("mc", **GEN8),
                             PruneSettings(PRUNE_LAYER, KEEP, "text"))
    res = pipe.generate(images["384x384"], PROMPTS["long"], fixed_schedule=True, preset="mc", **GEN8)
    assert res.ids == ref.ids and res.kept_visual == ref.kept_visual


def test_inductor_archives_are_checked_against_the_manifest(unpruned_all, tmp_path):
    """A manifest rewritten consistently for another bucket (graph I/O, digest: as if re-sealed) over the
    same Inductor archives: Pipeline.load reads each archive's serialized program (no weights) and refuses."""
    import dataclasses
    import shutil

    from llada_export.contract.graphset import GRAPHS, Dims
    from llada_export.contract.manifest import ManifestError
    from llada_export.runtime.pipeline import Pipeline

    root = Path(shutil.copytree(unpruned_all, tmp_path / "e"))
    m = Manifest.read(root)
    bucket = dataclasses.replace(m.bucket, max_text_tokens=2 * m.bucket.max_text_tokens)
    dims = Dims.of(bucket, m.model_config(), m.dtype)
    dataclasses.replace(m, bucket=bucket, graphs={n: GRAPHS[n].io(dims, m.fused_sampler) for n in m.graphs}).write(root)
    assert Manifest.read(root).bucket == bucket  # the manifest alone is consistent
    with pytest.raises(ManifestError, match=r"programs/\w+\.pt2: its inputs are \[\(\[1, \d+, \d+\], 'float32'\)"):
        Pipeline.load(root, backend="inductor", warmup=False)
