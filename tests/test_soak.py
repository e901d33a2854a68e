"""Soak: many concurrent clients on `lorax-lite serve` (the tiny model, three registered adapters and the
base model) for a bounded time, mixing the native API (/generate, /generate_stream) and the OpenAI one
(/v1/completions, /v1/chat/completions, streamed and not), some clients leaving mid-stream on purpose.

Every prompt carries a marker (one of a fixed set) and every request is greedy, so each (model, prompt,
API family) has one right answer, taken before the soak from a solo request to the same server; the
random tiny model answers each marker differently, so a response handed to the wrong request shows up.
Checked: no lost response (every request that stays gets a complete answer), no mixed-up one, no error
status; once idle, no request running or waiting and no KV block in use; and the server's memory is
flat after warm-up.

The soak lasts LORAX_SOAK_SECONDS (50 by default, after a 10 s warm-up); set it higher for a longer run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TINY_MODEL_SIZES, save_tiny_model
from lora_helpers import register_adapters
from server_helpers import ServerProcess, serve_process
from transformers import LlamaConfig

SOAK_SECONDS = float(os.environ.get("LORAX_SOAK_SECONDS", "50"))
WARMUP_SECONDS = 10.0
NUM_CLIENTS = 24
MAX_TOKENS = 12
LEAVER_MAX_TOKENS = 100  # a client that leaves asks for a long answer, so it leaves while the engine still runs it
LEAVE_PROBABILITY = 0.1
REQUEST_TIMEOUT = 120.0
MODEL_NAME = "tiny"
ADAPTERS = ("pricing", "logistics", "support")
MODELS = (MODEL_NAME, *ADAPTERS)
MARKERS = ["2yW4Acq9", "GFz6Y1t9", "EwL56nGi", "siWgNZq6", "ITZM5jtg", "Ue52RvEJ", "gwBuNO6n", "9JEC3Hqd", "Z6J6afU1",
           "zT0YQOaN", "F03vpUuT", "3em6KopZ"]
ROUTES = {  # route -> (API family, streamed)
    "/generate": ("native", False), "/generate_stream": ("native", True),
    "/v1/completions": ("completions", False), "/v1/completions:stream": ("completions", True),
    "/v1/chat/completions": ("chat", False), "/v1/chat/completions:stream": ("chat", True),
}
ROUTE_FAMILIES = ("native", "completions", "chat")
STREAMED_ROUTES = [route for route, (_, streamed) in ROUTES.items() if streamed]
# After warm-up the server's RSS still moves a little with the allocator's arenas and caches (2-5 MB between the
# two idle points here); a leak is growth that scales with the traffic. 10% of the warmed-up RSS (~40 MB of the
# ~400 MB server) plus 32 MB absorbs that noise, even after a warm-up slowed by other work on the machine, and
# still fails a leak of ~20 KB per request over a 50 s soak (~4000 requests on 2 cores); longer soaks
# (LORAX_SOAK_SECONDS) catch smaller leaks.
RSS_GROWTH_FACTOR = 1.10
RSS_SLACK_KB = 32 * 1024


def prompt_of(marker: str) -> str:
    return f"Customer {marker} asks: what is the price of the product?"


@dataclass(frozen=True)
class Job:
    route: str
    model: str
    marker: str
    leaves: bool = False  # the client disconnects after the first streamed event

    @property
    def family(self) -> str:
        return ROUTES[self.route][0]

    @property
    def streamed(self) -> bool:
        return ROUTES[self.route][1]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.marker, self.family


@dataclass
class Answer:
    job: Job
    status: int | None = None
    text: str | None = None
    num_tokens: int | None = None
    complete: bool = False
    problem: str | None = None  # an error status's body, a transport error, or what is wrong with the answer


@pytest.fixture(scope="module")
def soak_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with larger random weights (init std 0.3, not 0.1): its greedy answers then differ for each
    marker, model and API family, where at 0.1 many prompts end in the same repeated token and a mix-up of two
    of them would go unseen."""
    config = LlamaConfig(**{**TINY_MODEL_SIZES, "initializer_range": 0.3}, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("soak-llama"))


@pytest.fixture(scope="module")
def soak_server(soak_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("soak")
    # Two adapter slots for three adapters, and a KV cache of 48 blocks (768 tokens) for 24 clients: adapters
    # are loaded and evicted, and requests wait for memory or are preempted, while others generate.
    args = (*register_adapters(soak_model_dir, root, ADAPTERS, first_seed=11), "--served-model-name", MODEL_NAME,
            "--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--max-loras", "2",
            "--num-kv-blocks", "48")
    with serve_process(*args, log=root / "server.log") as server:
        yield server


def request_of(job: Job) -> tuple[str, dict, dict[str, str]]:
    """(path, JSON body, headers) of a greedy request of `job`, whose answer is exactly its max tokens long."""
    max_tokens = LEAVER_MAX_TOKENS if job.leaves else MAX_TOKENS
    path, prompt = job.route.removesuffix(":stream"), prompt_of(job.marker)
    if job.family == "native":
        headers = {} if job.model == MODEL_NAME else {"adapter_id": job.model}
        return path, {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "ignore_eos_token": True}}, headers
    body = {"model": job.model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if job.family == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if job.streamed:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return path, body, {}


async def send(client: httpx.AsyncClient, job: Job) -> Answer:
    """Send `job`; a transport error is an Answer with a problem, never an exception."""
    answer = Answer(job)
    path, body, headers = request_of(job)
    try:
        if job.streamed:
            async with client.stream("POST", path, json=body, headers=headers) as resp:
                answer.status = resp.status_code
                if resp.status_code != 200:
                    await resp.aread()
                    answer.problem = resp.text[:300]
                    return answer
                await read_stream(resp, answer)
        else:
            resp = await client.post(path, json=body, headers=headers)
            answer.status = resp.status_code
            if resp.status_code != 200:
                answer.problem = resp.text[:300]
                return answer
            read_body(resp.json(), resp.headers, answer)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        answer.problem = f"{type(exc).__name__}: {exc}"
    return answer


def read_body(data: dict, headers: httpx.Headers, answer: Answer) -> None:
    if answer.job.family == "native":
        answer.text, answer.num_tokens = data["generated_text"], int(headers["x-generated-tokens"])
        answer.complete = True
        return
    choice = data["choices"][0]
    answer.text = choice["message"]["content"] if answer.job.family == "chat" else choice["text"]
    answer.num_tokens = data["usage"]["completion_tokens"]
    answer.complete = choice["finish_reason"] == "length"


async def read_stream(resp: httpx.Response, answer: Answer) -> None:
    """Read the events (only the first if the client leaves); complete once the stream's end arrived."""
    events, done = [], False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            done = True
            break
        events.append(json.loads(payload))
        if answer.job.leaves:
            return  # leaving the `stream` block closes the connection mid-answer
    if any("error" in event for event in events):
        answer.problem = f"error event: {next(e for e in events if 'error' in e)}"
        return
    if answer.job.family == "native":
        last = events[-1]
        answer.text = last["generated_text"]
        answer.num_tokens = last["details"]["generated_tokens"]
        answer.complete = last["details"]["finish_reason"] == "length"
        if "".join(e["token"]["text"] for e in events) != answer.text:
            answer.problem = f"the streamed tokens do not add up to generated_text {answer.text!r}"
        return
    chunks = [event for event in events if event["choices"]]
    field = "delta" if answer.job.family == "chat" else None
    texts = [c["choices"][0][field].get("content", "") if field else c["choices"][0]["text"] for c in chunks]
    answer.text = "".join(texts)
    answer.num_tokens = events[-1]["usage"]["completion_tokens"]
    answer.complete = done and chunks[-1]["choices"][0]["finish_reason"] == "length"


async def solo_answers(url: str) -> dict[tuple[str, str, str], str]:
    """The right answer of every (model, marker, family), one request at a time."""
    expected = {}
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
        for model in MODELS:
            for marker in MARKERS:
                for route in ("/generate", "/v1/completions", "/v1/chat/completions"):  # one per family
                    answer = await send(client, Job(route, model, marker))
                    assert answer.status == 200 and answer.complete, answer
                    assert answer.num_tokens == MAX_TOKENS, answer
                    expected[answer.job.key] = answer.text
    return expected


async def traffic(url: str, seconds: float) -> list[Answer]:
    """NUM_CLIENTS clients, each sending random jobs one after another until `seconds` have passed."""
    deadline = time.monotonic() + seconds

    async def client_loop(index: int) -> list[Answer]:
        rng, answers = random.Random(index), []
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            while time.monotonic() < deadline:
                leaves = rng.random() < LEAVE_PROBABILITY
                route = rng.choice(STREAMED_ROUTES if leaves else list(ROUTES))
                answers.append(await send(client, Job(route, rng.choice(MODELS), rng.choice(MARKERS), leaves)))
        return answers

    per_client = await asyncio.gather(*(client_loop(i) for i in range(NUM_CLIENTS)))
    return [answer for answers in per_client for answer in answers]


def problems_of(answers: list[Answer], expected: dict[tuple[str, str, str], str]) -> dict[str, list[Answer]]:
    """The answers that break each rule (empty lists when all is well)."""
    stayed = [a for a in answers if not a.job.leaves]
    return {
        "server errors (5xx)": [a for a in answers if a.status is not None and a.status >= 500],
        "other error statuses": [a for a in answers if a.status is not None and a.status != 200 and a.status < 500],
        "transport errors and broken answers": [a for a in stayed if a.status in (200, None) and a.problem],
        "lost (no complete answer)": [a for a in stayed if a.status == 200 and not a.problem and not a.complete],
        "wrong length": [a for a in stayed if a.complete and a.num_tokens != MAX_TOKENS],
        "mixed up (not the solo answer)": [a for a in stayed if a.complete and a.text != expected[a.job.key]],
        "leavers that got an error": [a for a in answers if a.job.leaves and a.problem is not None],
    }


def assert_no_problems(answers: list[Answer], expected: dict[tuple[str, str, str], str], phase: str) -> None:
    problems = {rule: found for rule, found in problems_of(answers, expected).items() if found}
    report = "\n".join(f"{rule}: {len(found)} of {len(answers)}, e.g. {found[:3]}" for rule, found in problems.items())
    assert not problems, f"{phase}:\n{report}"


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def sample(text: str, name: str) -> float:
    """The sum of a metric's samples (all label sets); 0 when it has none."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def wait_until_idle(url: str, timeout: float = 60.0) -> str:
    """Poll /metrics until no request runs or waits; returns that /metrics text."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(url)
        if sample(text, "lorax_num_requests_running") == sample(text, "lorax_num_requests_waiting") == 0:
            return text
        assert time.monotonic() < deadline, f"not idle after {timeout:.0f} s:\n{text}"
        time.sleep(0.2)


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE).group(1))


@pytest.mark.timeout(int(WARMUP_SECONDS + SOAK_SECONDS) + 600)  # a long LORAX_SOAK_SECONDS is not cut off
def test_soak_every_answer_arrives_whole_and_right_and_the_server_ends_idle_with_flat_memory(
    soak_server: ServerProcess,
):
    url = soak_server.url
    expected = asyncio.run(solo_answers(url))
    # A completion and a native request of one prompt share their answer; all else must differ to be told apart.
    answers_of = {f: [text for (_, _, family), text in expected.items() if family == f] for f in ROUTE_FAMILIES}
    for texts in (answers_of["native"] + answers_of["chat"], answers_of["completions"]):
        assert len(set(texts)) == len(texts), f"two prompts share an answer, a mix-up could go unseen: {expected}"

    warmup = asyncio.run(traffic(url, WARMUP_SECONDS))
    assert_no_problems(warmup, expected, "warm-up")
    wait_until_idle(url)
    rss_warm = rss_kb(soak_server.pid)

    soak = asyncio.run(traffic(url, SOAK_SECONDS))
    assert_no_problems(soak, expected, "soak")
    idle = wait_until_idle(url)
    rss_end = rss_kb(soak_server.pid)

    assert sample(idle, "lorax_kv_blocks_used") == 0, idle
    num_leavers = sum(a.job.leaves for a in warmup + soak)
    aborted = sum(float(v) for v in re.findall(r'^lorax_requests_total{[^}]*outcome="aborted"[^}]*} (\S+)$', idle,
                                                re.MULTILINE))
    assert num_leavers > 0 and aborted > 0, (num_leavers, aborted)
    mean_batch = sample(idle, "lorax_batch_size_sum") / sample(idle, "lorax_batch_size_count")
    assert mean_batch > 1, "the clients' requests never shared a batch"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert soak_server.proc.poll() is None, soak_server.log_tail()
    print(f"soak: {len(warmup)} warm-up + {len(soak)} soak requests ({num_leavers} left mid-stream, {aborted:.0f} "
          f"aborted); mean batch {mean_batch:.1f}, {sample(idle, 'lorax_preemptions_total'):.0f} preemptions, "
          f"{sample(idle, 'lorax_adapter_evictions_total'):.0f} adapter evictions; "
          f"RSS {rss_warm // 1024} MB after warm-up, {rss_end // 1024} MB after the soak")
    assert rss_end <= rss_warm * RSS_GROWTH_FACTOR + RSS_SLACK_KB, (rss_warm, rss_end)


def test_a_request_that_breaks_the_sampler_fails_alone(soak_server: ServerProcess):
    url, num_neighbours = soak_server.url, 4
    neighbour = {"inputs": prompt_of(MARKERS[0]), "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    poison = {"model": MODEL_NAME, "prompt": prompt_of(MARKERS[1]), "max_tokens": 4, "temperature": 1e-300}

    async def neighbour_stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[dict]:
        async with client.stream("POST", "/generate_stream", json=neighbour) as resp:
            events = []
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[len("data:"):]))
                    started.set()
            return events

    async def scenario() -> tuple[httpx.Response, list[list[dict]]]:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            started = [asyncio.Event() for _ in range(num_neighbours)]
            streams = [asyncio.ensure_future(neighbour_stream(client, event)) for event in started]
            await asyncio.gather(*(event.wait() for event in started))  # every neighbour is generating
            bad = await client.post("/v1/completions", json=poison)
            return bad, await asyncio.gather(*streams)

    bad, streams = asyncio.run(scenario())  # the bad request itself may fail (ideally with a 4xx)
    for events in streams:
        last = events[-1]
        assert "error" not in last and last["details"]["generated_tokens"] == 200, last
