"""What every benchmark and sweep under tools/ does with its result: JSON, a Markdown table, a plot.

``write_report(out, res, markdown, plot)`` writes ``<out>.json`` (unless ``res`` is None: then
it is read back, which is ``--replot``), ``<out>.md`` and ``<out>.png``, prints the Markdown and
returns the result. Renderers take the result dict only, so a committed report re-renders from
its committed JSON byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_report(out: str | Path, res: dict | None, markdown: Callable[[dict], str],
                 plot: Callable[[dict, Path], None] | None) -> dict:
    out = Path(out)
    if res is None:
        res = json.loads(out.with_suffix(".json").read_text())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    if plot is not None:
        plot(res, out.with_suffix(".png"))
    print(md)
    return res


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    """One bar per series in each group (``series``: label -> a value per group), side by side and centred on
    the group's tick."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))], values, width, label=label)
    ax.set_xticks(range(len(groups)), groups)


def history_note(res: dict) -> str:
    """A report title's suffix for a result kept for history (its JSON's ``history`` field)."""
    return f" ({res['history']})" if res.get("history") else ""
