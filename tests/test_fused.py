"""--fuse-sampler: the greedy step inside the graphs gives the reference sampler's tokens."""

from __future__ import annotations

import onnx
import pytest

from helpers import PROMPTS, export
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline
from llada_export.sampler import GenerationError


@pytest.fixture(scope="module")
def fused_engines(tiny_ckpt, tmp_path_factory):
    return export(tiny_ckpt, tmp_path_factory.mktemp("fused") / "engines", fuse_sampler=True, baseline=True,
                  cache=True, gen_length=16)


def test_fused_graphs_output_predictions_not_logits(fused_engines):
    m = Manifest.read(fused_engines)
    assert m.fused_sampler is True
    expect = {"stage_a": ["x0", "confidence", "kept_index", "kept_alive"], "stage_b": ["x0", "confidence"],
              "unpruned": ["x0", "confidence"], "prefill": ["x0", "confidence", "kv_cache"],
              "cached": ["x0", "confidence"]}
    for name, outs in expect.items():
        model = onnx.load(str(fused_engines / m.artifacts["onnxruntime"][name]), load_external_data=False)
        assert [o.name for o in model.graph.output] == outs
        shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output[:2]]
        assert shapes == [[1, 16], [1, 16]]


@pytest.mark.parametrize("image", ["380x250", "384x384"])
@pytest.mark.parametrize("cache", [False, True])
def test_fused_pipeline_matches_reference_tokens(tiny, fused_engines, images, image, cache):
    model, tok, _ = tiny
    pipe = Pipeline.load(fused_engines)
    for unpruned, prune in ((False, PruneSettings(2, 0.5)), (True, None)):
        gen = pipe.generation_config(preset="chartqa", cache=cache, unpruned=unpruned, fixed_schedule=True, **({"refresh": 4} if cache else {}))
        ref = reference_generate(model, tok, images[image], PROMPTS["long"], gen, prune)
        got = pipe.generate(images[image], PROMPTS["long"], fixed_schedule=True, preset="chartqa", unpruned=unpruned, cache=cache,
                            **({"refresh": 4} if cache else {}))
        assert got.ids == ref.ids
        assert len(set(ref.ids)) > 2


def test_fused_engines_refuse_sampling(fused_engines, images):
    pipe = Pipeline.load(fused_engines)
    with pytest.raises(GenerationError, match="--fuse-sampler"):
        pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc", temperature=0.7)
