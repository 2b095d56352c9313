"""Where a load's seconds go on the weights file (issue 22 item 3), without a full export: a safetensors
file of random bf16 tensors shaped like LLaDA-8B's layers is written, then read back the ways a
``Pipeline.load`` could read it, each timed from the page cache (the file was just written):

- ``sha256``: one SHA-256 stream over the whole file (what the load did before block digests);
- ``sha256_blocks``: the file's 256 MiB blocks hashed in parallel threads (``Manifest.verify`` now);
- ``load_file``: ``safetensors.torch.load_file(path, device=DEVICE)`` (the load's weights stage);
- ``read``: the file read into memory in large chunks (the page cache's read rate, the floor of any reader).

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` with GB/s and the seconds the full-size 16.9 GB
weights file would take at each rate; ``--replot`` re-renders the last two from ``<out>.json``.

    python tools/weight_read_probe.py --gb 4 --out OUT/weight_read_probe [--note "how it was run"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llada_export.contract.manifest import BLOCK_BYTES, sha256  # noqa: E402
from llada_export.report import pyplot, save, write_report  # noqa: E402

FULL_BYTES = 16_869_760_192  # the full-size engines' weights.safetensors (bench_load.md)
SHAPES = [(4096, 4096), (4096, 4096), (12288, 4096), (4096, 12288)]  # one layer's q/o and gate/up/down-like


def write(path: Path, gb: float) -> int:
    """A safetensors file of about ``gb`` GB of random bf16 tensors of the layers' shapes."""
    tensors, total, i = {}, 0, 0
    while total < gb * 1e9:
        shape = SHAPES[i % len(SHAPES)]
        tensors[f"w{i}"] = torch.randn(shape, dtype=torch.bfloat16)
        total += tensors[f"w{i}"].numel() * 2
        i += 1
    save_file(tensors, str(path))
    return path.stat().st_size


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def probe(path: Path, device: str, threads: int) -> dict[str, float]:
    size = path.stat().st_size

    def blocks():
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a: sha256(path, start=a, length=BLOCK_BYTES), range(0, size, BLOCK_BYTES)))

    def read():
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 26):
                pass

    def load():
        w = load_file(str(path), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del w

    read()  # into the page cache, if writing left it out
    return {"read": timed(read), "sha256": timed(lambda: sha256(path)), "sha256_blocks": timed(blocks),
            "load_file": timed(load)}


def markdown(res: dict) -> str:
    lines = [f"# Reading a weights file ({res['host']}, {res['device_name']})", "",
             f"A {res['bytes'] / 1e9:.2f} GB safetensors file of random bf16 tensors, read from the page cache; "
             f"{res['threads']} threads for the block hashes ({res['cpus']} CPUs). The last column scales the "
             f"rate to the full-size engines' {FULL_BYTES / 1e9:.1f} GB weights file.", "",
             "| way | seconds | GB/s | full-size file s |", "| --- | --- | --- | --- |"]
    for way, s in res["seconds"].items():
        rate = res["bytes"] / s / 1e9
        lines.append(f"| {way} | {s:.2f} | {rate:.2f} | {FULL_BYTES / 1e9 / rate:.1f} |")
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ways = list(res["seconds"])
    full = [FULL_BYTES / (res["bytes"] / res["seconds"][w]) for w in ways]  # seconds for the full-size file
    ax.barh(ways, full, color="tab:blue")
    for y, v in enumerate(full):
        ax.text(v, y, f" {v:.1f} s", va="center", fontsize=8)
    ax.set_xlabel(f"seconds for the {FULL_BYTES / 1e9:.1f} GB weights file (at the measured rate)")
    ax.set_title(f"reading the weights file, {res['device_name']}", fontsize=9)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.0, help="size of the probe file (default 4 GB)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8), help="block-hash threads")
    p.add_argument("--dir", default="/tmp", help="where the probe file is written (removed after)")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--note", help="a paragraph on how the run was made (kept in the JSON)")
    p.add_argument("--replot", action="store_true", help="re-render <out>.md and .png from <out>.json (with --note: "
                   "its note replaced)")
    a = p.parse_args(argv)
    out, res = Path(a.out), None  # None: write_report reads <out>.json back
    if a.replot:
        if a.note is not None:  # the note replaced: the JSON is written again
            res = json.loads(out.with_suffix(".json").read_text()) | {"note": a.note}
    else:
        path = Path(a.dir) / f"weight_read_probe_{os.getpid()}.safetensors"
        try:
            size = write(path, a.gb)
            seconds = probe(path, a.device, a.threads)
        finally:
            path.unlink(missing_ok=True)
        res = {"host": platform.node(), "device": a.device, "cpus": os.cpu_count(), "threads": a.threads,
               "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "bytes": size, "seconds": seconds, "note": a.note}
    write_report(out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
