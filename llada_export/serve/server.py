"""Start and stop ``llada-serve``: a Ray cluster (local, or an existing one), Serve's HTTP proxy, the app.

:func:`start` returns once every replica has loaded the engines and warmed them up (or raises
ServeError saying why not, in one line: port taken, a backend the engines lack, Ray not installed,
no cluster at ``--address`` within the connect timeout, not enough GPUs, a replica that failed to
load); :meth:`Server.drain` lets the requests in flight finish while new ones are refused (``serve/drain.py``);
:func:`stop` shuts down what :func:`start` started and nothing else: the whole local cluster, its session
folder included unless the caller named the temp dir, or only this application on an attached one.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .app import APP_NAME, DEPLOYMENT, ServeOptions, build_app
from .drain import NAMESPACE, drain, start_board


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
    remove_session: bool = False  # stop() removes the local cluster's session folder (no --temp-dir given)
    board: object = None  # the drain's Ray actor (serve/drain.py)

    def drain(self, timeout_s: float) -> tuple[bool, int]:
        """New chat requests refused (503 server_shutting_down), those taken answered: returns once none is
        left on any replica, or after ``timeout_s``: (drained, requests still in flight then)."""
        if self.board is None or timeout_s <= 0:
            return False, 0
        return drain(self.board, self.replicas, timeout_s)

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


def check_address(address: str, timeout_s: float) -> None:
    """A ``host:port`` with nothing listening is refused at once (Ray itself would retry it for ever)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # auto, ray://...: Ray resolves it (within the connect timeout)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 5)).close()
    except OSError as e:
        raise ServeError(f"no Ray cluster at --address {address} ({e.strerror or e}): start one there with "
                         "`ray start --head`, or leave out --address to start a local one") from None


def import_ray():
    """``ray`` and ``ray.serve``, or ServeError naming the extra that installs them."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ServeError(f"llada-serve needs Ray Serve, which is not installed ({e}): "
                         "pip install 'llada-export[serve]'") from None
    return ray, serve


def check_options(options: ServeOptions, manifest) -> None:
    """What a replica would refuse only after the cluster started, refused before (one line)."""
    b = manifest.bucket.batch_size
    if options.max_batch is not None and options.max_batch > b:
        raise ServeError(f"--max-batch {options.max_batch} exceeds the engines' batch size {b}: re-export with "
                         f"llada-export --batch-size {options.max_batch}, or lower --max-batch")
    if options.backend is not None and options.backend not in manifest.backends:
        raise ServeError(f"--backend {options.backend!r} was not built for {options.engines}; these engines have: "
                         f"{', '.join(manifest.backends)} (leave --backend out for the fastest that runs here)")


def start(options: ServeOptions, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, temp_dir: str | None = None, cpus_per_replica: float = 1,
          metrics_port: int | None = None, verbose: bool = False, startup_timeout_s: float = 900,
          connect_timeout_s: float = 30) -> Server:
    from ..contract.manifest import Manifest

    m = Manifest.read(options.engines, verify=False)  # each replica verifies the hashes when it loads
    check_options(options, m)
    if temp_dir is not None and len(os.path.abspath(temp_dir)) > 40:
        raise ServeError(f"--temp-dir {temp_dir} is too long for Ray's socket paths (at most 40 characters)")
    local = address is None
    if not local and (temp_dir is not None or metrics_port is not None):
        flags = " and ".join(f for f, v in (("--temp-dir", temp_dir), ("--metrics-port", metrics_port)) if v)
        raise ServeError(f"{flags}: for the local cluster llada-serve starts, not with --address (the attached "
                         "cluster was started with its own)")
    check_port(host, port)
    if not local:
        check_address(address, connect_timeout_s)
    ray_environment(local)
    ray, serve = import_ray()

    level = logging.INFO if verbose else logging.WARNING
    remove_session = local and temp_dir is None  # Ray's shared /tmp/ray: our session folder is ours to remove
    deploying = False  # on an attached cluster, an app named APP_NAME is ours to delete only once we deploy it
    try:  # Ctrl-C or a failure from here on: the local cluster (its session folder too) goes, however far it got
        if local:
            ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * cpus_per_replica + 0.999)),
                     include_dashboard=False, log_to_driver=verbose, logging_level=level, _temp_dir=temp_dir,
                     **({"_metrics_export_port": metrics_port} if metrics_port else {}))
        else:
            _connect(address, connect_timeout_s, verbose, level)
        logging.getLogger("ray.serve").setLevel(level)
        gpus = ray.cluster_resources().get("GPU", 0)
        want_gpu = options.device is not None and options.device.startswith("cuda")
        if want_gpu and gpus < replicas or (options.device is None and 0 < gpus < replicas):
            raise ServeError(f"{replicas} replicas need one GPU each; the cluster has {gpus:g}: lower --replicas "
                             "or run them on the CPU with --device cpu")
        per_gpu = 1 if gpus and (options.device is None or want_gpu) else 0
        board = _start_board()  # first: it fails where another llada-serve runs on an attached cluster
        _start_serve(serve, host, port, level)
        app = build_app(options, replicas, gpus_per_replica=per_gpu, cpus_per_replica=cpus_per_replica)
        deploying = True
        _run_with_timeout(app, startup_timeout_s, verbose)
    except BaseException:
        _shutdown(local, remove_session, delete_app=deploying)
        raise
    return Server(f"http://{host}:{port}", replicas, options.max_batch or m.bucket.batch_size, per_gpu, local,
                  _metrics_url(), remove_session, board)


def _start_serve(serve, host: str, port: int, level: int) -> None:
    """``serve.start``, its proxy's failure to start in one line (on a machine whose cores are all busy, Serve's
    HTTP proxy can miss its 60 s start: seen on this project's 2-core machine beside two busy processes, with
    and without the drain's board; Serve then raised its proxy actor's death with a Ray traceback)."""
    import ray

    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": logging.getLevelName(level)})
    except (ray.exceptions.RayActorError, TimeoutError) as e:
        raise ServeError(f"Ray Serve's HTTP proxy did not start ({type(e).__name__}): is the machine too busy? Try "
                         "again once it is less loaded") from e


def _start_board():
    """The drain's board, named before the replicas start (they look it up by name as they load; their calls
    wait for its process, which starts beside them: nothing here waits for it)."""
    try:
        return start_board(APP_NAME)
    except ValueError as e:  # the name is taken: the board of another llada-serve on this cluster
        raise ServeError(f"another llada-serve already serves on this Ray cluster (its drain board {APP_NAME!r} in "
                         f"namespace {NAMESPACE!r} exists): stop it first, or start this one without --address (a "
                         "local cluster of its own)") from e


def _connect(address: str, timeout_s: float, verbose: bool, level: int) -> None:
    """``ray.init(address=...)`` on a thread, waited for at most ``timeout_s`` (Ray retries an address that
    does not answer as a cluster for ever, deaf to Ctrl-C meanwhile; this thread's wait hears it)."""
    import ray

    if not verbose:  # ray.init off the main thread warns that it set no SIGTERM handler: ours is set later
        logging.getLogger("ray._private.worker").setLevel(logging.ERROR)
    err: list[BaseException] = []

    def init():
        try:
            ray.init(address=address, log_to_driver=verbose, logging_level=level)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=init, daemon=True, name="ray-connect")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ServeError(f"no Ray cluster answered at --address {address} within {timeout_s:g} s: check the "
                         "address (`ray status` on the head node prints it), or raise --connect-timeout")
    if err:
        raise ServeError(f"cannot attach to the Ray cluster at --address {address}: "
                         f"{_first_error(err[0])}") from err[0]


def _session_dir() -> str | None:
    """The session folder of the cluster this process started (Ray has no public call for it)."""
    import ray

    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return None


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
        raise ServeError(f"the replicas failed to start: {_replica_error(err[0])}") from err[0]


def _replica_error(e: BaseException) -> str:
    """The replica's own error line: from Serve's deploy-failure text, or from the deployment's status
    message when that text only says that the deployment failed."""
    line = _first_error(e)
    if "Error" in line or "Exception" in line:
        return line
    try:
        from ray import serve

        return _first_error(Exception(serve.status().applications[APP_NAME].deployments[DEPLOYMENT].message))
    except Exception:  # noqa: BLE001 - only for the message
        return line


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
    _shutdown(server.local, server.remove_session)


def _shutdown(local: bool, remove_session: bool = False, delete_app: bool = True) -> None:
    """``delete_app``: on an attached cluster, delete our application (False when the start failed before
    deploying it: an application of that name there is another llada-serve's)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    session_dir = _session_dir() if local and remove_session else None
    if not local and delete_app:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - already gone
            pass
    ray.shutdown()  # a local cluster goes with it, Serve included (serve.shutdown() would only add noise)
    if session_dir is not None:
        _remove_session(Path(session_dir))


def _remove_session(session: Path, wait_s: float = 10) -> None:
    """Remove the session folder a local cluster of ours wrote under Ray's shared temp dir (``/tmp/ray``:
    one per run, they pile up), and ``session_latest`` when it points at it. Ray's processes may still
    be writing their last lines for a moment after ``ray.shutdown()``."""
    deadline = time.monotonic() + wait_s
    while True:
        shutil.rmtree(session, ignore_errors=True)
        if not session.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    latest = session.parent / "session_latest"
    try:
        if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
            latest.unlink()
    except OSError:
        pass
