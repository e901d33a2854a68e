"""Benchmark adapter-affinity routing over replicas on Ray Serve; writes its section of docs/benchmarks.md.

The open-loop many-adapter workload of bench_workload.py (its OpenLoopWorkload, RequestDraws and summarize), sent
over HTTP to `lorax-lite serve` in four set-ups, each a fresh subprocess on a fresh Redis registry prefix:

- single: one process, no Ray (`serve` alone);
- ray1: one replica on Ray with both CPUs (`--ray-address local --num-replicas 1 --replica-cpus 2`: Ray started
  by the command, the proxy's routing middleware installed through the environment): Ray's proxy overhead;
- affinity: two replicas (`--num-replicas 2`, one CPU each), routed by adapter (the proxy's middleware reads
  `parameters.adapter_id` from the body and sets Ray's multiplexed model id);
- default: the same two replicas with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="" in the command's environment, so
  the proxy has no middleware and Ray routes every request by its power-of-two-choices (checked: no response
  carries `x-lorax-routed-adapter`, where with the middleware every one names its adapter).

Every engine gets 4 device slots and a host cache of 8 adapters (`--max-loras 4 --max-cpu-loras 8`, so each replica
reports up to 8 adapter ids to Ray's router) for 16 random rank-8 adapters: with affinity each replica serves about
8 of them, which fit its host cache; routed at random each replica sees all 16 and reads adapters from disk again
and again. Requests stream from `/generate_stream` (the prompt's token ids decoded to text; TTFT = first event -
arrival, latency = last event - arrival). The adapter cache counters (`lorax_adapter_misses_total`: disk loads,
`lorax_adapter_host_hits_total`: host -> slot copies) are read from every replica's /metrics before and after each
point (GET /metrics until every replica id has answered) and summed over the replicas. A server is warmed up with
base-model requests only: it starts with no adapter in memory, so the first loads of each adapter are part of the
first point measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import torch
from bench_engine import _loadavg, environment, timed, write
from bench_lora import make_adapters
from bench_report import REPO_ROOT, command_line, parse_bench_args, repo_path, run_table, section_name, write_section
from bench_server import _tail, free_port
from bench_workload import OpenLoopWorkload, RequestDraws, RequestResult, TraceRequest, prompt_text_ids, summarize
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_lite.cluster.routing import PROXY_CALLBACK, PROXY_CALLBACK_ENV, ROUTED_HEADER
from lorax_lite.registry import admin
from lorax_lite.registry.factory import open_registry
from lorax_lite.registry.store import AdapterStore

JSON_NAME = "benchmarks_cluster"
REPLICA_HEADER = "x-replica-id"
ROUTED = ROUTED_HEADER.decode()
SINGLE = "single"  # the replica id of a server without replicas
COUNTERS = {"disk_loads": "misses", "slot_loads": "host_hits", "slot_hits": "slot_hits",
            "slot_evictions": "evictions", "host_evictions": "host_evictions"}  # -> lorax_adapter_<name>_total
REQUEST_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Setup:
    """One way of serving: `serve`'s extra arguments and whether the proxy routes by adapter."""

    key: str
    label: str
    num_replicas: int
    serve_args: tuple[str, ...]
    on_ray: bool
    affinity: bool
    threads: int  # torch threads of each replica (the process's default, or --replica-cpus)

    def env(self) -> dict[str, str]:
        env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0",
                            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        if self.on_ray:  # launch.py's setdefault keeps an empty value: no middleware in the proxy
            env[PROXY_CALLBACK_ENV] = PROXY_CALLBACK if self.affinity else ""
        return env


CORES = os.cpu_count() or 1
SETUPS = (
    Setup("single", "1 process, no Ray", 1, (), on_ray=False, affinity=False, threads=CORES),
    Setup("ray1", f"1 replica on Ray ({CORES} CPUs)", 1, ("--ray-address", "local", "--num-replicas", "1",
          "--replica-cpus", str(CORES)), on_ray=True, affinity=True, threads=CORES),
    Setup("affinity", "2 replicas, adapter affinity", 2, ("--num-replicas", "2"), on_ray=True, affinity=True,
          threads=max(1, CORES // 2)),
    Setup("default", "2 replicas, Ray's default routing", 2, ("--num-replicas", "2"), on_ray=True, affinity=False,
          threads=max(1, CORES // 2)),
)


def cluster_workload() -> OpenLoopWorkload:
    """16 adapters over 2 x 8 host-cache places; rates from light load to about saturation on 2 CPU cores."""
    return OpenLoopWorkload(num_adapters=(16,), skewed_alphas=(0.3,), rates=(0.5, 1.0, 2.0), duration=12.0,
                            slo_ttft=2.0, max_loras=4, max_cpu_loras=8, max_batch=64)


def quick_workload() -> OpenLoopWorkload:
    return OpenLoopWorkload(num_adapters=(4,), skewed_alphas=(), rates=(2.0,), duration=2.0, output_tokens=(4, 8),
                            max_loras=2, max_cpu_loras=2, max_batch=64)


# ---------------------------------------------------------------- Redis, adapters, servers


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A `redis-server` on a free loopback port, no persistence; yields its URL; always stops it."""
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server is not installed (`make install` installs it)")
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    try:
        import redis

        client, deadline = redis.Redis(port=port, socket_timeout=1), time.monotonic() + 10
        while not _pings(client):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"redis-server did not start:\n{_tail(workdir / 'redis.log')}")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def register_adapters(registry_url: str, store: AdapterStore, paths: list[Path], model_dir: str) -> None:
    registry = open_registry(registry_url)
    try:
        for path in paths:
            admin.register(registry, store, path.name, path, model_dir)
    finally:
        registry.close()


def engine_args(w: OpenLoopWorkload) -> tuple[str, ...]:
    return ("--dtype", "float32", "--device", "cpu", "--max-loras", str(w.max_loras), "--max-cpu-loras",
            str(w.max_cpu_loras), "--max-lora-rank", str(w.rank))


@contextmanager
def serve(setup: Setup, model_dir: str, registry_url: str, store: Path, w: OpenLoopWorkload,
          log_path: Path) -> Iterator[str]:
    """`lorax-lite serve` for `setup` on a free port; yields its URL once every replica answers; always stops it
    (SIGTERM: the replicas drain and Ray stops, in the command's own process group)."""
    port = free_port()
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", model_dir, "--registry", registry_url,
           "--store", str(store), "--port", str(port), *engine_args(w), *setup.serve_args]
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=setup.env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_replicas(proc, base, setup.num_replicas, log_path)
        yield base
    finally:
        _stop(proc, log_path)


def _wait_replicas(proc: subprocess.Popen, base: str, num_replicas: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            sys.exit(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
        try:
            if len(replica_metrics(base, num_replicas, tries=20)) == num_replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, log_path: Path) -> None:
    if proc.poll() is not None and proc.returncode != 0:
        print(f"server exited with {proc.returncode}:\n{_tail(log_path)}", file=sys.stderr)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this script started: serve and what it spawned
        proc.wait()


# ---------------------------------------------------------------- metrics of every replica


def replica_metrics(base: str, num_replicas: int, tries: int = 200) -> dict[str, dict[str, float]]:
    """Each replica's adapter cache counters: GET /metrics (balanced at random over the replicas, having no
    adapter) until `num_replicas` distinct replica ids answered, or `tries` ran out."""
    seen: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(tries):
            response = client.get("/metrics")
            if response.status_code == 200:
                seen[response.headers.get(REPLICA_HEADER, SINGLE)] = parse_counters(response.text)
            if len(seen) == num_replicas:
                break
    return seen


def parse_counters(text: str) -> dict[str, float]:
    counters = {}
    for key, name in COUNTERS.items():
        match = re.search(rf"^lorax_adapter_{name}_total (\S+)$", text, re.M)
        if match is None:
            raise RuntimeError(f"/metrics has no lorax_adapter_{name}_total")
        counters[key] = float(match[1])
    return counters


def counters_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Counter increases summed over the replicas, and per replica."""
    per = {rid: {k: int(v - before.get(rid, {}).get(k, 0)) for k, v in c.items()} for rid, c in after.items()}
    return {k: sum(p[k] for p in per.values()) for k in COUNTERS} | {"per_replica_counters": per}


# ---------------------------------------------------------------- the trace over HTTP


@dataclass(frozen=True)
class Answer:
    result: RequestResult
    replica_id: str
    routed: str | None  # x-lorax-routed-adapter (None: not there)


async def _stream(client: httpx.AsyncClient, req: TraceRequest, text: str, start: float) -> Answer:
    await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
    body = {"inputs": text, "parameters": {"adapter_id": req.adapter_id, "max_new_tokens": req.max_tokens,
                                           "ignore_eos_token": True}}
    first, last = None, None
    async with client.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{req.adapter_id}: HTTP {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            first = first or time.perf_counter()
            last = json.loads(line[5:])
    end = time.perf_counter()
    details = (last or {}).get("details") or {}
    if details.get("finish_reason") != "length":
        raise RuntimeError(f"{req.adapter_id}: the stream ended without finishing: {last}")
    arrived = start + req.arrival
    result = RequestResult(req.arrival, first - arrived, end - arrived, details["generated_tokens"], req.max_tokens,
                           req.adapter_id)
    return Answer(result, response.headers.get(REPLICA_HEADER, SINGLE), response.headers.get(ROUTED))


async def _send_trace(base: str, trace: list[tuple[TraceRequest, str]]) -> list[Answer]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        return list(await asyncio.gather(*(_stream(client, r, text, start) for r, text in trace)))


def check_routing(setup: Setup, answers: list[Answer]) -> None:
    """With the middleware every response names its adapter; without it none carries the header."""
    for a in answers:
        expected = a.result.adapter_id if setup.affinity else None
        if setup.on_ray and a.routed != expected:
            raise RuntimeError(f"{setup.key}: {ROUTED} is {a.routed!r} for {a.result.adapter_id}, "
                               f"expected {expected!r}")


def run_point(setup: Setup, base: str, trace: list[tuple[TraceRequest, str]], w: OpenLoopWorkload) -> dict[str, Any]:
    """One trace (each request with its prompt's text); the figures, the loads and the split over replicas."""
    before = replica_metrics(base, setup.num_replicas)
    answers = asyncio.run(_send_trace(base, trace))
    after = replica_metrics(base, setup.num_replicas)
    if len(before) != setup.num_replicas or len(after) != setup.num_replicas:
        raise RuntimeError(f"{setup.key}: /metrics reached {len(before)} then {len(after)} replicas, "
                           f"not {setup.num_replicas}")
    check_routing(setup, answers)
    split = Counter(a.replica_id for a in answers)
    adapters = {rid: sorted({a.result.adapter_id for a in answers if a.replica_id == rid}) for rid in split}
    point = summarize([a.result for a in answers], w.slo_ttft) | counters_delta(before, after)
    point["requests"] = [[*row, a.replica_id] for row, a in zip(point["requests"], answers, strict=True)]
    return point | {"replica_requests": dict(split), "replica_adapters": adapters}


def warm_up(base: str, num_replicas: int, text: str) -> None:
    """Base-model requests only (no adapter is loaded), in rounds until every replica has served some."""
    seen: set[str] = set()
    for _ in range(10):
        answers = asyncio.run(_send_base(base, 4, text))
        seen |= set(answers)
        if len(seen) >= num_replicas:
            return
    raise RuntimeError(f"warm-up reached {len(seen)} of {num_replicas} replicas")


async def _send_base(base: str, count: int, text: str) -> list[str]:
    body = {"inputs": text, "parameters": {"max_new_tokens": 4, "ignore_eos_token": True}}
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(count)))
    for r in responses:
        r.raise_for_status()
    return [r.headers.get(REPLICA_HEADER, SINGLE) for r in responses]


# ---------------------------------------------------------------- the sweep


def run_setup(setup: Setup, model_dir: str, redis_url: str, store: AdapterStore, paths: list[Path],
              w: OpenLoopWorkload, traces: dict[tuple[int, float, float], list[tuple[TraceRequest, str]]],
              warm_text: str, workdir: Path) -> dict[str, Any]:
    """A fresh registry prefix and a fresh server for `setup`; every series' rates in order on that server."""
    registry_url = f"{redis_url}?prefix=bench-{setup.key}-{uuid.uuid4().hex[:8]}"
    register_adapters(registry_url, store, paths, model_dir)
    start = time.perf_counter()
    print(f"{setup.key}: starting `serve {' '.join(setup.serve_args)}`", flush=True)
    with serve(setup, model_dir, registry_url, store.root, w, workdir / f"serve-{setup.key}.log") as base:
        ready_s = time.perf_counter() - start
        warm_up(base, setup.num_replicas, warm_text)
        points = []
        for (n, alpha, rate), trace in traces.items():
            points.append({"setup": setup.key, "num_adapters": n, "alpha": alpha, "rate": rate, "cold": not points,
                           **run_point(setup, base, trace, w)})
            _print_point(points[-1])
    return {"ready_s": ready_s, "seconds": time.perf_counter() - start, "points": points}


def _print_point(p: dict[str, Any]) -> None:
    print(f"  n={p['num_adapters']} alpha={p['alpha']:g} R={p['rate']:g}: {p['num_requests']} requests, "
          f"TTFT p50 {p['ttft_p50']:.2f}s p99 {p['ttft_p99']:.2f}s, disk loads {p['disk_loads']}, "
          f"slot copies {p['slot_loads']}, split {_split(p)}, adapters per replica {_adapters_per_replica(p)}",
          flush=True)


def make_traces(w: OpenLoopWorkload, model_dir: str) -> tuple[dict, str]:
    """Every point's requests with their prompts as text (the token ids decoded), and the warm-up's prompt."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    draws, text_ids = RequestDraws.draw(w), prompt_text_ids(tok, w.input_tokens[1])
    traces = {(n, alpha, rate): [(r, tok.decode(r.prompt_token_ids)) for r in draws.trace(w, rate, n, alpha, text_ids)]
              for n, alpha in w.series() for rate in w.rates}
    return traces, tok.decode(text_ids[:16])


def run_all(model_dir: str, w: OpenLoopWorkload, setups: Sequence[Setup], workdir: Path) -> dict[str, Any]:
    top = max(w.num_adapters)
    print(f"making {top} random rank-{w.rank} adapters", flush=True)
    make_s, paths = timed(lambda: make_adapters(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                                top, w.rank, w.lora_alpha, workdir / "adapters"))
    traces, warm_text = make_traces(w, model_dir)
    store = AdapterStore(workdir / "store")
    runs = {}
    with redis_server(workdir) as redis_url:
        for setup in setups:
            runs[setup.key] = run_setup(setup, model_dir, redis_url, store, paths, w, traces, warm_text, workdir)
    size_mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 2**20
    return {"make_adapters_s": make_s, "adapter_size_mb": size_mb, "serve_args": list(engine_args(w)),
            "setups": [asdict(s) for s in setups], "runs": runs,
            "points": [p for run in runs.values() for p in run["points"]]}


# ---------------------------------------------------------------- report


def _split(p: dict[str, Any]) -> str:
    return " / ".join(str(p["replica_requests"][rid]) for rid in sorted(p["replica_requests"]))


def _adapters_per_replica(p: dict[str, Any]) -> str:
    return " / ".join(str(len(p["replica_adapters"][rid])) for rid in sorted(p["replica_adapters"]))


def per_request(points: list[dict[str, Any]], key: str) -> float:
    requests = sum(p["num_requests"] for p in points)
    return sum(p[key] for p in points) / requests if requests else 0.0


def setup_points(res: dict[str, Any], key: str, alpha: float | None = None) -> list[dict[str, Any]]:
    """A set-up's points in run order (of one series when `alpha` is given)."""
    return [p for p in res["points"] if p["setup"] == key and alpha in (None, p["alpha"])]


def add_first_loads(res: dict[str, Any]) -> None:
    """Each point's `first_loads`: the adapters it used that no earlier point of its set-up used. Each needs one disk
    load somewhere however requests are routed; the other disk loads are re-loads."""
    seen: dict[str, set[str]] = {}
    for p in res["points"]:
        used, before = {r[4] for r in p["requests"]}, seen.setdefault(p["setup"], set())
        p["first_loads"] = len(used - before)
        before |= used


def reloads(points: list[dict[str, Any]]) -> int:
    return sum(p["disk_loads"] - p["first_loads"] for p in points)


def busiest_share(points: list[dict[str, Any]]) -> float:
    """The share of the requests served by the replica that served the most, over `points`."""
    served = Counter()
    for p in points:
        served.update(p["replica_requests"])
    return max(served.values()) / sum(served.values()) if served else 0.0


def render(res: dict[str, Any]) -> str:
    tables = [_series_md(res, n, alpha) for n, alpha in res["series"]]
    return "\n".join([_header(res), _workload_md(res), _summary_md(res), *tables, _reading_md(res)])


def _header(res: dict[str, Any]) -> str:
    env = res["env"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    starts = ", ".join(f"{k} {r['ready_s']:.0f} s" for k, r in res["runs"].items())
    return f"""## Replicas on Ray Serve: adapter-affinity routing vs Ray's default routing
{quick}
Generated by `scripts/bench_cluster.py`.

{run_table(env, software_note=f", ray {res['ray_version']}")}| Command | {env['command']} |
| Run | one run per point; whole run {res['total_seconds']:.0f} s; each server answering on every replica after: \
{starts} |

Raw numbers, with every request's arrival, TTFT, latency and replica: `{res['json_path']}`.
"""


def _workload_md(res: dict[str, Any]) -> str:
    w = res["workload"]
    n, slots, host = max(w["num_adapters"]), w["max_loras"], w["max_cpu_loras"]
    setups = "\n".join(f"  - **{s['key']}** ({s['label']}): `serve {' '.join(s['serve_args']) or '(no extra options)'}`"
                       + (f", {PROXY_CALLBACK_ENV}=\"\"" if s["on_ray"] and not s["affinity"] else "")
                       + f"; {s['threads']} torch thread(s) per replica" for s in res["setups"])
    alphas = "".join(f"; α = {a:g} ({0.1 ** a:.0%} of the requests to the first 10% of the adapters)"
                     for a in w["skewed_alphas"])
    return f"""
Workload (seed {w['seed']}), the open-loop workload of `scripts/bench_workload.py` sent over HTTP:

- **Adapters**: n = {n} random rank-{w['rank']} PEFT adapters ({res['adapter_size_mb']:.1f} MB each), registered in a
  real `redis-server` under a fresh prefix for each set-up (the store is shared). Popularity: α = 1 (uniform){alphas}.
- **Arrivals**: Poisson at R = {', '.join(f'{r:g}' for r in w['rates'])} req/s during {w['duration']:g} s per point
  (exactly R × {w['duration']:g} requests); {w['input_tokens'][0]}–{w['input_tokens'][1]} prompt tokens (decoded to \
text), {w['output_tokens'][0]}–{w['output_tokens'][1]} greedy output tokens, `ignore_eos`. Each request streams from
  `/generate_stream` through the server's port (Ray Serve's HTTP proxy on Ray), its adapter in the body's
  `parameters.adapter_id`: TTFT = first event − arrival, latency = last event − arrival.
- **Every engine**: `{' '.join(res['serve_args'])}`, the server's other defaults (max 64 sequences and 512 tokens
  a step; `--max-ongoing-requests` 64, `--max-models-per-replica` {host}, the host cache): {slots} device slots
  and a host cache of {host} adapters, so one engine serving all {n} adapters reads them from disk again and again,
  while {n // host} replicas that split them by affinity hold {host} each.
- **Set-ups**, each a fresh `lorax-lite serve` subprocess:
{setups}
- **Loads**: `lorax_adapter_misses_total` (disk loads) and `lorax_adapter_host_hits_total` (host → slot copies)
  from each replica's /metrics before and after each point, summed over the replicas. A server is warmed up with
  base-model requests only, so each set-up starts with no adapter in memory: its first point includes every
  adapter's first load (at least {n} disk loads in all, one per adapter, however requests are routed). The points
  run in the order of the tables, on the same server.
- **Split**: requests served by each replica (`x-replica-id`), and the distinct adapters each replica served.
"""


def _summary_md(res: dict[str, Any]) -> str:
    rows = []
    for _, alpha in res["series"]:
        for s in res["setups"]:
            points = setup_points(res, s["key"], alpha)
            requests, again = sum(p["num_requests"] for p in points), reloads(points)
            share = f"{busiest_share(points):.0%}" if s["num_replicas"] > 1 else "–"
            rows.append(f"| {alpha:g} | {s['label']} | {requests} | {sum(p['disk_loads'] for p in points)} | "
                        f"{per_request(points, 'disk_loads'):.2f} | {again} | {again / requests:.2f} | "
                        f"{per_request(points, 'slot_loads'):.2f} | {share} |")
    return f"""
Adapter loads, summed over the replicas and over every rate of a series. A re-load is a disk load beyond each
adapter's first in the set-up's run (the first is needed however requests are routed; the series run one after
the other on the same server, so α = 0.3 starts with the adapters of α = 1 in memory):

| α | set-up | requests | disk loads | disk loads / request | re-loads from disk | re-loads / request | \
host → slot copies / request | busiest replica's share of requests |
|---:|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


def _series_md(res: dict[str, Any], n: int, alpha: float) -> str:
    labels = {s["key"]: s["label"] for s in res["setups"]}
    rows = [_point_row(p, labels[p["setup"]]) for rate in res["workload"]["rates"] for p in res["points"]
            if (p["num_adapters"], p["alpha"], p["rate"]) == (n, alpha, rate)]
    title = f"n = {n}" + (" (uniform)" if alpha == 1 else f", α = {alpha:g}")
    return f"""
### {title}

| R (req/s) | set-up | requests done | req/s | tok/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) | \
latency p99 (s) | disk loads | host → slot copies | disk loads / request | requests per replica | adapters per replica |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


def _point_row(p: dict[str, Any], label: str) -> str:
    cells = [f"{p['rate']:g}", label, f"{p['completed']}/{p['num_requests']}", f"{p['req_s']:.2f}", f"{p['tok_s']:.1f}",
             f"{p['ttft_p50']:.2f}", f"{p['ttft_p99']:.2f}", f"{p['latency_p50']:.2f}", f"{p['latency_p99']:.2f}",
             str(p["disk_loads"]), str(p["slot_loads"]), f"{p['disk_loads'] / p['num_requests']:.2f}", _split(p),
             _adapters_per_replica(p)]
    return "| " + " | ".join(cells) + " |"


def _reading_md(res: dict[str, Any]) -> str:
    w, env = res["workload"], res["env"]
    return "\n".join(["", "### Reading", "", _routing_md(res), _balance_md(res), _throughput_md(res), f"""\
- **Noise.** The load average went from {env['loadavg_start']} to {env['loadavg_end']}, with the client, Redis, the
  proxy and the replicas on the same {env['cores']} cores{_busy_note(env)}; past saturation TTFT grows with the
  {w['duration']:g} s arrival window. One run per point, so single points are noisy; the load counts are the
  steadier figures.
"""])


def _routing_md(res: dict[str, Any]) -> str:
    w = res["workload"]
    runs = {s["key"]: setup_points(res, s["key"]) for s in res["setups"]}
    totals = {k: (sum(p["disk_loads"] for p in points), reloads(points), sum(p["first_loads"] for p in points))
              for k, points in runs.items()}
    figures = "; ".join(f"{k} {d} disk loads, {r} of them re-loads, for {f} adapters used" for k, (d, r, f)
                        in totals.items())
    verdict = ""
    if "affinity" in totals and "default" in totals:
        verdict = (" Affinity cut the re-loads from disk." if totals["affinity"][1] < totals["default"][1] else
                   " **Affinity routing did not reduce the re-loads from disk here** (see the per-point tables).")
    return f"""\
- **Routing.** The whole run of each set-up: {figures}.{verdict} With affinity the proxy reads the body's
  `parameters.adapter_id` and Ray sends an adapter's requests to the replica that reported it, so the
  {max(w['num_adapters'])} adapters split over the two replicas (the "adapters per replica" of a point add up to the
  adapters it used) and each host cache of {w['max_cpu_loras']} holds its share; with Ray's default routing both
  replicas serve the same adapters and their host caches thrash like the single engine's. Host → slot copies remain
  in every set-up: a replica has {w['max_loras']} device slots for the adapters it serves."""


def _balance_md(res: dict[str, Any]) -> str:
    top, skewed = max(res["workload"]["rates"]), [a for _, a in res["series"] if a != 1]
    at = {(p["setup"], p["alpha"]): p for p in res["points"] if p["rate"] == top}
    lines = [f"α = {a:g} at {top:g} req/s: the busiest replica served {busiest_share([at[(k, a)]]):.0%} of the "
             f"requests with affinity ({_split(at[(k, a)])}), TTFT p50 {at[(k, a)]['ttft_p50']:.2f} s vs "
             f"{at[('default', a)]['ttft_p50']:.2f} s with default routing ({_split(at[('default', a)])})"
             for a in skewed for k in ("affinity",) if (k, a) in at and ("default", a) in at]
    figures = (": " + "; ".join(lines)) if lines else ""
    return f"""\
- **Balance.** Affinity pins an adapter to a replica; Ray sends its requests elsewhere only when that replica
  holds 64 requests (`--max-ongoing-requests`) or no replica reported the adapter yet. Under skew the replica
  holding the popular adapters gets most of the requests and queues while the other idles{figures}. That is the
  price of affinity on a skewed load: `--max-ongoing-requests` lower than `--max-num-seqs` makes Ray spill sooner
  (and load the adapter on the other replica too)."""


def _throughput_md(res: dict[str, Any]) -> str:
    env, w = res["env"], res["workload"]
    top = max(w["rates"])
    at = {(p["setup"], p["alpha"]): p for p in res["points"] if p["rate"] == top}
    lines = "; ".join(f"α = {a:g}: " + ", ".join(f"{k} {at[(k, a)]['req_s']:.2f}" for k in
                                                 [s["key"] for s in res["setups"]] if (k, a) in at)
                      for _, a in res["series"])
    return f"""\
- **Throughput.** This machine has {env['cores']} cores: the single process and the one Ray replica use both
  ({env['cores']} torch threads); two replicas get one CPU and one torch thread each, on the same cores, so two
  replicas bring no compute here (the point of this run is the routing, not scale-out). Completed requests/s at
  {top:g} req/s offered: {lines}. Where two replicas did better, one reason is that a batch holds at most
  {w['max_loras']} distinct adapters (`--max-loras`) per engine, so two engines run twice as many adapters at once
  when requests spread over many adapters (uniform) and about as many as one when few adapters take most of them
  (α = 0.3); another is that one 1-thread
  process per core suffers less from other load on the machine than one process with 2 threads."""


def _busy_note(env: dict[str, Any]) -> str:
    loads = [float(v.split()[0]) for v in (env["loadavg_start"], env["loadavg_end"]) if v != "unknown"]
    if loads and max(loads) > 3:
        return (f"; **other jobs ran on the machine during this run** (1-minute load average up to {max(loads):g}"
                f" on {env['cores']} cores), which disturbs the times")
    return ""


# ---------------------------------------------------------------- main


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", type=float, nargs="+", help="arrival rates in req/s (default 0.5 1 2)")
    p.add_argument("--duration", type=float, help="seconds of arrivals per point (default 12)")
    p.add_argument("--skewed-alphas", type=float, nargs="*", help="power-law alphas besides 1 (default 0.3)")
    p.add_argument("--setups", nargs="+", choices=[s.key for s in SETUPS], help="set-ups to run (default all)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_bench_args(__doc__.splitlines()[0], JSON_NAME, argv, extra=add_options)


def workload_from(args: argparse.Namespace) -> OpenLoopWorkload:
    w = quick_workload() if args.quick else cluster_workload()
    given = {"rates": args.rates, "duration": args.duration, "skewed_alphas": args.skewed_alphas}
    return replace(w, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device.type != "cpu":
        sys.exit("bench_cluster.py measures routing on CPU replicas: pass --device cpu")
    try:
        w = workload_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import ray

    setups = [s for s in SETUPS if args.setups is None or s.key in args.setups]
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_cluster.py", argv), args.device)
    with tempfile.TemporaryDirectory(prefix="lorax-bench-cluster-") as workdir:
        res = run_all(str(Path(args.model).resolve()), w, setups, Path(workdir))
    res.update(workload=asdict(w), series=w.series(), env=env | {"loadavg_end": _loadavg()}, quick=args.quick,
               json_path=args.json, ray_version=ray.__version__, total_seconds=time.perf_counter() - start)
    add_first_loads(res)
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    write_section(repo_path(args.output), section_name("cluster", args.device), render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
