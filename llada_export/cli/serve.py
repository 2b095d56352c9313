"""``llada-serve``: serve exported engines over HTTP on Ray Serve (an OpenAI-style chat API)."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from ..outdir import TERMINATING
from .common import directory, non_negative_float, parser, positive_float, positive_int, user_errors

DESCRIPTION = """\
Serve LLaDA-V engines built by llada-export on Ray Serve: one Pipeline per replica (one GPU
each where the cluster has GPUs), concurrent requests of one generation setting batched
together up to the engines' --batch-size (the largest of --batch-sizes, where each batch runs on
the smallest size that holds it). Starts a local Ray cluster (loopback only), or
attaches to a running one with --address. Routes: POST /v1/chat/completions (what the official
openai client sends: text-only or one image, system messages, conversations, stop strings,
stream: true as server-sent chunks of the committed answer prefix), GET /v1/models, GET /health."""

EPILOG = """\
examples:
  llada-serve --engines engines/
  llada-serve --engines engines/ --replicas 2 --max-batch 8 --batch-wait-ms 20 --port 8080
  llada-serve --engines engines/ --address auto          # a cluster started with `ray start --head`
  llada-serve --engines engines/ --allowed-origins http://localhost:3000   # a web page there may call it

then, from another shell:
  llada-generate --server http://127.0.0.1:8000 --image photo.png --prompt "What is shown?" --stream
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d @body.json

Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops the server after a drain: new chat requests
get a 503 server_shutting_down (GET /health a 503 "draining"), those it holds are answered, for
up to --drain-timeout seconds; a second Ctrl-C stops it at once. Then the local cluster and every
process it started go, or on an attached cluster only this application. Ray's logs (and Serve's
access log with --verbose) are in the cluster's session folder under --temp-dir, which is kept;
without --temp-dir the local cluster's session folder under /tmp/ray is removed when it stops.
Request bodies are limited to 16 MiB (413 above it).

needs Ray Serve: pip install 'llada-export[serve]'"""


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {v}")
    return v


def origin(text: str) -> str:
    """A browser origin (scheme://host[:port]) or '*', for --allowed-origins."""
    from ..serve.cors import check_origins

    try:
        return check_origins([text])[0]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--allowed-origins: ")) from None


def build_parser():
    p = parser("llada-serve", DESCRIPTION, EPILOG)
    p.add_argument("--engines", required=True, type=directory, help="engines directory written by llada-export")
    p.add_argument("--model-name", help="the model id in the API (default: the engines directory's name)")
    p.add_argument("--replicas", type=positive_int, default=1, help="copies of the pipeline (default: 1)")
    p.add_argument("--max-batch", type=positive_int,
                   help="requests per batch, at most the engines' --batch-size or the largest of their --batch-sizes "
                   "(default: that size)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=10.0,
                   help="how long a request waits for others of its setting to fill a batch (default: 10)")
    p.add_argument("--max-queued", type=positive_int, default=64, metavar="N",
                   help="requests a replica holds waiting for their batch (being checked, or queued behind the one "
                        "running); one more is refused at once with 503 server_overloaded and a Retry-After "
                        "header, instead of waiting without bound (default: 64)")
    p.add_argument("--drain-timeout", type=non_negative_float, default=30.0, metavar="S",
                   help="on Ctrl-C / SIGTERM, seconds to go on answering the requests already taken while new ones "
                        "are refused with a 503, before stopping (0: stop at once; default: 30, a Kubernetes pod's "
                        "grace period: keep it below yours)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--address", help="attach to this Ray cluster (auto, or host:port) instead of starting one")
    p.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the cluster at --address to answer (default: 30)")
    p.add_argument("--temp-dir", help="the local cluster's folder, kept when it stops (at most 40 characters; "
                                      "default: a session folder under /tmp/ray, removed when it stops)")
    p.add_argument("--backend", help="backend to serve, one the engines were built with (default: the fastest "
                                     "one built that runs on the replica)")
    p.add_argument("--device", help="cpu, cuda (default: cuda where the cluster has GPUs)")
    p.add_argument("--threads", type=positive_int, help="CPU threads per replica for the engines (default: theirs)")
    p.add_argument("--cpus-per-replica", type=positive_float, default=1.0,
                   help="Ray CPUs reserved per replica (default: 1)")
    p.add_argument("--startup-timeout", type=positive_float, default=900.0,
                   help="seconds to wait for the replicas to load (default: 900)")
    p.add_argument("--metrics-port", type=port,
                   help="local cluster: the port of Ray's Prometheus metrics (default: one Ray picks; printed)")
    p.add_argument("--allowed-origins", nargs="+", type=origin, default=(), metavar="ORIGIN",
                   help="browser pages of these origins may call the API (CORS), e.g. http://localhost:3000; '*' "
                        "for any (no credentials either way); default: none, and browsers refuse cross-origin calls")
    p.add_argument("--verbose", action="store_true", help="Ray's and Serve's own logs on the console")
    return p


def _stop(signum, frame):
    raise KeyboardInterrupt()


def _drain(server, timeout_s: float) -> None:
    """The drain before the stop (``serve/drain.py``), said on stderr; a second Ctrl-C / SIGTERM ends it."""
    if timeout_s <= 0 or server.board is None:
        print("llada-serve: stopping", file=sys.stderr, flush=True)
        return
    print(f"llada-serve: draining: new requests get a 503; answering those in flight for up to {timeout_s:g} s "
          "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        drained, held = server.drain(timeout_s)
    except KeyboardInterrupt:
        print("llada-serve: stopping at once", file=sys.stderr, flush=True)
        return
    except Exception as e:  # noqa: BLE001 - the cluster failed under the drain: stop all the same
        print(f"llada-serve: the drain failed ({type(e).__name__}: {e}); stopping", file=sys.stderr, flush=True)
        return
    if drained:
        print(f"llada-serve: drained in {time.perf_counter() - t0:.1f} s; stopping", file=sys.stderr, flush=True)
    else:
        print(f"llada-serve: {held} request(s) still in flight after {timeout_s:g} s (--drain-timeout); stopping "
              "them", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("llada-serve"):
        from ..serve.app import ServeOptions
        from ..serve.server import start

        options = ServeOptions(engines=args.engines, model_name=args.model_name, max_batch=args.max_batch,
                               batch_wait_ms=args.batch_wait_ms, backend=args.backend, device=args.device,
                               threads=args.threads, allowed_origins=tuple(dict.fromkeys(args.allowed_origins)),
                               max_queued=args.max_queued)
        t0 = time.perf_counter()
        server = start(options, replicas=args.replicas, host=args.host, port=args.port, address=args.address,
                       temp_dir=args.temp_dir, cpus_per_replica=args.cpus_per_replica,
                       metrics_port=args.metrics_port, verbose=args.verbose,
                       startup_timeout_s=args.startup_timeout, connect_timeout_s=args.connect_timeout)
        for sig in TERMINATING:  # ray.init installed its own SIGTERM handler, which exits at once
            if signal.getsignal(sig) not in (None, signal.SIG_IGN):  # under nohup SIGHUP stays ignored
                signal.signal(sig, _stop)
        where = f"{server.replicas} replica(s)" + (", one GPU each" if server.gpus_per_replica else ", CPU")
        print(f"llada-serve: serving {options.name!r} at {server.url} ({where}, max batch {server.max_batch}, "
              f"batch wait {args.batch_wait_ms:g} ms, at most {args.max_queued} waiting per replica; "
              f"ready in {time.perf_counter() - t0:.0f} s). "
              "Ctrl-C stops it." + (f" Metrics: {server.metrics_url}" if server.metrics_url else ""), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through our handler
            _drain(server, args.drain_timeout)
        finally:
            server.stop()
        print("llada-serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
