"""Inductor's kernels saved at export (``--precompile``) and run without Dynamo, and the runtime holding
one copy of the weights (fused projections built at load, the checkpoint tensors that fed them freed).

One export (tiny checkpoint, unpruned + prefix cache, G 16, weights left in the checkpoint): its
kernels are compiled once there (about a minute on 2 cores); the tests load them in-process, where
the export's compile also left the C++ kernels in Inductor's cache."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from helpers import PROMPTS, export
from llada_export.contract.manifest import Manifest, ManifestError
from llada_export.runtime.pipeline import Pipeline
from llada_export.runtime.weights import held_bytes

GEN = dict(gen_length=16, block_length=8, steps=16, refresh=3, cache=True)


@pytest.fixture(scope="module")
def pre(tiny_ckpt, tmp_path_factory):
    return export(tiny_ckpt, tmp_path_factory.mktemp("pre") / "e", prune=None, cache=True, gen_length=16,
                  backends=("inductor",), compiled_weights="checkpoint", compile_cache=False, precompile=True)


def dynamo_frames() -> int:
    """Frames and graphs Dynamo traced, and AOTAutograd runs, in this process so far (torch.compile of a
    graph adds to each)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"] + counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"]


def test_export_saves_kernels_per_graph_without_the_weights(pre):
    m = Manifest.read(pre)
    assert m.precompiled == {"inductor": "programs/precompiled.json"}
    index = json.loads((pre / "programs" / "precompiled.json").read_text())
    assert set(index["graphs"]) == set(m.artifacts["inductor"]) and index["built_for"]["torch"] == torch.__version__
    for key, entry in index["graphs"].items():
        assert f"programs/{entry['artifact']}" in m.files  # SHA-256-checked like every artifact
        # the weights are inputs, not baked in: the kernels are smaller than the weights the graph binds
        mapped = m.constants_from_checkpoint["inductor"][key]
        assert set(mapped) <= set(entry["inputs"])
    pipe = Pipeline.load(pre, warmup=False)
    for key, r in pipe.runners.items():
        bound = held_bytes(r.call.weights if hasattr(r.call, "weights") else [])
        assert 0 < (pre / "programs" / f"{key}.compiled.bin").stat().st_size < bound, key


def test_archives_hold_no_example_inputs(pre):
    """torch.export.save keeps the inputs a program was traced with; for the cached step those hold the example
    KV cache (0.77 GB per request at full size, read back onto the GPU by torch.export.load). The archives
    leave them out, and still load."""
    import zipfile

    archives = sorted((pre / "programs").glob("*.pt2"))
    cached = [a for a in archives if a.stem.endswith("cached")]  # unpruned_cached here
    assert cached and len(archives) > 1
    for archive in archives:
        with zipfile.ZipFile(archive) as z:
            sample = [i for i in z.infolist() if "/sample_inputs/" in i.filename]
        assert sum(i.file_size for i in sample) == 0, (archive.name, [(i.filename, i.file_size) for i in sample])
    assert torch.export.load(str(cached[0])).example_inputs is None


def test_precompiled_load_runs_no_dynamo_and_answers_as_the_eager_oracle(pre, tiny, images):
    """Pipeline.load + warm-up (every graph once) + generation through the saved kernels: no Dynamo frame,
    no AOTAutograd run; the answer (pruned-free cached path and the no-cache path) token for token the
    eager cached reference's."""
    from llada_export.reference import reference_generate

    before = dynamo_frames()
    pipe = Pipeline.load(pre)
    assert pipe.precompiled == "loaded"
    model, tok, _ = tiny
    for kw in (GEN, dict(GEN, cache=False, refresh="default")):
        got = pipe.generate(images["380x250"], PROMPTS["long"], **kw)
        ref = reference_generate(model, tok, images["380x250"], PROMPTS["long"], pipe.generation_config(**kw), None)
        assert got.ids == ref.ids and len(set(ref.ids)) > 2
    assert got.graph_calls.get("unpruned", 0) > 0
    assert dynamo_frames() == before


def test_saved_cached_step_writes_its_cache_in_place_as_torch_compile_does(pre):
    """The cached step from its saved kernels against the same archive under torch.compile (the fallback
    path, taken here because the kernels were built for another thread count): the same logits and the
    same kv_cache written into the input buffer."""
    from llada_export.engines.inductor import runner
    from llada_export.runtime.weights import bind_constants

    m = Manifest.read(pre)
    pipe = Pipeline.load(pre, warmup=False)
    r = pipe.runners["unpruned_cached"]
    io = m.graphs["unpruned_cached"]
    g = torch.Generator().manual_seed(0)
    feeds = {t.name: (torch.randn(t.shape, generator=g) if t.dtype == "float32" else
                      torch.randint(0, 50, t.shape, generator=g) if t.dtype == "int64" else
                      torch.ones(t.shape, dtype=torch.bool)) for t in io.inputs}
    feeds["block_start"] = torch.full_like(feeds["block_start"], 8)
    a, b = {k: v.clone() for k, v in feeds.items()}, {k: v.clone() for k, v in feeds.items()}
    got = r.run(a)
    constants, _ = bind_constants(m.constants_from_checkpoint["inductor"], dict(pipe.weights), owned=True)
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)  # CPU kernels are built per thread count: these are foreign now
    try:
        fallback = runner(pre / "programs" / "unpruned_cached.pt2", io, constants=constants["unpruned_cached"],
                          precompiled=pre / "programs" / "precompiled.json")
        assert fallback.precompiled.startswith("built for another machine (cpu_threads")
        want = fallback.run(b)
    finally:
        torch.set_num_threads(n)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["kv_cache"], b["kv_cache"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(a["kv_cache"], feeds["kv_cache"])  # written in place, by both


def test_tampered_kernels_are_refused_and_missing_ones_fall_back(pre, tmp_path, caplog):
    d = tmp_path / "e"
    shutil.copytree(pre, d)
    art = d / "programs" / "unpruned_cached.compiled.bin"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="unpruned_cached.compiled.bin does not match its SHA-256"):
        Pipeline.load(d, warmup=False)
    shutil.copy(pre / "programs" / "unpruned_cached.compiled.bin", art)
    index = d / "programs" / "precompiled.json"
    saved = json.loads(index.read_text())
    kept = {k: v for k, v in saved["graphs"].items() if k != "unpruned_cached"}
    index.write_text(json.dumps(saved | {"graphs": kept}))
    with pytest.raises(ManifestError, match="programs/precompiled.json has .* bytes, the manifest says"):
        Pipeline.load(d, warmup=False)
    with caplog.at_level(logging.WARNING, logger="llada_export"):  # unverified: the entry is missing
        pipe = Pipeline.load(d, warmup=False, verify=False)
    said = [r.getMessage() for r in caplog.records if "unpruned_cached" in r.getMessage()]
    assert len(said) == 1 and "no precompiled kernels for unpruned_cached" in said[0] and "torch.compile" in said[0]
    assert pipe.runners["unpruned_cached"].module is not None and pipe.runners["unpruned"].module is None
    assert pipe.precompiled.startswith("no precompiled kernels for unpruned_cached")
    entry = saved["graphs"]["unpruned"] | {"artifact": "stolen.compiled.bin"}
    index.write_text(json.dumps(saved | {"graphs": {"unpruned": entry}}))
    with pytest.raises(ManifestError, match="names a graph or a file the manifest does not list"):
        Pipeline.load(d, warmup=False, verify=False)


def _reachable_tensors(obj, seen=None, depth=0) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, containers, modules and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return list(obj.state_dict(keep_vars=True).values())
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif callable(obj) and hasattr(obj, "__closure__"):
        items = [c.cell_contents for c in obj.__closure__ or ()] + list(getattr(obj, "__dict__", {}).values())
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("llada_export"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for x in items for t in _reachable_tensors(x, seen, depth + 1)]


@pytest.mark.parametrize("runner_options", [None, {"compile": False}], ids=["precompiled", "eager-kernels"])
def test_the_runtime_holds_one_copy_of_the_weights(pre, tiny, runner_options):
    """Graphs with fused q/k/v and gate/up weights over a checkpoint of separate ones: what the pipeline
    holds (its weight table, every runner's bound constants, anything else reachable from it) is one
    copy of the checkpoint's weights, not the checkpoint's plus the fused copies (1.2x on this model)."""
    pipe = Pipeline.load(pre, warmup=False, runner_options=runner_options)
    ckpt = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    held = _reachable_tensors(pipe)
    prompt_side = held_bytes([pipe.embed_table, pipe.image_newline, pipe.newline, pipe.mask_embed])
    assert held_bytes(held) - prompt_side <= 1.01 * ckpt
    assert not any(k.startswith("model.layers.") and k.endswith(("q_proj.weight", "gate_proj.weight"))
                   for k in pipe.weights)  # only the fused copies (cat(...) keys) of those
    assert held_bytes(pipe.weights.values()) > 0.7 * ckpt


def test_the_export_holds_one_copy_of_the_fused_weights(tiny_ckpt, images):
    """The exporter's fused language model (``BuildContext.language``; ``share_storage``: what export_engines
    sets for a model it loaded itself) leaves the model's own q/k/v and gate/up weights as views of the fused
    ones: the model and the graphs' weights are one copy, and the model computes what it computed."""
    from llada_export.checkpoint.loader import load_checkpoint
    from llada_export.exporter.programs import BuildContext
    from llada_export.reference import embed_prompt

    model, tok, _ = load_checkpoint(tiny_ckpt, dtype=torch.float32)  # its own copy: this test changes it
    ckpt = held_bytes(model.state_dict().values())
    inp = embed_prompt(model, tok, images["380x250"], PROMPTS["short"])
    ids, pos = torch.full((1, 4), 5), torch.arange(inp.length + 4)[None]
    with torch.no_grad():
        want = model.language(inp.embeds, ids, pos)
        ctx = BuildContext(model, None, None, None, None, False, torch.device("cpu"), share_storage=True)
        fused = ctx.language
        torch.testing.assert_close(model.language(inp.embeds, ids, pos), want, rtol=0, atol=0)
        torch.testing.assert_close(fused(inp.embeds, ids, pos), want, rtol=1e-5, atol=1e-5)
    tensors = list(model.state_dict().values()) + list(fused.state_dict().values())
    assert held_bytes(tensors) == ckpt  # not ckpt + the fused copies


def test_out_of_memory_is_found_in_the_chain_the_compiler_raises():
    """What ``precompile`` retries on with the next ``AUTOTUNE_FALLBACKS`` entry: the accelerator out of memory,
    as Inductor's wrapper raises it (a RuntimeError "Failed to run autotuning code block: CUDA out of memory..."
    from the tuning code's own error) or as torch's OutOfMemoryError anywhere in the chain; not any other error."""
    from llada_export.device import is_out_of_memory as out_of_memory
    from llada_export.engines.precompiled import AUTOTUNE_FALLBACKS

    def raised(inner, outer):
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e

    msg = "Failed to run autotuning code block: CUDA out of memory. Tried to allocate 14.92 GiB"
    assert out_of_memory(RuntimeError(msg))
    assert out_of_memory(raised(torch.OutOfMemoryError("CUDA error"), RuntimeError("backend compiler failed")))
    assert not out_of_memory(raised(ValueError("bad shape"), RuntimeError("backend compiler failed")))
    assert not out_of_memory(AssertionError("memory planning"))
    assert AUTOTUNE_FALLBACKS[0] == {} and len(AUTOTUNE_FALLBACKS) == 3  # the first attempt changes nothing
