"""Inductor's kernels saved per graph at export and run without Dynamo (``llada-export --precompile``).

``torch.compile`` at load re-traces every graph with Dynamo and re-runs AOTAutograd before its
cache can hit (84.6 s for the full-size graph set on an H100, from a warm compile cache). Here the
export hands each program's own ATen graph (``ExportedProgram.graph_module``: its weights,
buffers and constants lifted as the first inputs, then the user inputs; the in-place cached
step's ``index_put_`` into its ``kv_cache`` input kept) to ``torch._inductor.standalone_compile``
and saves the result (``CompiledArtifact.save``, binary: the AOTAutograd and Inductor cache
entries with their generated code and, on CUDA, Triton kernels) as ``programs/<graph>.compiled.bin``.
The weights are inputs of the compiled function, never baked into it: an artifact holds code, not
tensors. ``programs/precompiled.json`` (listed in the manifest's ``precompiled`` and file table, so
SHA-256-checked like every artifact) records, per graph key, the artifact, the lifted inputs' names in
order, and a small ``<graph>.compiled.safetensors`` of the inputs that are not checkpoint tensors
(folded tables) where the weights live outside the archives; and what the kernels were built for
(torch build, Triton, GPU, CPU threads on the CPU).

``Pipeline.load`` then loads each artifact (``CompiledArtifact.load``: no Dynamo, no tracing) and
binds its weights; where the artifacts are absent, or were built for another torch / Triton / GPU,
the runner falls back to ``torch.compile`` of the archive and logs one line saying why.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..device import is_out_of_memory
from .torch_caches import install as install_torch_caches

log = logging.getLogger("llada_export")

INDEX = "precompiled.json"
SUFFIX, INPUTS_SUFFIX = ".compiled.bin", ".compiled.safetensors"
INPUT_KINDS = ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")  # what a program lifts before its user inputs


def built_for(device: str) -> dict:
    """What an artifact is valid for: the compile cache's key (torch, Triton, GPU; CPU threads on the
    CPU) and the hash of torch's own sources, which ``CompiledArtifact.load`` insists on."""
    from torch._inductor.codecache import torch_key

    from .inductor import cache_key

    return {**cache_key(device), "torch_key": torch_key().hex()}


def lifted_inputs(ep: torch.export.ExportedProgram) -> list[str]:
    """The names (fqns) of a program's lifted inputs, in the order its graph takes them (before the user
    inputs). ValueError for a program this module cannot run (other lifted inputs, or outputs that are
    mutations the caller would have to write back)."""
    sig = ep.graph_signature
    kinds = [s.kind.name for s in sig.input_specs]
    if any(k not in (*INPUT_KINDS, "USER_INPUT") for k in kinds) or kinds.index("USER_INPUT") != \
            len([k for k in kinds if k != "USER_INPUT"]):
        raise ValueError(f"inputs of kinds {sorted(set(kinds))} not as (lifted..., user...)")
    if bad := [s.kind.name for s in sig.output_specs if s.kind.name != "USER_OUTPUT"]:
        raise ValueError(f"outputs of kinds {sorted(set(bad))} (mutations returned, not written in place)")
    return [s.target for s in sig.input_specs if s.kind.name != "USER_INPUT"]


def program_constant(ep: torch.export.ExportedProgram, fqn: str) -> torch.Tensor:
    return ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]


# Inductor options to compile a graph with, in turn, while the compile-time autotuning runs out of GPU memory.
# standalone_compile autotunes each Triton kernel with several configurations at compile time, on a random
# tensor per argument: a kernel writing into the KV cache gets a second cache-sized tensor beside the example
# one (14.9 GiB for the unpruned cache at B = 8: the export ran out of memory on an 80 GB H100 where the
# engines need 42 GiB). Then one configuration per pointwise kernel (no tuning tensors for them), then no
# compile-time autotuning at all (kernels tuned at their first run, in the loading process).
AUTOTUNE_FALLBACKS = ({}, {"triton.autotune_pointwise": False}, {"triton.autotune_at_compile_time": False})


def precompile(ep: torch.export.ExportedProgram, feeds: list[torch.Tensor], out: Path,
               mapped: dict[str, str] | None) -> tuple[dict, list[Path]]:
    """Compile ``ep``'s graph with Inductor on its own constants and ``feeds`` (example user inputs) and save
    the kernels to ``out`` (compiled again with the next of ``AUTOTUNE_FALLBACKS`` while the compile-time
    autotuning runs out of GPU memory: the index entry's ``config_patches`` says with what); ``mapped``: {fqn: checkpoint key} of the constants the runtime gets from the
    weights (the others are saved beside the artifact; None: they stay in the archive). Returns the index
    entry and the files written. RuntimeError / ValueError where the graph cannot be saved this way."""
    from safetensors.torch import save_file

    names = lifted_inputs(ep)
    weights = [program_constant(ep, n) for n in names]
    if any(w.device.type == "meta" for w in weights):
        raise ValueError("the program holds meta tensors (pass the in-memory program, not a reloaded archive)")
    entry = {"artifact": out.name, "inputs": names, "constants": None}
    art = None
    for i, patches in enumerate(AUTOTUNE_FALLBACKS):
        try:
            with torch.no_grad():
                art = torch._inductor.standalone_compile(ep.graph_module, [*weights, *feeds],
                                                         dynamic_shapes="from_example_inputs",
                                                         options={"config_patches": patches} if patches else {})
            break
        except Exception as e:
            if not is_out_of_memory(e) or i + 1 == len(AUTOTUNE_FALLBACKS):
                raise
        # out of memory: the failed attempt's tensors (held by its traceback until here) are freed first
        entry["config_patches"] = AUTOTUNE_FALLBACKS[i + 1]
        gc.collect()
        torch.cuda.empty_cache()
        biggest = max((t.numel() * t.element_size() for t in feeds), default=0)
        log.warning("%s: the compile-time autotuning ran out of GPU memory (the largest input %.1f GiB); "
                    "compiling again with %s", out.name, biggest / 2**30, AUTOTUNE_FALLBACKS[i + 1])
    art.save(path=str(out), format="binary")
    files = [out]
    if mapped is not None and (rest := [n for n in names if n not in mapped]):
        side = out.with_name(out.name.removesuffix(SUFFIX) + INPUTS_SUFFIX)
        save_file({n: program_constant(ep, n).detach().cpu().contiguous() for n in rest}, str(side))
        files.append(side)
        entry["constants"] = side.name
    return entry, files


def write_index(folder: Path, device: str, graphs: dict[str, dict]) -> Path:
    path = folder / INDEX
    path.write_text(json.dumps({"built_for": built_for(device), "graphs": graphs}, indent=2) + "\n")
    return path


_INDEX_MEMO: dict[tuple[str, str], tuple[dict | None, str]] = {}


def read_index(index: Path, device: str) -> tuple[dict | None, str]:
    """(the index, "loaded") if its kernels were built for this machine, else (None, why not); read
    and logged once per index and machine (device, thread count)."""
    here = built_for(device)
    memo = (str(index), json.dumps(here, sort_keys=True))
    if memo not in _INDEX_MEMO:
        d = json.loads(Path(index).read_text())
        saved = d.get("built_for", {})
        if saved != here:
            diff = ", ".join(f"{k} {str(saved.get(k))[:16]} (here {str(here.get(k))[:16]})"
                             for k in {**saved, **here} if saved.get(k) != here.get(k))
            why = f"built for another machine ({diff})"
            log.warning("%s: precompiled kernels not used: %s; compiling the graphs with torch.compile", index, why)
            _INDEX_MEMO[memo] = (None, why)
        else:
            _INDEX_MEMO[memo] = (d, "loaded")
    return _INDEX_MEMO[memo]


def load(index: Path, key: str, archive: Path, device: str, constants: dict[str, torch.Tensor] | None):
    """The compiled function of graph ``key`` with its weights bound (``fn(*user_inputs) -> list``), or
    (None, why not). ``constants``: {fqn: tensor} of the checkpoint-mapped weights (the runner's);
    the rest come from the artifact's side file, or from ``archive`` for engines whose archives hold
    their weights."""
    from safetensors.torch import load_file

    d, why = read_index(index, device)
    if d is None:
        return None, why
    entry = d["graphs"].get(key)
    if entry is None:
        return None, f"no precompiled kernels for {key} (the export could not save them: see the manifest's notes)"
    folder = Path(index).parent
    values = dict(constants or {})
    if entry["constants"]:
        values.update(load_file(str(folder / entry["constants"]), device=device))
    if missing := [n for n in entry["inputs"] if n not in values]:
        install_torch_caches()
        ep = torch.export.load(str(archive))  # weights inside the archive (compiled_weights "package")
        values.update({n: program_constant(ep, n).to(device) for n in missing})
    weights = [values[n] for n in entry["inputs"]]
    art = torch._inductor.CompiledArtifact.load(path=str(folder / entry["artifact"]), format="binary")

    def fn(*args: torch.Tensor) -> Any:
        return art(*weights, *args)

    fn.weights = weights  # what the runner binds (tests count them)
    return fn, "loaded"
