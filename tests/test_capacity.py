"""Memory per request and the largest batch that fits (``exporter/capacity.py``), ``llada-export
--batch-sizes auto`` and ``tools/kv_capacity.py``: the KV bytes the arithmetic gives are the bytes of
the cache the eager model's prefill returns, pruning shrinks them by the positions ratio, the auto
sizes are the powers of two the arithmetic allows and the manifest says so, and a card too small is
refused in one line that names what would fit."""

from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import load_tool
from llada_export.config import full_config
from llada_export.contract.bucket import Bucket
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings
from llada_export.exporter.build import ExportError, ExportOptions, plan_bucket
from llada_export.exporter.capacity import headroom_bytes, kv_bytes, path_capacity, powers_of_two

PRUNE = PruneSettings(2, 0.5)
BUCKET = dict(image_size=(384, 384), gen_length=16, max_prompt_tokens=112)


def tiny_bucket(cfg) -> Bucket:
    opts = ExportOptions("-", "-", prune=PRUNE, **BUCKET)
    return plan_bucket(opts, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kv_bytes_are_the_eager_prefills_cache(tiny_ckpt, dtype):
    """The non-circular check: the eager model's prefill at the pruned length (P' + G) and the unpruned
    length (P + G), batch 2, returns a cache of exactly twice the bytes the arithmetic counts per request."""
    from llada_export.checkpoint.loader import load_checkpoint

    model, _, cfg = load_checkpoint(tiny_ckpt, dtype=dtype)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    bucket = tiny_bucket(cfg)
    g, d = bucket.gen_length, cfg.text.hidden_size
    for path, length in (("pruned", bucket.reduced_seq_len), ("unpruned", bucket.seq_len)):
        cap = path_capacity(path, bucket, cfg, name, prune=PRUNE)
        with torch.no_grad():
            _, kv = model.language.prefill(torch.randn(2, length - g, d), torch.zeros(2, g, dtype=torch.long),
                                           torch.arange(length).expand(2, length),
                                           torch.ones(2, length, dtype=torch.bool))  # kv [NL, 2, B, n_kv, L, hd]
        assert kv.dtype == dtype and kv.shape[2] == 2 and kv.shape[4] == length
        assert cap.kv_positions == length and cap.kv * 2 == kv.numel() * kv.element_size()
        assert kv_bytes(cfg, length, name) == cap.kv


def test_pruned_needs_fewer_bytes_by_the_positions_ratio(tiny):
    """KV per request scales with the cache positions: pruned / unpruned = (P' + G) / (P + G); the
    pruned path fits more requests on the same memory."""
    _, _, cfg = tiny
    bucket = tiny_bucket(cfg)
    pr = path_capacity("pruned", bucket, cfg, "float32", prune=PRUNE)
    un = path_capacity("unpruned", bucket, cfg, "float32", prune=PRUNE)
    assert pr.kv * bucket.seq_len == un.kv * bucket.reduced_seq_len and pr.kv < un.kv
    memory = 2**30
    assert pr.largest_batch(memory) > un.largest_batch(memory) >= 1


def test_full_size_1024x768_numbers():
    """The issue's figures for full-size LLaDA-V, 1024x768, bf16: 0.5 MiB of cache per position (32 layers x
    K and V x 32 heads x 128 x 2 bytes), 1461 positions pruned (64 + 1269 kept + 128), 3819 unpruned
    (about 0.77 GB against 2.0 GB); an 80 GB H100 holds about 2.5x the pruned requests."""
    kvc = load_tool("kv_capacity")
    cfg = full_config()
    prune = PruneSettings(16, 0.35)
    bucket = kvc.bucket_for(cfg, (1024, 768), 64, 128, prune)
    assert (bucket.max_visual_tokens, bucket.k_static) == (3627, 1269)
    pr = path_capacity("pruned", bucket, cfg, "bfloat16", prune=prune)
    un = path_capacity("unpruned", bucket, cfg, "bfloat16", prune=prune)
    assert (pr.kv_positions, un.kv_positions) == (1461, 3819)
    assert pr.kv == 1461 * 2**19 and un.kv == 3819 * 2**19
    h100 = int(79.1 * 2**30)
    fit = [c.largest_batch(h100, headroom_bytes(h100)) for c in (pr, un)]
    assert fit[0] >= 2 * fit[1] > 0
    # the largest batch is the largest: one more does not fit
    for c, b in zip((pr, un), fit):
        assert c.need(b, headroom_bytes(h100)) <= h100 < c.need(b + 1, headroom_bytes(h100))


def test_kv_capacity_tool_writes_and_replots(tmp_path):
    """tools/kv_capacity.py writes JSON / Markdown / PNG that say they are a model, and --replot renders
    the same Markdown from the JSON."""
    kvc = load_tool("kv_capacity")
    out = tmp_path / "kv"
    kvc.main(["--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "This is a model, not a measurement" in md and "What a GPU run must confirm" in md
    assert out.with_suffix(".png").stat().st_size > 0
    kvc.main(["--out", str(out), "--replot"])
    assert out.with_suffix(".md").read_text() == md


def _memory_for(cap, batch: int) -> int:
    """The smallest memory on which the arithmetic fits ``batch`` requests (headroom included)."""
    m = math.ceil(cap.need(batch) / 0.95)
    while cap.largest_batch(m, headroom_bytes(m)) < batch:
        m += 1
    return m


def test_batch_sizes_auto_plans_the_powers_of_two_and_records_them(tiny_ckpt, tiny, tmp_path, capsys):
    """`llada-export --batch-sizes auto --device-memory M` with M that holds 3 pruned + cache requests by
    the arithmetic builds sizes 1 and 2; the manifest's notes carry the KV bytes per request. (Inductor
    programs: neither the plan nor the manifest depends on the backend, and they are written in a third
    of the ONNX graphs' time.)"""
    from llada_export.cli.export import main

    _, _, cfg = tiny
    cap = path_capacity("pruned", tiny_bucket(cfg), cfg, "float32", prune=PRUNE)
    memory = _memory_for(cap, 3)
    assert cap.largest_batch(memory, headroom_bytes(memory)) == 3
    out = tmp_path / "e"
    assert main(["--model", str(tiny_ckpt), "-o", str(out), "-q", "--prune-layer", "2", "--keep", "0.5", "--cache",
                 "--image-size", "384x384", "--gen-length", "16", "--max-prompt-tokens", "112",
                 "--batch-sizes", "auto", "--device-memory", str(memory), "--backend", "inductor"]) == 0
    m = Manifest.read(out)
    assert m.sizes == [1, 2] and m.bucket.batch_size == 2
    note = next(n for n in m.notes if n.startswith("batch sizes planned by --batch-sizes auto"))
    assert f"KV cache {cap.kv} B over {cap.kv_positions} positions" in note and " is 3:" in note
    assert set(m.artifacts["inductor"]) == {"vision", "stage_a", "stage_b", "prefill", "cached", "stage_a@b1",
                                            "stage_b@b1", "prefill@b1", "cached@b1"}  # built at both sizes
    kv_io = next(t for t in m.graphs["prefill"].outputs if t.name == "kv_cache")
    assert math.prod(kv_io.shape) * 4 == 2 * cap.kv  # batch 2, fp32


def test_auto_refusals_are_one_line(tiny_ckpt, tmp_path, capsys):
    """A card too small: one line naming the memory one request needs; auto on a CPU without
    --device-memory, and --device-memory without auto: one line each; nothing written."""
    from llada_export.cli.export import main

    base = ["--model", str(tiny_ckpt), "-o", str(tmp_path / "e"), "-q", "--prune-layer", "2", "--cache",
            "--image-size", "384x384", "--gen-length", "16", "--max-prompt-tokens", "112"]
    cases = [(["--batch-sizes", "auto", "--device-memory", "1MiB"], r"not one pruned \+ cache request fits 1\.0 MiB "
              r"\(--device-memory\): it needs .*; plan for a card of at least [\d.]+ [MG]iB"),
             (["--batch-sizes", "auto"], "give --device-memory"),
             (["--device-memory", "80GiB"], "--device-memory applies to --batch-sizes auto only")]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(base + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and re.search(msg, err[0]), err
    assert list(tmp_path.iterdir()) == []


def test_the_card_a_refusal_names_fits(tiny_ckpt, tmp_path):
    """The memory a refusal names ("a card of at least X") holds one request: planning for it builds size 1."""
    from llada_export.exporter.build import preflight

    def opts(memory: int) -> ExportOptions:
        return ExportOptions(str(tiny_ckpt), str(tmp_path / "e"), prune=PRUNE, cache=True, auto_batch=True,
                             device_memory=memory, **BUCKET)

    with pytest.raises(ExportError) as e:
        preflight(opts(2**20))
    size, unit = re.search(r"a card of at least ([\d.]+) ([MG])iB", str(e.value)).groups()
    named = math.ceil((float(size) + 0.05) * (2**20 if unit == "M" else 2**30))  # printed to 0.1, rounded
    o = opts(named)
    assert preflight(o).batch_size >= 1 and o.sizes[0] == 1


def test_powers_of_two():
    assert powers_of_two(1) == (1,) and powers_of_two(3) == (1, 2) and powers_of_two(34) == (1, 2, 4, 8, 16, 32)
    assert powers_of_two(0) == ()


def test_export_memory_check_counts_stage_a_scores():
    """The export check reads the same arithmetic: stage A's call includes its layer-K scores, so it
    grows with the score source's query rows (G for response, the whole sequence otherwise)."""
    from llada_export.exporter.build import largest_call

    cfg = full_config()
    base = dict(image_size=(1024, 768), max_prompt_tokens=64, gen_length=128, dtype="bfloat16")
    calls = {}
    for src in ("response", "text"):
        opts = ExportOptions("-", "-", prune=PruneSettings(16, 0.35, src), **base)
        calls[src] = largest_call(opts, plan_bucket(opts, cfg), cfg)
    assert calls["response"][0] == "stage_a" and calls["text"][1] > calls["response"][1]
