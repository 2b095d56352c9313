"""The Inductor compile cache of an export that is not the first in its process (tools/bench_gpu.py exports
pruned then unpruned engines in one process): it must hold every graph of its own engines.

torch records compiler cache artifacts per process and incrementally: an artifact recorded before (the
vision graph of an earlier export of the same checkpoint and bucket) was left out of later saves, and
``load_cache_artifacts`` keeps only the last save's artifacts of each kind, so the second export's
cache lacked the vision graph and a fresh process recompiled it at every load (1 hit, 1 miss).
"""

from __future__ import annotations

import json

from llada_export.contract.manifest import Manifest


def test_second_export_in_a_process_saves_a_cache_of_all_its_graphs(compile_cache_engines):
    """Two unpruned exports in this process sharing the vision graph (gen lengths 8 and 16); a fresh process
    with an empty Inductor cache loads the second one's engines: every graph compiles from the saved cache.
    (conftest's compile_cache_engines: the exports and the fresh process's load, shared with test_export.)"""
    out = compile_cache_engines / "g16"
    graphs = Manifest.read(out).artifacts["inductor"]
    assert set(graphs) == {"vision", "unpruned"}
    got = json.loads((compile_cache_engines / "load.json").read_text())
    assert got["returncode"] == 0, got["stderr"]
    assert got["cache"] == "loaded"
    assert (got["hits"], got["misses"]) == (len(graphs), 0), got
