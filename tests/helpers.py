"""Shared test helpers (imported by the tests; the fixtures are in conftest.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

TINY_STD = 0.3  # init std of the tiny checkpoints: a random model whose answers vary, so comparisons can fail
PRUNE_LAYER, KEEP = 2, 0.5  # the session engines' pruning

PROMPTS = {
    "short": "<image>\nWhat is here?",
    "long": "<image>\nDescribe the colours, the shapes and where each object is, then say which is largest.",
}


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def four_requests() -> list:
    """Four different requests (two image sizes, a text-only one) that fit conftest's multi_size_engines."""
    from llada_export.runtime.pipeline import Request

    return [Request(random_image(380, 250, 1), "<image>\nWhat colour is it?"),
            Request(random_image(384, 288, 9), "<image>\nWhat is here?"),
            Request(None, "Name three colours."),
            Request(random_image(300, 200, 3), "<image>\nWhat is here?", seed=5)]


def export(ckpt, out, **kw):
    """``export_engines`` of ``ckpt`` into ``out`` with the test defaults: prune at layer 2, keep 0.5,
    192 prompt tokens, a 384x384 bucket, no progress bars."""
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, export_engines

    kw.setdefault("prune", PruneSettings(PRUNE_LAYER, KEEP))
    kw.setdefault("max_prompt_tokens", 192)
    kw.setdefault("image_size", (384, 384))
    return export_engines(ExportOptions(model=str(ckpt), output=str(out), progress=False, **kw))


COMPILE_CACHE_LOAD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from torch._dynamo.utils import counters
from llada_export.runtime.pipeline import Pipeline
t0 = time.perf_counter()
pipe = Pipeline.load(sys.argv[1])
print(json.dumps({"cache": pipe.compile_cache, "seconds": time.perf_counter() - t0,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def compile_cache_exports(ckpt, out):
    """Two unpruned Inductor exports of ``ckpt`` with ``--compile-cache`` in this process (gen lengths 8 and
    16: the second shares its vision graph with the first), then ``Pipeline.load`` of the second in a fresh
    process with an empty Inductor cache; what that load reported (or its exit status and stderr) is
    ``out/load.json``. Returns ``out``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    out = Path(out)
    for g in (8, 16):
        export(ckpt, out / f"g{g}", prune=None, backends=("inductor",), gen_length=g, max_prompt_tokens=64,
               compile_cache=True, precompile=False)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor-cache")}
    r = subprocess.run([sys.executable, "-c", COMPILE_CACHE_LOAD, str(out / "g16"), str(torch.get_num_threads())],
                       capture_output=True, text=True, timeout=600, env=env)
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    (out / "load.json").write_text(json.dumps({"returncode": r.returncode, "stderr": r.stderr[-3000:], **got}))
    return out


def cli_here(main, prog: str, capture, *args):
    """``PROG ARGS`` run in this process through the CLI's ``main`` (what its console script runs as
    ``sys.exit(main())``) without a fresh interpreter's seconds of imports: for runs where the process itself
    is not what a test checks (refusals, a second run). Returns a CompletedProcess with the exit status and
    the output a fresh process would show: ``capture``'s (capsys, or capfd to include what native code writes
    to the file descriptors), plus the Python warnings of a fresh interpreter's default filters, log records
    of WARNING and above that reach the root logger (a fresh process prints those no handler takes: logging's
    last resort, which pytest's handlers stand in for here), and a string exit code. An exception that escapes
    main fails the test."""
    import logging
    import subprocess
    import sys
    import warnings

    capture.readouterr()
    last_resort = logging.StreamHandler(sys.stderr)  # the captured stream
    last_resort.setLevel(logging.WARNING)
    logging.getLogger().addHandler(last_resort)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.resetwarnings()  # pytest's filters out; a fresh interpreter's in
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code
    finally:
        logging.getLogger().removeHandler(last_resort)
    out = capture.readouterr()
    err = out.err + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
    err += f"{code}\n" if code is not None and not isinstance(code, int) else ""
    status = code if isinstance(code, int) else 0 if code is None else 1  # as sys.exit(code) ends a process
    return subprocess.CompletedProcess([prog, *args], status, out.out, err)


def load_tool(name: str):
    """A script of tools/ as a module (tools/ holds scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fixed(settings: dict) -> dict:
    """Sampler settings with the official fixed schedule made explicit when they name no parallel rule
    (Pipeline's default is the factor rule; the eager references default to the fixed schedule)."""
    named = settings.get("factor") is not None or settings.get("threshold") is not None
    return {**settings, **({} if named else {"fixed_schedule": True})}
