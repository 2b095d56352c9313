"""``engines/manifest.json``: what was built, from what, for which shapes; with SHA-256s."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import __version__

FORMAT = "llada-export/engines"
FORMAT_VERSION = 2  # 2: constants_from_checkpoint per backend (aoti, inductor)
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """An engines directory is missing, altered, truncated or from an incompatible tool version."""


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, files: list[Path]) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(files)}


def write_manifest(root: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__, **manifest}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    """Read and validate a manifest; with ``verify`` check every file's size and SHA-256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST} (not an engines directory written by llada-export)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); the directory is damaged, re-run llada-export") from e
    if m.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a llada-export engines manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: engines format version {m.get('format_version')} (tool {m.get('tool_version')}) is not "
            f"supported by llada-export {__version__} (format {FORMAT_VERSION}); re-export with this version")
    for key in ("bucket", "tokens", "files", "artifacts", "config"):
        if key not in m:
            raise ManifestError(f"{path}: field {key!r} is missing")
    if verify:
        for rel, info in m["files"].items():
            f = root / rel
            if not f.is_file():
                raise ManifestError(f"{root}: artifact {rel} listed in the manifest is missing")
            if f.stat().st_size != info["bytes"]:
                raise ManifestError(f"{root}: artifact {rel} has {f.stat().st_size} bytes, the manifest says "
                                    f"{info['bytes']} (truncated or replaced?)")
            if sha256(f) != info["sha256"]:
                raise ManifestError(f"{root}: artifact {rel} does not match its SHA-256 in the manifest (altered?)")
    return m
