"""Load test for ``llada-serve``: closed-loop clients at several concurrency levels and open-loop
(Poisson) arrivals at several rates, every answer checked against the single-request pipeline.

A closed-loop level (``--concurrency C``) runs ``C`` client threads; each sends ``--requests`` chat
requests one after another (a question of the procedural VQA task about its image, different per
request). An open-loop level (``--rate R``) sends ``--requests`` requests at the arrival times of a
Poisson process of ``R`` per second, each when its time comes whatever the others are doing (as
vLLM's serving benchmark does), so requests meet in batches as they would from many users; latency
counts from the scheduled arrival. Every level stops early after ``--duration`` seconds. Per level:
requests answered, errors (an HTTP error or no answer: each request times out, nothing can hang),
lost (sent but neither answered nor failed: must be 0), refused (the errors that were an overloaded
server's 503: ``llada-serve --max-queued``), requests/s and completion tokens/s over
the level's wall time, p50/p95/p99 latency, the mean batch the server ran them in, and answers
that differ from ``Pipeline.generate`` on the same engines in this process (one request per
batch, no server). Loopback servers only.

``--stream`` sends every request with ``stream: true`` (``--stream 0.5``: every other one) and reads
its server-sent events with ``Client.chat_stream``: the concatenated text is checked against the
pipeline like a plain answer, and the time to the first streamed chunk (the first piece of the
answer's text, from the send or, open loop, the scheduled arrival) gets its p50 / p99 per level.
Per level too: ``cancelled``, the server's /health counter of callers that hung up, after the
level minus before (/health answers for one replica at a time: it is asked several times and the
replicas are told apart by their start time, ``now - uptime_s``), 0 unless clients timed out.

    python tools/load_test.py --engines out/serve-engines --concurrency 1 2 4 --requests 25
    python tools/load_test.py --engines out/serve-engines --concurrency --rate 1 2 4 --requests 40
    python tools/load_test.py --engines E --url http://127.0.0.1:8000      # a server already running
    python tools/load_test.py --engines out/serve-engines --concurrency 1 4 --rate 2 4 --stream --requests 8

Without ``--url`` it starts ``llada-serve`` itself (a local Ray cluster; ``--replicas``,
``--max-batch``, ``--batch-wait-ms``, ``--max-queued``) and stops it at the end. Writes ``<out>.json``, ``<out>.md``
and ``<out>.png`` (default ``benchmarks/load_test``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from llada_export.cli.common import positive_float, positive_int
from llada_export.report import pyplot, save, write_report

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def questions(n: int):
    """n (image, question, truth) of the VQA task's test split, one image per sample."""
    from llada_export import vqa_task

    return [(s.image(), s.prompt, s.answer) for s in vqa_task.make_split("test", n)]


def expected_answers(engines: str, items, settings: dict, threads: int | None) -> list[str]:
    """The single-request pipeline's answer to every item (the oracle of the server's answers)."""
    from llada_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines, threads=threads)
    return [pipe.generate(img, q, **settings).text for img, q, _ in items]


def streams(k: int, share: float) -> bool:
    """Whether request ``k`` of a level streams: ``share`` of the requests, evenly spread (0.5: every other)."""
    return int((k + 1) * share) > int(k * share)


def ask(url: str, items, expected, i: int, settings: dict, timeout_s: float, rec: dict, stream: bool = False) -> None:
    """One chat request for item ``i`` (``stream``: with ``stream: true``); its outcome goes into ``rec``
    (latency and, streamed, ``first_chunk``: the first text of the answer, both from ``rec["sent"]``)."""
    from llada_export.serve.client import Client

    img, q, truth = items[i]
    cl = Client(url, timeout_s=timeout_s, retries=0)  # a load test counts failures, it does not hide them
    fields = {"max_tokens": settings.get("gen_length"), "seed": 0}
    rec["stream"] = stream
    try:
        if stream:
            final: list = []
            pieces = []
            for piece in cl.chat_stream(q, img, final=final, stream_options={"include_usage": True}, **fields):
                if not pieces:
                    rec["first_chunk"] = time.perf_counter() - rec["sent"]
                pieces.append(piece)
            msg = "".join(pieces)
            last = next(e for e in final if e["choices"])  # the finish_reason chunk, with the server's record
            tokens = next(e for e in final if not e["choices"])["usage"]["completion_tokens"]
            llada = last["llada"]
        else:
            r = cl.chat(q, img, **fields)
            msg, tokens, llada = r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"], r["llada"]
        batch = llada["batch"]["size"]
        rec["narrowed"] = len(llada["timings"].get("engine_batch_sizes") or ()) > 1  # ran on a smaller size too
        latency = time.perf_counter() - rec["sent"]
        if stream:
            rec.setdefault("first_chunk", latency)  # an empty answer: its first chunk is its end
        rec.update(ok=True, latency=latency, text=msg, tokens=tokens, batch=batch,
                   same=msg == expected[i], right=msg.strip() == truth)
    except (OSError, ValueError, KeyError, StopIteration) as e:  # ServerError, a broken or malformed stream
        rec.update(ok=False, latency=time.perf_counter() - rec["sent"], error=str(e) or type(e).__name__,
                   status=getattr(e, "status", None))


def health_counts(url: str, samples: int, tol_s: float = 0.3) -> list[tuple[float, int]] | None:
    """(start time, ``cancelled``) per replica that answered one of ``samples`` GET /health (each answers
    for the replica it reached; replicas are told apart by ``now - uptime_s``, within ``tol_s``); None for
    a server whose /health has no ``cancelled`` counter."""
    from llada_export.serve.client import Client

    cl = Client(url, timeout_s=30, retries=2)
    seen = []
    for _ in range(samples):
        t = time.time()
        h = cl.health()
        if "cancelled" not in h:
            return None
        seen.append((t - h["uptime_s"], int(h["cancelled"])))
    groups: list[list] = []
    for start, n in sorted(seen):
        if groups and start - groups[-1][0] <= tol_s:
            groups[-1][1] = max(groups[-1][1], n)
        else:
            groups.append([start, n])
    return [(g[0], g[1]) for g in groups]


def cancelled_between(before, after, tol_s: float = 1.0) -> dict:
    """The server's ``cancelled`` counter after a level minus before, summed over the replicas seen both
    times (a replica seen only after counts from 0)."""
    if before is None or after is None:
        return {"cancelled": None}
    delta = sum(n - next((m for s, m in before if abs(s - start) <= tol_s), 0) for start, n in after)
    return {"cancelled": delta, "replicas_seen": len(after)}


def summary(recs: list[dict], wall: float, **level) -> dict:
    """A level's counts, throughput over its wall time, latency (and first-chunk) percentiles."""
    done = [r for r in recs if r.get("ok")]
    failed = [r for r in recs if r.get("ok") is False]
    lat = np.array([r["latency"] for r in done]) if done else np.zeros(1)
    first = [r["first_chunk"] for r in done if r.get("stream")]
    pct = lambda q: float(np.percentile(first, q)) if first else None  # noqa: E731
    return {**level, "sent": len(recs), "answered": len(done), "errors": len(failed),
            "refused": sum(r.get("status") == 503 for r in failed),
            "lost": len(recs) - len(done) - len(failed), "wall_s": wall,
            "requests_per_s": len(done) / wall, "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_p99_s": float(np.percentile(lat, 99)),
            "mean_batch": float(np.mean([r["batch"] for r in done])) if done else 0.0,
            "narrowed": sum(bool(r.get("narrowed")) for r in done),
            "differ_from_pipeline": sum(not r["same"] for r in done),
            "accuracy": sum(r["right"] for r in done) / len(done) if done else 0.0,
            "error_messages": sorted({r["error"] for r in failed})[:5],
            "streamed": sum(bool(r.get("stream")) for r in recs), "first_chunk_p50_s": pct(50),
            "first_chunk_p99_s": pct(99)}


def run_level(url: str, items, expected, concurrency: int, requests: int, duration_s: float, settings: dict,
              timeout_s: float, stream: float = 0.0) -> dict:
    """One closed-loop level: ``concurrency`` clients, ``requests`` each, one after another (``stream`` of
    them streamed)."""
    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client(c: int):
        for j in range(requests):
            if time.perf_counter() > deadline:
                break
            i = (c * requests + j) % len(items)
            rec = {"client": c, "item": i, "sent": time.perf_counter()}
            with lock:
                records.append(rec)
            ask(url, items, expected, i, settings, timeout_s, rec, streams(c * requests + j, stream))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * requests + 60)
    wall = time.perf_counter() - t0
    with lock:
        recs = [dict(r) for r in records]
    return summary(recs, wall, concurrency=concurrency)


def run_open_level(url: str, items, expected, rate: float, requests: int, duration_s: float, settings: dict,
                   timeout_s: float, max_in_flight: int, seed: int = 0, stream: float = 0.0) -> dict:
    """One open-loop level: ``requests`` arrivals of a Poisson process at ``rate`` per second, each sent
    at its time whatever the others are doing (at most ``max_in_flight`` open at once: an arrival past
    that waits for a slot and counts as ``late``). Latency runs from the scheduled arrival, so time
    spent waiting for a slot counts."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, requests)
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request at t = 0
    slots = threading.BoundedSemaphore(max_in_flight)
    records: list[dict] = []
    threads: list[threading.Thread] = []

    def one(rec: dict):
        try:
            ask(url, items, expected, rec["item"], settings, timeout_s, rec, rec["stream"])
        finally:
            slots.release()

    t0 = time.perf_counter()
    for j, at in enumerate(arrivals):
        if at > duration_s:
            break
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        late = not slots.acquire(blocking=False)
        if late:
            slots.acquire()
        rec = {"item": j % len(items), "sent": t0 + at, "late": late, "stream": streams(j, stream)}
        records.append(rec)
        th = threading.Thread(target=one, args=(rec,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout_s + 60)
    wall = time.perf_counter() - t0
    recs = [dict(r) for r in records]
    return summary(recs, wall, offered_rps=rate, late=sum(r["late"] for r in recs))


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"load_test: {url} is not a loopback address ({', '.join(LOOPBACK)}); "
                         "this tool only loads servers on this machine")


def run(args) -> dict:
    load_before = os.getloadavg()[0]  # the machine may be shared: the numbers say how busy it was
    items = questions(args.items)
    settings = {"gen_length": args.max_tokens} if args.max_tokens else {}
    expected = expected_answers(args.engines, items, settings, args.threads)
    server = None
    url = args.url
    if url is None:
        from llada_export.serve.app import ServeOptions
        from llada_export.serve.server import start

        port = args.port
        server = start(ServeOptions(args.engines, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                    threads=args.threads, max_queued=args.max_queued), replicas=args.replicas, port=port,
                       temp_dir=args.temp_dir)
        url = server.url
    try:
        from llada_export.serve.client import Client

        models = Client(url).models()["data"][0]
        samples = 8 * (args.replicas if args.url is None else 4)

        def counted(level):  # the level, with the server's cancellations during it
            before = health_counts(url, samples)
            res = level()
            return res | cancelled_between(before, health_counts(url, samples))

        levels = [counted(lambda c=c: run_level(url, items, expected, c, args.requests, args.duration, settings,
                                                args.timeout, args.stream)) for c in args.concurrency]
        open_levels = [counted(lambda k=k, r=r: run_open_level(
            url, items, expected, r, args.requests, args.duration, settings, args.timeout, args.max_in_flight,
            seed=k, stream=args.stream)) for k, r in enumerate(args.rate)]
    finally:
        if server is not None:
            server.stop()
    return {"engines": str(args.engines), "model": models["id"], "server": models["llada"],
            "replicas": args.replicas if args.url is None else None, "items": args.items,
            "max_queued": args.max_queued if args.url is None else None,
            "requests_per_client": args.requests, "duration_s": args.duration, "levels": levels,
            "stream": args.stream, "command": args.command,
            **({"open_levels": open_levels, "max_in_flight": args.max_in_flight} if open_levels else {}),
            "env": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "device": models["llada"]["device"], "gpu": gpu_name(),
                    "load_avg_1min": [load_before, os.getloadavg()[0]]}}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def markdown(res: dict) -> str:
    s = res["server"]
    kinds = (["closed-loop clients"] if res["levels"] else []) + (["open-loop arrivals"] if res.get("open_levels") else [])
    lines = ["# llada-serve load test", "",
             f"Engines `{res['engines']}` ({s['backend']} on {s['device']}, batch size {s['batch_size']}, max batch "
             f"{s['max_batch']}, prefix cache {'on' if s['prefix_cache'] else 'off'}); "
             + (f"{res['replicas']} replica(s); " if res["replicas"] else "")
             + (f"at most {res['max_queued']} requests waiting per replica (`--max-queued`); "
                if res.get("max_queued") else "")
             + f"{' and '.join(kinds)}, {res['requests_per_client']} requests each (VQA test questions, "
             f"{res['items']} different images); machine: {res['env']['machine']}, {res['env']['cpus']} CPUs"
             + (f", {res['env']['gpu']}" if res["env"].get("gpu") else "")
             + (", load average (1 min) {:.1f} at the start and {:.1f} at the end".format(*res["env"]["load_avg_1min"])
                if "load_avg_1min" in res["env"] else "") + "."]
    new = "stream" in res  # reports written before streaming render as they were
    if res.get("stream"):
        share = "every request" if res["stream"] == 1 else f"{100 * res['stream']:g}% of the requests"
        lines += ["", f"Streaming: {share} sent with `stream: true` (server-sent events), the concatenated text "
                  "checked against the pipeline like a plain answer; first chunk: the first text of the answer, "
                  "timed like the latency."]
    if new:
        lines += ["", "`cancelled`: the server's /health counter of callers that hung up, after the level minus "
                  "before (summed over the replicas told apart)."]
    narrow = any("narrowed" in lv for lv in res["levels"] + res.get("open_levels", []))  # not in older reports
    if narrow:
        lines += ["", "`narrowed`: answers whose batch went on at a smaller built batch size once rows finished "
                  "(the server's `timings.engine_batch_sizes` of each answer)."]
    refused = any("refused" in lv for lv in res["levels"] + res.get("open_levels", []))  # not in older reports
    if refused:
        lines += ["", "`refused`: the errors that were the server's 503 `server_overloaded` (a replica already held "
                  "`--max-queued` requests waiting); latencies count the answered requests only."]
    cols = ("| sent | answered | errors " + ("| refused " if refused else "") + "| lost "
            + ("| streamed | cancelled " if new else "")
            + "| requests/s | tokens/s | p50 s | p95 s | p99 s "
            + ("| first chunk p50 s | first chunk p99 s " if new else "")
            + "| mean batch " + ("| narrowed " if narrow else "") + "| differ from pipeline | accuracy |")
    opt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    row = lambda lv: (f"{lv['sent']} | {lv['answered']} | {lv['errors']} | "  # noqa: E731
                      + (f"{lv['refused']} | " if refused else "") + f"{lv['lost']} | "
                      + (f"{lv['streamed']} | {'-' if lv['cancelled'] is None else lv['cancelled']} | " if new else "")
                      + f"{lv['requests_per_s']:.2f} | {lv['tokens_per_s']:.2f} | {lv['latency_p50_s']:.2f} | "
                      f"{lv['latency_p95_s']:.2f} | {lv['latency_p99_s']:.2f} | "
                      + (f"{opt(lv['first_chunk_p50_s'])} | {opt(lv['first_chunk_p99_s'])} | " if new else "")
                      + f"{lv['mean_batch']:.2f} | " + (f"{lv['narrowed']} | " if narrow else "")
                      + f"{lv['differ_from_pipeline']} | {100 * lv['accuracy']:.0f}% |")
    ncols = cols.count("|") - 1
    if res["levels"]:
        lines += ["", "| clients " + cols, "| --- " * (ncols + 1) + "|"]
        lines += [f"| {lv['concurrency']} | " + row(lv) for lv in res["levels"]]
    if res.get("open_levels"):
        lines += ["", f"Open loop (Poisson arrivals, at most {res['max_in_flight']} requests open at once; `late`: "
                  "arrivals that waited for a slot; latency from the scheduled arrival):", "",
                  "| offered requests/s | late " + cols, "| --- " * (ncols + 2) + "|"]
        lines += [f"| {lv['offered_rps']:g} | {lv['late']} | " + row(lv) for lv in res["open_levels"]]
    errs = sorted({m for lv in res["levels"] + res.get("open_levels", []) for m in lv["error_messages"]})
    if errs:
        lines += ["", "Errors seen:", *[f"- {m}" for m in errs]]
    if res.get("command"):
        lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Latency percentiles and throughput against the offered load: one row of panels per kind of level."""
    plt = pyplot()

    rows = [(lv, key, label) for lv, key, label in (
        (res["levels"], "concurrency", "concurrent clients (closed loop)"),
        (res.get("open_levels", []), "offered_rps", "offered requests/s (open loop, Poisson)")) if lv]
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.8 * len(rows)), squeeze=False)
    for (lv, key, label), (a, b) in zip(rows, axes):
        x = [v[key] for v in lv]
        for k, name in (("latency_p50_s", "p50"), ("latency_p95_s", "p95"), ("latency_p99_s", "p99")):
            a.plot(x, [v[k] for v in lv], marker="o", label=name)
        for k, name in (("first_chunk_p50_s", "first chunk p50"), ("first_chunk_p99_s", "first chunk p99")):
            if any(v.get(k) is not None for v in lv):
                a.plot(x, [np.nan if v.get(k) is None else v[k] for v in lv], marker="x", ls="--", label=name)
        a.set_xlabel(label)
        a.set_ylabel("latency per request (s)")
        a.legend()
        a.grid(alpha=0.3)
        b.plot(x, [v["requests_per_s"] for v in lv], marker="o", color="C3", label="answered")
        if key == "offered_rps":
            b.plot(x, x, ls=":", color="grey", label="offered")
            b.legend()
        b.set_xlabel(label)
        b.set_ylabel("requests / s")
        b.grid(alpha=0.3)
    fig.suptitle(f"llada-serve on {res['env']['device']}: {res['model']}", fontsize=10)
    save(fig, path)


def share(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1 (1: every request streams)")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", required=True, help="the engines the server serves (the answers' oracle)")
    p.add_argument("--url", help="a running llada-serve on this machine (default: start one)")
    p.add_argument("--concurrency", type=positive_int, nargs="*", default=[1, 2, 4],
                   help="closed-loop levels: clients per level (default 1 2 4; none: no closed-loop levels)")
    p.add_argument("--rate", type=positive_float, nargs="*", default=[],
                   help="open-loop levels: Poisson arrivals per second (default: none)")
    p.add_argument("--max-in-flight", type=positive_int, default=64,
                   help="open loop: requests open at once at most; later arrivals wait and count as late (default 64)")
    p.add_argument("--stream", type=share, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                   help="send requests with stream: true and time their first streamed chunk: every one "
                        "(--stream), or this share of them, evenly spread (--stream 0.5: every other; default 0)")
    p.add_argument("--requests", type=positive_int, default=25,
                   help="requests per client of a closed-loop level, per open-loop level (default 25)")
    p.add_argument("--duration", type=float, default=600, help="seconds per level at most (default 600)")
    p.add_argument("--items", type=int, default=20, help="different questions/images to cycle through (default 20)")
    p.add_argument("--max-tokens", type=int, help="response length (default: the engines')")
    p.add_argument("--timeout", type=float, default=120, help="seconds a client waits for one answer (default 120)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--max-queued", type=positive_int, default=64,
                   help="the server's --max-queued, where this tool starts it (default 64, llada-serve's)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica and for the oracle (default 1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temp-dir", help="the local Ray cluster's session folder (short)")
    p.add_argument("--out", default="benchmarks/load_test", help="output path without extension")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    args.command = "python tools/load_test.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.concurrency and not args.rate and not args.replot:
        p.error("nothing to run: give --concurrency levels, --rate levels or both")
    if args.url is not None and not args.replot:
        check_loopback(args.url)
    write_report(args.out, None if args.replot else run(args), markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
