"""What an image's preprocessing costs a request, before the vision graph runs: the anyres crops cut and
resized by PIL on the CPU, then their normalisation (x / 255, (x - mean) / std, CHW float32) done

- ``before``: with numpy, crop by crop on the CPU (``normalize_crop``, the transformers processor's
  arithmetic), and the float32 pixels copied to the device;
- ``now``: ``preprocess(image, cfg, device)``: the uint8 crops copied to the device (a quarter of the
  bytes) and normalised there by torch, the same bits (checked here on every run).

Full-size LLaDA-V's vision settings (384 px crops, anyres_max_4 grids). Writes ``<out>.json``, ``<out>.md``
and ``<out>.png``; ``--replot`` re-renders the last two from ``<out>.json``.

    python tools/preprocess_probe.py --out OUT/preprocess_probe [--device cuda] [--sizes 1024x768,384x384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llada_export.config import full_config  # noqa: E402
from llada_export.graphs.anyres import (  # noqa: E402
    _crops, normalize_crop, preprocess, resize_and_pad, select_best_resolution, split_tiles)
from llada_export.report import grouped_bars, pyplot, save, write_report  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    """Median milliseconds of ``fn()`` (after one untimed call)."""
    fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def before(img: Image.Image, cfg, device: str) -> torch.Tensor:
    """The earlier preprocessing: numpy normalisation per crop, float32 pixels to the device."""
    s = cfg.vision.image_size
    crops = [img.resize((s, s))] + split_tiles(resize_and_pad(img, select_best_resolution(img.size,
                                                                                           cfg.image_grid_pinpoints)), s)
    return torch.from_numpy(np.stack([normalize_crop(c, cfg) for c in crops])).to(device)  # [N, 3, S, S]


def probe(size: tuple[int, int], device: str, repeat: int) -> dict:
    cfg = full_config()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    now = preprocess(img, cfg, device)[0]
    if not torch.equal(now.cpu(), before(img, cfg, device).cpu()):
        raise SystemExit(f"{size}: the pixels differ from the numpy normalisation's")
    return {"image": f"{size[0]}x{size[1]}", "crops": now.shape[0],
            "ms": {"crops (PIL)": timed(lambda: _crops(img, cfg), device, repeat),
                   "before: numpy normalisation, float32 to the device": timed(lambda: before(img, cfg, device),
                                                                               device, repeat),
                   "now: uint8 to the device, torch normalisation there": timed(lambda: preprocess(img, cfg, device),
                                                                                device, repeat)}}


def markdown(res: dict) -> str:
    lines = [f"# An image's preprocessing ({res['device_name']}, {res['cpus']} CPUs, torch {res['torch']})", "",
             f"Median of {res['repeat']} runs after one untimed, milliseconds; the whole preprocessing "
             "(PIL crops included) before and now, the crops alone; the pixels are the same bits.", "",
             "| image | crops | " + " | ".join(res["rows"][0]["ms"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in res["rows"][0]["ms"]) + " |"]
    for r in res["rows"]:
        lines.append(f"| {r['image']} | {r['crops']} | " + " | ".join(f"{v:.1f}" for v in r["ms"].values()) + " |")
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    rows = res["rows"]
    grouped_bars(ax, [r["image"] for r in rows], {w: [r["ms"][w] for r in rows] for w in rows[0]["ms"]})
    ax.set_ylabel("ms per image")
    ax.set_title(f"preprocessing, {res['device_name']}", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="1024x768,384x384,1920x1080", help="image sizes, WxH, comma-separated")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--note", help="a paragraph on how the run was made (kept in the JSON)")
    p.add_argument("--replot", action="store_true", help="re-render <out>.md and .png from <out>.json")
    a = p.parse_args(argv)
    out, res = Path(a.out), None  # None: write_report reads <out>.json back
    if not a.replot:
        sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
        res = {"host": platform.node(), "device": a.device, "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "repeat": a.repeat,
               "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               "rows": [probe(s, a.device, a.repeat) for s in sizes], "note": a.note}
    write_report(out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
