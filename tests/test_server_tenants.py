"""Tenants end to end: real `lorax-lite serve` processes on the default model, keys made with `lorax-lite keys`,
replicas sharing a real redis-server (and a SQLite file), driven over HTTP, by lorax-client and by the openai SDK.

Two business units (pricing, supply_chain) each get a key for their own adapter; every route but the probes
needs a key; another tenant's adapter is answered exactly like an unknown one; a key's rate limit refuses its
own flood while the other tenant is served; usage adds up to what the responses said; denied requests are
audited without the key; a revoked, rotated or expired key stops working on every replica within a second.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import ServerProcess, free_port, serve_process
from transformers import AutoModelForCausalLM

import lorax_lite
from lorax_lite.lora.synthetic import make_random_adapter
from lorax_lite.registry import admin
from lorax_lite.registry.factory import open_registry
from lorax_lite.registry.store import AdapterStore

pytestmark = pytest.mark.slow

BASE = "smollm2"
UNITS = ("pricing", "supply_chain")
LATE = "logistics"  # registered while the servers run
PROMPT = "The price of a widget is"
QUESTION = [{"role": "user", "content": "What is a discount?"}]
KEY = re.compile(r"llk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
REFUSAL_DEADLINE_S = 1.5  # the contract: within 1 s on every replica; polled with some slack
CLIENTS_DIR = Path(__file__).parent / "clients"
SERVE_OPTIONS = ("--served-model-name", BASE, "--dtype", "float32", "--device", "cpu", "--max-loras", "4",
                 "--max-model-len", "512", "--num-kv-blocks", "256")


# ---- deployments: a registry with two units' adapters, keys made by the CLI, server replicas -----------------


@dataclass
class Deployment:
    """A registry (URL) and its adapter store; every key made for it, kept to check none of them leaks."""

    registry: str
    store: Path
    model: Path
    keys: list[str] = field(default_factory=list)

    def serve_args(self, *extra: str) -> list[str]:
        return ["--model", str(self.model), "--registry", self.registry, "--store", str(self.store),
                *SERVE_OPTIONS, *extra]


@dataclass
class Keys:
    pricing: str  # tenant pricing: its adapter only
    supply: str  # tenant supply_chain: its adapter and the base model
    admin: str  # tenant platform, admin role (/metrics)


@dataclass
class Replicas:
    """Server processes sharing one registry; the first writes its audit log to `audit`, the others to stdout."""

    deployment: Deployment
    keys: Keys
    servers: list[ServerProcess]
    audit: Path

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]


def cli(*args: str) -> subprocess.CompletedProcess:
    """`lorax-lite ARGS` in a child process (this worktree's code: PYTHONPATH is inherited)."""
    done = subprocess.run([sys.executable, "-m", "lorax_lite.cli", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"lorax-lite {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}"
    return done


def create_key(deployment: Deployment, tenant: str, *options: str) -> str:
    """`lorax-lite keys create`: the key is the last line of its output."""
    done = cli("keys", "create", "--tenant", tenant, *options, "--registry", deployment.registry)
    key = done.stdout.strip().splitlines()[-1]
    assert KEY.fullmatch(key), done.stdout
    deployment.keys.append(key)
    return key


def rotate_key(deployment: Deployment, key: str) -> str:
    done = cli("keys", "rotate", key_id(key), "--registry", deployment.registry)
    new = done.stdout.strip().splitlines()[-1]
    assert KEY.fullmatch(new) and key_id(new) == key_id(key) and new != key, done.stdout
    deployment.keys.append(new)
    return new


def key_id(key: str) -> str:
    """The public id of a key (`llk_` and 12 hex digits), as listings, usage, metrics and the audit log show it."""
    return key[:16]


def secret(key: str) -> str:
    return key[17:]


def wrong_secret(key: str) -> str:
    """`key` with the last character of its secret changed: a known key id, a wrong secret."""
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def make_deployment(url: str, root: Path, sources: dict[str, Path], model_dir: Path) -> Deployment:
    registry, store = open_registry(url), AdapterStore(root / "store")
    for unit in UNITS:
        admin.register(registry, store, unit, sources[unit], model_dir, owner=unit,
                       system_prompt=f"You are the {unit} assistant.")
    registry.close()
    return Deployment(url, root / "store", model_dir)


def make_keys(deployment: Deployment) -> Keys:
    with ThreadPoolExecutor(3) as pool:
        pricing = pool.submit(create_key, deployment, "pricing", "--adapters", "pricing")
        supply = pool.submit(create_key, deployment, "supply_chain", "--adapters", "supply_chain", "--base-model")
        admin_key = pool.submit(create_key, deployment, "platform", "--admin")
        return Keys(pricing.result(), supply.result(), admin_key.result())


@contextmanager
def serve_all(*arg_lists: list[str], logs: list[Path]) -> Iterator[list[ServerProcess]]:
    """`serve_process` for each argument list, started at the same time (each loads the model)."""
    managers = [serve_process(*args, log=log) for args, log in zip(arg_lists, logs, strict=True)]
    with ExitStack() as stack, ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
        servers, error = [], None
        for manager, future in zip(managers, futures, strict=True):
            try:
                servers.append(future.result())
                stack.push(manager.__exit__)
            except BaseException as exc:  # pytest.fail in a starting thread: stop the others, then fail
                error = error or exc
        if error is not None:
            raise error
        yield servers


@contextmanager
def replicas_of(deployment: Deployment, keys: Keys, root: Path, count: int = 2) -> Iterator[Replicas]:
    audit = root / "audit.jsonl"
    arg_lists = [deployment.serve_args("--audit-log", str(audit))] + [deployment.serve_args()] * (count - 1)
    with serve_all(*arg_lists, logs=[root / f"server-{i}.log" for i in range(count)]) as servers:
        yield Replicas(deployment, keys, servers, audit)


def check_imports_this_checkout() -> None:
    """This process and its children (servers, CLI) import lorax_lite from this checkout, not another one."""
    root = str(Path(__file__).resolve().parents[1])
    child = subprocess.run([sys.executable, "-c", "import lorax_lite; print(lorax_lite.__file__)"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    for where, path in (("tests", lorax_lite.__file__), ("child processes", child)):
        assert str(Path(path).resolve()).startswith(root), f"{where} import lorax_lite from {path}, not {root}"


@pytest.fixture(scope="module")
def sources(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("tenant-adapters")
    return {name: make_random_adapter(model, root / name, rank=4, alpha=8, seed=seed, std=0.3)
            for seed, name in enumerate((*UNITS, LATE), start=1)}


@pytest.fixture(scope="module")
def redis_replicas(redis_url: str, sources: dict[str, Path], default_model_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two servers on one Redis registry (keys, rate limits and usage shared through it)."""
    check_imports_this_checkout()
    root = tmp_path_factory.mktemp("tenants-redis")
    url = f"{redis_url}?prefix=tenants-{uuid.uuid4().hex[:8]}"
    deployment = make_deployment(url, root, sources, default_model_dir)
    with replicas_of(deployment, make_keys(deployment), root) as replicas:
        yield replicas


@pytest.fixture(scope="module")
def sqlite_replicas(sources: dict[str, Path], default_model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two servers on one SQLite file."""
    root = tmp_path_factory.mktemp("tenants-sqlite")
    deployment = make_deployment(f"sqlite:///{root / 'registry.db'}", root, sources, default_model_dir)
    with replicas_of(deployment, make_keys(deployment), root) as replicas:
        yield replicas


# ---- requests --------------------------------------------------------------------------------------------------


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def generate(url: str, key: str | None, adapter: str | None = None, path: str = "/generate",
             request_id: str | None = None, max_new_tokens: int = 3) -> httpx.Response:
    headers = {**auth(key), **({"adapter_id": adapter} if adapter else {}),
               **({"x-request-id": request_id} if request_id else {})}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True,
                                             "details": path == "/generate"}}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def chat(url: str, key: str | None, model: str, request_id: str | None = None, max_tokens: int = 3,
         **extra: object) -> httpx.Response:
    headers = {**auth(key), **({"x-request-id": request_id} if request_id else {})}
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def get(url: str, path: str, key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={**auth(key), **headers}, timeout=30)


def model_ids(url: str, key: str) -> list[str]:
    resp = get(url, "/v1/models", key)
    assert resp.status_code == 200, resp.text
    return [card["id"] for card in resp.json()["data"]]


def metric(url: str, admin_key: str, name: str, **labels: str) -> float:
    """One sample of /metrics, read with the admin key (0 when the series does not exist)."""
    resp = get(url, "/metrics", admin_key)
    assert resp.status_code == 200, resp.text
    values = [sample.value for family in text_string_to_metric_families(resp.text) for sample in family.samples
              if sample.name == name and sample.labels == labels]
    return values[0] if values else 0.0


def poll(check: Callable[[], bool], seconds: float, interval: float = 0.05) -> float | None:
    """Seconds until `check()` held, polled every `interval`; None if it did not within `seconds`."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            return None
        time.sleep(interval)


def refused_everywhere(urls: list[str], key: str, seconds: float) -> tuple[float | None, list[int]]:
    """(seconds until every replica refused `key` with a 401 (None: not within `seconds`), the last statuses)."""
    statuses = [0] * len(urls)

    def all_refuse() -> bool:
        for i, url in enumerate(urls):
            if statuses[i] != 401:
                statuses[i] = get(url, "/info", key).status_code
        return all(status == 401 for status in statuses)

    return poll(all_refuse, seconds), statuses


def accepted_everywhere(urls: list[str], key: str, seconds: float) -> float | None:
    return poll(lambda: all(get(url, "/info", key).status_code == 200 for url in urls), seconds)


# ---- keys and the routes -------------------------------------------------------------------------------------


def test_keys_made_by_the_cli_are_listed_without_their_secrets(redis_replicas: Replicas):
    deployment, keys = redis_replicas.deployment, redis_replicas.keys
    listed = json.loads(cli("keys", "list", "--json", "--registry", deployment.registry).stdout)
    by_id = {entry["id"]: entry for entry in listed}
    assert by_id[key_id(keys.pricing)]["tenant"] == "pricing" and by_id[key_id(keys.pricing)]["adapters"] == ["pricing"]
    assert by_id[key_id(keys.supply)]["base_model"] is True
    assert by_id[key_id(keys.admin)]["role"] == "admin"
    text = json.dumps(listed) + cli("keys", "list", "--registry", deployment.registry).stdout
    assert "secret_hash" not in text and not any(secret(key) in text for key in deployment.keys)


PAGE, NATIVE, OPENAI = "page", "native", "openai"
ROUTES = [  # (method, path, the 401's form)
    ("GET", "/", PAGE), ("GET", "/chat", PAGE), ("GET", "/chat/pricing", PAGE), ("GET", "/docs", PAGE),
    ("GET", "/redoc", PAGE), ("GET", "/openapi.json", NATIVE), ("GET", "/info", NATIVE), ("GET", "/metrics", NATIVE),
    ("GET", "/v1/models", OPENAI), ("POST", "/generate", NATIVE), ("POST", "/generate_stream", NATIVE),
    ("POST", "/", NATIVE), ("POST", "/v1/chat/completions", OPENAI), ("POST", "/v1/completions", OPENAI),
    ("GET", "/no-such-route", NATIVE),
]
BODIES = {"/v1/chat/completions": {"model": BASE, "messages": QUESTION, "max_tokens": 2},
          "/v1/completions": {"model": BASE, "prompt": PROMPT, "max_tokens": 2}}


def refusal_problem(resp: httpx.Response, form: str, challenge: str) -> str | None:
    """What is wrong with `resp` as a 401 of the route family `form`, or None."""
    if resp.status_code != 401:
        return f"status {resp.status_code}: {resp.text[:200]}"
    if resp.headers.get("www-authenticate") != challenge:
        return f"WWW-Authenticate {resp.headers.get('www-authenticate')!r}"
    if form == PAGE:  # the key form
        ok = resp.headers["content-type"].startswith("text/html") and 'id="key-form"' in resp.text
    elif form == OPENAI:
        error = resp.json().get("error")
        ok = isinstance(error, dict) and error["code"] == "invalid_api_key" and error["message"]
    else:
        body = resp.json()
        ok = body.get("error_type") == "unauthorized" and isinstance(body.get("error"), str) and body["error"]
    return None if ok else f"body {resp.headers['content-type']} {resp.text[:200]}"


def test_every_route_but_the_probes_needs_a_key(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    unknown = f"llk_{uuid.uuid4().hex[:12]}_{'A' * 43}"
    presented = [  # (headers, the challenge expected)
        ({}, 'Bearer realm="lorax-lite"'),
        (auth(unknown), 'Bearer realm="lorax-lite", error="invalid_token"'),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 'Bearer realm="lorax-lite", error="invalid_token"'),
        ({"X-API-Key": wrong_secret(keys.pricing)}, 'Bearer realm="lorax-lite", error="invalid_token"'),
    ]
    failures = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, form in ROUTES:
            for headers, challenge in presented:
                body = BODIES.get(path, {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
                resp = client.request(method, path, headers=headers, json=body if method == "POST" else None)
                if problem := refusal_problem(resp, form, challenge):
                    failures.append(f"{method} {path} with {sorted(headers) or 'no key'}: {problem}")
        for probe in ("/health", "/ready", "/static/chat.js"):
            if (status := client.get(probe).status_code) != 200:
                failures.append(f"GET {probe} without a key: {status}, expected 200")
    assert not failures, "\n".join(failures)


def test_a_key_opens_the_routes_and_only_an_admin_key_the_metrics(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    for path in ("/docs", "/openapi.json", "/info", "/chat"):
        assert get(url, path, keys.supply).status_code == 200, path
    assert get(url, "/v1/models", None, **{"X-API-Key": keys.supply}).status_code == 200
    both = get(url, "/v1/models", keys.supply, **{"X-API-Key": keys.pricing})
    assert both.status_code == 401, "two different keys must be refused"
    for path in ("/generate", "/v1/chat/completions"):  # past the key check: the empty body is what is refused
        resp = httpx.post(f"{url}{path}", json={}, headers=auth(keys.supply), timeout=30)
        assert resp.status_code in (400, 422), (path, resp.status_code, resp.text)
    metrics = get(url, "/metrics", keys.supply)
    assert metrics.status_code == 403 and metrics.json()["error_type"] == "forbidden", metrics.text
    assert get(url, "/metrics", keys.admin).status_code == 200


# ---- what a key may use ----------------------------------------------------------------------------------------


def test_another_tenants_adapter_is_answered_exactly_like_an_unknown_one(redis_replicas: Replicas,
                                                                         sources: dict[str, Path]):
    deployment, keys, url = redis_replicas.deployment, redis_replicas.keys, redis_replicas.urls[0]
    early = create_key(deployment, "logistics", "--adapters", LATE)  # may use LATE, not registered yet
    unknown = {"native": generate(url, early, LATE), "openai": chat(url, early, LATE)}
    for resp in unknown.values():
        assert resp.status_code == 404, resp.text
    registry = open_registry(deployment.registry)
    admin.register(registry, AdapterStore(deployment.store), LATE, sources[LATE], deployment.model, owner=LATE)
    registry.close()
    assert generate(url, early, LATE).status_code == 200  # it exists now, for the key that may use it
    denied = {"native": generate(url, keys.pricing, LATE), "openai": chat(url, keys.pricing, LATE)}
    for api in ("native", "openai"):
        assert denied[api].status_code == 404, denied[api].text
        assert denied[api].content == unknown[api].content, api
        assert denied[api].headers["content-type"] == unknown[api].headers["content-type"]
    other = {"native": generate(url, keys.pricing, "supply_chain"), "openai": chat(url, keys.pricing, "supply_chain")}
    for api in ("native", "openai"):  # another tenant's registered adapter: the unknown answer, naming the id asked
        assert other[api].status_code == 404
        assert other[api].content == unknown[api].content.replace(LATE.encode(), b"supply_chain"), api
    assert generate(url, keys.pricing, "pricing").status_code == 200


def test_the_base_model_needs_permission(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    native, openai = generate(url, keys.pricing), chat(url, keys.pricing, BASE)
    assert native.status_code == 403 and native.json()["error_type"] == "forbidden", native.text
    assert openai.status_code == 403 and openai.json()["error"]["type"] == "permission_error", openai.text
    assert generate(url, keys.supply).status_code == 200
    assert chat(url, keys.supply, BASE).status_code == 200


def test_listings_show_only_what_the_key_may_use(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    assert model_ids(url, keys.pricing) == ["pricing"]
    assert model_ids(url, keys.supply) == [BASE, "supply_chain"]
    info = get(url, "/info", keys.pricing).json()
    assert info["auth"] == {"keys_required": True, "tenant": "pricing", "key_id": key_id(keys.pricing)}
    assert all(k is None or k.startswith("pricing") for k in info["adapters"]["slots"] + info["adapters"]["host"])
    page = get(url, "/chat", keys.pricing).text
    assert 'href="/chat/pricing"' in page and "supply_chain" not in page and f'href="/chat/{BASE}"' not in page
    assert get(url, "/chat/supply_chain", keys.pricing).status_code == 404
    assert get(url, "/chat/pricing", keys.pricing).status_code == 200


# ---- rate limits ---------------------------------------------------------------------------------------------


def test_a_flooding_key_gets_429s_while_another_tenant_is_served(redis_replicas: Replicas):
    deployment, keys, (url, other_url) = redis_replicas.deployment, redis_replicas.keys, redis_replicas.urls
    limited = create_key(deployment, "pricing", "--adapters", "pricing", "--rpm", "5", "--name", "flood")
    with ThreadPoolExecutor(25) as pool:
        flood, served = [], []
        for i in range(20):
            flood.append(pool.submit(generate, url, limited, "pricing"))
            if i % 4 == 0:
                served.append(pool.submit(generate, url, keys.supply, "supply_chain"))
        flood_statuses = Counter(f.result().status_code for f in flood)
        served_statuses = [f.result().status_code for f in served]
    assert flood_statuses == {200: 5, 429: 15}, flood_statuses
    assert served_statuses == [200] * 5
    for resp in (f.result() for f in flood):
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1 and resp.json()["error_type"] == "rate_limited", resp.text
    replica = generate(other_url, limited, "pricing")  # the buckets are in Redis: every replica sees them
    assert replica.status_code == 429, replica.text
    openai = chat(url, limited, "pricing")
    assert openai.status_code == 429 and int(openai.headers["retry-after"]) >= 1
    assert openai.json()["error"]["type"] == "rate_limit_error" and openai.json()["error"]["code"] == "rate_limited"
    refused = metric(url, keys.admin, "lorax_rate_limited_requests_total", tenant="pricing", key=key_id(limited))
    assert refused == 16, get(url, "/metrics", keys.admin).text[-3000:]


# ---- usage -----------------------------------------------------------------------------------------------------


def test_usage_is_counted_exactly_in_the_store_and_in_the_metrics(redis_replicas: Replicas):
    deployment, keys, (a, b) = redis_replicas.deployment, redis_replicas.keys, redis_replicas.urls
    key = create_key(deployment, "supply_chain", "--adapters", "supply_chain", "--base-model", "--name", "usage")
    expected: dict[str, Counter] = {}

    def count(adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        totals = expected.setdefault(adapter, Counter())
        totals.update(requests=1, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)

    native = generate(a, key, "supply_chain", max_new_tokens=4).json()["details"]
    count("supply_chain", native["prompt_tokens"], native["generated_tokens"])
    with httpx.stream("POST", f"{b}/generate_stream", headers={**auth(key), "adapter_id": "supply_chain"},
                      json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}, timeout=120) as resp:
        events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
    count("supply_chain", events[-1]["details"]["prompt_tokens"], events[-1]["details"]["generated_tokens"])
    for url, model in ((b, "supply_chain"), (a, BASE), (b, BASE)):
        usage = chat(url, key, model, max_tokens=3).json()["usage"]
        count(model, usage["prompt_tokens"], usage["completion_tokens"])
    completion = httpx.post(f"{a}/v1/completions", headers=auth(key), timeout=120,
                            json={"model": BASE, "prompt": PROMPT, "max_tokens": 2}).json()["usage"]
    count(BASE, completion["prompt_tokens"], completion["completion_tokens"])
    assert generate(a, key, "pricing").status_code == 404  # refused: never reaches the engine, not counted

    def stored() -> dict[str, Counter]:
        rows = json.loads(cli("usage", "--json", "--tenant", "supply_chain", "--registry", deployment.registry).stdout)
        return {row["adapter"]: Counter({name: row[name] for name in ("requests", "prompt_tokens", "generated_tokens")})
                for row in rows if row["key_id"] == key_id(key)}

    seen: list[dict[str, Counter]] = []

    def flushed() -> bool:
        seen.append(stored())
        return seen[-1] == expected

    assert poll(flushed, 5.0, interval=0.3) is not None, f"usage in the store {seen[-1]} != the responses' {expected}"
    for adapter, totals in expected.items():
        labels = dict(tenant="supply_chain", key=key_id(key), adapter=adapter)
        scraped = {name: sum(metric(url, keys.admin, f"lorax_tenant_{metric_name}_total", **labels) for url in (a, b))
                   for name, metric_name in (("requests", "requests"), ("prompt_tokens", "prompt_tokens"),
                                             ("generated_tokens", "generated_tokens"))}
        assert scraped == dict(totals), (adapter, scraped, totals)


# ---- the audit log ---------------------------------------------------------------------------------------------


def audit_lines(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_denied_requests_are_audited_one_json_line_each_without_the_key(redis_replicas: Replicas):
    deployment, keys, url = redis_replicas.deployment, redis_replicas.keys, redis_replicas.urls[0]
    throttled = create_key(deployment, "pricing", "--adapters", "pricing", "--rpm", "1", "--name", "audit")
    revoked = create_key(deployment, "pricing", "--adapters", "pricing", "--name", "revoked")
    cli("keys", "revoke", key_id(revoked), "--registry", deployment.registry)
    assert refused_everywhere([url], revoked, 3.0)[0] is not None
    unknown = f"llk_{uuid.uuid4().hex[:12]}_{'B' * 43}"
    rid = uuid.uuid4().hex[:8]
    assert generate(url, throttled, "pricing").status_code == 200  # allowed: no audit line
    cases = {  # request id -> (response, expected status, key, tenant, route, adapter)
        f"{rid}-nokey": (get(url, "/v1/models", None, **{"x-request-id": f"{rid}-nokey"}), 401, None, None,
                         "/v1/models", None),
        f"{rid}-unknown": (get(url, "/info", unknown, **{"x-request-id": f"{rid}-unknown"}), 401, unknown, None,
                           "/info", None),
        f"{rid}-revoked": (get(url, "/info", revoked, **{"x-request-id": f"{rid}-revoked"}), 401, revoked, "pricing",
                           "/info", None),
        f"{rid}-acl": (generate(url, keys.pricing, "supply_chain", request_id=f"{rid}-acl"), 404, keys.pricing,
                       "pricing", "/generate", "supply_chain"),
        f"{rid}-base": (chat(url, keys.pricing, BASE, request_id=f"{rid}-base"), 403, keys.pricing, "pricing",
                        "/v1/chat/completions", BASE),
        f"{rid}-metrics": (get(url, "/metrics", keys.supply, **{"x-request-id": f"{rid}-metrics"}), 403, keys.supply,
                           "supply_chain", "/metrics", None),
        f"{rid}-limit": (generate(url, throttled, "pricing", request_id=f"{rid}-limit"), 429, throttled, "pricing",
                         "/generate", "pricing"),
    }
    for name, (resp, status, *_) in cases.items():
        assert resp.status_code == status, (name, resp.status_code, resp.text)
    found: dict[str, list[dict]] = {}

    def all_written() -> bool:
        found.clear()
        for line in audit_lines(redis_replicas.audit):
            found.setdefault(line.get("request_id"), []).append(line)
        return set(cases) <= set(found)

    assert poll(all_written, 3.0, interval=0.1) is not None, f"missing audit lines: {set(cases) - set(found)}"
    for name, (_, status, key, tenant, route, adapter) in cases.items():
        assert len(found[name]) == 1, found[name]
        line = found[name][0]
        assert line["event"] == "denied" and line["reason"], line
        expected = {"status": status, "key_id": key_id(key) if key else None, "tenant": tenant, "route": route,
                    "adapter": adapter}
        assert {k: line.get(k) for k in expected} == expected, (name, line)
    assert not [line for line in audit_lines(redis_replicas.audit) if line.get("status") == 200]
    text = redis_replicas.audit.read_text()
    for key in (*deployment.keys, unknown):
        assert key not in text and secret(key) not in text


# ---- revocation, rotation, expiry ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_a_revoked_key_is_refused_by_every_replica_within_a_second(backend: str, request: pytest.FixtureRequest):
    replicas: Replicas = request.getfixturevalue(f"{backend}_replicas")
    deployment, urls = replicas.deployment, replicas.urls
    key = create_key(deployment, "pricing", "--adapters", "pricing", "--name", "to-revoke")
    # The key's first use, just before the revocation: each replica has just read its record (and may keep it).
    assert [get(url, "/info", key).status_code for url in urls] == [200] * len(urls)
    started = time.monotonic()
    cli("keys", "revoke", key_id(key), "--registry", deployment.registry)
    cli_seconds = time.monotonic() - started
    seconds, statuses = refused_everywhere(urls, key, REFUSAL_DEADLINE_S)
    assert seconds is not None, (f"{backend}: a revoked key still worked {REFUSAL_DEADLINE_S} s after `keys revoke` "
                                 f"returned (statuses {statuses}; the CLI took {cli_seconds:.2f} s)")
    for url in urls:
        resp = generate(url, key, "pricing")
        assert resp.status_code == 401 and "revoked" in resp.json()["error"], resp.text
    print(f"{backend}: revoked key refused by {len(urls)} replicas {seconds:.2f} s after `keys revoke` returned, "
          f"{seconds + cli_seconds:.2f} s after it started")
    assert seconds <= REFUSAL_DEADLINE_S, f"refused {seconds:.2f} s after `keys revoke` returned"
    second = replicas.servers[1]  # audits to stdout: its log has the refusals, by key id only
    assert poll(lambda: key_id(key) in second.log.read_text() and '"event": "denied"' in second.log.read_text(), 3.0)
    for server in replicas.servers:
        log = server.log.read_text()
        assert not any(k in log or secret(k) in log for k in deployment.keys), "a key is in the server log"


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_a_rotated_key_works_only_with_its_new_secret(backend: str, request: pytest.FixtureRequest):
    replicas: Replicas = request.getfixturevalue(f"{backend}_replicas")
    deployment, urls = replicas.deployment, replicas.urls
    old = create_key(deployment, "supply_chain", "--adapters", "supply_chain", "--name", "to-rotate")
    assert [get(url, "/info", old).status_code for url in urls] == [200] * len(urls)  # fresh records, as above
    new = rotate_key(deployment, old)
    seconds, statuses = refused_everywhere(urls, old, REFUSAL_DEADLINE_S)
    assert seconds is not None, f"{backend}: the old key still worked after rotation (statuses {statuses})"
    assert accepted_everywhere(urls, new, REFUSAL_DEADLINE_S) is not None, f"{backend}: the new key does not work"
    assert all(generate(url, new, "supply_chain").status_code == 200 for url in urls)


def test_an_expired_key_stops_working(redis_replicas: Replicas):
    deployment, urls = redis_replicas.deployment, redis_replicas.urls
    expires_at = math.ceil(time.time()) + 5
    iso = dt.datetime.fromtimestamp(expires_at, dt.timezone.utc).isoformat(timespec="seconds")
    key = create_key(deployment, "pricing", "--adapters", "pricing", "--expires", iso)
    assert time.time() < expires_at - 0.5, "creating the key took too long to see it work before it expires"
    assert all(get(url, "/info", key).status_code == 200 for url in urls)
    time.sleep(max(0.0, expires_at - time.time()))
    seconds, statuses = refused_everywhere(urls, key, REFUSAL_DEADLINE_S)
    assert seconds is not None, f"an expired key still worked {REFUSAL_DEADLINE_S} s after its expiry ({statuses})"
    resp = get(urls[0], "/info", key)
    assert resp.status_code == 401 and "expired" in resp.json()["error"], resp.text


# ---- the real clients, unchanged ---------------------------------------------------------------------------------


def clients_python() -> str:
    python = os.environ.get("LORAX_CLIENTS_PYTHON", ".venv-clients/bin/python")
    if not Path(python).exists():
        if os.environ.get("LORAX_REQUIRE_DEFAULT_MODEL") == "1":
            pytest.fail(f"{python} is missing: run `make clients`")
        pytest.skip(f"{python} is missing: run `make clients`")
    return python


def run_client(script: str, url: str, key: str, calls: list[dict]) -> list[dict]:
    """A tests/clients script with the key in LORAX_TEST_API_KEY (lorax-client: headers=, openai: api_key=)."""
    done = subprocess.run([clients_python(), str(CLIENTS_DIR / script), url, json.dumps(calls)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "LORAX_TEST_API_KEY": key})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_lorax_client_with_a_key(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    call = {"op": "generate", "prompt": PROMPT, "max_new_tokens": 4, "ignore_eos_token": True}
    ok, streamed, other = run_client("lorax_client_calls.py", url, keys.pricing, [
        {**call, "adapter_id": "pricing"}, {**call, "op": "generate_stream", "adapter_id": "pricing"},
        {**call, "adapter_id": "supply_chain"}])
    assert "error" not in ok and ok["generated_tokens"] == 4, ok
    assert streamed.get("text") == ok["text"], streamed
    assert other["error"] == "NotFoundError", other
    wrong = run_client("lorax_client_calls.py", url, wrong_secret(keys.pricing), [{**call, "adapter_id": "pricing"}])[0]
    assert wrong["error"] == "UnknownError" and "401" in wrong["message"], wrong  # lorax-client has no 401 class


def test_openai_sdk_with_a_key(redis_replicas: Replicas):
    url, keys = redis_replicas.urls[0], redis_replicas.keys
    call = {"op": "chat", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    models, answer, base, other = run_client("openai_calls.py", url, keys.pricing, [
        {"op": "models"}, {**call, "model": "pricing"}, {**call, "model": BASE}, {**call, "model": "supply_chain"}])
    assert models == {"ids": ["pricing"]}
    assert "error" not in answer and answer["model"] == "pricing" and answer["usage"]["completion_tokens"] >= 1
    assert base["error"] == "PermissionDeniedError" and base["status"] == 403, base
    assert other["error"] == "NotFoundError" and other["status"] == 404, other
    wrong = run_client("openai_calls.py", url, wrong_secret(keys.pricing),
                       [{"op": "models"}, {**call, "model": "pricing"}])
    assert [w.get("error") for w in wrong] == ["AuthenticationError"] * 2, wrong
    assert [w["status"] for w in wrong] == [401, 401]


# ---- protected mode ------------------------------------------------------------------------------------------------


def test_serving_on_all_interfaces_without_keys_needs_no_auth(tmp_path: Path, tiny_llama_dir: Path):
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    no_model = tmp_path / "not-a-model"
    no_model.mkdir()  # were the model loaded first, this would fail with another message
    done = subprocess.run([sys.executable, "-m", "lorax_lite.cli", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--model", str(no_model), "--registry", empty],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "refusing to serve on 0.0.0.0 without API keys" in done.stderr and "--no-auth" in done.stderr, done.stderr
    with serve_process("--host", "0.0.0.0", "--no-auth", "--model", str(tiny_llama_dir), "--registry", empty,
                       "--dtype", "float32", "--device", "cpu") as server:
        assert get(server.url, "/v1/models").status_code == 200
        assert get(server.url, "/info").json()["auth"]["keys_required"] is False


# ---- last: nothing leaked ------------------------------------------------------------------------------------------


def test_no_key_is_in_the_audit_log_or_the_server_logs(redis_replicas: Replicas):
    deployment = redis_replicas.deployment
    assert len(deployment.keys) >= 3
    for path in (redis_replicas.audit, *(server.log for server in redis_replicas.servers)):
        text = path.read_text()
        leaked = [key_id(key) for key in deployment.keys if key in text or secret(key) in text]
        assert not leaked, f"{path.name} holds the secret of {leaked}"
