"""Load test for ``llada-serve``: closed-loop clients at several concurrency levels and open-loop
(Poisson) arrivals at several rates, every answer checked against the single-request pipeline.

A closed-loop level (``--concurrency C``) runs ``C`` client threads; each sends ``--requests`` chat
requests one after another (a question of the procedural VQA task about its image, different per
request). An open-loop level (``--rate R``) sends ``--requests`` requests at the arrival times of a
Poisson process of ``R`` per second, each when its time comes whatever the others are doing (as
vLLM's serving benchmark does), so requests meet in batches as they would from many users; latency
counts from the scheduled arrival. Every level stops early after ``--duration`` seconds. Per level:
requests answered, errors (an HTTP error or no answer: each request times out, nothing can hang),
lost (sent but neither answered nor failed: must be 0), requests/s and completion tokens/s over
the level's wall time, p50/p95/p99 latency, the mean batch the server ran them in, and answers
that differ from ``Pipeline.generate`` on the same engines in this process (one request per
batch, no server). Loopback servers only.

    python tools/load_test.py --engines out/serve-engines --concurrency 1 2 4 --requests 25
    python tools/load_test.py --engines out/serve-engines --concurrency --rate 1 2 4 --requests 40
    python tools/load_test.py --engines E --url http://127.0.0.1:8000      # a server already running

Without ``--url`` it starts ``llada-serve`` itself (a local Ray cluster; ``--replicas``,
``--max-batch``, ``--batch-wait-ms``) and stops it at the end. Writes ``<out>.json``, ``<out>.md``
and ``<out>.png`` (default ``benchmarks/load_test``).
"""

from __future__ import annotations

import argparse
import os
import platform
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


def ask(url: str, items, expected, i: int, settings: dict, timeout_s: float, rec: dict) -> None:
    """One chat request for item ``i``; its outcome goes into ``rec`` (latency from ``rec["sent"]``)."""
    from llada_export.serve.client import Client, ServerError

    img, q, truth = items[i]
    cl = Client(url, timeout_s=timeout_s, retries=0)  # a load test counts failures, it does not hide them
    try:
        r = cl.chat(q, img, max_tokens=settings.get("gen_length"), seed=0)
        msg = r["choices"][0]["message"]["content"]
        rec.update(ok=True, latency=time.perf_counter() - rec["sent"], text=msg,
                   tokens=r["usage"]["completion_tokens"], batch=r["llada"]["batch"]["size"],
                   same=msg == expected[i], right=msg.strip() == truth)
    except ServerError as e:
        rec.update(ok=False, latency=time.perf_counter() - rec["sent"], error=str(e), status=e.status)


def summary(recs: list[dict], wall: float, **level) -> dict:
    """A level's counts, throughput over its wall time and latency percentiles."""
    done = [r for r in recs if r.get("ok")]
    failed = [r for r in recs if r.get("ok") is False]
    lat = np.array([r["latency"] for r in done]) if done else np.zeros(1)
    return {**level, "sent": len(recs), "answered": len(done), "errors": len(failed),
            "lost": len(recs) - len(done) - len(failed), "wall_s": wall,
            "requests_per_s": len(done) / wall, "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_p99_s": float(np.percentile(lat, 99)),
            "mean_batch": float(np.mean([r["batch"] for r in done])) if done else 0.0,
            "differ_from_pipeline": sum(not r["same"] for r in done),
            "accuracy": sum(r["right"] for r in done) / len(done) if done else 0.0,
            "error_messages": sorted({r["error"] for r in failed})[:5]}


def run_level(url: str, items, expected, concurrency: int, requests: int, duration_s: float, settings: dict,
              timeout_s: float) -> dict:
    """One closed-loop level: ``concurrency`` clients, ``requests`` each, one after another."""
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
            ask(url, items, expected, i, settings, timeout_s, rec)

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
                   timeout_s: float, max_in_flight: int, seed: int = 0) -> dict:
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
            ask(url, items, expected, rec["item"], settings, timeout_s, rec)
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
        rec = {"item": j % len(items), "sent": t0 + at, "late": late}
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
                                    threads=args.threads), replicas=args.replicas, port=port,
                       temp_dir=args.temp_dir)
        url = server.url
    try:
        from llada_export.serve.client import Client

        models = Client(url).models()["data"][0]
        levels = [run_level(url, items, expected, c, args.requests, args.duration, settings, args.timeout)
                  for c in args.concurrency]
        open_levels = [run_open_level(url, items, expected, r, args.requests, args.duration, settings, args.timeout,
                                      args.max_in_flight, seed=k) for k, r in enumerate(args.rate)]
    finally:
        if server is not None:
            server.stop()
    return {"engines": str(args.engines), "model": models["id"], "server": models["llada"],
            "replicas": args.replicas if args.url is None else None, "items": args.items,
            "requests_per_client": args.requests, "duration_s": args.duration, "levels": levels,
            **({"open_levels": open_levels, "max_in_flight": args.max_in_flight} if open_levels else {}),
            "env": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "device": models["llada"]["device"], "gpu": gpu_name()}}


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
             + f"{' and '.join(kinds)}, {res['requests_per_client']} requests each (VQA test questions, "
             f"{res['items']} different images); machine: {res['env']['machine']}, {res['env']['cpus']} CPUs"
             + (f", {res['env']['gpu']}" if res["env"].get("gpu") else "") + "."]
    cols = ("| sent | answered | errors | lost | requests/s | tokens/s | p50 s | p95 s | p99 s | mean batch "
            "| differ from pipeline | accuracy |")
    row = lambda lv: (f"{lv['sent']} | {lv['answered']} | {lv['errors']} | {lv['lost']} | "  # noqa: E731
                      f"{lv['requests_per_s']:.2f} | {lv['tokens_per_s']:.2f} | {lv['latency_p50_s']:.2f} | "
                      f"{lv['latency_p95_s']:.2f} | {lv['latency_p99_s']:.2f} | {lv['mean_batch']:.2f} | "
                      f"{lv['differ_from_pipeline']} | {100 * lv['accuracy']:.0f}% |")
    if res["levels"]:
        lines += ["", "| clients " + cols, "| --- " * 13 + "|"]
        lines += [f"| {lv['concurrency']} | " + row(lv) for lv in res["levels"]]
    if res.get("open_levels"):
        lines += ["", f"Open loop (Poisson arrivals, at most {res['max_in_flight']} requests open at once; `late`: "
                  "arrivals that waited for a slot; latency from the scheduled arrival):", "",
                  "| offered requests/s | late " + cols, "| --- " * 14 + "|"]
        lines += [f"| {lv['offered_rps']:g} | {lv['late']} | " + row(lv) for lv in res["open_levels"]]
    errs = sorted({m for lv in res["levels"] + res.get("open_levels", []) for m in lv["error_messages"]})
    if errs:
        lines += ["", "Errors seen:", *[f"- {m}" for m in errs]]
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
    p.add_argument("--requests", type=positive_int, default=25,
                   help="requests per client of a closed-loop level, per open-loop level (default 25)")
    p.add_argument("--duration", type=float, default=600, help="seconds per level at most (default 600)")
    p.add_argument("--items", type=int, default=20, help="different questions/images to cycle through (default 20)")
    p.add_argument("--max-tokens", type=int, help="response length (default: the engines')")
    p.add_argument("--timeout", type=float, default=120, help="seconds a client waits for one answer (default 120)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica and for the oracle (default 1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temp-dir", help="the local Ray cluster's session folder (short)")
    p.add_argument("--out", default="benchmarks/load_test", help="output path without extension")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    if not args.concurrency and not args.rate and not args.replot:
        p.error("nothing to run: give --concurrency levels, --rate levels or both")
    if args.url is not None and not args.replot:
        check_loopback(args.url)
    write_report(args.out, None if args.replot else run(args), markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
