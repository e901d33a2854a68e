"""Several replicas on Ray Serve, end to end: `lorax-lite serve --num-replicas 2` starts a local Ray cluster on
loopback, a real redis-server holds the registry (adapters, versions, keys), and the default model serves the two
business units' adapters from one store. Everything goes through Ray Serve's HTTP proxy.

- every route works through the proxy, both wire formats, streaming, lorax-client and the openai SDK, keys;
- affinity: requests for one adapter are served by one replica (x-replica-id), two adapters spread over both;
- an adapter (and a new version) registered while serving is served by every replica within a second;
- the same greedy answer whichever replica serves it;
- a killed replica: requests keep succeeding, Ray replaces it, and the new one serves;
- SIGTERM: the replicas drain (a request in flight finishes) and the command exits 0.

To reach a given replica, a request names the adapter it wants in `adapter_id` and steers with Ray's own header
`serve_multiplexed_model_id` set to an adapter that replica holds (the proxy's middleware keeps an explicit one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_helpers import ServerProcess, serve_process
from test_server_tenants import (
    BASE,
    LATE,
    PROMPT,
    QUESTION,
    UNITS,
    Deployment,
    cli,
    create_key,
    make_deployment,
    run_client,
    sources,  # noqa: F401 (a fixture: the units' random adapters, and a late one)
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra `lorax-lite[cluster]` (make install has it)")

STEER = "serve_multiplexed_model_id"
REPLICA = "x-replica-id"
REGISTER_DEADLINE_S = 1.5  # the contract: within a second on every replica; polled with some slack
REPLACE_DEADLINE_S = 180.0
SERVE_OPTIONS = ("--served-model-name", BASE, "--dtype", "float32", "--device", "cpu", "--max-loras", "4",
                 "--max-model-len", "512", "--num-kv-blocks", "256")


@dataclass
class Cluster:
    server: ServerProcess
    deployment: Deployment

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def cluster(redis_url: str, sources: dict[str, Path], default_model_dir: Path,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    deployment = make_deployment(f"{redis_url}?prefix=cluster-{uuid.uuid4().hex[:8]}", root, sources,
                                 default_model_dir)
    args = ["--model", str(default_model_dir), "--registry", deployment.registry, "--store", str(deployment.store),
            "--num-replicas", "2", *SERVE_OPTIONS]
    with serve_process(*args, log=root / "serve.log", startup_timeout=300) as server:
        yield Cluster(server, deployment)


def post(url: str, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def generate(url: str, adapter: str | None, steer: str | None = None, tokens: int = 4,
             **headers: str) -> httpx.Response:
    if adapter is not None:
        headers["adapter_id"] = adapter
    if steer is not None:
        headers[STEER] = steer
    return post(url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens,
                                                                    "ignore_eos_token": True, "details": True}},
                **headers)


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers[REPLICA]


def homes(url: str) -> dict[str, str]:
    """The replica each unit's adapter lives on (one request each, sequentially)."""
    return {unit: replica_of(generate(url, unit)) for unit in UNITS}


# ---- every route through the proxy -----------------------------------------------------------------------------


def test_every_route_through_the_proxy(cluster: Cluster):
    url = cluster.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json()["status"] == "ready"
    info_response = httpx.get(f"{url}/info")
    assert info_response.json()["replica_id"] == info_response.headers[REPLICA]  # the replica that answered
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {BASE, *UNITS}

    native = generate(url, "pricing", tokens=6)
    assert native.status_code == 200 and native.json()["details"]["generated_tokens"] == 6
    assert native.headers["x-lorax-routed-adapter"] == "pricing"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "ignore_eos_token": True, "adapter_id": "pricing"}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert stream.status_code == 200 and events[-1]["generated_text"] == native.json()["generated_text"]
    assert stream.headers[REPLICA] == native.headers[REPLICA]  # routed by the body's parameters.adapter_id

    chat = post(url, "/v1/chat/completions", {"model": "supply_chain", "messages": QUESTION, "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == "supply_chain"
    assert chat.headers["x-lorax-routed-adapter"] == "supply_chain"
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
            "model": "supply_chain", "messages": QUESTION, "max_tokens": 4, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    completion = post(url, "/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 4})
    assert completion.status_code == 200 and completion.headers["x-lorax-routed-adapter"] == ""  # base: balanced

    unknown = generate(url, "no_such_adapter")
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found" and REPLICA in unknown.headers
    bad = post(url, "/v1/chat/completions", {"model": "pricing", "messages": "not a list"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    assert "lorax_requests_total" in httpx.get(f"{url}/metrics").text
    assert httpx.get(f"{url}/chat").status_code == 200


# ---- affinity -----------------------------------------------------------------------------------------------


def test_one_adapter_one_replica_and_two_adapters_spread(cluster: Cluster):
    url = cluster.url
    home = homes(url)
    for _ in range(8):  # light load, sequential: always the replica that holds it
        for unit in UNITS:
            assert replica_of(generate(url, unit)) == home[unit]
    assert home["pricing"] != home["supply_chain"]  # a new adapter goes to the replica holding the fewest

    with ThreadPoolExecutor(12) as pool:  # both busy at once: each stays on its own replica
        futures = {pool.submit(generate, url, unit, None, 8): unit for unit in UNITS for _ in range(6)}
        served = Counter((unit, replica_of(future.result())) for future, unit in futures.items())
    assert served == Counter({("pricing", home["pricing"]): 6, ("supply_chain", home["supply_chain"]): 6})

    resident = {}
    for unit in UNITS:  # /info of each replica lists what it holds
        info = httpx.get(f"{url}/info", headers={STEER: unit}).json()
        resident[info["replica_id"]] = {key.split("@")[0] for key in info["adapters"]["host"]}
    assert resident == {home["pricing"]: {"pricing"}, home["supply_chain"]: {"supply_chain"}}


def test_the_same_greedy_answer_on_either_replica(cluster: Cluster):
    url = cluster.url
    home = homes(url)
    for unit in UNITS:
        answers = {}
        for steer in UNITS:  # once on each replica
            response = generate(url, unit, steer=steer, tokens=12)
            answers[replica_of(response)] = [t["id"] for t in response.json()["details"]["tokens"]]
        assert set(answers) == set(home.values())
        assert len({tuple(tokens) for tokens in answers.values()}) == 1, answers


# ---- the registry shared by every replica --------------------------------------------------------------------


def test_an_adapter_registered_while_serving_reaches_every_replica_within_a_second(
        cluster: Cluster, sources: dict[str, Path]):  # noqa: F811
    url, deployment = cluster.url, cluster.deployment
    home = homes(url)
    store = ("--registry", deployment.registry, "--store", str(deployment.store), "--model", str(deployment.model))

    def served_everywhere(adapter: str) -> dict[str, list[int]]:
        """Poll each replica (steered) until it serves `adapter`; its tokens per replica."""
        answers = {}
        deadline = time.monotonic() + REGISTER_DEADLINE_S
        for steer in UNITS:
            while True:
                response = generate(url, adapter, steer=steer, tokens=6)
                if response.status_code == 200:
                    answers[replica_of(response)] = [t["id"] for t in response.json()["details"]["tokens"]]
                    break
                assert response.status_code == 404, response.text
                assert time.monotonic() < deadline, f"{adapter} not served by the replica holding {steer} in time"
                time.sleep(0.05)
        assert set(answers) == set(home.values())
        return answers

    assert generate(url, LATE).status_code == 404
    cli("adapters", "register", LATE, str(sources[LATE]), *store)
    first = served_everywhere(LATE)
    assert len({tuple(t) for t in first.values()}) == 1

    cli("adapters", "register", LATE, str(sources["pricing"]), *store)  # a new version: other weights
    deadline = time.monotonic() + REGISTER_DEADLINE_S
    for steer in UNITS:
        while True:
            response = generate(url, LATE, steer=steer, tokens=6)
            tokens = [t["id"] for t in response.json()["details"]["tokens"]]
            if tokens != first[replica_of(response)]:
                break
            assert time.monotonic() < deadline, f"the new version of {LATE} not served in time (steered by {steer})"
            time.sleep(0.05)
    pricing = [t["id"] for t in generate(url, "pricing", tokens=6).json()["details"]["tokens"]]
    assert [t["id"] for t in generate(url, LATE, tokens=6).json()["details"]["tokens"]] == pricing


# ---- failures ----------------------------------------------------------------------------------------------


def replica_pids() -> set[int]:
    done = subprocess.run(["pgrep", "-f", "ServeReplica:lorax-lite"], capture_output=True, text=True)
    return {int(pid) for pid in done.stdout.split()}


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(cluster: Cluster):
    url = cluster.url
    homes(url)
    before = {replica_of(generate(url, None, steer=f"probe-{i}")) for i in range(6)} | set(homes(url).values())
    pids = replica_pids()
    assert len(pids) == 2, pids
    victim = min(pids)
    results: list[tuple[float, float, int, str]] = []  # (start, end, status, replica)
    killed_at: list[float] = []
    stop = threading.Event()

    def load(unit: str) -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                response = generate(url, unit, tokens=8)
                results.append((start, time.monotonic(), response.status_code, response.headers.get(REPLICA, "")))
            except httpx.HTTPError:
                results.append((start, time.monotonic(), 0, ""))

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, unit) for unit in (*UNITS, *UNITS)]
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        time.sleep(8)
        stop.set()
        for worker in workers:
            worker.result()
    failed = [r for r in results if r[2] != 200]
    assert all(start < killed_at[0] for start, *_ in failed), f"requests sent after the kill failed: {failed}"
    assert len(failed) <= 4  # at most the requests in flight on the victim (4 workers)
    assert sum(1 for start, _, status, _ in results if start > killed_at[0] and status == 200) >= 4

    deadline = time.monotonic() + REPLACE_DEADLINE_S  # Ray starts a new replica, which loads the model
    new_replica = None
    while new_replica is None:
        assert time.monotonic() < deadline, f"no replacement replica in {REPLACE_DEADLINE_S} s"
        if len(replica_pids() - {victim}) == 2:
            for i in range(8):  # an id no replica holds goes to the one holding the fewest: the new one
                response = generate(url, "pricing", steer=f"fresh-{uuid.uuid4().hex[:6]}-{i}")
                if response.status_code == 200 and response.headers[REPLICA] not in before:
                    new_replica = response.headers[REPLICA]
                    break
        time.sleep(1)
    assert replica_pids() - pids, "the victim was not replaced by a new process"


# ---- keys (last: once a key exists, every request needs one) ------------------------------------------------


def test_keys_through_the_proxy_with_both_sdks(cluster: Cluster):
    url, deployment = cluster.url, cluster.deployment
    home = homes(url)
    key = create_key(deployment, "pricing", "--adapters", "pricing")
    deadline = time.monotonic() + REGISTER_DEADLINE_S
    for steer in UNITS:  # every replica asks for the key within a second
        while generate(url, "pricing", steer=steer).status_code != 401:
            assert time.monotonic() < deadline, f"the replica holding {steer} still serves without a key"
            time.sleep(0.05)
    auth = {"Authorization": f"Bearer {key}"}
    assert replica_of(generate(url, "pricing", **auth)) == home["pricing"]
    assert generate(url, "supply_chain", **auth).status_code == 404  # another tenant's adapter: unknown
    assert httpx.get(f"{url}/health").status_code == 200  # probes stay public

    call = {"op": "generate", "prompt": PROMPT, "max_new_tokens": 4, "ignore_eos_token": True}
    ok, streamed = run_client("lorax_client_calls.py", url, key, [
        {**call, "adapter_id": "pricing"}, {**call, "op": "generate_stream", "adapter_id": "pricing"}])
    assert "error" not in ok and ok["generated_tokens"] == 4, ok
    assert streamed.get("text") == ok["text"], streamed
    chat = {"op": "chat", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    models, answer, stream = run_client("openai_calls.py", url, key, [
        {"op": "models"}, {**chat, "model": "pricing"}, {**chat, "op": "chat_stream", "model": "pricing"}])
    assert models == {"ids": ["pricing"]}
    assert answer["model"] == "pricing" and answer["usage"]["completion_tokens"] >= 1, answer
    assert stream["content"] == answer["content"], stream


def test_sigterm_drains_the_replicas_and_exits_0(cluster: Cluster):
    url, server = cluster.url, cluster.server
    key = cluster.deployment.keys[-1]
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(generate, url, "pricing", None, 96, Authorization=f"Bearer {key}")
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        response = long.result()
    assert response.status_code == 200 and response.json()["details"]["generated_tokens"] == 96
    assert server.proc.wait(timeout=120) == 0, server.log_tail()
    deadline = time.monotonic() + 30
    while replica_pids():
        assert time.monotonic() < deadline, "replica processes left behind"
        time.sleep(0.5)


def test_the_health_check_fails_only_when_the_engine_stopped():
    """Ray's health check reads the readiness checks: a stopped engine fails it (Ray replaces the replica); a
    drain or an unreachable registry does not (every replica shares the registry)."""
    import asyncio
    from types import SimpleNamespace

    from lorax_lite.cluster.deployment import LoraxReplica

    def replica(running: bool, reachable: bool, draining: bool = False) -> SimpleNamespace:
        health = SimpleNamespace(reachable=reachable, configured=True, message="redis: connection refused")
        llm = SimpleNamespace(is_running=running, check_registry=lambda: health)
        state = SimpleNamespace(llm=llm, draining=draining)
        return SimpleNamespace(replica_id="r1", parts=SimpleNamespace(app=SimpleNamespace(
            state=SimpleNamespace(server=state))))

    asyncio.run(LoraxReplica.check_health(replica(running=True, reachable=True)))
    asyncio.run(LoraxReplica.check_health(replica(running=True, reachable=False, draining=True)))
    with pytest.raises(RuntimeError, match="engine stopped"):
        asyncio.run(LoraxReplica.check_health(replica(running=False, reachable=True)))
