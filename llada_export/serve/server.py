"""Start and stop ``llada-serve``: a Ray cluster (local, or an existing one), Serve's HTTP proxy, the app.

:func:`start` returns once every replica has loaded the engines and warmed them up (or raises
ServeError saying why not: port taken, not enough GPUs, a replica that failed to load);
:func:`stop` shuts down what :func:`start` started and nothing else: the whole local cluster,
or only this application on an attached one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

from .app import APP_NAME, DEPLOYMENT, ServeOptions, build_app


class ServeError(ValueError):
    """The server could not start; the message says why and what to change."""


@dataclass
class Server:
    url: str
    replicas: int
    max_batch: int
    gpus_per_replica: float
    local: bool  # True: this process started the Ray cluster (stop() shuts it down)
    metrics_url: str | None = None  # Prometheus text of this node (Ray Serve's metrics among it)

    def stop(self) -> None:
        stop(self)


def ray_environment(local: bool) -> None:
    """Environment for Ray, set before it is imported: no usage-stats upload; a local cluster on
    loopback only and without token authentication (nothing outside this machine can reach it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray server on 127.0.0.1
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will (TIME_WAIT is no conflict)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from e


def start(options: ServeOptions, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, temp_dir: str | None = None, cpus_per_replica: float = 1,
          metrics_port: int | None = None, verbose: bool = False, startup_timeout_s: float = 900) -> Server:
    from ..contract.manifest import Manifest

    m = Manifest.read(options.engines, verify=False)  # each replica verifies the hashes when it loads
    b = m.bucket.batch_size
    if options.max_batch is not None and options.max_batch > b:
        raise ServeError(f"--max-batch {options.max_batch} exceeds the engines' batch size {b}: re-export with "
                         f"llada-export --batch-size {options.max_batch}, or lower --max-batch")
    if temp_dir is not None and len(os.path.abspath(temp_dir)) > 40:
        raise ServeError(f"--temp-dir {temp_dir} is too long for Ray's socket paths (at most 40 characters)")
    local = address is None
    check_port(host, port)
    ray_environment(local)
    import ray
    from ray import serve

    level = logging.INFO if verbose else logging.WARNING
    if local:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * cpus_per_replica + 0.999)),
                 include_dashboard=False, log_to_driver=verbose, logging_level=level, _temp_dir=temp_dir,
                 **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    else:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    logging.getLogger("ray.serve").setLevel(level)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        want_gpu = options.device is not None and options.device.startswith("cuda")
        if want_gpu and gpus < replicas or (options.device is None and 0 < gpus < replicas):
            raise ServeError(f"{replicas} replicas need one GPU each; the cluster has {gpus:g}: lower --replicas "
                             "or run them on the CPU with --device cpu")
        per_gpu = 1 if gpus and (options.device is None or want_gpu) else 0
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": logging.getLevelName(level)})
        app = build_app(options, replicas, gpus_per_replica=per_gpu, cpus_per_replica=cpus_per_replica)
        _run_with_timeout(app, startup_timeout_s, verbose)
    except BaseException:
        _shutdown(local)
        raise
    return Server(f"http://{host}:{port}", replicas, options.max_batch or b, per_gpu, local, _metrics_url())


def _metrics_url() -> str | None:
    """Where this node's metrics agent serves Prometheus text (Ray has no public call for the port)."""
    import ray

    try:
        node = ray._private.worker._global_node
        return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    except AttributeError:
        return None


def _run_with_timeout(app, timeout_s: float, verbose: bool) -> None:
    from ray import serve

    err: list[BaseException] = []

    def deploy():
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False,
                      logging_config={"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose})
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=deploy, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ServeError(f"the replicas did not start within {timeout_s:.0f} s: {_status()}")
    if err:
        raise ServeError(f"the replicas failed to start: {_first_error(err[0])}") from err[0]


def _status() -> str:
    from ray import serve

    try:
        d = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
        return f"{d.status} {dict(d.replica_states)} {d.message}".strip()
    except Exception as e:  # noqa: BLE001 - only for the message
        return f"(status unavailable: {e})"


def _first_error(e: BaseException) -> str:
    """The replica's own error line out of Serve's deploy-failure text (which holds its traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return errs[-1] if errs else (lines[-1] if lines else type(e).__name__)


def stop(server: Server) -> None:
    _shutdown(server.local)


def _shutdown(local: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if not local:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - already gone
            pass
    ray.shutdown()  # a local cluster goes with it, Serve included (serve.shutdown() would only add noise)
