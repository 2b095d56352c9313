"""The Inductor compile cache of an export that is not the first in its process (tools/bench_gpu.py exports
pruned then unpruned engines in one process): it must hold every graph of its own engines.

torch records compiler cache artifacts per process and incrementally: an artifact recorded before (the
vision graph of an earlier export of the same checkpoint and bucket) was left out of later saves, and
``load_cache_artifacts`` keeps only the last save's artifacts of each kind, so the second export's
cache lacked the vision graph and a fresh process recompiled it at every load (1 hit, 1 miss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from helpers import export
from llada_export.contract.manifest import Manifest

LOAD = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from torch._dynamo.utils import counters
from llada_export.runtime.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[1])
print(json.dumps({"cache": pipe.compile_cache, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_second_export_in_a_process_saves_a_cache_of_all_its_graphs(tiny_ckpt, tmp_path):
    """Two unpruned exports in this process sharing the vision graph (gen lengths 8 and 16); a fresh process
    with an empty Inductor cache loads the second one's engines: every graph compiles from the saved cache."""
    for g in (8, 16):
        out = export(tiny_ckpt, tmp_path / f"g{g}", prune=None, backends=("inductor",), gen_length=g,
                     max_prompt_tokens=64, compile_cache=True, precompile=False)
    graphs = Manifest.read(out).artifacts["inductor"]
    assert set(graphs) == {"vision", "unpruned"}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    r = subprocess.run([sys.executable, "-c", LOAD, str(out), str(torch.get_num_threads())], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["cache"] == "loaded"
    assert (got["hits"], got["misses"]) == (len(graphs), 0), got
