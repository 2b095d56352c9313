"""--fuse-sampler: the greedy step inside the graphs gives the reference sampler's tokens."""

from __future__ import annotations

import onnx
import pytest

from llada_export.exporter.manifest import read_manifest
from llada_export.reference import PruneSettings, reference_generate
from llada_export.runtime.pipeline import Pipeline
from llada_export.runtime.sampler import preset

from conftest import PROMPTS


@pytest.fixture(scope="module")
def fused_engines(tiny_ckpt, tmp_path_factory):
    from llada_export.exporter.build import ExportOptions, export_engines

    out = tmp_path_factory.mktemp("fused") / "engines"
    return export_engines(ExportOptions(model=str(tiny_ckpt), output=str(out), prune_layer=2, keep=0.5,
                                        fuse_sampler=True, baseline=True, gen_length=16, block_length=16, steps=16,
                                        max_prompt_tokens=192, progress=False))


def test_fused_graphs_output_predictions_not_logits(fused_engines):
    m = read_manifest(fused_engines)
    assert m["fused_sampler"] is True
    for name, outs in {"stage_a": ["x0", "confidence", "kept_index", "kept_alive"], "stage_b": ["x0", "confidence"],
                       "full": ["x0", "confidence"]}.items():
        model = onnx.load(str(fused_engines / m["artifacts"]["onnxruntime"][name]))
        assert [o.name for o in model.graph.output] == outs
        shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output[:2]]
        assert shapes == [[1, 16], [1, 16]]


@pytest.mark.parametrize("image", ["380x250", "384x384"])
def test_fused_pipeline_matches_reference_tokens(tiny, fused_engines, images, image):
    model, tok, _ = tiny
    pipe = Pipeline.load(fused_engines)
    gen = preset("chartqa")
    for unpruned, prune in ((False, PruneSettings(2, 0.5)), (True, None)):
        ref = reference_generate(model, tok, images[image], PROMPTS["long"], gen, prune)
        got = pipe.generate(images[image], PROMPTS["long"], preset="chartqa", unpruned=unpruned)
        assert got.ids == ref.ids
        assert len(set(ref.ids)) > 2


def test_fused_engines_refuse_sampling(fused_engines, images):
    pipe = Pipeline.load(fused_engines)
    with pytest.raises(ValueError, match="--fuse-sampler"):
        pipe.generate(images["384x384"], PROMPTS["short"], preset="mc", temperature=0.7)
