"""What the stages of ``long_sweeps.py`` share: the grid's constants, its generation settings and cells
(``setting``, ``exact``, ``cell``, ``cache_settings``), the evaluation set of a result (``_balanced``) and
the loader of sibling scripts (``_tool``). tools/ holds scripts, not a package: ``long_sweeps.py`` puts
this folder on ``sys.path``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from llada_export import vqa_task

G = 32  # vqa_task.GEN_LENGTH: the evaluation's response length
RULES = ["none", "factor 0.5", "factor 1", "factor 2", "threshold 0.95", "threshold 0.9", "threshold 0.8",
         "threshold 0.7"]
REFRESHES = ["1", "2", "4", "8", "16", "32", "never"]
KINDS = ("stage_a", "full", "prefill", "cached")  # graph kinds a row's forward can use


def _tool(name: str):
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _split_args(r: dict, s: dict) -> tuple:
    return r["eval"]["split"], r["eval"]["per_type"], tuple(r["eval"].get("types") or vqa_task.QTYPES)


@functools.lru_cache(maxsize=16)
def _balanced(split: str, per_type: int, types: tuple) -> list:
    return vqa_task.balanced_split(split, per_type, types)


def setting(name: str, path: str, block: int = G, cache: bool = False, refresh=None, rule: str = "none",
            gen: int = G) -> dict:
    """One generation setting: response length ``gen`` in blocks of ``block``, the fixed schedule (one
    token per forward) unless ``rule`` is a parallel rule; the prefix cache refreshed every ``refresh``
    forwards ("never": at block starts only)."""
    return {"name": name, "path": path, "block": block, "cache": cache, "refresh": refresh, "rule": rule, "gen": gen}


def exact(path: str, block: int = G) -> dict:
    return setting(f"{path} exact" + (f" block {block}" if block != G else ""), path, block)


def cell(part: str, key: str, export: dict, settings: list[dict], eval_spec: dict, **kw) -> dict:
    return {"part": part, "key": key, "export": export, "settings": settings, "eval": eval_spec} | kw


def cache_settings(path: str, blocks: list[int], refreshes: list[str], rules: list[str]) -> list[dict]:
    """Exact (no cache, fixed schedule) per block, then every cached setting; a refresh interval of the
    block length or more refreshes at block starts only, the same computation as "never": run once."""
    out = []
    for block in blocks:
        out.append(exact(path, block))
        for rule in rules:
            seen = set()
            for refresh in refreshes:
                key = "never" if refresh == "never" or int(refresh) >= block else refresh
                if key in seen:
                    continue
                seen.add(key)
                out.append(setting(f"{path} block {block} refresh {key} {rule}", path, block, True, key, rule))
    return out
