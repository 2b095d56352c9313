"""The seams: layers import downwards only; a new backend or a new graph is one registration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS, export
from llada_export.contract.graphset import GRAPHS, GraphSpec, Selection, TensorSpec, graphs_for, unregister_graph
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings
from llada_export.engines.registry import Backend, register_backend, unregister_backend
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline

PACKAGE = Path(__file__).resolve().parents[1] / "llada_export"

# what each layer may not import (anything of the package above it)
FORBIDDEN = {
    "config": {"contract", "sampler", "graphs", "passes", "engines", "exporter", "runtime", "reference", "compare",
               "cli", "checkpoint", "synthetic", "serve", "demo"},
    "contract": {"sampler", "graphs", "passes", "engines", "exporter", "runtime", "reference", "compare", "cli",
                 "checkpoint", "synthetic", "serve", "demo", "tokenizer"},
    "sampler": {"contract", "graphs", "passes", "engines", "exporter", "runtime", "reference", "compare", "cli",
                "checkpoint", "synthetic", "serve", "demo", "tokenizer", "config"},
    "graphs": {"passes", "engines", "exporter", "runtime", "reference", "compare", "cli", "checkpoint", "synthetic",
               "serve", "demo"},
    "engines": {"exporter", "runtime", "reference", "compare", "cli", "serve", "demo", "graphs", "passes"},
    "runtime": {"exporter", "passes", "reference", "compare", "cli", "serve", "demo", "synthetic"},
    "exporter": {"runtime", "reference", "compare", "cli", "serve", "demo"},
    "outdir": {"*"},
    "rules": {"*"},
    "quant": {"*"},  # the FP8 op: below the exporter and the engines, imports nothing of the package
    "ops": {"*"},  # custom ops the programs call: below the graphs and the engines, imports nothing of the package
}


def imports_of(path: Path) -> set[str]:
    """Top-level names of llada_export modules a file imports (lazy imports inside functions too)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    here = ["llada_export", *rel.parts[:-1]] if rel.name != "__init__" else ["llada_export", *rel.parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = (node.module or "").split(".")
            if base[0] == "llada_export":
                names = base[1:] or [a.name for a in node.names]
                out.add(names[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "llada_export" and len(parts) > 1:
                    out.add(parts[1])
    return out


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_no_module_imports_upward():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        forbidden = FORBIDDEN.get(layer)
        if not forbidden:
            continue
        got = imports_of(path) - {layer}
        wrong = got if "*" in forbidden else got & forbidden
        if wrong:
            bad.append(f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}")
    assert not bad, "\n".join(bad)


def test_the_import_scan_sees_imports():
    """The scan above can fail: it finds the runtime's (allowed) imports and a forbidden one."""
    got = imports_of(PACKAGE / "runtime" / "pipeline.py")
    assert {"contract", "engines", "graphs", "sampler", "tokenizer", "checkpoint"} <= got
    assert "exporter" in imports_of(PACKAGE / "cli" / "export.py")


# ---------------------------------------------------------------------- a new backend: one registration
def _write_program(ctx, graph, path):
    torch.export.save(ctx.programs[graph], str(path))
    return [path]


class _EagerProgramRunner:
    """The exported program run as it is (no compiler): a backend in a dozen lines."""

    def __init__(self, path, io, device="cpu", constants=None, cuda_graph=None):
        self.module = torch.export.load(str(path)).module()
        self.inputs, self.outputs = io.input_names, io.output_names

    def run(self, feeds):
        out = self.module(*[feeds[k] for k in self.inputs])
        return dict(zip(self.outputs, out if isinstance(out, (list, tuple)) else [out]))


@pytest.fixture
def fake_backend():
    register_backend(Backend(name="fake", folder="fake", suffix=".pt2", write=_write_program,
                             runner=_EagerProgramRunner, description="torch.export programs run eagerly",
                             priority={"cpu": 5}))
    yield "fake"
    unregister_backend("fake")


def test_a_new_backend_is_one_registration(fake_backend, tiny_ckpt, tiny, images, tmp_path):
    out = export(tiny_ckpt, tmp_path / "e", backends=(fake_backend,), gen_length=16, cache=True)
    m = Manifest.read(out)
    assert set(m.artifacts) == {"fake"} and m.artifacts["fake"]["stage_a"] == "fake/stage_a.pt2"
    pipe = Pipeline.load(out)  # picked: the only backend built
    assert pipe.backend == "fake"
    model, tok, _ = tiny
    for cache in (False, True):
        gen = pipe.generation_config(preset="chartqa", cache=cache, fixed_schedule=True)
        ref = reference_generate(model, tok, images["380x250"], PROMPTS["long"], gen, PruneSettings(2, 0.5))
        got = pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, preset="chartqa", cache=cache)
        assert got.ids == ref.ids and got.kept_visual == ref.kept_visual


# ---------------------------------------------------------------------- a new graph: one registration
class _EmbedProbe(torch.nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, response_ids):
        return self.embed(response_ids).float()  # [B, G, D]


def _build_probe(ctx):
    with torch.no_grad():
        return torch.export.export(_EmbedProbe(ctx.model.model.embed_tokens), ctx.examples("embed_probe"))


def _probe_oracle(model, feeds, ctx):
    return (model.embed(feeds["response_ids"]).float(),)


@pytest.fixture
def fake_graph():
    spec = GraphSpec("embed_probe", (TensorSpec("response_ids", ("B", "G"), "int64", "mask"),),
                     (TensorSpec("embeds", ("B", "G", "D"), "float32"),), when=lambda s: True, build=_build_probe,
                     oracle=_probe_oracle, denoiser=False, doc="test-only: the response embeddings")
    GRAPHS[spec.name] = spec
    yield spec
    unregister_graph(spec.name)


def test_a_new_graph_is_one_registration(fake_graph, tiny_ckpt, tmp_path):
    """Built by the exporter for the backend, described in the manifest, loaded by the runtime and
    checked by llada-compare against its oracle: nothing but the registration above names it."""
    from llada_export.compare import run_compare

    assert fake_graph in graphs_for(Selection())
    out = export(tiny_ckpt, tmp_path / "e", gen_length=8)
    m = Manifest.read(out)
    assert m.artifacts["onnxruntime"]["embed_probe"] == "onnx/embed_probe.onnx"
    assert m.graphs["embed_probe"].outputs[0].shape == (1, 8, 64)
    pipe = Pipeline.load(out)
    ids = torch.randint(0, 100, (1, 8))
    got = pipe.run("embed_probe", response_ids=ids)["embeds"]
    torch.testing.assert_close(got, pipe.embed_table[ids].float())
    rep = run_compare(out, tiny_ckpt, presets=("mc",))
    probe = [g for g in rep.graphs if g.graph == "embed_probe"]
    assert probe and probe[0].passed and rep.passed
    assert probe[0].stats["embeds"]["max_abs"] <= probe[0].tolerances["embeds"]["atol"]  # compared, and close
    # the engines with the extra graph still answer end to end as the eager model does (mc fits G = 8)
    mc = [a for a in rep.agreement if a["preset"] == "mc"]
    assert mc and all(a["engine_vs_reference_exact"] for a in mc)
