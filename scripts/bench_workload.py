"""Benchmark many adapters under open-loop Poisson load (S-LoRA style); writes its section of docs/benchmarks.md.

Every point of the sweep sends one request trace to lorax-lite and to PEFT with static batching:

- n random rank-8 PEFT adapters on all seven projections, n in (16, 128). Popularity is a power
  law: adapter index = floor(n * X), X = U^(1/alpha), U uniform on [0, 1). alpha 1 is uniform; the
  skewed alpha 0.3 (half of the requests go to the first 10% of the adapters) is swept at the
  largest n only, to keep the run short.
- Poisson arrivals at R req/s during a fixed window (`--duration`): exactly R x duration requests,
  at independent uniform times in the window (a Poisson process given its count). A prompt is a
  slice of a fixed text (8-64 tokens); a request asks for 8-32 greedy tokens with `ignore_eos`. One
  seed draws every request once: a point at rate R is the first R x duration of them, so points
  differ only in R, n and alpha, never in their random draws.
- lorax-lite: `AsyncLLM` with fewer device slots (`max_loras`) than the largest n and a bounded
  host cache (`max_cpu_loras`), so adapters move disk -> host -> slot while it serves. Each request
  is submitted at its arrival time and streamed: TTFT = first streamed token - arrival, latency =
  last token - arrival. The adapter cache's counters are read before and after each point. Each
  n starts with its first `max_cpu_loras` adapters in host memory, as on a server already running.
- PEFT: one `PeftModel`; before each point, the adapters its requests use that it does not hold yet
  are loaded with `load_adapter`, untimed (PEFT's loads get slower with every adapter it holds:
  all 128 took 6.5 minutes here, so it holds only what it serves). Batches form in arrival order: a batch starts when
  the previous one ends and takes every request that has arrived, up to `max_batch`; it runs as one
  left-padded greedy `generate(adapter_names=...)` for its longest request's token count. TTFT =
  the batch's first token (timed by a streamer) - arrival; latency = batch end - arrival (static
  batching answers the batch as a whole). PEFT's sweep stops after the first rate at which fewer
  than half of its requests meet the TTFT SLO: it is past capacity, and higher rates would only
  add minutes of queueing.

The two systems alternate point by point. `--repeats` is not used (one run per point).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_engine import CONTEXT, QUESTIONS, _loadavg, environment, greedy, timed, write
from bench_lora import adapter_name, make_adapters
from bench_report import (command_line, figure_name, figure_path, parse_bench_args, pyplot, repo_path, run_table,
                          save_figure, section_name, write_section)
from peft import PeftModel
from peft import __version__ as PEFT_VERSION
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from lorax_lite import AsyncLLM, OutputKind

JSON_NAME = "benchmarks_workload"
PLOT_NAME = "workload_ttft_p99.png"  # written to img/ beside the markdown report
SYSTEMS = {"lorax": "lorax-lite", "peft": "PEFT static batching"}


@dataclass
class OpenLoopWorkload:
    """The sweep and the serving settings; `quick()` is a smoke run, `for_device` picks rates and SLO."""

    num_adapters: tuple[int, ...] = (16, 128)  # 2x the device slots; 16x the slots and 2x the host cache
    skewed_alphas: tuple[float, ...] = (0.3,)  # swept at the largest n only
    rates: tuple[float, ...] = (1.0, 2.0, 4.0)  # req/s: capacity on 2 CPU cores is ~3
    duration: float = 6.0  # seconds of arrivals per point
    input_tokens: tuple[int, int] = (8, 64)  # uniform, inclusive
    output_tokens: tuple[int, int] = (8, 32)
    slo_ttft: float = 2.0  # seconds
    seed: int = 0
    rank: int = 8
    lora_alpha: float = 16
    max_loras: int = 8  # device slots (the engine's default): fewer than every n, so adapters swap
    max_cpu_loras: int = 64  # host cache (the server's default): fewer than n = 128, so adapters load from disk
    max_batch: int = 32  # lorax-lite max_num_seqs and the PEFT batch size
    baseline_min_slo: float = 0.5  # PEFT's sweep stops after a rate with a lower SLO attainment

    def __post_init__(self) -> None:
        if not self.num_adapters or min(self.num_adapters) < 1:
            raise ValueError(f"num_adapters must be counts >= 1, got {self.num_adapters}")
        if not self.rates or min(self.rates) <= 0 or self.duration <= 0 or self.slo_ttft <= 0:
            raise ValueError("rates, duration and slo_ttft must be > 0")
        if self.num_requests(min(self.rates)) < 1:
            raise ValueError(f"{min(self.rates):g} req/s x {self.duration:g} s is no request: "
                             "raise the rate or the duration")
        if any(a <= 0 for a in self.skewed_alphas):
            raise ValueError(f"alphas must be > 0, got {self.skewed_alphas}")
        for name in ("input_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {(low, high)}")
        if not 1 <= self.max_loras <= self.max_cpu_loras:
            raise ValueError(f"need 1 <= max_loras ({self.max_loras}) <= max_cpu_loras ({self.max_cpu_loras})")

    @classmethod
    def quick(cls) -> "OpenLoopWorkload":
        return cls(num_adapters=(4,), rates=(4.0, 12.0), duration=1.0, max_loras=2, max_cpu_loras=3, max_batch=8)

    @classmethod
    def for_device(cls, device: torch.device) -> "OpenLoopWorkload":
        """CPU defaults go from light load to overload on 2 cores; CUDA ones are scaled guesses."""
        return cls() if device.type == "cpu" else cls(rates=(4.0, 8.0, 16.0, 32.0, 64.0), slo_ttft=0.5)

    def num_requests(self, rate: float) -> int:
        return round(rate * self.duration)

    def series(self) -> list[tuple[int, float]]:
        """(n, alpha) of each rate sweep: uniform popularity at every n, then the skewed alphas at the largest n."""
        top = max(self.num_adapters)
        return [(n, 1.0) for n in self.num_adapters] + [(top, a) for a in self.skewed_alphas]


# ---------------------------------------------------------------- the trace


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the start of the point
    adapter_id: str
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class RequestDraws:
    """Seeded random draws for requests 0, 1, 2, ...; the trace at rate R is made of the first R x duration.

    Given its count, a Poisson process's arrival times are independent and uniform over the window, so
    each request draws its time as a uniform fraction of the window: every point has exactly R x duration
    requests, Poisson-distributed in time, and a faster point adds requests to a slower one's.
    """

    times: np.ndarray  # uniform [0, 1): arrival as a fraction of the window
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    offsets: np.ndarray  # uniform [0, 1): where in the text the prompt starts
    popularity: np.ndarray  # uniform [0, 1): U of the power law

    @classmethod
    def draw(cls, w: OpenLoopWorkload) -> "RequestDraws":
        size = w.num_requests(max(w.rates))
        # one generator per field: the first k draws are the same whatever `size`, so a seed gives the
        # same requests at a rate whatever the other rates swept
        streams = np.random.SeedSequence(w.seed).spawn(5)
        times, inputs, outputs, offsets, popularity = map(np.random.default_rng, streams)
        return cls(times=times.random(size), input_tokens=inputs.integers(*w.input_tokens, size, endpoint=True),
                   output_tokens=outputs.integers(*w.output_tokens, size, endpoint=True),
                   offsets=offsets.random(size), popularity=popularity.random(size))

    def trace(self, w: OpenLoopWorkload, rate: float, n: int, alpha: float, text_ids: list[int]) -> list[TraceRequest]:
        """The requests of one point, in arrival order."""
        count = w.num_requests(rate)
        return [self._request(int(i), w.duration, n, alpha, text_ids)
                for i in np.argsort(self.times[:count], kind="stable")]

    def _request(self, i: int, duration: float, n: int, alpha: float, text_ids: list[int]) -> TraceRequest:
        length = int(self.input_tokens[i])
        start = int(self.offsets[i] * (len(text_ids) - length + 1))
        adapter = min(int(n * self.popularity[i] ** (1 / alpha)), n - 1)  # X = U^(1/alpha) ~ Power(alpha)
        return TraceRequest(float(self.times[i] * duration), adapter_name(adapter), text_ids[start:start + length],
                            int(self.output_tokens[i]))


def prompt_text_ids(tok: PreTrainedTokenizerBase, max_tokens: int) -> list[int]:
    """The fixed text prompts are cut from: the engine benchmark's sentences, repeated until long enough."""
    text = " ".join(CONTEXT + QUESTIONS)
    ids = tok(text, add_special_tokens=False).input_ids
    return ids * (2 * max_tokens // len(ids) + 1) if len(ids) < 2 * max_tokens else ids


# ---------------------------------------------------------------- per-request results


@dataclass(frozen=True)
class RequestResult:
    arrival: float
    ttft: float  # seconds from arrival to the first token
    latency: float  # seconds from arrival to the last token (PEFT: the end of its batch)
    num_tokens: int
    max_tokens: int
    adapter_id: str

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.num_tokens - 1) if self.num_tokens > 1 else None


def summarize(results: list[RequestResult], slo_ttft: float) -> dict[str, Any]:
    """The point's figures; throughput is over the makespan, from the start of the arrival window to the last answer."""
    ttft, latency = np.array([r.ttft for r in results]), np.array([r.latency for r in results])
    tpot = [r.tpot for r in results if r.tpot is not None]
    makespan = max(r.arrival + r.latency for r in results)
    return {
        "num_requests": len(results), "completed": sum(r.num_tokens == r.max_tokens for r in results),
        "makespan_s": makespan, "req_s": len(results) / makespan,
        "tok_s": sum(r.num_tokens for r in results) / makespan,
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
        "latency_p50": float(np.percentile(latency, 50)), "latency_p99": float(np.percentile(latency, 99)),
        "tpot_mean": float(np.mean(tpot)) if tpot else None,
        "slo_attainment": float(np.mean(ttft <= slo_ttft)),
        "requests": [[round(r.arrival, 4), round(r.ttft, 4), round(r.latency, 4), r.num_tokens, r.adapter_id]
                     for r in results],
    }


# ---------------------------------------------------------------- lorax-lite


def engine_counters(llm: AsyncLLM) -> dict[str, int]:
    """The adapter cache's and the engine's counters (read between points, while the engine is idle)."""
    snap = llm.snapshot()
    cache, stats = snap.adapter_cache.stats, snap.stats
    return {"disk_loads": cache.misses, "slot_loads": cache.host_hits, "slot_evictions": cache.evictions,
            "host_evictions": cache.host_evictions, "steps": stats.steps, "batch_size_sum": stats.batch_size_sum,
            "preemptions": snap.num_preemptions}


async def _serve(llm: AsyncLLM, req: TraceRequest, start: float) -> RequestResult:
    await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
    first, out = None, None
    outputs = llm.generate(req.prompt_token_ids, greedy(req.max_tokens), adapter_id=req.adapter_id,
                           output_kind=OutputKind.DELTA)  # as the server streams
    async for out in outputs:
        if first is None and out.token_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    if out is None or out.finish_reason != "length" or first is None:
        raise RuntimeError(f"engine request failed: {None if out is None else (out.finish_reason, out.error)}")
    arrived = start + req.arrival
    return RequestResult(req.arrival, first - arrived, end - arrived, out.num_generated_tokens, req.max_tokens,
                         req.adapter_id)


async def _serve_trace(llm: AsyncLLM, trace: list[TraceRequest]) -> list[RequestResult]:
    start = time.perf_counter()
    return list(await asyncio.gather(*(_serve(llm, req, start) for req in trace)))


def engine_point(llm: AsyncLLM, trace: list[TraceRequest], slo_ttft: float) -> dict[str, Any]:
    before = engine_counters(llm)
    results = asyncio.run(_serve_trace(llm, trace))
    delta = {k: v - before[k] for k, v in engine_counters(llm).items()}
    steps, seqs = delta.pop("steps"), delta.pop("batch_size_sum")
    return summarize(results, slo_ttft) | delta | {"mean_batch_size": seqs / steps if steps else 0.0}


def prime_host_cache(llm: AsyncLLM, n: int, w: OpenLoopWorkload, text_ids: list[int]) -> None:
    """One 1-token request for each of the first min(n, host cache) adapters: they start in host memory."""
    trace = [TraceRequest(0.0, adapter_name(i), text_ids[:8], 1) for i in range(min(n, w.max_cpu_loras))]
    asyncio.run(_serve_trace(llm, trace))


# ---------------------------------------------------------------- PEFT static batching


class FirstTokenClock(BaseStreamer):
    """Notes when `generate` has its first new tokens: its first `put` is the prompt, the second the first tokens."""

    def __init__(self) -> None:
        self.num_puts, self.first_token_at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def peft_batch(peft: PeftModel, tok: PreTrainedTokenizerBase, batch: list[TraceRequest]) -> tuple[float, float]:
    """One static batch, text out like the engine; returns perf_counter times of its first token and its end."""
    enc = tok.pad({"input_ids": [r.prompt_token_ids for r in batch]}, padding_side="left", return_tensors="pt")
    enc = enc.to(peft.device)
    steps, clock = max(r.max_tokens for r in batch), FirstTokenClock()
    with torch.inference_mode():
        out = peft.generate(**enc, adapter_names=[r.adapter_id for r in batch], max_new_tokens=steps,
                            min_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id, streamer=clock)
    new = out[:, enc.input_ids.shape[1]:].tolist()
    if len(new[0]) != steps:
        raise RuntimeError(f"PEFT generated {len(new[0])} tokens, not {steps}")
    tok.batch_decode([row[:r.max_tokens] for row, r in zip(new, batch)], skip_special_tokens=True)
    return clock.first_token_at, time.perf_counter()


def _static_batches(peft: PeftModel, tok: PreTrainedTokenizerBase, trace: list[TraceRequest],
                    max_batch: int) -> list[RequestResult]:
    start, waiting, results = time.perf_counter(), deque(trace), []
    while waiting:
        now = time.perf_counter() - start
        if waiting[0].arrival > now:
            time.sleep(waiting[0].arrival - now)
            continue
        batch = []
        while waiting and len(batch) < max_batch and waiting[0].arrival <= now:
            batch.append(waiting.popleft())
        first, end = peft_batch(peft, tok, batch)
        results += [RequestResult(r.arrival, first - start - r.arrival, end - start - r.arrival, r.max_tokens,
                                  r.max_tokens, r.adapter_id) for r in batch]
    return results


def peft_point(peft: PeftModel, tok: PreTrainedTokenizerBase, trace: list[TraceRequest],
               w: OpenLoopWorkload) -> dict[str, Any]:
    return summarize(_static_batches(peft, tok, trace, w.max_batch), w.slo_ttft)


def load_peft(base: PreTrainedModel, first: Path, device: torch.device) -> PeftModel:
    """`base` as a PeftModel holding the first adapter; `ensure_peft_adapters` adds the others when needed."""
    return PeftModel.from_pretrained(base.to(device).eval(), first, adapter_name=adapter_name(0)).eval()


def ensure_peft_adapters(peft: PeftModel, trace: list[TraceRequest], adapter_dir: Path) -> int:
    """Load (untimed) the adapters of `trace` that `peft` does not hold yet; returns how many it holds."""
    for adapter_id in sorted({r.adapter_id for r in trace} - set(peft.peft_config)):
        peft.load_adapter(adapter_dir / adapter_id, adapter_name=adapter_id, low_cpu_mem_usage=True)
    peft.eval()
    return len(peft.peft_config)


# ---------------------------------------------------------------- the sweep


def run_sweep(llm: AsyncLLM, peft: PeftModel, tok: PreTrainedTokenizerBase, w: OpenLoopWorkload,
              adapter_dir: Path) -> list[dict[str, Any]]:
    """Every (n, alpha) series over the rates, lorax-lite then PEFT at each point."""
    draws, text_ids = RequestDraws.draw(w), prompt_text_ids(tok, w.input_tokens[1])
    points = []
    for n, alpha in w.series():
        prime_host_cache(llm, n, w, text_ids)
        peft_on = True
        for rate in w.rates:
            trace = draws.trace(w, rate, n, alpha, text_ids)
            key = {"num_adapters": n, "alpha": alpha, "rate": rate}
            points.append({"system": "lorax", **key, **engine_point(llm, trace, w.slo_ttft)})
            if peft_on:
                held = ensure_peft_adapters(peft, trace, adapter_dir)
                points.append({"system": "peft", **key, **peft_point(peft, tok, trace, w), "peft_adapters_held": held})
                peft_on = points[-1]["slo_attainment"] >= w.baseline_min_slo
            _print_point(points, peft_on, key)
    return points


def _print_point(points: list[dict[str, Any]], peft_on: bool, key: dict[str, Any]) -> None:
    here = [p for p in points if all(p[k] == v for k, v in key.items())]
    figures = ", ".join(f"{p['system']} TTFT p99 {p['ttft_p99']:.2f}s SLO {p['slo_attainment']:.0%}" for p in here)
    stop = "" if peft_on or len(here) < 2 else " (PEFT past capacity: its sweep stops here)"
    print(f"  n={key['num_adapters']} alpha={key['alpha']:g} R={key['rate']:g}: {len(here[0]['requests'])} requests, "
          f"{figures}{stop}", flush=True)


def add_adapters(llm: AsyncLLM, paths: list[Path]) -> None:
    for i, path in enumerate(paths):
        llm.add_adapter(adapter_name(i), path)


def warm_up(llm: AsyncLLM, peft: PeftModel, tok: PreTrainedTokenizerBase) -> None:
    text_ids = prompt_text_ids(tok, 16)
    trace = [TraceRequest(0.0, adapter_name(0), text_ids[:16], 4)] * 2
    asyncio.run(_serve_trace(llm, trace))
    peft_batch(peft, tok, trace)


def run_all(model_dir: str, w: OpenLoopWorkload, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Make the adapters, load both systems, run the sweep; set-up seconds are kept apart, PEFT's load among them."""
    top, setup = max(w.num_adapters), {}
    print(f"making {top} random rank-{w.rank} adapters; lorax-lite registers them all, PEFT loads those each point needs", flush=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    setup["make_adapters_s"], paths = timed(lambda: make_adapters(base, top, w.rank, w.lora_alpha, workdir))
    setup["peft_load_s"], peft = timed(lambda: load_peft(base, paths[0], device))
    engine_config = {"dtype": "float32", "device": str(device), "max_loras": w.max_loras, "max_lora_rank": w.rank,
                     "max_cpu_loras": w.max_cpu_loras, "max_num_seqs": w.max_batch, "max_num_batched_tokens": 512}
    setup["engine_start_s"], llm = timed(lambda: AsyncLLM(model_dir, **engine_config))
    try:
        setup["engine_add_adapters_s"], _ = timed(lambda: add_adapters(llm, paths))
        warm_up(llm, peft, tok)
        print(f"sweep: {len(w.series())} series x {len(w.rates)} rates, {w.duration:g} s of arrivals each", flush=True)
        sweep_seconds, points = timed(lambda: run_sweep(llm, peft, tok, w, workdir))
        backend = type(llm.engine.lora_layers.backend).__name__
    finally:
        llm.shutdown()
    size_mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 2**20
    return {"engine_config": engine_config, "backend": backend, "adapter_size_mb": size_mb, "setup": setup,
            "sweep_seconds": sweep_seconds, "points": points}


# ---------------------------------------------------------------- report


def series_points(points: list[dict[str, Any]], system: str, n: int, alpha: float) -> list[dict[str, Any]]:
    """One system's points of one (n, alpha) series, in rate order."""
    return [p for p in points if (p["system"], p["num_adapters"], p["alpha"]) == (system, n, alpha)]


def capacity(points: list[dict[str, Any]], system: str, n: int, alpha: float, share: float = 0.9) -> float | None:
    """The highest rate at which at least `share` of the requests met the TTFT SLO (None: no such rate)."""
    return max((p["rate"] for p in series_points(points, system, n, alpha) if p["slo_attainment"] >= share),
               default=None)


def plot_ttft_p99(res: dict[str, Any]) -> Any:
    """TTFT p99 against the arrival rate: one colour per (n, alpha), solid lorax-lite, dashed PEFT."""
    w, points = res["workload"], res["points"]
    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    for i, (n, alpha) in enumerate(res["series"]):
        series = f"n={n}" + ("" if alpha == 1 else f", α={alpha:g}")
        for system, style in (("lorax", "-"), ("peft", "--")):
            xy = [(p["rate"], p["ttft_p99"]) for p in series_points(points, system, n, alpha)]
            if xy:
                ax.plot(*zip(*xy), style, marker="o", color=f"C{i}", label=f"{SYSTEMS[system]}, {series}")
    ax.axhline(w["slo_ttft"], color="gray", linestyle=":", label=f"SLO {w['slo_ttft']:g} s")
    ax.set(xscale="log", yscale="log", xlabel="arrival rate (requests/s)", ylabel="TTFT p99 (s)",
           title=f"TTFT p99 vs arrival rate: {Path(res['env']['model']).name}, {res['env']['device']}")
    ax.set_xticks(w["rates"], [f"{r:g}" for r in w["rates"]], minor=False)
    ax.set_xticks([], minor=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def render(res: dict[str, Any]) -> str:
    tables = [_series_md(res, n, alpha) for n, alpha in res["series"]]
    return "\n".join([_header(res), _workload_md(res), _summary_md(res), *tables, _reading_md(res)])


def _header(res: dict[str, Any]) -> str:
    env, st = res["env"], res["setup"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    return f"""## Many adapters under open-loop load: lorax-lite vs PEFT static batching
{quick}
Generated by `scripts/bench_workload.py`, in the style of the S-LoRA paper's synthetic workload.

{run_table(env, software_note=f", peft {res['peft_version']}")}| Command | {env['command']} |
| Run | one run per point; whole run {res['total_seconds']:.0f} s, the sweep {res['sweep_seconds']:.0f} s |
| Set-up, {max(res['workload']['num_adapters'])} adapters | making them {st['make_adapters_s']:.0f} s; PEFT model with one adapter {st['peft_load_s']:.1f} s; \
lorax-lite start {st['engine_start_s']:.1f} s, `add_adapter` of all {st['engine_add_adapters_s']:.1f} s |

Raw numbers, with every request's arrival, TTFT and latency: `{res['json_path']}`.
"""


def _workload_md(res: dict[str, Any]) -> str:
    w, e = res["workload"], res["engine_config"]
    top = max(w["num_adapters"])
    held = max((p["peft_adapters_held"] for p in res["points"] if p["system"] == "peft"), default=0)
    shares = ", ".join(f"α = {a:g} sends {0.1 ** a:.0%} of the requests to the first 10% of the adapters"
                       for a in w["skewed_alphas"])  # P(X < 0.1) = 0.1^α
    skew_line = f"; {shares}, at n = {top} only" if shares else ""
    config = ", ".join(f"{k}={json.dumps(v)}" for k, v in e.items())
    return f"""
Workload (seed {w['seed']}):

- **Adapters**: n = {', '.join(map(str, w['num_adapters']))} random rank-{w['rank']} PEFT adapters (alpha {w['lora_alpha']:g}) on
  q/k/v/o/gate/up/down, {res['adapter_size_mb']:.1f} MB each on disk.
- **Popularity**: adapter index = ⌊n·X⌋ with X = U^(1/α), U uniform on [0, 1): α = 1 (uniform) at every
  n{skew_line}.
- **Arrivals**: Poisson at R = {', '.join(f'{r:g}' for r in w['rates'])} req/s during {w['duration']:g} s per point: exactly
  R × {w['duration']:g} requests at independent uniform times in the window (a Poisson process given its count). Every
  request is drawn once from the seed; a point at rate R takes the first R × {w['duration']:g}, so points differ only in R, n and α.
- **Requests**: the prompt is a slice of a fixed English text (the engine benchmark's sentences),
  {w['input_tokens'][0]}–{w['input_tokens'][1]} tokens uniform; {w['output_tokens'][0]}–{w['output_tokens'][1]} greedy output tokens uniform, `ignore_eos`.
- **SLO**: TTFT ≤ {w['slo_ttft']:g} s; "SLO" below is the share of requests that met it.
- **lorax-lite**: `AsyncLLM(model, {config})`, LoRA backend `{res['backend']}`:
  {w['max_loras']} device slots and a host cache of {w['max_cpu_loras']} adapters, so adapters are copied host → slot when
  n > {w['max_loras']} and read from disk when n > {w['max_cpu_loras']}. Every request is submitted at its arrival time and
  streamed. Each n starts with its first min(n, {w['max_cpu_loras']}) adapters in host memory; cache counters are per point.
- **PEFT static batching**: one `PeftModel`; before each point the adapters its requests use are loaded with
  `load_adapter` if it does not hold them yet, untimed (it ends holding {held} adapters; PEFT's loads slow down as it
  holds more: all 128 took 395 s in a trial run, so it only holds what it serves, which favours it). A batch starts when the previous one ends and takes
  every request that has arrived (arrival order, at most {w['max_batch']}); it runs as one left-padded greedy
  `generate(adapter_names=…)` for its longest request's token count (`min_new_tokens` = `max_new_tokens`). Its sweep
  stops after the first rate at which less than {w['baseline_min_slo']:.0%} of its requests meet the SLO (past capacity).
- **Figures**: TTFT = first token − arrival (lorax-lite: the first streamed token; PEFT: the batch's first token,
  timed by a `generate` streamer, so its prefill included); latency = last token − arrival (PEFT: the batch's end,
  when static batching answers); TPOT = (latency − TTFT) / (tokens − 1), mean over requests; throughput = generated
  tokens (requests) / makespan, from the start of the arrival window to the last answer, so it equals the offered load
  until the system saturates.
"""


def _summary_md(res: dict[str, Any]) -> str:
    rows = []
    for n, alpha in res["series"]:
        cap = {s: capacity(res["points"], s, n, alpha) for s in SYSTEMS}
        ratio = f"{cap['lorax'] / cap['peft']:.3g}×" if cap["lorax"] and cap["peft"] else "–"
        lowest = min(res["workload"]["rates"])
        rows.append(f"| {n} | {alpha:g} | {_rate(cap['lorax'], lowest)} | {_rate(cap['peft'], lowest)} | {ratio} |")
    return f"""
Highest arrival rate at which ≥ 90% of the requests met the SLO (among the rates swept):

| n | α | lorax-lite (req/s) | PEFT static batching (req/s) | ratio |
|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

![TTFT p99 vs arrival rate](img/{Path(res['plot_path']).name})
"""


def _rate(rate: float | None, lowest: float) -> str:
    return f"below {lowest:g}" if rate is None else f"{rate:g}"


def _series_md(res: dict[str, Any], n: int, alpha: float) -> str:
    w = res["workload"]
    rows = []
    for rate in w["rates"]:
        here = {p["system"]: p for p in res["points"] if (p["num_adapters"], p["alpha"], p["rate"]) == (n, alpha, rate)}
        not_run = f"| {rate:g} | PEFT | not run: past capacity at a lower rate |" + " |" * 12
        rows += [_point_row(rate, here["lorax"]), _point_row(rate, here["peft"]) if "peft" in here else not_run]
    title = f"n = {n}" + (" (uniform)" if alpha == 1 else f", α = {alpha:g}")
    return f"""
### {title}

| R (req/s) | system | requests done | req/s | tok/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) | latency p99 (s) | TPOT (ms) | SLO | mean batch | slot loads | disk loads | slot evictions |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


def _point_row(rate: float, p: dict[str, Any]) -> str:
    tpot = "–" if p["tpot_mean"] is None else f"{1000 * p['tpot_mean']:.0f}"
    cells = [f"{rate:g}", "lorax-lite" if p["system"] == "lorax" else "PEFT", f"{p['completed']}/{p['num_requests']}",
             f"{p['req_s']:.2f}", f"{p['tok_s']:.1f}", f"{p['ttft_p50']:.2f}", f"{p['ttft_p99']:.2f}",
             f"{p['latency_p50']:.2f}", f"{p['latency_p99']:.2f}", tpot, f"{p['slo_attainment']:.0%}"]
    if p["system"] == "lorax":
        cells += [f"{p['mean_batch_size']:.1f}", str(p["slot_loads"]), str(p["disk_loads"]), str(p["slot_evictions"])]
    else:
        cells += ["–"] * 4
    return "| " + " | ".join(cells) + " |"


def _reading_md(res: dict[str, Any]) -> str:
    w = res["workload"]
    top = max(w["num_adapters"])
    loads = "; ".join(_load_counts(series_points(res["points"], "lorax", n, alpha), alpha)
                      for n, alpha in res["series"] if n == top)
    return f"""
### Reading

- **Continuous batching vs static batching.** lorax-lite admits an arriving request at the next step, so its
  TTFT is its queueing plus its own prefill; under PEFT's static batching a request that arrives while a batch
  runs waits for that whole batch (up to {w['output_tokens'][1]} tokens of decoding), and every row of a batch decodes
  for its longest request, so short requests pay for long ones and capacity goes to padding.
- **Adapters.** lorax-lite adds the deltas of all the adapters in a batch with batched matmuls over its
  {w['max_loras']} slots; it reads adapters from disk on a background thread and copies one from host memory into a
  slot when a request for it is admitted (at n = {top}, all rates: {loads}). PEFT loops over the distinct adapters
  of a batch in every layer, so its steps slow down as a batch holds more of them. A lorax-lite batch holds at most
  {w['max_loras']} distinct adapters (`max_loras`): with uniform popularity over many more adapters than slots,
  requests for other adapters wait for a slot, which caps its batch size ("mean batch").
- **Overload.** Past capacity the queue grows for the whole arrival window, so TTFT p99 there measures the
  window's length ({w['duration']:g} s) as much as the system; compare where the curves cross the SLO line.
"""



def _load_counts(points: list[dict[str, Any]], alpha: float) -> str:
    total = {k: sum(p[k] for p in points) for k in ("num_requests", "slot_loads", "disk_loads")}
    return (f"α = {alpha:g}: {total['num_requests']} requests, slot loads {total['slot_loads']}, "
            f"disk loads {total['disk_loads']}")


# ---------------------------------------------------------------- main


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-adapters", type=int, nargs="+", help="adapter counts n (default 16 128)")
    p.add_argument("--skewed-alphas", type=float, nargs="*",
                   help="power-law alphas swept at the largest n besides alpha 1 (default 0.3; none: leave it out)")
    p.add_argument("--rates", type=float, nargs="+",
                   help="arrival rates in req/s (default 1 2 4 on CPU, 4 8 16 32 64 on CUDA)")
    p.add_argument("--duration", type=float, help="seconds of arrivals per point (default 6)")
    p.add_argument("--slo-ttft", type=float, help="TTFT bound in seconds (default 2 on CPU, 0.5 on CUDA)")
    p.add_argument("--max-loras", type=int, help="lorax-lite device slots (default 8)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_bench_args(__doc__.splitlines()[0], JSON_NAME, argv, extra=add_options)


def workload_from(args: argparse.Namespace, device: torch.device) -> OpenLoopWorkload:
    w = OpenLoopWorkload.quick() if args.quick else OpenLoopWorkload.for_device(device)
    given = {"num_adapters": args.num_adapters, "skewed_alphas": args.skewed_alphas, "rates": args.rates,
             "duration": args.duration, "slo_ttft": args.slo_ttft, "max_loras": args.max_loras}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    return replace(w, **overrides)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device
    try:
        w = workload_from(args, device)
    except ValueError as exc:  # bad options: say which, exit 2 like argparse
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_workload.py", argv), device)
    with tempfile.TemporaryDirectory(prefix="lorax-bench-workload-") as workdir:
        res = run_all(args.model, w, device, Path(workdir))
    plot_path = figure_path(repo_path(args.output), figure_name(PLOT_NAME, device))
    res.update(workload=asdict(w), series=w.series(), env=env | {"loadavg_end": _loadavg()}, quick=args.quick,
               json_path=args.json, plot_path=str(plot_path), peft_version=PEFT_VERSION,
               total_seconds=time.perf_counter() - start)
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    save_figure(plot_ttft_p99(res), plot_path)
    write_section(repo_path(args.output), section_name("workload", device), render(res))
    print(f"wrote {args.output}, {args.json} and {plot_path} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
