"""Issue 21's sweeps on the task-v2 demo model (short and long answers), in one command.

Parts, run in this order, each with its own time budget (``--budget part=seconds``):

- ``main``: exact unpruned engines and the demo's pruned engines on ``--main-per-type`` test
  questions per type (``vqa_task.balanced_split``), gen = block = steps = 32, with the
  text-only baseline of the same questions;
- ``prune``: K x keep x score source (``--layers``, ``--keeps``, ``--sources``), one engine set
  per cell (vision + stage A + stage B only), the exact schedule; and the attention analysis
  (``tools/attention_analysis.py``) on the long question types;
- ``cache``: prefix cache refresh x parallel rule (``--refreshes``, ``--rules``), pruned and
  unpruned, block 32 and block 8 (``--blocks``), on one engine set with the cache graphs, with
  the exact engines (no cache, fixed schedule) of each path and block as the reference;
- ``composed``: the cheapest pruning settings of ``prune`` x the cheapest cache settings of
  ``cache`` that stay within 1 point of their references on long answers, built together
  (pruning + cache graphs) and run against exact unpruned; the best one by the rule in
  :func:`choose_composed`;
- ``batch``: the same questions through bfloat16 engines (``--batch-dtype``) at batch 1 and
  batch 8: differing answers and tokens.

Every answer's FLOPs are counted as it ran: the denoiser of each batch is observed (which
graph each row's forward used: stage A, full, prefill or cached) and priced by
``llada_export.flops.graph_flops`` for the engines' bucket, plus the vision graph once.

Run (on the GPU: inductor engines exported for CUDA, fp32, no compile cache, loaded with
``runner_options={"compile": False}``; cells run in ``--workers`` processes, each keeping the
visual features it computed in ``<workdir>/vision`` for the others)::

    python tools/long_sweeps.py run --ckpt out/demo-v2 --out $OUT --backend inductor --device cuda \
        --workers 8 --batch 128 2>$OUT/stderr.txt

On one H100 (16 cores) with the default grids (36 pruning cells, 164 cache settings, 100
questions per type, 300 for the main table) the parts take about 50 / 95 / 90 / 35 / 60 s
(estimated from a 20-per-type run of the bundled model and a 100-per-type run of part of the
pruning grid); the default budgets (``--budget``) stop starting new cells after 75 / 110 / 120 /
50 / 60 s.

writes ``$OUT/<part>.json`` (raw: every prediction and per-row graph counts) and
``$OUT/log.txt``. Then, here::

    python tools/long_sweeps.py render --from DIR --out benchmarks

writes ``benchmarks/vqa2_<part>.json`` (summaries), ``.md`` and ``.png``; ``render --replot``
re-renders the Markdown and PNG from those summaries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ holds scripts, not a package

from long_sweeps_common import REFRESHES, RULES  # noqa: E402
from long_sweeps_report import render  # noqa: E402
from long_sweeps_runs import Runner, part_batch, part_cache, part_composed, part_main, part_prune  # noqa: E402

# re-exported: tests use them as long_sweeps.X
from long_sweeps_common import KINDS, cell, setting  # noqa: E402,F401
from long_sweeps_summary import summarize_setting  # noqa: E402,F401
from long_sweeps_worker import _W, _init_worker, _load_shared_vision, gen_kwargs, run_cell  # noqa: E402,F401

PARTS = ("main", "prune", "cache", "composed", "batch")
DEFAULT_BUDGET = {"main": 75, "prune": 110, "cache": 120, "composed": 50, "batch": 60}  # seconds: ~7 min in all


# ====================================================================== command line
def machine_info(device: str) -> dict:
    info = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_budget(items: list[str]) -> dict[str, float]:
    out = dict(DEFAULT_BUDGET)
    for it in items or []:
        part, _, sec = it.partition("=")
        if part not in PARTS or not sec:
            raise SystemExit(f"--budget {it!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        out[part] = float(sec)
    return out


def run_all(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.1f} s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    budget = parse_budget(a.budget)
    check_layers(a)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="long_sweeps_"))
    work.mkdir(parents=True, exist_ok=True)
    common = {"ckpt": str(Path(a.ckpt).resolve()), "backend": a.backend, "device": a.device, "workdir": str(work),
              "threads": a.threads}
    args = {k: v for k, v in vars(a).items() if k not in ("func",)}
    machine = machine_info(a.device)
    log(f"start: parts {', '.join(a.parts)}; {a.workers} workers; machine {machine}")
    runner = Runner(common, a.workers, log)
    raws: dict[str, dict] = {}
    try:
        for part in a.parts:
            t0 = time.perf_counter()
            log(f"{part}: start (budget {budget[part]:.0f} s)")
            if part == "main":
                raw = part_main(runner, a, budget[part])
            elif part == "prune":
                raw = part_prune(runner, a, budget[part])
            elif part == "cache":
                raw = part_cache(runner, a, budget[part])
            elif part == "composed":
                prev = {p: raws.get(p) or _read(out / f"{p}.json") for p in ("prune", "cache")}
                raw = part_composed(runner, a, budget[part], prev["prune"], prev["cache"])
            else:
                raw = part_batch(runner, a, budget[part])
            raw.update(part=part, args=args, machine=machine, seconds=time.perf_counter() - t0)
            raws[part] = raw
            (out / f"{part}.json").write_text(json.dumps(raw))
            cells = raw.get("cells", [])
            bad = sum("error" in c for c in cells)
            cut = sum("skipped" in c for c in cells)
            log(f"{part}: done in {raw['seconds']:.1f} s -> {out / (part + '.json')} ({len(cells) - bad - cut} cells "
                f"measured, {bad} failed, {cut} cut by the time budget)")
    finally:
        runner.close()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    log(f"all done in {time.perf_counter() - t_start:.1f} s")
    log_file.close()
    return 0


def check_layers(a) -> None:
    """Prune layers of the grid, the demo's and the attention analysis' must exist in the checkpoint."""
    n = json.loads((Path(a.ckpt) / "config.json").read_text())["num_hidden_layers"]
    asked = {a.demo_prune[0]} if set(a.parts) & {"main", "cache", "batch"} else set()
    if "prune" in a.parts:
        asked |= set(a.layers) | (set(a.attention_layers or []) if a.attention_n else set())
    if bad := sorted(k for k in asked if not 0 <= k < n):
        raise SystemExit(f"prune layers {bad} do not exist: {a.ckpt} has layers 0..{n - 1} "
                         "(--layers, --demo-prune, --attention-layers)")


def _read(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


def parse_prune(text: str) -> list:
    k, keep, src = text.split()
    return [int(k), float(keep), src]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the sweeps, writing raw JSONs into --out")
    r.add_argument("--ckpt", default="llada_export/assets/demo-model")
    r.add_argument("--out", required=True, help="directory for <part>.json and log.txt")
    r.add_argument("--backend", choices=("onnxruntime", "inductor"), default="onnxruntime")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--dtype", default="float32", help="engines' dtype of every part but batch (default float32)")
    r.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    r.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS",
                   help=f"time budget per part: cells not started by then are skipped (default "
                        f"{' '.join(f'{k}={v}' for k, v in DEFAULT_BUDGET.items())})")
    r.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    r.add_argument("--batch", type=int, default=64, help="engines' batch size (every part but batch)")
    r.add_argument("--per-type", type=int, default=100, help="test questions per type (prune, cache, composed)")
    r.add_argument("--main-per-type", type=int, default=300, help="test questions per type of the main table")
    r.add_argument("--demo-prune", type=parse_prune, default=[3, 0.5, "response"], metavar="'K KEEP SOURCE'",
                   help="the demo's pruning (main, cache, batch parts; default '3 0.5 response')")
    r.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    r.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1])
    r.add_argument("--sources", nargs="+", choices=("response", "text", "last"), default=["response", "text", "last"])
    r.add_argument("--attention-n", type=int, default=60, help="long-answer questions of the attention analysis (0: skip)")
    r.add_argument("--attention-layers", type=int, nargs="*", default=None, help="default: --layers")
    r.add_argument("--attention-keeps", type=float, nargs="+", default=[0.25, 0.1])
    r.add_argument("--blocks", type=int, nargs="+", default=[32, 8])
    r.add_argument("--refreshes", nargs="+", default=REFRESHES)
    r.add_argument("--rules", nargs="+", default=RULES, help="'none', 'factor F', 'threshold T' (quote each)")
    r.add_argument("--cache-chunk", type=int, default=4,
                   help="cache settings per cell (the engines stay loaded in each worker between cells)")
    r.add_argument("--composed-top", type=int, default=3, help="candidates from each of prune and cache")
    r.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 8])
    r.add_argument("--batch-dtype", default="bfloat16")
    r.add_argument("--batch-per-type", type=int, default=50, help="test questions per type of the batch part")
    r.add_argument("--workdir", default=None, help="where engines are built (default: a temporary directory)")
    r.set_defaults(func=run_all)
    d = sub.add_parser("render", help="summaries, Markdown and PNG from run's JSONs")
    d.add_argument("--from", dest="src", default=None, help="directory of run's <part>.json")
    d.add_argument("--out", default="benchmarks", help="where vqa2_*.json/.md/.png go (default benchmarks)")
    d.add_argument("--replot", action="store_true", help="re-render .md and .png from the summaries in --out")
    d.set_defaults(func=lambda a: (render(Path(a.src or a.out), Path(a.out), a.replot), 0)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "render" and not a.replot and not a.src:
        raise SystemExit("render: give --from DIR (run's output) or --replot")
    if a.cmd == "run":
        return _checked_run(a)
    return a.func(a)


def _checked_run(a) -> int:
    bad = [r for r in a.rules if r != "none" and (len(r.split()) != 2 or r.split()[0] not in ("factor", "threshold"))]
    if bad:
        raise SystemExit(f"--rules {bad}: use 'none', 'factor F' or 'threshold T'")
    if a.device == "cuda" and a.backend == "onnxruntime":
        raise SystemExit("--device cuda needs --backend inductor here (no onnxruntime-gpu)")
    return a.func(a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
