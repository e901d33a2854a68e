"""Benchmark multi-LoRA serving against the base model and PEFT; writes its section of docs/benchmarks.md.

All in one run, on one model (fp32), with random rank-8 PEFT adapters on all seven projections:

1. Adapters per batch: 64 prompts built like the engine benchmark's (10-60 tokens) x 24 greedy
   tokens (`ignore_eos`) as one `LLM.generate` call, with 1, 2, 8, 32 and 64 distinct adapters (request i uses adapter i mod n),
   against the same engine on the base model alone; against PEFT `generate(adapter_names=...)`
   on the same batch (left-padded); and against PEFT one request at a time with `set_adapter`
   (on the first `--sequential` requests: it is slow). Engine runs alternate with each other for
   `--repeats` rounds; medians are reported. The engine's tokens for the sequential requests are
   checked against PEFT's. Plot: docs/img/lora_adapters_per_batch.png.
2. Adapter load latency: disk -> ready in a device slot (read + validate + copy), host memory ->
   slot, against PEFT `load_adapter` into a PeftModel, per adapter, median over the adapters.
3. Adapter cold start, request to first token: an adapter registered (admin API, SQLite registry,
   store) but never requested, so the engine resolves, reads, verifies and loads it; the same
   adapter again from host memory (evicted from its slot) and hot (in a slot); the base model; and
   PEFT `load_adapter` + `set_adapter` + the first token against PEFT with the adapter loaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_engine import Workload, _loadavg, build_prompts, environment, greedy, verdict, write
from bench_report import (command_line, figure_name, figure_path, median, parse_bench_args, pyplot, repo_path, save_figure,
                          section_name, sync, write_section)
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lorax_lite import LLM
from lorax_lite.lora.synthetic import make_random_adapters


@dataclass
class LoRAWorkload:
    num_prompts: int = 64
    max_tokens: int = 24
    min_prompt_tokens: int = 10
    max_prompt_tokens: int = 60  # decode-heavy, like chat turns; also keeps PEFT's left-padded batch short
    num_adapters: tuple[int, ...] = (1, 2, 8, 32, 64)
    rank: int = 8
    alpha: float = 16
    repeats: int = 2
    peft_repeats: int = 1  # PEFT batched runs once per adapter count (it is slow)
    sequential: int = 4
    load_samples: int = 16  # adapters whose load latency is measured
    cold_adapters: int = 4  # cold-start samples (each a never-requested adapter)
    cold_slots: int = 2  # device slots of the cold-start engine: the host-memory case needs evictions

    @classmethod
    def quick(cls) -> "LoRAWorkload":
        return cls(num_prompts=4, max_tokens=4, num_adapters=(1, 4), repeats=1, sequential=2, cold_adapters=3)


def adapter_name(index: int) -> str:
    """The id of the index-th adapter `make_adapters` makes, which is also its directory's name."""
    return f"bench-{index}"


def make_adapters(model: PreTrainedModel, n: int, rank: int, alpha: float, out: Path) -> list[Path]:
    return make_random_adapters(model, [out / adapter_name(i) for i in range(n)], list(range(n)), rank=rank, alpha=alpha,
                                std=0.3)


def flop_share(shapes: Iterable[tuple[int, int]], rank: int) -> tuple[float, float]:
    """The least and most a rank-`rank` delta adds to a projection's multiply-adds: r(in + out) / (in * out)."""
    shares = [rank * (i + o) / (i * o) for i, o in shapes]
    return min(shares), max(shares)


def adapter_ids_for(n: int, num_prompts: int) -> list[str | None]:
    return [None] * num_prompts if n == 0 else [adapter_name(i % n) for i in range(num_prompts)]


# ---------------------------------------------------------------- 1. throughput


def engine_round(llm: LLM, prompts: list[str], ids: list[str | None], max_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = llm.generate(prompts, greedy(max_tokens), adapter_ids=ids)
    seconds = time.perf_counter() - start
    if any(o.finish_reason != "length" for o in outs):
        raise RuntimeError(f"engine request failed: {next(o.error for o in outs if o.finish_reason != 'length')}")
    return seconds, [list(o.token_ids) for o in outs]


def run_engine(llm: LLM, prompts: list[str], w: LoRAWorkload) -> dict[str, Any]:
    """Base alone and each adapter count, alternating order each round; medians of `w.repeats`."""
    counts = (0, *w.num_adapters)
    stubs = [" ".join(p.split()[:4]) for p in prompts]
    for n in counts:  # warm-up on short prompts (batch shapes, first-call allocations); also puts every adapter in a slot
        engine_round(llm, stubs, adapter_ids_for(n, len(prompts)), 2)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    tokens: dict[int, list[list[int]]] = {}
    for r in range(w.repeats):
        for n in counts if r % 2 == 0 else counts[::-1]:
            elapsed, tokens[n] = engine_round(llm, prompts, adapter_ids_for(n, len(prompts)), w.max_tokens)
            seconds[n].append(elapsed)
        print(f"  round {r + 1}: " + ", ".join(f"{n} adapters {seconds[n][-1]:.1f}s" for n in counts), flush=True)
    total = len(prompts) * w.max_tokens
    return {"seconds": seconds, "tok_s": {n: total / median(s) for n, s in seconds.items()}, "tokens": tokens}


def peft_batched(peft: PeftModel, tok: PreTrainedTokenizerBase, prompts: list[str], ids: list[str], max_tokens: int) -> float:
    """PEFT mixed-adapter inference: one left-padded batch, `adapter_names` per row."""
    start = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(peft.device)
    with torch.inference_mode():
        out = peft.generate(**enc, adapter_names=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    tok.batch_decode(out[:, enc.input_ids.shape[1]:].tolist(), skip_special_tokens=True)
    return time.perf_counter() - start


def peft_sequential(peft: PeftModel, tok: PreTrainedTokenizerBase, prompts: list[str], ids: list[str],
                    max_tokens: int) -> tuple[float, list[list[int]]]:
    """PEFT one request at a time, switching adapters with `set_adapter` (no padding, no EOS stop)."""
    start, tokens = time.perf_counter(), []
    for prompt, adapter_id in zip(prompts, ids):
        peft.set_adapter(adapter_id)
        enc = tok(prompt, return_tensors="pt").to(peft.device)
        with torch.inference_mode():
            out = peft.generate(**enc, max_new_tokens=max_tokens, do_sample=False, eos_token_id=[],
                                pad_token_id=tok.pad_token_id)
        tokens.append(out[0, enc.input_ids.shape[1]:].tolist())
        tok.decode(tokens[-1], skip_special_tokens=True)
    return time.perf_counter() - start, tokens


def run_peft(peft: PeftModel, tok: PreTrainedTokenizerBase, prompts: list[str], w: LoRAWorkload) -> dict[str, Any]:
    peft_batched(peft, tok, prompts[:4], adapter_ids_for(1, 4), 4)  # warm-up
    total = len(prompts) * w.max_tokens
    batched = {}
    for n in w.num_adapters:
        runs = [peft_batched(peft, tok, prompts, adapter_ids_for(n, len(prompts)), w.max_tokens) for _ in range(w.peft_repeats)]
        batched[n] = {"seconds": runs, "tok_s": total / median(runs)}
        print(f"  PEFT batched, {n} adapters: {median(runs):.1f}s", flush=True)
    k = w.sequential
    seq_ids = adapter_ids_for(max(w.num_adapters), len(prompts))[:k]
    seconds, tokens = peft_sequential(peft, tok, prompts[:k], seq_ids, w.max_tokens)
    print(f"  PEFT one at a time, {k} requests: {seconds:.1f}s", flush=True)
    return {"batched": batched, "sequential": {"requests": k, "seconds": seconds, "tok_s": k * w.max_tokens / seconds,
                                               "tokens": tokens}}


# ---------------------------------------------------------------- 2. load latency


def run_loads(llm: LLM, base: PreTrainedModel, paths: list[Path], samples: int) -> tuple[dict[str, Any], PeftModel]:
    """Per adapter of the first `samples`: ours disk -> slot and host -> slot; PEFT load_adapter.

    Returns the PeftModel with every adapter of `paths` loaded (the rest untimed, `low_cpu_mem_usage`).
    """
    engine, slots, device = llm.engine, llm.engine.lora_layers, base.device
    disk, host = [], []
    for i, path in enumerate(paths[:samples]):
        start = time.perf_counter()
        weights = engine.read_adapter(path)
        slots.load(i % slots.max_loras, weights)
        sync(device)
        disk.append(time.perf_counter() - start)
        start = time.perf_counter()
        slots.load(i % slots.max_loras, weights)
        sync(device)
        host.append(time.perf_counter() - start)
        slots.clear(i % slots.max_loras)
    peft_times = []
    start = time.perf_counter()
    peft = PeftModel.from_pretrained(base, paths[0], adapter_name=adapter_name(0))
    sync(device)
    peft_times.append(time.perf_counter() - start)
    for i, path in enumerate(paths[1:samples], start=1):
        start = time.perf_counter()
        peft.load_adapter(path, adapter_name=adapter_name(i))
        sync(device)
        peft_times.append(time.perf_counter() - start)
    for i, path in enumerate(paths[samples:], start=samples):
        peft.load_adapter(path, adapter_name=adapter_name(i), low_cpu_mem_usage=True)
    peft.eval()
    res = {"disk_to_slot_s": disk, "host_to_slot_s": host, "peft_load_adapter_s": peft_times,
           "median_disk_to_slot_s": median(disk), "median_host_to_slot_s": median(host),
           "median_peft_s": median(peft_times)}
    res["cold_speedup"] = res["median_peft_s"] / res["median_disk_to_slot_s"]
    print(f"  disk->slot {1e3 * res['median_disk_to_slot_s']:.1f} ms, host->slot {1e3 * res['median_host_to_slot_s']:.1f} ms, "
          f"PEFT load_adapter {1e3 * res['median_peft_s']:.0f} ms", flush=True)
    return res, peft


# ---------------------------------------------------------------- 3. cold start


def first_token_seconds(llm: LLM, prompt: str, adapter_id: str | None) -> float:
    """Request -> first token for one request on an idle engine (`max_tokens=1`: prefill plus one sample)."""
    start = time.perf_counter()
    out = llm.generate([prompt], greedy(1), adapter_ids=[adapter_id])[0]
    seconds = time.perf_counter() - start
    if out.finish_reason != "length":
        raise RuntimeError(f"cold-start request for {adapter_id!r} failed: {out.error}")
    return seconds


def peft_first_token_seconds(peft: PeftModel, tok: PreTrainedTokenizerBase, prompt: str, adapter_id: str,
                             load_from: Path | None = None) -> float:
    """PEFT: (`load_adapter` when `load_from`) + `set_adapter` + one greedy token."""
    start = time.perf_counter()
    if load_from is not None:
        peft.load_adapter(load_from, adapter_name=adapter_id)
    peft.set_adapter(adapter_id)
    enc = tok(prompt, return_tensors="pt").to(peft.device)
    with torch.inference_mode():
        peft.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    sync(peft.device)
    return time.perf_counter() - start


def run_cold_start(model_dir: str, paths: list[Path], peft: PeftModel, tok: PreTrainedTokenizerBase, prompt: str,
                   w: LoRAWorkload, workdir: Path) -> dict[str, Any]:
    """The adapters at `paths`, registered but never requested, through a registry-backed engine with `w.cold_slots` slots."""
    from lorax_lite.registry import admin
    from lorax_lite.registry.sqlite import SQLiteRegistry
    from lorax_lite.registry.store import AdapterStore

    registry, store = SQLiteRegistry(workdir / "registry.db"), AdapterStore(workdir / "store")
    ids = [path.name for path in paths]
    for adapter_id, path in zip(ids, paths):
        admin.register(registry, store, adapter_id, path, model_dir)
    llm = LLM(model_dir, dtype="float32", device=str(peft.device), registry=registry, store=store,
              max_loras=w.cold_slots, max_lora_rank=w.rank, max_cpu_loras=max(w.cold_adapters, w.cold_slots))
    try:
        first_token_seconds(llm, prompt, None)  # warm-up (first-call allocations)
        res: dict[str, list[float]] = {"base": [], "cold": [], "hot": [], "host": [], "peft_cold": [], "peft_hot": []}
        for adapter_id in ids:  # never requested: registry lookup, store read, checksum, validation, slot copy
            res["cold"].append(first_token_seconds(llm, prompt, adapter_id))
            res["hot"].append(first_token_seconds(llm, prompt, adapter_id))
            res["base"].append(first_token_seconds(llm, prompt, None))
        for adapter_id in ids:  # all in host memory; cycling through more adapters than slots (LRU) misses every slot
            res["host"].append(first_token_seconds(llm, prompt, adapter_id))
        for adapter_id, path in zip(ids, paths):
            res["peft_cold"].append(peft_first_token_seconds(peft, tok, prompt, adapter_id, load_from=path))
            res["peft_hot"].append(peft_first_token_seconds(peft, tok, prompt, adapter_id))
        cache = asdict(llm.engine.adapter_manager.stats)
    finally:
        del llm
        registry.close()
    out: dict[str, Any] = {"seconds": res, "median_s": {k: median(v) for k, v in res.items()},
                           "prompt_tokens": len(tok(prompt).input_ids), "slots": w.cold_slots,
                           "adapter_cache": cache}
    m = out["median_s"]
    print("  first token: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in m.items()), flush=True)
    return out


# ---------------------------------------------------------------- report


PLOT = "lora_adapters_per_batch.png"


def render(res: dict[str, Any]) -> str:
    return "\n".join([_header(res), _throughput_md(res), _loads_md(res), _cold_md(res), _reading_md(res)])


def plot(res: dict[str, Any], path: Path) -> None:
    """Tokens/s against distinct adapters in the batch: engine, PEFT batched; base and PEFT one-at-a-time as lines."""
    plt = pyplot()
    e, p, w = res["engine"], res["peft"], res["workload"]
    counts = list(w["num_adapters"])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(counts, [e["tok_s"][n] for n in counts], "o-", label="lorax-lite engine")
    ax.plot(counts, [p["batched"][n]["tok_s"] for n in counts], "s--", label="PEFT generate(adapter_names=…)")
    ax.axhline(e["tok_s"][0], color="grey", linestyle=":", label="lorax-lite engine, base model only")
    ax.axhline(p["sequential"]["tok_s"], color="tab:red", linestyle="-.", label="PEFT one request at a time")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"distinct adapters in a batch of {w['num_prompts']}")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{res['env']['model'].split('/')[-1]}, {res['env']['dtype']}, {res['env']['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _header(res: dict[str, Any]) -> str:
    env, w = res["env"], res["workload"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    return f"""## Multi-LoRA: mixed-adapter batches vs the base model and PEFT
{quick}
Generated by `scripts/bench_lora.py` on {env['date']}, commit `{env['commit']}`: {env['machine']},
load average {env['loadavg_start']} → {env['loadavg_end']}; model
`{env['model']}`, {env['dtype']}, {env['device']}; torch {env['torch']}, transformers {env['transformers']},
peft {res['peft_version']}. Command: {env['command']}. Whole run {res['total_seconds']:.0f} s; raw numbers
`{res['json_path']}`.

Workload: {w['num_prompts']} prompts built like the engine benchmark's ({min(res['prompt_tokens'])}–{max(res['prompt_tokens'])} tokens) ×
{w['max_tokens']} greedy tokens (`ignore_eos`); random rank-{w['rank']} PEFT adapters (alpha {w['alpha']:g}) on all
seven projections (q/k/v/o/gate/up/down); request i uses adapter i mod n. Engine:
`LLM(model, dtype="float32", device="{env['device']}", max_loras={res['max_loras']}, max_lora_rank={w['rank']}, max_num_seqs=64, max_num_batched_tokens=512)`;
LoRA backend `{res['backend']}`.
"""


def _throughput_md(res: dict[str, Any]) -> str:
    e, p, w = res["engine"], res["peft"], res["workload"]
    base = e["tok_s"][0]
    rows = [f"| base model only | {base:.1f} | 1.00× | – | – |"]
    for n in w["num_adapters"]:
        tps, ptps = e["tok_s"][n], p["batched"][n]["tok_s"]
        rows.append(f"| {n} distinct adapter{'s' if n > 1 else ''} | {tps:.1f} | {tps / base:.2f}× | {ptps:.1f} | {tps / ptps:.1f}× |")
    top = max(w["num_adapters"])
    seq = p["sequential"]
    vs_base, vs_peft, vs_seq = e["tok_s"][top] / base, e["tok_s"][top] / p["batched"][top]["tok_s"], e["tok_s"][top] / seq["tok_s"]
    return f"""
### 1. Adapters per batch: throughput with many adapters in one batch

![Generated tokens/s against distinct adapters per batch](img/{res['plot']})

| Batch of {w['num_prompts']} | engine tok/s | vs engine, base only | PEFT `generate(adapter_names=…)` tok/s | engine / PEFT |
|---|---|---|---|---|
{chr(10).join(rows)}

PEFT one request at a time with `set_adapter` ({seq['requests']} requests over {seq['requests']} adapters):
**{seq['tok_s']:.1f} tok/s**. Engine with {top} adapters against it: **{vs_seq:.0f}×**.
Engine tokens identical to PEFT's for those {seq['requests']} requests: **{res['identical']}/{seq['requests']}**.

The multi-LoRA issue's bars (set for a batch of 32 prompts × 64 tokens; measured here on this batch):

| Bar (at {top} distinct adapters) | measured | |
|---|---|---|
| ≥ 0.85× the engine on the base model alone (goal 0.95×) | {vs_base:.2f}× | {verdict(vs_base >= 0.85)} |
| ≥ 2.5× PEFT `generate(adapter_names=…)`, same batch | {vs_peft:.1f}× | {verdict(vs_peft >= 2.5)} |
| ≥ 10× PEFT one request at a time | {vs_seq:.0f}× | {verdict(vs_seq >= 10)} |

Engine seconds per round: {', '.join(f"{'base' if n == 0 else n}: " + ' / '.join(f'{s:.1f}' for s in v) for n, v in e['seconds'].items())}.
"""


def _loads_md(res: dict[str, Any]) -> str:
    lo = res["loads"]
    return f"""
### 2. Adapter load latency (median of {len(lo['disk_to_slot_s'])} adapters, {lo['size_mb']:.1f} MB each)

| Path | median | |
|---|---|---|
| engine: disk → ready in a device slot (read safetensors, validate, fold scaling, copy) | {1e3 * lo['median_disk_to_slot_s']:.1f} ms | |
| engine: host memory → device slot | {1e3 * lo['median_host_to_slot_s']:.2f} ms | |
| PEFT `load_adapter` into a `PeftModel` | {1e3 * lo['median_peft_s']:.0f} ms | |
| cold load, PEFT / engine (bar ≥ 20×) | {lo['cold_speedup']:.0f}× | {verdict(lo['cold_speedup'] >= 20)} |
"""


def _cold_md(res: dict[str, Any]) -> str:
    c = res["cold"]
    m = {k: 1e3 * v for k, v in c["median_s"].items()}
    return f"""
### 3. Adapter cold start: request to first token (median of {len(c['seconds']['cold'])} adapters)

One request of {c['prompt_tokens']} prompt tokens, `max_tokens=1`, on an idle engine with {c['slots']} device slots
whose adapters come from a SQLite registry and the store (as `lorax-lite serve` runs them). PEFT: a fresh
`PeftModel` holding one adapter, into which each cold adapter is loaded in turn (it holds 2–{len(c['seconds']['cold']) + 1}
adapters: PEFT's per-adapter costs grow with the adapters it holds).

| The request's adapter | first token | vs the base model |
|---|---|---|
| base model (no adapter) | {m['base']:.0f} ms | 1.00× |
| hot: already in a device slot | {m['hot']:.0f} ms | {m['hot'] / m['base']:.2f}× |
| in host memory, evicted from its slot | {m['host']:.0f} ms | {m['host'] / m['base']:.2f}× |
| cold: registered, never requested (registry lookup, store read, checksum, validation, slot copy) | {m['cold']:.0f} ms | {m['cold'] / m['base']:.2f}× |
| PEFT, adapter already loaded (`set_adapter`) | {m['peft_hot']:.0f} ms | {m['peft_hot'] / m['base']:.2f}× |
| PEFT cold: `load_adapter` + `set_adapter` | {m['peft_cold']:.0f} ms | {m['peft_cold'] / m['base']:.2f}× |

A cold adapter costs {m['cold'] - m['hot']:.0f} ms over a hot one here; PEFT's load costs {m['peft_cold'] - m['peft_hot']:.0f} ms
({(m['peft_cold'] - m['peft_hot']) / max(m['cold'] - m['hot'], 1e-3):.0f}× more). Adapter cache counters of that engine: {', '.join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c['adapter_cache'].items())}.
"""


def _reading_md(res: dict[str, Any]) -> str:
    e, w = res["engine"], res["workload"]
    base, top, one = e["tok_s"][0], max(w["num_adapters"]), min(w["num_adapters"])
    base_runs = e["seconds"][0]
    spread = max(base_runs) / min(base_runs) - 1
    fewest = e["tok_s"][one] / e["tok_s"][top] - 1  # how much faster the fewest adapters ran than the most
    if fewest <= spread:
        trend = (f"{one} and {top} adapters differ by {100 * fewest:.0f}%, within that noise, "
                 f"so this run does not resolve a cost that grows with the adapters")
    else:
        trend = f"{one} adapter ran {100 * fewest:.0f}% faster than {top}, more than that noise"
    size, traffic = res["loads"]["size_mb"], top * res["loads"]["size_mb"]
    low, high = res["flop_share"]
    return f"""
### Reading

- Every projection of every layer adds the delta for the whole flat batch in two batched
  matmuls: decode steps (one token per request, even groups) use `bmm` over a padded
  [adapters × rows] grid, prefill chunks with uneven groups use two grouped GEMMs. No weights are
  gathered per token and no Python runs per request. PEFT instead runs one masked sub-batch per
  adapter in every layer (its throughput falls as adapters are added), and one request at a time it
  loses all batching.
- What adapters cost: {one} adapter for the whole batch runs at {e['tok_s'][one] / base:.2f}× the base model, {top} distinct
  adapters at {e['tok_s'][top] / base:.2f}×; the base-model rounds alone varied by {100 * spread:.0f}%, and {trend}.
  Rank {w['rank']} adds {low:.0%}–{high:.0%} to a projection's arithmetic; what grows with distinct adapters is memory
  traffic: each decode step reads the weights of every distinct adapter in the batch for a handful
  of rows ({top} × {size:.1f} MB = {traffic:.0f} MB at {top} adapters, against the base model's {res['base_mb']:.0f} MB), while the
  base projections reuse their weights across all {w['num_prompts']} rows.
- A cold load is one safetensors read, validation, the scaling folded into B, and a copy into
  pre-allocated slot buffers; PEFT's `load_adapter` builds new modules for every adapter it loads.
"""


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_bench_args(__doc__.splitlines()[0], "benchmarks_lora", argv)


def run_all(model_dir: str, w: LoRAWorkload, workdir: Path, device: torch.device) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    prompts = build_prompts(tok, Workload(num_prompts=w.num_prompts, min_prompt_tokens=w.min_prompt_tokens,
                                          max_prompt_tokens=w.max_prompt_tokens))
    top = max(w.num_adapters)
    print(f"making {top} random rank-{w.rank} adapters", flush=True)
    paths = make_adapters(base, top, w.rank, w.alpha, workdir)
    llm = LLM(model_dir, dtype="float32", device=str(device), max_loras=top, max_lora_rank=w.rank, max_num_seqs=64,
              max_num_batched_tokens=512)
    res: dict[str, Any] = {"workload": asdict(w), "prompt_tokens": [len(tok(p).input_ids) for p in prompts],
                           "max_loras": top, "backend": type(llm.engine.lora_layers.backend).__name__,
                           "base_mb": sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20,
                           "flop_share": flop_share(llm.engine.lora_layers.targets.values(), w.rank)}
    print("1/3 adapter load latency", flush=True)
    cold_paths = make_random_adapters(base, [workdir / "cold-src" / f"cold-{i}" for i in range(w.cold_adapters)],
                                      [1000 + i for i in range(w.cold_adapters)], rank=w.rank, alpha=w.alpha,
                                      std=0.3)  # before PEFT wraps `base`
    res["loads"], peft = run_loads(llm, base, paths, w.load_samples)
    res["loads"]["size_mb"] = llm.engine.read_adapter(paths[0]).size_bytes / 2**20
    for i, path in enumerate(paths):
        llm.add_adapter(adapter_name(i), path)
    print(f"2/3 throughput: {w.num_prompts} prompts x {w.max_tokens} tokens", flush=True)
    res["engine"] = run_engine(llm, prompts, w)
    res["peft"] = run_peft(peft, tok, prompts, w)
    got = res["engine"]["tokens"][top][: w.sequential]
    res["identical"] = sum(a == b for a, b in zip(got, res["peft"]["sequential"]["tokens"]))
    del llm, peft, base  # PEFT's per-adapter cost grows with the adapters it holds: cold start uses a fresh PeftModel
    print(f"3/3 cold start: {w.cold_adapters} never-requested adapters", flush=True)
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    peft = PeftModel.from_pretrained(fresh, paths[0], adapter_name=adapter_name(0)).eval()
    res["cold"] = run_cold_start(model_dir, cold_paths, peft, tok, prompts[0], w, workdir)
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    w = LoRAWorkload.quick() if args.quick else LoRAWorkload(repeats=args.repeats)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import peft

    start = time.perf_counter()
    command = command_line("bench_lora.py", argv)
    env = environment(args.model, command, args.device)
    with tempfile.TemporaryDirectory(prefix="lorax-bench-adapters-") as workdir:
        res = run_all(args.model, w, Path(workdir), args.device)
    res.update(env=env | {"loadavg_end": _loadavg()}, quick=args.quick, json_path=args.json, peft_version=peft.__version__)
    res["total_seconds"] = time.perf_counter() - start
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    out = repo_path(args.output)
    res["plot"] = figure_name(PLOT, args.device)
    plot(res, figure_path(out, res["plot"]))
    write_section(out, section_name("lora", args.device), render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
