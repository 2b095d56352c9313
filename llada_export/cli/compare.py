"""``llada-compare``: check an engines directory against the eager PyTorch model with Polygraphy."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..engines.registry import backend_names
from ..rules import shorten
from .common import cli_prompt, directory, parser, user_errors
from .generate import add_decoding_flags, decoding_settings

DEFAULT_REPORT = "llada-compare.json"

DESCRIPTION = """\
Compare every graph of an engines directory (vision, stage A, stage B, the cache graphs,
the unpruned graphs) with the same checkpoint run eagerly, using Polygraphy's Comparator,
and report the end-to-end token agreement."""

EPILOG = """\
examples:
  llada-compare --engines engines/ --model ckpt/
  llada-compare --engines engines/ --model ckpt/ --image a.jpg --prompt "What is this?" --report out.json
  llada-compare --engines engines/ --model ckpt/ --factor 1 --refresh 8

Prompts: --image/--prompt pairs replace the built-in prompts; built-in prompts (and presets)
that do not fit the engines' bucket are skipped, and the report says which and why. What
cannot run (a backend not built, a prompt too long for the bucket) is refused before any
comparison runs.

Exit status: 0 when every graph is within tolerance and fp32 engines reproduce the eager
tokens exactly, 1 when a comparison fails, 2 on a usage error (a checkpoint of another
model included). A failed run removes the Polygraphy files it wrote (unless --save-dir is
given); the report (with --report, the reason a run could not compare) is still written."""


def build_parser() -> argparse.ArgumentParser:
    p = parser("llada-compare", DESCRIPTION, EPILOG)
    p.add_argument("--engines", required=True, type=directory, help="engines directory written by llada-export")
    p.add_argument("--model", required=True, type=directory, help="the checkpoint the engines were exported from")
    p.add_argument("--image", action="append", default=[], help="image for a prompt (repeatable, pairs with --prompt)")
    p.add_argument("--prompt", action="append", default=[], type=cli_prompt,
                   help="prompt about the image (repeatable; the image goes first unless <image> places it); "
                   "replaces the built-in prompts")
    p.add_argument("--backend", action="append", choices=backend_names(),
                   help="backends to check (default: every backend built)")
    p.add_argument("--presets", default="mc,chartqa", type=preset_list, help="sampler presets for the agreement check; one longer than "
                   "the engines' gen length is skipped (default: mc,chartqa)")
    add_decoding_flags(p)
    p.add_argument("--report", help="JSON report path; a .md summary is written beside it (default: "
                   f"{DEFAULT_REPORT}; a run that cannot compare writes it only when --report is given)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Polygraphy's own comparison log")
    p.add_argument("--save-dir", help="where Polygraphy inputs/outputs go, kept when a comparison fails (default: "
                   "<engines>-compare/, removed when a comparison fails)")
    return p


def preset_list(text: str) -> str:
    """``--presets``: at least one name (an empty list ran no end-to-end check and still passed)."""
    if not any(t.strip() for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"no preset named in {text!r}: give one or more, e.g. mc,chartqa (a "
                                         "preset longer than the engines' gen length is skipped)")
    return text


def check_report_path(path: Path, engines: str, model: str) -> None:
    """Refuse, before the comparison runs, a report path that could not be written at its end, or that lies in
    the engines or checkpoint directory (``--report ENGINES/manifest.json`` replaced the manifest)."""
    from ..compare import check_outside

    check_outside("--report", path, Path(engines), Path(model), "path")
    if path.suffix == ".md":
        raise ValueError(f"--report {path}: the JSON report's path (its .md summary goes beside it); "
                         f"give {path.with_suffix('.json')}")
    if path.is_dir():
        raise ValueError(f"--report {path} is a directory: give a file path such as {path / DEFAULT_REPORT}")
    if not path.parent.is_dir():
        raise ValueError(f"--report {path}: the folder {path.parent} does not exist; create it first")
    from ..compare import is_report

    for f in (path, path.with_suffix(".md")):  # replace an earlier report, never a file of the user's
        if f.exists() and not is_report(f):
            raise ValueError(f"--report {path}: {f} exists and is not a llada-compare report (the report writes "
                             f"{path.name} and {path.with_suffix('.md').name}); give another path or remove it")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("llada-compare"):
        from ..compare import CompareReport, run_compare, write_report

        if len(args.image) != len(args.prompt):
            raise ValueError("give one --image for each --prompt")
        check_report_path(Path(args.report or DEFAULT_REPORT), args.engines, args.model)
        report = CompareReport(args.engines, args.model, "")
        try:
            run_compare(args.engines, args.model, list(zip(args.image, args.prompt)) or None, args.backend,
                        args.save_dir, tuple(p.strip() for p in args.presets.split(",") if p.strip()), args.verbose,
                        settings=decoding_settings(args), report=report)
        except Exception as e:
            if args.report:  # the user sees why in the report they asked for
                report.error = " ".join(str(e).split()) or type(e).__name__
                with contextlib.suppress(OSError):  # the error to show is the one above
                    write_report(report, args.report)
            raise
        js, md = write_report(report, args.report or DEFAULT_REPORT)
        print(md.read_text())
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
        for g in report.graphs:
            for out, s in g.stats.items():
                if not s["passed"]:
                    print(f"FAILED: {g.backend} {g.graph} output '{out}': max abs error {s['max_abs']:.3g} > "
                          f"atol {g.tolerances[out]['atol']:.3g}", file=sys.stderr)
        for a in report.agreement:
            if a["strict"] and not a["engine_vs_reference_exact"]:
                print(f"FAILED: {a['backend']} tokens differ from the eager reference for {shorten(repr(a['prompt']))} "
                      f"({a['settings']})", file=sys.stderr)
        print(f"report: {js} and {md}")
        return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
