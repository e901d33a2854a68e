"""`lorax-lite serve --num-replicas N` / `--ray-address ADDR`: start (or join) Ray, deploy the replicas behind
Ray Serve's HTTP proxy on --host/--port, and stay in the foreground until SIGTERM/SIGINT, which deletes the
application (each replica drains: Ray stops routing to it and waits for its requests).

Started here (no --ray-address), Ray runs on this machine only, with the proxy's routing middleware installed
(cluster/routing.py). Joining a cluster (`--ray-address auto` on a node where `ray start` ran), the nodes must
have been started with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH set; this command checks that and warns.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from lorax_lite.cluster.routing import PROXY_CALLBACK, PROXY_CALLBACK_ENV, ROUTED_HEADER

if TYPE_CHECKING:
    from lorax_lite.server.build import ServerSpec

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # Ray's shared memory on a local start: only small messages use it
STATUS_INTERVAL_S = 2.0
MAX_CONSTRUCTOR_RETRIES = 3
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .+")


class ClusterError(Exception):
    """Ray could not be started or joined, or the deployment failed; the message is one line for the user."""


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas and what each gets from Ray."""

    num_replicas: int = 1
    cpus: float = 1.0  # Ray CPUs per replica (also torch's thread count on CPU)
    gpus: float = 0.0  # Ray GPUs per replica (a fraction lets replicas share one)
    max_ongoing_requests: int = 64  # in flight on one replica before Ray routes elsewhere (default: max_num_seqs)
    max_models_per_replica: int = 64  # adapter ids a replica reports to the router (default: max_cpu_loras)


@dataclass(frozen=True)
class ClusterOptions:
    host: str
    port: int
    ray_address: str | None  # None (or "local"): start Ray on this machine
    shutdown_timeout: float


def run_cluster(spec: ServerSpec, replicas: ReplicaOptions, cluster: ClusterOptions,
                say: Callable[[str], None] = print) -> int:
    """Deploy and serve until a signal; returns the exit status (0 after a clean teardown)."""
    import ray
    from ray import serve

    from lorax_lite.cluster.deployment import APP_NAME, application

    say = _flushing(say)
    started_here = starts_ray_here(cluster.ray_address)
    if started_here:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # inherited by Ray's processes started below
    try:
        if started_here:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, configure_logging=False)
        else:
            ray.init(address=cluster.ray_address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot {'start' if started_here else 'join'} Ray: {error}") from error
    stop = _stop_event()
    try:
        serve.start(http_options={"host": cluster.host, "port": cluster.port})
        app = application(spec, replicas, cluster.shutdown_timeout)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as error:
            raise ClusterError(f"the deployment failed: {deployment_error(serve) or error}") from error
        base = f"http://{_probe_host(cluster.host)}:{cluster.port}"
        if not proxy_routes_by_adapter(base):
            logger.warning("Ray's HTTP proxy has no lorax-lite routing middleware, so requests are not routed by "
                           "adapter: start every Ray node with %s=%s", PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        say(f"{replicas.num_replicas} replicas running on Ray ({'local' if started_here else 'joined'}); "
                 f"Ray Serve's proxy listens on {cluster.host}:{cluster.port}")
        while not stop.wait(STATUS_INTERVAL_S):
            pass
        say("stopping: the replicas drain (Ray stops routing to them and waits for their requests)")
        serve.delete(APP_NAME)
        return 0
    finally:
        if started_here:
            serve.shutdown()
        ray.shutdown()


def starts_ray_here(ray_address: str | None) -> bool:
    """Whether `serve` starts Ray on this machine: no address, or Ray's "local" (a new cluster here)."""
    return ray_address in (None, "local")


def deployment_error(serve: Any) -> str | None:
    """The last exception line of the replicas' failure in Ray Serve's status (e.g. "FileNotFoundError: ...")."""
    from lorax_lite.cluster.deployment import APP_NAME, DEPLOYMENT_NAME

    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except (KeyError, AttributeError, RuntimeError):
        return None
    errors = [line.strip() for line in message.splitlines() if EXCEPTION_LINE.match(line.strip())]
    return errors[-1] if errors else None


def proxy_routes_by_adapter(base_url: str, timeout_s: float = 30.0) -> bool:
    """Whether the proxy at `base_url` runs the routing middleware (it marks every response)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:  # noqa: S310 (our own URL)
                return response.headers.get(ROUTED_HEADER.decode()) is not None
        except urllib.error.HTTPError as error:
            return error.headers.get(ROUTED_HEADER.decode()) is not None
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def _flushing(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, then flush stdout: a supervisor (or a test) reading the log sees each line when it happens."""

    def said(text: str) -> None:
        say(text)
        sys.stdout.flush()

    return said


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _stop_event() -> threading.Event:
    """Set by SIGTERM or SIGINT."""
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop
