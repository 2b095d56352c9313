"""``engines/manifest.json``: what was built, from what, for which shapes; with SHA-256s.

The file table gives each file's size and SHA-256, and a file of two blocks or more (:data:`BLOCK_BYTES`)
also a SHA-256 per block, which :meth:`Manifest.verify` checks in parallel threads (the full-size weights
file is 16.9 GB); a table without block digests (an older export) is checked file by file.

:class:`Manifest` is the one typed reader and writer. :meth:`Manifest.read` validates the
format and version, every field, that every artifact is a file listed (size and SHA-256)
in the file table, and that every artifact's graph has its I/O recorded.

Tamper evidence: the export writes ``content_sha256``, a SHA-256 of the manifest's own
content (every field but the file table, which is checked against the files themselves,
and the digest); :meth:`Manifest.from_dict` recomputes it, and checks that the fields
agree with each other (the graphs' I/O with the bucket and the config, the bucket's static
top-k with the pruning). :func:`llada_export.engines.registry.check_artifacts` checks the artifacts of one
backend against the manifest (shapes in the graphs, stage A's static top-k) without
reading any weights. A hand-edited manifest is refused with one line.

Several batch sizes (``llada-export --batch-sizes 1,2,4``): ``batch_sizes`` lists them,
``bucket.batch_size`` is the largest, and every graph with a batch dimension is built once per
size: under its plain name at the largest size, as ``name@bN`` below it
(``contract.graphset.sized_key``); the vision graph once. :meth:`Manifest.keys_at` gives a size's
graphs. The cross-field checks cover every size (each key's I/O against the bucket at its size,
the same graphs at every size, in every backend).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import LLaDAVConfig
from ..outdir import refuse_unlisted
from .bucket import Bucket
from .graphset import GRAPHS, Dims, GraphIO, batched, split_key
from .pruning import PruneSettings
from .tokens import SpecialTokens

FORMAT = "llada-export/engines"
FORMAT_VERSION = 5  # 3: typed manifest, batch size, graph I/O with dtypes, "unpruned" graph names, cache graphs;
# 4: content_sha256 (the manifest's own content, checked at load); 5: batch_sizes (graphs name@bN), weights_file
READABLE_VERSIONS = (4, 5)  # a version-4 directory reads as one batch size, its weights where it says
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
# files that hold only tensors and a JSON header: reading a damaged one cannot run code, so a load may read them
# while their SHA-256 is still being computed (Manifest.verify's defer)
DATA_ONLY = (".safetensors",)


class ManifestError(ValueError):
    """An engines directory is missing, altered, truncated or from an incompatible tool version."""


def sha256(path: Path, chunk: int = 1 << 22, stop: threading.Event | None = None, start: int = 0,
           length: int | None = None) -> str | None:
    """SHA-256 (hex) of the file, or of its ``length`` bytes from ``start``; None once ``stop`` is set
    (checked between reads)."""
    h = hashlib.sha256()
    left = float("inf") if length is None else length
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0 and (block := f.read(int(min(chunk, left)))):
            if stop is not None and stop.is_set():
                return None
            h.update(block)
            left -= len(block)
    return h.hexdigest()


# a file of at least two blocks also gets a SHA-256 per block in the file table: the load checks those in
# parallel threads (a 16.9 GB weights file is about 10 s of SHA-256 in one stream, about 1.5 s on 8 cores)
BLOCK_BYTES = 1 << 28


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # of the whole file (what ``sha256sum`` prints)
    bytes: int
    blocks: tuple[str, ...] = ()  # SHA-256 of each block_bytes-long block (the last one shorter), or none
    block_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = {"sha256": self.sha256, "bytes": self.bytes}
        return d | ({"block_bytes": self.block_bytes, "block_sha256": list(self.blocks)} if self.blocks else {})

    @classmethod
    def from_dict(cls, f: dict[str, Any]) -> "FileEntry":
        e = cls(str(f["sha256"]), int(f["bytes"]), tuple(str(b) for b in f.get("block_sha256") or ()),
                int(f.get("block_bytes") or 0))
        if e.blocks and (e.block_bytes < 1 or len(e.blocks) != -(-e.bytes // e.block_bytes)):
            raise ValueError(f"{len(e.blocks)} block digests of {e.block_bytes} bytes for a file of {e.bytes} bytes")
        return e

    def ranges(self) -> list[tuple[int, int | None]]:
        """(start, length) of each part the load hashes: the blocks, else the whole file (length None)."""
        if not self.blocks:
            return [(0, None)]
        return [(i * self.block_bytes, self.block_bytes) for i in range(len(self.blocks))]

    def digests(self) -> tuple[str, ...]:
        """What :meth:`ranges` must hash to."""
        return self.blocks or (self.sha256,)


def file_table(root: Path, files: list[Path], block_bytes: int = BLOCK_BYTES) -> dict[str, FileEntry]:
    """Size and SHA-256 of each file, and of each block for files of two blocks or more (threads)."""
    files = sorted(set(files))
    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8), thread_name_prefix="llada-hash") as pool:
        whole = {p: pool.submit(sha256, p) for p in files}
        sizes = {p: p.stat().st_size for p in files}
        parts = {p: [pool.submit(sha256, p, start=i, length=block_bytes) for i in range(0, sizes[p], block_bytes)]
                 for p in files if sizes[p] >= 2 * block_bytes}
        return {str(p.relative_to(root)): FileEntry(whole[p].result(), sizes[p],
                                                    tuple(b.result() for b in parts.get(p, ())),
                                                    block_bytes if p in parts else 0) for p in files}


DIGEST = "content_sha256"
UNSEALED = ("files", DIGEST)  # the file table is checked against the files it lists


def content_digest(d: dict[str, Any]) -> str:
    """SHA-256 of a manifest dict's canonical JSON, without the file table and the digest itself."""
    body = {k: v for k, v in d.items() if k not in UNSEALED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Manifest:
    source_checkpoint: str  # where the weights came from (aoti / inductor graphs may load them from there)
    config_hash: str
    config: dict[str, Any]  # LLaDAVConfig.to_dict() of the source
    dtype: str
    device: str
    fused_sampler: bool
    pruning: PruneSettings | None  # None: unpruned engines
    bucket: Bucket
    generation: dict[str, int]  # default gen_length / block_length / steps
    tokens: SpecialTokens
    graphs: dict[str, GraphIO]
    artifacts: dict[str, dict[str, str]]  # backend -> graph -> path relative to the directory
    files: dict[str, FileEntry]
    weights: dict[str, str] = field(default_factory=dict)  # where each backend's weights live, in words
    constants_from_checkpoint: dict[str, dict[str, dict[str, str]]] | None = None  # backend -> graph -> {fqn: key}
    compile_cache: dict[str, str] | None = None  # backend -> saved compiler artifacts (path), for a fast load
    # backend -> index of its graphs' precompiled kernels (inductor: programs/precompiled.json), run without Dynamo
    precompiled: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    export: dict[str, Any] = field(default_factory=dict)  # seconds, peak memory
    batch_sizes: list[int] = field(default_factory=list)  # every size built, ascending (empty: [bucket.batch_size])
    # a safetensors file of the directory holding the compiled backends' weights once, by checkpoint key
    # (constants_from_checkpoint maps every graph's constants to it); None: they come from the checkpoint
    weights_file: str | None = None
    # None: the weights in ``dtype``; {"weights": "fp8", "activations": "row" | "tensor", "skipped": [linear
    # names kept in dtype], "skip_patterns", ...}: e4m3 linears (llada_export.quant.fp8.FP8Record.to_dict)
    quantization: dict[str, Any] | None = None
    tool_version: str = __version__
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ derived
    @property
    def pruned(self) -> bool:
        return self.pruning is not None

    @property
    def backends(self) -> list[str]:
        return list(self.artifacts)

    def model_config(self) -> LLaDAVConfig:
        return LLaDAVConfig.from_dict(self.config)

    def has_graph(self, name: str, backend: str | None = None) -> bool:
        return any(name in g for b, g in self.artifacts.items() if backend in (None, b))

    @property
    def weights_format(self) -> str:
        """``"fp8"`` for engines with e4m3 linears, else the dtype."""
        return str(self.quantization.get("weights")) if self.quantization else self.dtype

    @property
    def sizes(self) -> list[int]:
        """The batch sizes built, ascending (one for a directory of one ``--batch-size``)."""
        return list(self.batch_sizes) or [self.bucket.batch_size]

    def bucket_at(self, batch: int) -> Bucket:
        return replace(self.bucket, batch_size=batch)

    def keys_at(self, batch: int) -> dict[str, str]:
        """Graph name -> its manifest key at batch size ``batch`` (one of :attr:`sizes`)."""
        if batch not in self.sizes:
            raise ManifestError(f"no graphs of batch size {batch} (built: {', '.join(map(str, self.sizes))})")
        keys = {k: k for k in self.graphs if split_key(k)[1] is None}
        keys.update({split_key(k)[0]: k for k in self.graphs if split_key(k)[1] == batch})
        return keys

    def size_of(self, key: str) -> int:
        """The batch size a graph key was built at (the largest for plain names)."""
        return split_key(key)[1] or self.bucket.batch_size

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version, "tool_version": self.tool_version,
            "source": {"checkpoint": self.source_checkpoint, "config_hash": self.config_hash},
            "config": self.config, "dtype": self.dtype, "device": self.device, "fused_sampler": self.fused_sampler,
            "pruning": self.pruning.to_dict() if self.pruning else None, "bucket": self.bucket.to_dict(),
            "generation": self.generation, "tokens": self.tokens.to_dict(),
            "graphs": {n: g.to_dict() for n, g in self.graphs.items()}, "artifacts": self.artifacts,
            "weights": self.weights, "constants_from_checkpoint": self.constants_from_checkpoint,
            "compile_cache": self.compile_cache, "precompiled": self.precompiled, "notes": self.notes,
            "export": self.export,
            "batch_sizes": self.sizes, "weights_file": self.weights_file, "quantization": self.quantization,
            "files": {k: f.to_dict() for k, f in self.files.items()},
        }

    def sealed_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as JSON holds it, with its ``content_sha256``."""
        d = json.loads(json.dumps(self.to_dict()))
        return d | {DIGEST: content_digest(d)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a llada-export engines manifest")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ManifestError(f"{where}: format_version {version!r} is not an integer (damaged or edited manifest; "
                                "re-run llada-export)")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"{where}: engines format version {version} (tool {d.get('tool_version')}) is not "
                f"supported by llada-export {__version__} (format {FORMAT_VERSION}); re-export with this version")
        try:
            m = cls(
                source_checkpoint=str(d["source"]["checkpoint"]), config_hash=str(d["source"]["config_hash"]),
                config=dict(d["config"]), dtype=str(d["dtype"]), device=str(d["device"]),
                fused_sampler=bool(d["fused_sampler"]),
                pruning=PruneSettings.from_dict(d["pruning"]) if d["pruning"] else None,
                bucket=Bucket.from_dict(d["bucket"]), generation={k: int(v) for k, v in d["generation"].items()},
                tokens=SpecialTokens.from_dict(d["tokens"]),
                graphs={n: GraphIO.from_dict(g) for n, g in d["graphs"].items()},
                artifacts={b: {g: str(p) for g, p in gs.items()} for b, gs in d["artifacts"].items()},
                files={k: FileEntry.from_dict(f) for k, f in d["files"].items()},
                weights=dict(d.get("weights") or {}), constants_from_checkpoint=d.get("constants_from_checkpoint"),
                compile_cache=d.get("compile_cache"), precompiled=d.get("precompiled"),
                notes=list(d.get("notes") or []),
                export=dict(d.get("export") or {}), tool_version=str(d.get("tool_version")),
                format_version=int(d["format_version"]),
                batch_sizes=[_size(b) for b in d.get("batch_sizes") or []],
                weights_file=None if d.get("weights_file") is None else str(d["weights_file"]),
                quantization=None if d.get("quantization") is None else dict(d["quantization"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"field {e.args[0]!r} is missing" if isinstance(e, KeyError) else f"malformed field ({e})"
            raise ManifestError(f"{where}: {what}; the directory is damaged, re-run llada-export") from None
        if m.dtype not in DTYPES:
            raise ManifestError(f"{where}: unknown dtype {m.dtype!r} (damaged or edited manifest; re-run llada-export)")
        m._check_sizes(where)
        m._check_artifacts(where)
        m._check_consistent(where)
        if d.get(DIGEST) != content_digest(d):
            raise ManifestError(f"{where}: edited after export (its {DIGEST} does not match its content); the "
                                "engines are only valid as exported: re-run llada-export (or restore the manifest)")
        return m

    def _check_consistent(self, where: str) -> None:
        """The fields must agree with each other: an edit of one of them is refused by name."""
        edited = "(edited manifest; re-run llada-export)"
        try:
            cfg = self.model_config()
        except ValueError as e:
            raise ManifestError(f"{where}: config: {e} {edited}") from None
        if cfg.hash() != self.config_hash:
            raise ManifestError(f"{where}: config does not match source.config_hash {edited}")
        b, v = self.bucket, self.bucket.max_visual_tokens
        want_k = self.pruning.k_static(v) if self.pruning and v else v
        if b.k_static != want_k:
            what = f"pruning.keep {self.pruning.keep}" if self.pruning else "unpruned engines"
            raise ManifestError(f"{where}: bucket.k_static {b.k_static} is not what {what} gives for {v} visual "
                                f"slots ({want_k}) {edited}")
        if not 1 <= self.generation.get("gen_length", 0) <= b.gen_length:
            raise ManifestError(f"{where}: generation.gen_length {self.generation.get('gen_length')} does not fit "
                                f"bucket.gen_length {b.gen_length} {edited}")
        dims = {n: Dims.of(self.bucket_at(n), cfg, self.dtype) for n in self.sizes}
        for key, io in self.graphs.items():
            name = split_key(key)[0]
            if name in GRAPHS and (want := GRAPHS[name].io(dims[self.size_of(key)], self.fused_sampler)) != io:
                bad = next(f"{a.name} {list(a.shape)} {a.dtype}, the bucket and config give {list(w.shape)} {w.dtype}"
                           for a, w in zip(io.inputs + io.outputs, want.inputs + want.outputs) if a != w) \
                    if len(io.inputs) == len(want.inputs) and len(io.outputs) == len(want.outputs) \
                    else f"tensors {io.input_names + io.output_names}, expected {want.input_names + want.output_names}"
                raise ManifestError(f"{where}: graph {key}: {bad} {edited}")

    def _check_sizes(self, where: str) -> None:
        """``batch_sizes`` against the bucket and the graph keys: every size has the same graphs, in every
        backend; a graph without a batch dimension is built once."""
        edited = "(edited manifest; re-run llada-export)"
        sizes = self.sizes
        if sizes != sorted(set(sizes)) or sizes[-1] != self.bucket.batch_size:
            raise ManifestError(f"{where}: batch_sizes {sizes} must ascend without repeats and end with "
                                f"bucket.batch_size {self.bucket.batch_size} {edited}")
        if len(sizes) > 1 and self.format_version < 5:
            raise ManifestError(f"{where}: batch_sizes {sizes} in a format-{self.format_version} manifest {edited}")
        try:
            split = {k: split_key(k) for k in self.graphs}
        except ValueError as e:
            raise ManifestError(f"{where}: {e} {edited}") from None
        for key, (name, size) in split.items():
            if size is not None and (size not in sizes[:-1] or name not in self.graphs):
                raise ManifestError(f"{where}: graph {key} is of a batch size not in batch_sizes {sizes[:-1]} below "
                                    f"the largest, or of no graph at the largest {edited}")
            if size is not None and name in GRAPHS and not batched(GRAPHS[name]):
                raise ManifestError(f"{where}: graph {key}: {name} has no batch dimension, it is built once {edited}")
        plain = [k for k, (n, s) in split.items() if s is None and (n not in GRAPHS or batched(GRAPHS[n]))]
        for table, what in [(self.graphs, "graphs")] + [(a, f"artifacts.{b}") for b, a in self.artifacts.items()]:
            for n in sizes[:-1]:
                have = {split_key(k)[0] for k in table if split_key(k)[1] == n}
                want = {k for k in plain if k in table}
                if have != want:
                    raise ManifestError(f"{where}: {what} at batch size {n} are {sorted(have)}, at "
                                        f"{sizes[-1]} {sorted(want)}: every size has the same graphs {edited}")
        if self.weights_file is not None and self.weights_file not in self.files:
            raise ManifestError(f"{where}: weights_file {self.weights_file} is not in the file table {edited}")

    def _check_artifacts(self, where: str) -> None:
        for backend, graphs in self.artifacts.items():
            for name, rel in graphs.items():
                if name not in self.graphs:
                    raise ManifestError(f"{where}: artifact {backend}:{name} names a graph the manifest does not "
                                        "describe (damaged or edited manifest; re-run llada-export)")
                if rel not in self.files:
                    raise ManifestError(f"{where}: artifact {backend}:{name} points at {rel}, which is not in the "
                                        "manifest's file table (damaged or edited manifest; re-run llada-export)")
                stem = rel.rsplit("/", 1)[-1].split(".", 1)[0]
                if stem != name:
                    raise ManifestError(f"{where}: artifact {backend}:{name} points at {rel}, a file of another "
                                        "graph (damaged or edited manifest; re-run llada-export)")
        for backend, rel in (self.compile_cache or {}).items():
            if rel not in self.files:
                raise ManifestError(f"{where}: the {backend} compile cache {rel} is not in the file table (damaged or "
                                    "edited manifest; re-run llada-export)")
        for backend, rel in (self.precompiled or {}).items():
            if backend not in self.artifacts or rel not in self.files:
                raise ManifestError(f"{where}: the {backend} precompiled kernels' index {rel} is not in the file "
                                    "table or names no built backend (damaged or edited manifest; re-run llada-export)")

    def write(self, root: Path) -> Path:
        path = Path(root) / MANIFEST
        path.write_text(json.dumps(self.sealed_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, root: str | Path, verify: bool = True) -> "Manifest":
        """Read and validate ``root/manifest.json``; with ``verify`` check every file's size and SHA-256."""
        root = Path(root)
        if not root.exists():
            raise ManifestError(f"{root}: no such engines directory (write one with llada-export -o {root})")
        if not root.is_dir():
            raise ManifestError(f"{root}: not a directory (an engines directory written by llada-export is expected)")
        path = root / MANIFEST
        if not path.is_file():
            if (root / "config.json").is_file():  # the other kind of directory
                raise ManifestError(f"{root} is a checkpoint directory (it holds config.json), not engines: export it "
                                    f"first (llada-export --model {root} -o ENGINES_DIR) and pass that directory")
            raise ManifestError(f"{root}: no {MANIFEST} (not an engines directory written by llada-export)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a binary or non-UTF-8 file, too
            raise ManifestError(f"{path}: not valid JSON ({e}); the directory is damaged, re-run llada-export") from e
        m = cls.from_dict(d, str(path))
        if verify:
            m.verify(root)
        return m

    def verify(self, root: Path, defer: Iterable[str] = ()) -> "Verification":
        """Check every listed file's size, then its SHA-256: the files, and the blocks of a file that has
        block digests (then the whole-file SHA-256 is for people: ``sha256sum``), hashed in parallel
        threads (hashlib lets go of the GIL). The files of ``defer`` (paths in the file table) are hashed
        in the background: the returned :class:`Verification`'s ``wait()`` waits for them and raises
        ManifestError on a mismatch (at once when nothing was deferred). Only :data:`DATA_ONLY` files may
        be deferred (safetensors holds tensors and a JSON header: reading a damaged one cannot run code);
        program archives and compiled kernels are checked before this returns."""
        later = [r for r in self.files if r in set(defer)]
        if bad := [r for r in later if not r.endswith(DATA_ONLY)]:
            raise ValueError(f"only data files ({', '.join(DATA_ONLY)}) may be hashed while they are read: {bad}")
        fix = "the directory is damaged: re-run llada-export (or restore it from a copy)"
        for rel, info in self.files.items():
            f = root / rel
            if not f.is_file():
                raise ManifestError(f"{root}: artifact {rel} listed in the manifest is missing; {fix}")
            if f.stat().st_size != info.bytes:
                raise ManifestError(f"{root}: artifact {rel} has {f.stat().st_size} bytes, the manifest says "
                                    f"{info.bytes} (truncated or replaced?); {fix}")

        now = [r for r in self.files if r not in later]
        stop = threading.Event()  # a failed check stops the other hashes at their next read
        threads = min(os.cpu_count() or 1, 8)
        pools = [ThreadPoolExecutor(max_workers=max(1, min(sum(len(self.files[r].ranges()) for r in rels), threads)),
                                    thread_name_prefix="llada-verify")
                 for rels in (now, later) if rels]  # the deferred files: their own threads
        hashes = {r: [pools[-1 if r in later else 0].submit(sha256, root / r, stop=stop, start=a, length=n)
                      for a, n in self.files[r].ranges()] for r in later + now}

        def check(rels: list[str]) -> None:  # the first mismatch in the manifest's order is said
            try:
                for rel in rels:
                    entry = self.files[rel]
                    for i, (h, want) in enumerate(zip(hashes[rel], entry.digests())):
                        if h.result() != want:
                            where = f" (block {i + 1} of {len(entry.blocks)})" if entry.blocks else ""
                            raise ManifestError(f"{root}: artifact {rel} does not match its SHA-256 in the manifest"
                                                f"{where} (altered?); {fix}")
            except BaseException:
                stop.set()
                raise
            finally:
                if all(h.done() for hs in hashes.values() for h in hs):
                    for pool in pools:
                        pool.shutdown(wait=False)

        check(now)
        return Verification(lambda: check(later), stop)


@dataclass(frozen=True)
class Verification:
    """The SHA-256 checks :meth:`Manifest.verify` left running in the background (the deferred files')."""
    check: Callable[[], None]
    stop: threading.Event

    def wait(self) -> None:
        """Wait for them; ManifestError naming the first file that does not match."""
        self.check()

    def cancel(self) -> None:
        """Stop them at their next block (an interrupted load does not wait for a hash it will not use)."""
        self.stop.set()


def _size(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"batch_sizes holds {b!r}, not a positive integer")
    return b


def is_engines_dir(path: Path) -> bool:
    """True for a directory holding a llada-export manifest (any format version): what
    ``llada-export --overwrite`` may replace. One that also holds files its manifest's file table does
    not list (the user's own: notes, reports, results) is refused with an OutputDirError naming them, as
    replacing it would delete them."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
        if m.get("format") != FORMAT:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    listed = m.get("files")
    if isinstance(listed, dict):  # older exports without a file table: nothing to tell the user's files by
        refuse_unlisted(Path(path), {*listed, MANIFEST}, "llada-export")
    return True
