"""The official LLaDA-V sampler, batched: masked-diffusion denoising of ``[B, G]`` responses.

Per row it reproduces ``generate_with_embeds`` of the official code on the response
region: blocks of ``block_length``, ``steps // n_blocks`` steps per block, a fixed number
of positions committed per step (remainder to the first steps), EOS / BOS / header ids
set to -inf at masked positions (``<|eot_id|>`` is not suppressed), temperature 0 ->
argmax, else Gumbel-max in float64, confidence = float64 softmax probability of the
chosen token (``low_confidence``) or uniform noise (``random``), positions past the
current block excluded, optional classifier-free guidance. With ``stop_at_eot`` (the
official demo and evaluation pass ``stopping_criteria=['<|eot_id|>']``) the first
committed ``<|eot_id|>`` becomes a stop position: later positions no longer compete, the
block ends once everything before it is committed, and later blocks are skipped. The
answer is cut at the first ``<|eot_id|>``.

Parallel decoding (Fast-dLLM), instead of the fixed schedule; a block then runs until it
is fully committed, at most ``block_length`` forwards (``steps`` is not used; the official
loop has no cap, so a model that keeps predicting the mask token never ends there):

- ``factor=f``: what the official LLaDA-V Fast-dLLM hook's ``threshold`` argument does
  (its demo passes 1): sort the confidences of the N masked response positions
  (``-inf`` outside the current block) c_0 >= c_1 >= ...; commit the top k, k the first
  index >= 1 with c_k < 1 - f/(k+2), else N; k = N - 1 becomes N (the hook's edge case).
- ``threshold=t``: commit every masked position of the block with confidence >= t, and at
  least the most confident one.

Prefix KV cache (``cache=True``): the sampler tells the denoiser per row when to refresh,
as the official hook does: at the first forward of every block and every ``refresh``
forwards within a block (``refresh=None``: only at block starts).

Rows are independent: a row's answer does not depend on the other rows. Each row keeps
its own block, step and stop state; a row that is done stops committing (its forwards
are computed and ignored: a dead row). ``cancel`` (polled before each forward) ends rows
early: a cancelled row is done from then on (it never again asks the cached denoiser for a
refresh), gives its committed prefix, and a batch whose rows are all done ends. A denoiser with
``narrow(rows) -> size | None`` (engines of several batch sizes) is offered the running rows whenever
fewer run: where it moves them to a smaller batch size, the sampler's state follows them (between two
forwards) and the done rows are no longer computed; answers, the trace and ``on_step``'s events keep
every row, in the starting order. A candidate with confidence -inf is never committed (the official
code can pick one in a tie of -inf values when a stop position leaves fewer candidates than the
schedule asks for; which one is not defined there).

The model is reached through a :class:`Denoiser`: response ids [B, G] -> logits
[B, G, V]; the prompt (and which visual tokens survive, and the cache) is the denoiser's
own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch

from .rules import GenerationError, check_number, check_refresh, shorten

DEFAULT_REFRESH = 32  # forwards between cache refreshes within a block (the official demo's value)
# The product's defaults (Pipeline / llada-generate / llada-serve), from the task-v2 sweep on the GPU
# (benchmarks/vqa2_cache_sweep.md, README "Defaults"): Fast-dLLM's threshold rule at 0.9, with the cache
# refreshed every forward (a longer interval cost 2-3 points of long answers with every parallel rule).
PRODUCT_THRESHOLD = 0.9
PRODUCT_REFRESH = 1


def parallel_rule(factor: float | None, threshold: float | None, fixed_schedule: bool,
                  remasking: str) -> tuple[float | None, float | None]:
    """The product's default parallel decoding (README, "Defaults"): the threshold rule at
    ``PRODUCT_THRESHOLD`` unless a rule is named or ``fixed_schedule`` asks for the official fixed
    schedule (steps / blocks tokens per forward). Random remasking has no confidence to rank by: it keeps
    the fixed schedule. Returns (factor, threshold) for :class:`GenerationConfig`."""
    if not isinstance(fixed_schedule, bool):
        raise GenerationError(f"fixed_schedule must be true or false, got {shorten(repr(fixed_schedule))}")
    if fixed_schedule and (factor is not None or threshold is not None):
        raise GenerationError("fixed_schedule commits a fixed number of tokens per forward: leave factor and "
                              "threshold out, or drop fixed_schedule to decode in parallel")
    if factor is None and threshold is None and not fixed_schedule and remasking == "low_confidence":
        return None, PRODUCT_THRESHOLD
    return factor, threshold


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    stop_at_eot: bool = True
    factor: float | None = None  # parallel decoding, the official hook's rule (its "threshold")
    threshold: float | None = None  # parallel decoding, Fast-dLLM's confidence threshold
    cache: bool = False  # prefix KV cache (engines with cache graphs, or the eager cached reference)
    refresh: int | None = DEFAULT_REFRESH  # with cache: forwards between refreshes in a block; None = block starts only

    @property
    def parallel(self) -> str:
        return "factor" if self.factor is not None else "threshold" if self.threshold is not None else "none"

    @property
    def n_blocks(self) -> int:
        return self.gen_length // self.block_length

    def validate(self) -> "GenerationConfig":
        for name in ("gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise GenerationError(f"{name} must be a positive integer, got {shorten(repr(v))}")
        if self.gen_length % self.block_length:
            raise GenerationError(
                f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        n_blocks = self.n_blocks
        if self.steps % n_blocks:
            raise GenerationError(
                f"steps {self.steps} is not divisible by the number of blocks {n_blocks} "
                f"(gen_length {self.gen_length} / block_length {self.block_length})")
        if self.steps // n_blocks > self.block_length:
            raise GenerationError(f"{self.steps // n_blocks} steps per block exceed block_length {self.block_length}")
        if self.remasking not in ("low_confidence", "random"):
            raise GenerationError("remasking must be 'low_confidence' or 'random', got "
                                  f"{shorten(repr(self.remasking))}")
        # the one rule for numbers (rules.py): finite, in range; inf / nan are refused
        check_number(self.temperature, "temperature", low=0.0)
        check_number(self.cfg_scale, "cfg_scale", low=0.0)
        if self.factor is not None and self.threshold is not None:
            raise GenerationError("choose one parallel decoding rule: factor or threshold, not both")
        if self.factor is not None:
            check_number(self.factor, "factor", low=0.0, low_open=True)
        if self.threshold is not None:
            check_number(self.threshold, "threshold", low=0.0, high=1.0, low_open=True)
        if self.parallel != "none" and self.remasking != "low_confidence":
            raise GenerationError("parallel decoding ranks by confidence: it needs remasking 'low_confidence'")
        if self.cache and self.cfg_scale > 0:
            raise GenerationError(
                f"classifier-free guidance (cfg_scale {self.cfg_scale:g}) needs the full forward, which the prefix "
                "cache skips: turn the cache off (llada-generate --no-cache; cache=False in Python, \"cache\": false "
                "over HTTP)")
        if check_refresh(self.refresh) != self.refresh:
            raise GenerationError(f"refresh must be a positive integer or None (never), got {self.refresh!r}")
        return self

    def to_dict(self) -> dict:
        """The settings as ``Pipeline.generate`` takes them back (refresh only with the cache; None
        there is written "never", as llada-generate and the HTTP API spell it; ``fixed_schedule`` true
        when no parallel rule ran, since Pipeline's default is the threshold rule)."""
        d = dict(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                 temperature=self.temperature, remasking=self.remasking, cfg_scale=self.cfg_scale,
                 factor=self.factor, threshold=self.threshold, fixed_schedule=self.parallel == "none",
                 cache=self.cache)
        if self.cache:
            d["refresh"] = "never" if self.refresh is None else self.refresh
        return d

    def describe(self) -> str:
        s = f"{self.gen_length}/{self.block_length}/{self.steps}"
        if self.parallel != "none":
            s += f", {self.parallel} {self.factor if self.factor is not None else self.threshold}"
        if self.cache:
            s += f", cache refresh {self.refresh or 'never'}"
        return s


# Official presets (gen_length, block_length, steps).
PRESETS: dict[str, GenerationConfig] = {
    "mc": GenerationConfig(2, 2, 2),
    "chartqa": GenerationConfig(16, 16, 16),
    "docvqa": GenerationConfig(32, 32, 16),
    "mathvista": GenerationConfig(96, 96, 48),
    "mathverse": GenerationConfig(64, 64, 32),
    "demo": GenerationConfig(128, 128, 128),
}


def preset(name: str, **overrides) -> GenerationConfig:
    """An official preset with ``overrides`` (None values ignored), validated."""
    if name not in PRESETS:
        raise GenerationError(f"unknown preset {shorten(repr(name))}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}).validate()


@dataclass
class StepInfo:
    """What the sampler tells the denoiser about one forward (device tensors, and the same flags on the host)."""

    index: int  # forwards made so far in this generation
    refresh: torch.Tensor  # [B] bool: this row's cache is due for a refresh (cached denoisers)
    block_start: torch.Tensor  # [B] int64: first response slot of the row's current block
    active: torch.Tensor  # [B] bool: rows still generating (the others' outputs are ignored)
    refresh_rows: list[bool] = field(default_factory=list)  # refresh, on the host
    active_rows: list[bool] = field(default_factory=list)  # active, on the host


class Denoiser(Protocol):
    """``__call__``: response ids [B, G] int64 -> logits [B, G, V] (fp32); ``uncond``: the prompt
    fully masked (CFG). A denoiser with ``fused = True`` (engines built with the sampler's greedy
    step inside) offers ``predict(ids, step) -> (x0 [B, G], confidence [B, G])`` instead. Optional:
    ``narrow(rows) -> int | None``: keep only ``rows`` (current indices, ascending) on a smaller batch
    size padded with dead rows, and return it (None: it stays as it is)."""

    fused: bool

    def __call__(self, response_ids: torch.Tensor, step: StepInfo, *, uncond: bool = False) -> torch.Tensor: ...


@dataclass
class StepEvent:
    """Passed to ``on_step`` after each forward: the ids so far and what changed (copies)."""

    index: int  # forwards made, this one included
    ids: torch.Tensor  # [B, G] current response ids (mask id where still masked)
    committed: torch.Tensor  # [B, G] bool: positions committed by this step
    done: torch.Tensor  # [B] bool


@dataclass
class SamplerTrace:
    """What happened, for tests and timings: batched forward calls, forwards per row, and the
    positions each row committed at each step."""

    forwards: int = 0
    row_forwards: list[int] = field(default_factory=list)
    committed: list[list[list[int]]] = field(default_factory=list)  # [step][row] -> sorted positions
    record: bool = True  # record ``committed`` (a read-back per step: off on the serving path)
    step_graph: bool = False  # the per-step update ran from a CUDA graph
    cancelled: list[bool] = field(default_factory=list)  # [B] rows ended by ``cancel`` before they were done


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: even split, remainder to the first steps."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 as the official code: exp(logits) / (-log u)^temperature."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def generate(
    denoiser: Denoiser,
    gen: GenerationConfig,
    *,
    mask_id: int,
    eot_id: int,
    suppress_ids: list[int],
    batch_size: int = 1,
    active: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
    trace: SamplerTrace | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[StepEvent], None] | None = None,
    step_graph: bool | None = None,
    cancel: Callable[[], Sequence[bool]] | None = None,
    on_done: Callable[[int, torch.Tensor, int, bool], None] | None = None,
) -> list[torch.Tensor]:
    """Generate ``batch_size`` responses on ``device`` (where the denoiser's outputs live).

    ``active`` [B] bool: rows holding a request (default all); ``generators``: one per row for
    sampling (temperature > 0, random remasking), on ``device``. ``step_graph`` (default: on
    CUDA): the per-step update runs from a captured CUDA graph (the same code; one launch and
    one small read-back per step instead of dozens of kernel launches). Returns each row's
    answer ids (cut at its first ``<|eot_id|>``), int64 on the CPU; inactive rows give an empty
    tensor. ``cancel``: called before each forward, one flag per row (a shorter list leaves the
    rest alone); a row flagged True stops there (no more commits, no more forwards counted) and
    gives its committed prefix (up to its first mask, cut at ``<|eot_id|>``); once every row is
    done or cancelled the generation ends. A denoiser's ``narrow`` (see :class:`Denoiser`) is offered
    the running rows each time fewer run; rows are always reported in the starting order.
    ``on_done(row, ids, forwards, cancelled)``: called once per real row as soon as its answer is final
    (the row is done or cancelled), while the others may still run, with the ids this function returns
    for it and the forwards the row needed (a server answers that row's caller at once)."""
    gen.validate()
    fused = getattr(denoiser, "fused", False)
    greedy = gen.temperature == 0 and gen.remasking == "low_confidence" and gen.cfg_scale == 0
    if fused and not greedy:
        raise GenerationError(
            "these engines were built with --fuse-sampler (argmax and confidence inside the graph): they serve "
            "temperature 0, low_confidence remasking and no CFG only; re-export without --fuse-sampler")
    b, dev = batch_size, torch.device(device)
    generators = generators or [None] * b
    use_graph = dev.type == "cuda" if step_graph is None else step_graph
    narrow = getattr(denoiser, "narrow", None)
    rows = _Rows(b, gen.gen_length, mask_id, dev)
    real = [True] * b if active is None else active.cpu().tolist()
    reported = [not r for r in real]  # rows whose on_done was called (padding: never)

    def report(loop: "_Loop", done: list[bool], cancelled: list[bool]) -> None:
        for i, o in enumerate(rows.of):
            if o is not None and done[i] and not reported[o]:
                reported[o] = True
                if trace is not None:
                    trace.step_graph = loop.graph is not None and loop.use_graph
                x = loop.x[i].to("cpu", copy=True)  # [G]
                on_done(o, cut_at_eot(_before_mask(x, mask_id) if cancelled[i] else x, eot_id),
                        int(loop.row_forwards[i]), cancelled[i])

    loop = _claim(gen, b, mask_id, eot_id, dev, use_graph)
    try:
        done, refresh = loop.reset(active)
        suppress = torch.tensor(suppress_ids, dtype=torch.long, device=dev)
        forwards, running = 0, b
        cancelled = [False] * b  # rows of the current loop
        while not all(done):
            if cancel is not None and loop.cancel(rows.current(cancel()), done, cancelled):
                done = [d or c for d, c in zip(done, cancelled)]
                if on_done is not None:  # before a narrowing leaves the cancelled rows behind
                    report(loop, done, cancelled)
                if all(done):
                    break
            if narrow is not None and done.count(False) < running:  # fewer rows run: a smaller batch size?
                running = done.count(False)
                keep = [i for i, d in enumerate(done) if not d]
                if (size := narrow(keep)) is not None:
                    rows.save(loop, cancelled)
                    old, loop = loop, _claim(gen, size, mask_id, eot_id, dev, use_graph, wait=False)
                    try:
                        done, refresh = loop.take(old, keep)
                    finally:
                        old.lock.release()
                    cancelled = [False] * size
                    generators = [generators[i] for i in keep] + [None] * (size - len(keep))
                    rows.narrow(keep, size)
            info = StepInfo(forwards, loop.refresh, loop.block_start, ~loop.done, refresh, [not d for d in done])
            if fused:
                x0, x0_p = denoiser.predict(loop.x.clone(), info)  # argmax + its probability computed in the graph
            else:
                x0, x0_p = _predict(denoiser, loop.x, loop.x == mask_id, info, suppress, gen, generators)
            forwards += 1 + (gen.cfg_scale > 0 and not fused)
            done, refresh = loop.step(x0, x0_p)
            if trace is not None and trace.record:
                chosen = [sorted(loop.chosen[i].nonzero().flatten().tolist()) for i in range(len(rows.of))]
                trace.committed.append(rows.starting(chosen, []))
            if on_step is not None:
                on_step(rows.event(forwards, loop))
            if on_done is not None and not all(reported):
                report(loop, done, cancelled)
        rows.save(loop, cancelled)
        if trace is not None:
            trace.forwards += forwards
            trace.row_forwards = rows.row_forwards
            trace.step_graph = loop.graph is not None and loop.use_graph
            trace.cancelled = rows.cancelled
        x = rows.x.to("cpu", copy=True)
    finally:
        loop.lock.release()
    cancelled = rows.cancelled
    answers = [cut_at_eot(_before_mask(x[i], mask_id) if cancelled[i] else x[i], eot_id) if real[i] else x[i, :0]
               for i in range(b)]
    for i in range(b):  # rows the loop ended without reporting (a generation that ends at its start)
        if on_done is not None and not reported[i]:
            on_done(i, answers[i], rows.row_forwards[i], cancelled[i])
    return answers


class _Rows:
    """The batch's rows in their starting order, while the loop may run on fewer (a narrowed batch):
    ``of`` gives each current row's starting row (None: padding); the last state saved of every row."""

    def __init__(self, b: int, g: int, mask_id: int, dev: torch.device):
        self.of: list[int | None] = list(range(b))
        self.x = torch.full((b, g), mask_id, dtype=torch.long, device=dev)  # [B, G] each row's ids when saved
        self.row_forwards, self.cancelled = [0] * b, [False] * b
        self.start: torch.Tensor | None = None  # [n] int64: the current real rows' starting rows (once narrowed)

    def current(self, flags: Sequence[bool]) -> list[bool]:
        """The caller's flags (one per starting row; a shorter list leaves the rest alone) for the current rows."""
        return [o is not None and o < len(flags) and bool(flags[o]) for o in self.of]

    def starting(self, values: list, fill) -> list:
        """One value per current row -> one per starting row (``fill`` for rows no longer in the batch)."""
        if self.start is None:
            return values
        out = [fill] * len(self.row_forwards)
        for v, o in zip(values, self.of):
            if o is not None:
                out[o] = v
        return out

    def save(self, loop: "_Loop", cancelled: list[bool]) -> None:
        """Keep every current row's ids, forwards and cancel flag under its starting row."""
        cur = [i for i, o in enumerate(self.of) if o is not None]
        self.x[[self.of[i] for i in cur]] = loop.x[cur]  # [n, G]
        for i, f in enumerate(loop.row_forwards.tolist()):
            if self.of[i] is not None:
                self.row_forwards[self.of[i]], self.cancelled[self.of[i]] = f, cancelled[i]

    def narrow(self, keep: list[int], size: int) -> None:
        self.of = [self.of[i] for i in keep] + [None] * (size - len(keep))
        self.start = torch.tensor(self.of[: len(keep)], device=self.x.device)

    def event(self, forwards: int, loop: "_Loop") -> StepEvent:
        """``on_step``'s event, [B, G] in the starting order (rows gone: their last ids, done)."""
        if self.start is None:
            return StepEvent(forwards, loop.x.clone(), loop.chosen.clone(), loop.done.clone())

        def spread(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [n, ...] rows into [B, ...]
            return full.index_copy(0, self.start, t[: len(self.start)])  # the real rows come first

        ids = spread(self.x, loop.x)  # [B, G]
        done = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)  # [B]
        return StepEvent(forwards, ids, spread(torch.zeros_like(ids, dtype=torch.bool), loop.chosen),
                         spread(done, loop.done))


_LOOPS: dict[tuple, "_Loop"] = {}


def _claim(gen: GenerationConfig, b: int, mask_id: int, eot_id: int, dev: torch.device, use_graph: bool,
           wait: bool = True) -> "_Loop":
    """The kept loop of this setting, locked (once another generation is done with it); with ``wait`` off
    (a narrowed batch, which holds its first loop meanwhile), a loop of its own where another holds it."""
    loop = _loop(gen, b, mask_id, eot_id, dev, use_graph)
    if not loop.lock.acquire(blocking=wait):
        loop = _Loop(gen, b, mask_id, eot_id, dev, use_graph)
        loop.lock.acquire()
    return loop


def _loop(gen: GenerationConfig, b: int, mask_id: int, eot_id: int, dev: torch.device, use_graph: bool) -> "_Loop":
    """One loop (state buffers, captured step) per setting and device, kept for later generations."""
    key = (gen, b, mask_id, eot_id, str(dev), use_graph)
    if key not in _LOOPS:
        if len(_LOOPS) >= 32:
            _LOOPS.pop(next(iter(_LOOPS)))
        _LOOPS[key] = _Loop(gen, b, mask_id, eot_id, dev, use_graph)
    return _LOOPS[key]


class _Loop:
    """The sampler's per-row state, updated in place by :meth:`update` after each forward: commit
    this step's tokens, then move rows whose block is over to the next block or finish them (the
    official checks before a forward). On CUDA the update is captured once in a CUDA graph and
    replayed; elsewhere it runs as it is. Either way the host reads back two flags per row a step."""

    def __init__(self, gen: GenerationConfig, b: int, mask_id: int, eot_id: int, dev: torch.device, use_graph: bool):
        import threading

        self.gen, self.mask_id, self.eot_id, self.dev = gen, mask_id, eot_id, dev
        g, bl = gen.gen_length, gen.block_length
        self.steps = gen.steps // gen.n_blocks
        self.cap = self.steps if gen.parallel == "none" else bl  # forwards a block may take at most
        self.lock = threading.Lock()
        with torch.device(dev):
            self.pos = torch.arange(g)[None, :]  # [1, G]
            self.rank_base = torch.arange(g).expand(b, g).contiguous()  # [B, G]
            self.neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
            self.x = torch.empty(b, g, dtype=torch.long)  # [B, G] response ids
            self.block = torch.empty(b, dtype=torch.long)  # current block per row
            self.step_in = torch.empty(b, dtype=torch.long)  # forwards made in the current block
            self.masked_at_start = torch.empty(b, dtype=torch.long)  # masked slots when the block began
            self.stop = torch.empty(b, dtype=torch.long)  # first committed eot (G: none)
            self.done = torch.empty(b, dtype=torch.bool)
            self.row_forwards = torch.empty(b, dtype=torch.long)
            self.chosen = torch.zeros(b, g, dtype=torch.bool)  # positions committed by the last step
            self.x0_in = torch.empty(b, g, dtype=torch.long)  # this step's predictions ...
            self.conf_in = torch.empty(b, g, dtype=torch.float64)  # ... and their confidences
            self.refresh = torch.empty(b, dtype=torch.bool)  # the cache refresh hint of the next forward
            self.block_start = torch.empty(b, dtype=torch.long)  # first slot of each row's current block
            self.flags = torch.empty(2, b, dtype=torch.bool)  # (done, refresh): what the host reads back
        self.use_graph, self.graph = use_graph and dev.type == "cuda", None

    def reset(self, active: torch.Tensor | None) -> tuple[list[bool], list[bool]]:
        g, bl = self.gen.gen_length, self.gen.block_length
        self.x.fill_(self.mask_id)
        self.block.zero_()
        self.step_in.zero_()
        self.masked_at_start.fill_(bl)
        self.stop.fill_(g)
        self.done.copy_(torch.zeros_like(self.done) if active is None else ~active.to(self.dev, torch.bool))
        self.row_forwards.zero_()
        self.chosen.zero_()
        self._advance()
        self._advance()
        self._flags()
        return self._read()

    def take(self, src: "_Loop", rows: list[int]) -> tuple[list[bool], list[bool]]:
        """Go on with ``src``'s rows ``rows`` here (a smaller batch): their state copied into this loop's own
        buffers (a captured update reads those), the rows past them padding, done from the start."""
        n = self.x.shape[0]
        idx = torch.tensor(rows + [rows[0]] * (n - len(rows)), device=self.dev)  # [b']
        for name in ("x", "block", "step_in", "masked_at_start", "stop", "done", "row_forwards", "chosen"):
            getattr(self, name).copy_(getattr(src, name).index_select(0, idx))
        self.done[len(rows):] = True
        self._flags()
        return self._read()

    def cancel(self, rows: Sequence[bool], done: list[bool], cancelled: list[bool]) -> bool:
        """Rows flagged in ``rows`` that are still running become done (in place, between two updates: a
        captured update reads the same buffer) and are marked in ``cancelled``. Whether any did."""
        new = [i for i, (r, d) in enumerate(zip(rows, done)) if r and not d]
        if new:
            self.done[new] = True  # [B] one small host -> device copy, only when a row is cancelled
            for i in new:
                cancelled[i] = True
        return bool(new)

    def step(self, x0: torch.Tensor, conf: torch.Tensor) -> tuple[list[bool], list[bool]]:
        self.x0_in.copy_(x0)
        self.conf_in.copy_(conf)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # never let the speed-up cost an answer: run the same update eagerly
                import sys

                print(f"llada-export: warning: the sampler step could not be captured in a CUDA graph ({e}); "
                      "running it eagerly", file=sys.stderr)
                self.use_graph = False
        if self.use_graph:
            self.graph.replay()
        else:
            self.update()
        return self._read()

    def _read(self) -> tuple[list[bool], list[bool]]:
        done, refresh = self.flags.tolist()  # the one read-back per step
        return done, refresh

    def update(self) -> None:
        self._commit()
        self._advance()
        self._advance()  # a row that ended its block at a stop finishes at the next block's check
        self._flags()

    def _capture(self) -> None:
        state = [self.x, self.block, self.step_in, self.masked_at_start, self.stop, self.done, self.row_forwards,
                 self.chosen, self.refresh, self.block_start, self.flags]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):  # warm up outside the capture, then put the state back
            self.update()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        for t, v in zip(state, saved):
            t.copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.update()
        self.graph = graph

    def _advance(self) -> None:
        """Rows whose block is over move to the next block, or finish (the official checks before
        each forward: block committed, or nothing left before the stop, or the block's steps used)."""
        gen, g, bl, pos = self.gen, self.gen.gen_length, self.gen.block_length, self.pos
        start = self.block * bl
        masked = self.x == self.mask_id
        in_block = (pos >= start[:, None]) & (pos < (start + bl)[:, None])
        over = ~(masked & in_block).any(1) | ((self.stop < g) & ~(masked & (pos < self.stop[:, None])).any(1))
        # the fixed schedule ends after its steps; parallel decoding after block_length forwards at most
        # (each commits a position, unless it commits the mask token itself, which leaves it masked)
        over = (over | (self.step_in >= self.cap)) & ~self.done
        self.block.add_(over.long())
        self.step_in.masked_fill_(over, 0)
        nxt = self.block * bl
        self.done.logical_or_(over & ((self.block >= gen.n_blocks) | (self.stop <= nxt)))
        n_new = (masked & (pos >= nxt[:, None]) & (pos < (nxt + bl)[:, None])).sum(1)
        self.masked_at_start.copy_(torch.where(over, n_new, self.masked_at_start))

    def _commit(self) -> None:
        """Commit this step's tokens (``x0_in``, ranked by ``conf_in``) by the schedule or a parallel rule."""
        gen, g, bl, pos = self.gen, self.gen.gen_length, self.gen.block_length, self.pos
        masked = self.x == self.mask_id  # [B, G]
        active = (~self.done).long()
        self.row_forwards.add_(active)
        limit = torch.where(self.stop < g, self.stop, self.block * bl + bl)  # positions >= limit do not compete
        x0 = torch.where(masked, self.x0_in, self.x)
        conf = torch.where(masked & (pos < limit[:, None]), self.conf_in, self.neg_inf)  # [B, G] float64
        order = conf.sort(dim=1, descending=True, stable=True)  # values / indices [B, G]
        k = _n_commit(gen, order.values, masked, self.masked_at_start, self.step_in, self.steps)
        k = torch.minimum(k, torch.isfinite(conf).sum(1))
        k = torch.where(self.done, torch.zeros_like(k), k)
        rank = torch.empty_like(self.rank_base).scatter_(1, order.indices, self.rank_base)  # rank of each slot
        self.chosen.copy_(rank < k[:, None])  # [B, G]
        self.x.copy_(torch.where(self.chosen, x0, self.x))
        self.step_in.add_(active)
        if gen.stop_at_eot:
            self.stop.copy_(torch.minimum(self.stop, torch.where(self.x == self.eot_id, pos, g).amin(1)))

    def _flags(self) -> None:
        r = self.gen.refresh
        self.refresh.copy_((self.step_in == 0) if r is None else (self.step_in % r == 0))
        self.block_start.copy_(self.block * self.gen.block_length)
        self.flags[0].copy_(self.done)
        self.flags[1].copy_(self.refresh)


def _n_commit(gen: GenerationConfig, sorted_conf: torch.Tensor, masked: torch.Tensor, masked_at_start: torch.Tensor,
              step_in: torch.Tensor, steps: int) -> torch.Tensor:
    """Positions each row commits this step [B], before clamping to its finite candidates."""
    if gen.parallel == "none":
        base, rem = masked_at_start // steps, masked_at_start % steps
        return base + (step_in < rem).long()  # transfer_schedule(masked_at_start, steps)[step_in]
    if gen.parallel == "threshold":
        return (sorted_conf >= gen.threshold).sum(1).clamp_min(1)
    # factor rule: first index j >= 1 with c_j < 1 - f / (j + 2) among the N masked slots, else N - 1;
    # then k = 0 or k = N - 1 is bumped by one (the official hook's loop, written vectorised)
    n = masked.sum(1)  # [B] every masked response slot (later blocks too, at -inf)
    j = torch.arange(sorted_conf.shape[1], device=sorted_conf.device)
    th = torch.where(j == 0, -1.0, 1 - gen.factor / (j + 2).to(torch.float64))  # no host->device copy: capturable
    fail = (sorted_conf < th) & (j[None, :] < n[:, None])
    k = torch.where(fail.any(1), fail.to(torch.int8).argmax(1), n - 1)
    return torch.where((k == 0) | (k == n - 1), k + 1, k)


def _predict(denoiser, x, mask, info, suppress, gen, generators) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from logits: (x0 [B, G], confidence [B, G] float64), as the official sampler."""
    logits = denoiser(x.clone(), info).float()  # [B, G, V]
    if gen.cfg_scale > 0:
        un = denoiser(x.clone(), info, uncond=True).float()
        logits = un + (gen.cfg_scale + 1) * (logits - un)
    sup = logits[..., suppress]  # [B, G, S]
    logits[..., suppress] = torch.where(mask[..., None], torch.full_like(sup, float("-inf")), sup)
    if gen.temperature > 0:
        x0 = torch.stack([add_gumbel_noise(logits[i], gen.temperature, gen_i).argmax(dim=-1)
                          for i, gen_i in enumerate(generators)])  # [B, G]
    else:
        x0 = logits.argmax(dim=-1)  # [B, G]
    if gen.remasking == "low_confidence":
        p = torch.softmax(logits.to(torch.float64), dim=-1)  # [B, G, V]
        return x0, p.gather(-1, x0[..., None]).squeeze(-1)
    return x0, torch.stack([torch.rand(x0.shape[1], dtype=torch.float64, generator=gen_i, device=x0.device)
                            for gen_i in generators])


def fused_prediction(logits: torch.Tensor, response_ids: torch.Tensor, suppress_ids: list[int],
                     mask_id: int, suppress_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy step inside a graph: logits [B, G, V] -> (x0 [B, G] int64, confidence [B, G] fp32).

    Suppressed ids (``suppress_mask`` [V], or made from ``suppress_ids``) are -inf at masked positions,
    as in the sampler; the confidence is the
    softmax probability of the argmax, exp(max - logsumexp), computed in fp32 (the eager
    sampler uses float64, so a near-tie can in rare cases commit positions in another order).
    """
    masked = (response_ids == mask_id)[..., None]  # [B, G, 1]
    sup = suppress_mask  # [V] bool: a buffer of the graph (no host->device copy inside it), or made here
    if sup is None:
        sup = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        sup[suppress_ids] = True
    logits = torch.where(masked & sup, torch.full_like(logits, float("-inf")), logits)  # [B, G, V]
    best = logits.max(dim=-1)  # values/indices [B, G]
    conf = torch.exp(best.values - torch.logsumexp(logits, dim=-1))  # [B, G]
    return best.indices, conf


def _before_mask(ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``ids`` up to its first mask (a cancelled row's committed prefix)."""
    hits = (ids == mask_id).nonzero().flatten()
    return ids[: int(hits[0])] if len(hits) else ids


def cut_at_eot(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    hits = (ids == eot_id).nonzero().flatten()
    return ids[: int(hits[0])] if len(hits) else ids
