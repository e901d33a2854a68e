"""GPU benchmark of lorax-lite on one CUDA GPU (bf16), sized to finish in about 5 minutes on an H100/H200.

Three parts, each independent (one that fails is reported, and the others still run and write their sections):

1. decode: decode tokens/s at batch 1, 8, 64 and 256 on the model (default models/SmolLM2-135M-Instruct), for the
   base model and for 8, 32 and 128 distinct rank-16 adapters (request i uses adapter i mod n; never more adapters
   than requests). Each of B requests has a 32-token random prompt and decodes `max_tokens` greedy tokens with
   `ignore_eos`; the engine is stepped through the prefill first, then only the decode steps are timed. Beside each
   figure, the roofline: the bytes a decode step must read from HBM (the model's weights, the A/B of the adapters
   in the step, each sequence's K/V) over the GPU's HBM bandwidth.
2. kernels: `triton.testing.do_bench` timings of paged decode attention (the Triton kernel vs the SDPA backend's
   gather + SDPA) and of one layer's LoRA delta (the Triton backend vs the torch backends).
3. generate: end to end, the engine vs transformers `generate` (base model) and vs PEFT
   `generate(adapter_names=...)` with 32 adapters in one PeftModel, on the same batch of 64 prompts.

Writes the sections `decode-cuda`, `kernels-cuda` and `generate-cuda` of docs/benchmarks.md and
docs/benchmarks_gpu_cuda.json (after each part, so a run cut short keeps what it measured); `make bench` runs it when
torch sees a GPU. `--time-budget` (default 270 s) skips, and notes, the cases a part would run past its share of it.
Decode speed does not depend on the weights' values, so a model directory without weights gets random ones in its
architecture, and a missing default model SmolLM2-135M's architecture (config built in) with a synthetic tokenizer.
`--smoke` runs the same code paths at toy scale on the CPU (a tiny random Llama in float32, Triton kernels in its
interpreter, a made-up bandwidth) and writes only where `--out` says.

On a machine that gets a copy of the tree without .git or the weights, write the report where it comes back from,
then merge its sections here:

    cp docs/benchmarks.md $OUT/ && python3 scripts/bench_gpu.py --commit <sha> --output $OUT/benchmarks.md \
        --json $OUT/benchmarks_gpu_cuda.json
    .venv/bin/python scripts/bench_gpu.py --merge-from <returned>/benchmarks.md   # then copy the JSON into docs/
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv[1:]:  # Triton reads TRITON_INTERPRET when a kernel is defined: set it before any is
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import torch  # noqa: E402
from bench_engine import _loadavg, environment, verdict, write  # noqa: E402
from bench_report import (  # noqa: E402
    _SECTION,
    DEFAULT_MODEL,
    REPO_ROOT,
    command_line,
    median,
    parse_bench_args,
    repo_path,
    run_table,
    section_name,
    sync,
    write_section,
)

sys.path.insert(0, str(REPO_ROOT))  # import this checkout's lorax_lite whatever the editable install says

from lorax_lite import LLM, SamplingParams  # noqa: E402
from lorax_lite.config import ATTENTION_BACKENDS, LORA_BACKENDS  # noqa: E402
from lorax_lite.engine.request import OutputKind, Request  # noqa: E402

JSON_NAME = "benchmarks_gpu"
PARTS = ("decode", "kernels", "generate")  # the order they run in
SEED = 0
FALLBACK_ENGINE = {"attention_backend": "sdpa", "lora_backend": "segment", "enforce_eager": True}  # torch only
SMOKE_GBPS = 50.0  # the smoke run's bandwidth: made up, flagged as such in its report
# GPU name (lower case) -> HBM bandwidth in GB/s; every listed word must be in the name; the first match wins.
HBM_GBPS: list[tuple[tuple[str, ...], float | None]] = [
    (("gh200",), None),  # HBM3 or HBM3e: ask for --hbm-gbps
    (("h200",), 4800.0),
    (("h100", "pcie"), 2000.0),
    (("h100", "nvl"), 3900.0),
    (("h100",), 3350.0),  # SXM (H100 80GB HBM3)
    (("a100", "80gb"), 2000.0),
    (("a100",), 1555.0),  # 40GB
]


@dataclass
class GpuWorkload:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    adapter_counts: tuple[int, ...] = (8, 32, 128)  # distinct adapters, capped at the batch size
    prompt_tokens: int = 32
    decode_tokens: int = 64  # max_tokens of every decode request (ignore_eos)
    rank: int = 16
    alpha: float = 32
    repeats: int = 2
    bar_batch: int = 64  # the bars' batch size and adapter count
    bar_adapters: int = 32
    generate_tokens: int = 32  # max_new_tokens of the end-to-end comparison (PEFT is slow)
    attn_batches: tuple[int, ...] = (64, 256)
    attn_contexts: tuple[int, ...] = (512, 2048)
    lora_tokens: int = 64
    block_size: int = 16

    @classmethod
    def quick(cls) -> GpuWorkload:
        return cls(batch_sizes=(1, 64), adapter_counts=(32,), decode_tokens=32, repeats=1, generate_tokens=16,
                   attn_batches=(64,), attn_contexts=(512,))

    @classmethod
    def smoke(cls) -> GpuWorkload:
        return cls(batch_sizes=(1, 4), adapter_counts=(2,), prompt_tokens=8, decode_tokens=5, rank=4, alpha=8,
                   repeats=1, bar_batch=4, bar_adapters=2, generate_tokens=4, attn_batches=(2,),
                   attn_contexts=(40,), lora_tokens=4)

    @property
    def max_adapters(self) -> int:
        return max(*self.adapter_counts, self.bar_adapters)

    @property
    def max_batch(self) -> int:
        return max(*self.batch_sizes, self.bar_batch)


def decode_cases(w: GpuWorkload) -> list[tuple[int, int]]:
    """(batch, distinct adapters) pairs, the bars' batch first (it matters most if the time budget runs out)."""
    batches = sorted(w.batch_sizes, key=lambda b: b != w.bar_batch)
    return [(b, n) for b in batches for n in sorted({0, *(min(c, b) for c in w.adapter_counts)})]


def adapter_name(index: int) -> str:
    return f"bench-{index}"


def adapter_ids_for(n: int, batch: int) -> list[str | None]:
    """Request i uses adapter i mod n; n = 0: the base model."""
    return [None] * batch if n == 0 else [adapter_name(i % n) for i in range(batch)]


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` random token ids, away from the special tokens at the ends of the vocabulary."""
    low, high = min(1000, vocab_size // 4), vocab_size - min(1000, vocab_size // 10)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=gen).tolist()


# ---------------------------------------------------------------- the model's shape and the roofline


@dataclass(frozen=True)
class ModelFacts:
    """What the roofline and the kernel shapes need to know about the model (from its config, no weights read)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    weight_bytes: int  # what one decode step reads of the weights (the input embedding only when tied to the head)
    adapter_bytes: int  # A and B of one adapter at the workload's rank on every decoder linear
    dtype_bytes: int

    @classmethod
    def of(cls, model_dir: str, dtype: torch.dtype, rank: int) -> ModelFacts:
        from transformers import AutoConfig, AutoModelForCausalLM

        from lorax_lite.lora.layers import decoder_linears

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        cfg = config.get_text_config()
        size = torch.tensor([], dtype=dtype).element_size()
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        embedding = model.get_input_embeddings().weight
        if embedding is not model.get_output_embeddings().weight:  # a lookup reads a few rows, not the table
            params -= embedding.numel()
        lora_params = sum(rank * (m.in_features + m.out_features) for _, m in decoder_linears(model))
        heads = cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.hidden_size,
                   cfg.intermediate_size, cfg.vocab_size, params * size, lora_params * size, size)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


def hbm_gbps(gpu_name: str, override: float | None, smoke: bool) -> tuple[float | None, str]:
    """The HBM bandwidth (GB/s) the roofline divides by, and where it came from (or why there is none)."""
    if override is not None:
        return override, "given with --hbm-gbps"
    if smoke and not torch.cuda.is_available():
        return SMOKE_GBPS, "**made up for the smoke run** (no GPU)"
    name = gpu_name.lower()
    for words, gbps in HBM_GBPS:
        if all(word in name for word in words):
            if gbps is None:
                break
            return gbps, f"the table in scripts/bench_gpu.py for {gpu_name}"
    return None, f"unknown for {gpu_name!r}: pass --hbm-gbps to get the roofline"


def roofline(facts: ModelFacts, gbps: float | None, steps: int, num_adapters: int, kv_token_reads: int,
             seconds: float) -> dict[str, Any]:
    """Bytes read per decode step (weights + the step's adapters + K/V) and the time HBM needs for them."""
    weights = facts.weight_bytes + num_adapters * facts.adapter_bytes
    kv = kv_token_reads * facts.kv_bytes_per_token
    per_step = (steps * weights + kv) / max(steps, 1)
    res: dict[str, Any] = {"weight_bytes_per_step": weights, "kv_bytes_per_step": kv / max(steps, 1),
                           "bytes_per_step": per_step}
    if gbps is not None:
        res["roofline_ms_per_step"] = 1e3 * per_step / (gbps * 1e9)
        res["measured_over_roofline"] = (seconds / max(steps, 1)) / (per_step / (gbps * 1e9))
    return res


# ---------------------------------------------------------------- shared state of a run


class Budget:
    """The run's time budget; each part may use it up to its share (the parts after it get the rest)."""

    SHARES = {"decode": 0.6, "kernels": 0.75, "generate": 1.0}  # fraction of the budget spent when a part must stop

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def part_over(self, part: str) -> bool:
        return self.elapsed() > self.SHARES[part] * self.seconds


@dataclass
class Bench:
    """One run's settings and what its parts share: the adapters on disk and one engine (built on first use)."""

    args: argparse.Namespace
    w: GpuWorkload
    device: torch.device
    dtype: torch.dtype
    model_dir: str
    facts: ModelFacts
    workdir: Path
    budget: Budget
    gbps: float | None
    gbps_source: str
    _paths: list[Path] | None = None
    _llm: LLM | None = None
    engine_info: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None  # why the engine now runs FALLBACK_ENGINE (the asked-for one failed); None: it did not

    @property
    def smoke(self) -> bool:
        return bool(self.args.smoke)

    def adapter_paths(self) -> list[Path]:
        """Random rank-`w.rank` PEFT adapters on all seven projections, made once (on a CPU fp32 copy of the model)."""
        if self._paths is None:
            from transformers import AutoModelForCausalLM

            from lorax_lite.lora.synthetic import make_random_adapters

            n, start = self.w.max_adapters, time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            outs = [self.workdir / adapter_name(i) for i in range(n)]
            self._paths = make_random_adapters(model, outs, list(range(n)), rank=self.w.rank, alpha=self.w.alpha,
                                               std=0.3)
            del model
            print(f"  made {n} rank-{self.w.rank} adapters in {time.perf_counter() - start:.1f} s", flush=True)
        return self._paths

    def engine_kwargs(self) -> dict[str, Any]:
        w = self.w
        max_len = w.prompt_tokens + max(w.decode_tokens, w.generate_tokens) + w.block_size
        max_len = -(-max_len // w.block_size) * w.block_size
        return dict(dtype=str(self.dtype).removeprefix("torch."), device=str(self.device), max_num_seqs=w.max_batch,
                    max_num_batched_tokens=max(512, w.max_batch * w.prompt_tokens), max_model_len=max_len,
                    num_kv_blocks=w.max_batch * (max_len // w.block_size) + 8, block_size=w.block_size,
                    enable_prefix_caching=False, max_loras=w.max_adapters, max_lora_rank=w.rank,
                    max_cpu_loras=w.max_adapters, attention_backend=self.args.attention_backend,
                    lora_backend=self.args.lora_backend, enforce_eager=self.args.enforce_eager) | (
                        FALLBACK_ENGINE if self.fallback else {})

    @property
    def can_fall_back(self) -> bool:
        return self.fallback is None and any(self.engine_kwargs()[k] != v for k, v in FALLBACK_ENGINE.items())

    def llm(self) -> LLM:
        """The engine every part shares, with every adapter added (read and validated now)."""
        if self._llm is None:
            paths = self.adapter_paths()
            start = time.perf_counter()
            kwargs = self.engine_kwargs()
            llm = LLM(self.model_dir, **kwargs)
            for i, path in enumerate(paths):
                llm.add_adapter(adapter_name(i), path)
            backends = llm.engine.backends()
            self.engine_info = {"kwargs": kwargs, "attention_backend": backends["attention"],
                                "lora_backend": backends["lora"], "backends": backends,
                                "seconds_to_start": time.perf_counter() - start}
            print(f"  engine up in {self.engine_info['seconds_to_start']:.1f} s: {backends}", flush=True)
            self._llm = llm
        return self._llm

    def drop_engine(self) -> None:
        """Forget the engine (after a part failed in it, the next part starts a fresh one)."""
        self._llm = None
        free_memory(self.device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 1. decode tokens/s and the roofline


def add_requests(llm: LLM, prompts: list[list[int]], ids: list[str | None], max_tokens: int) -> list[Request]:
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = []
    for prompt, adapter_id in zip(prompts, ids, strict=True):
        adapter = engine.resolve_adapter(adapter_id) if adapter_id is not None else None
        request = engine.make_request(prompt, params, adapter=adapter, output_kind=OutputKind.FINAL_ONLY)
        engine.add(request)
        requests.append(request)
    return requests


def step(llm: LLM) -> None:
    for out in llm.engine.step():
        if out.finish_reason == "error":
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")


def decode_round(llm: LLM, prompts: list[list[int]], ids: list[str | None], max_tokens: int,
                 device: torch.device) -> dict[str, Any]:
    """Prefill every request, then time the decode steps until all finish; K/V reads counted per sequence-step."""
    requests = add_requests(llm, prompts, ids, max_tokens)
    limit = 4 * (max_tokens + len(prompts)) + 100
    for _ in range(limit):
        if all(r.num_generated_tokens > 0 or r.is_finished for r in requests):
            break
        step(llm)
    else:
        raise RuntimeError(f"{len(requests)} requests still in prefill after {limit} steps")
    sync(device)
    first = [r.num_generated_tokens for r in requests]
    steps, step_seconds = 0, []
    start = time.perf_counter()
    while not all(r.is_finished for r in requests):
        t = time.perf_counter()
        step(llm)
        step_seconds.append(time.perf_counter() - t)
        steps += 1
        if steps > limit:
            raise RuntimeError(f"{len(requests)} requests of {max_tokens} tokens still unfinished after {steps} steps")
    sync(device)
    seconds = time.perf_counter() - start
    last = [r.num_generated_tokens for r in requests]
    # a decode step feeds token g of a sequence with g tokens generated, which attends prompt + g keys
    kv_reads = sum(r.num_prompt_tokens * (g1 - g0) + (g0 + g1 - 1) * (g1 - g0) // 2
                   for r, g0, g1 in zip(requests, first, last, strict=True))
    tokens = sum(last) - sum(first)
    return {"seconds": seconds, "steps": steps, "tokens": tokens, "kv_token_reads": kv_reads,
            "median_step_ms": 1e3 * median(step_seconds) if step_seconds else 0.0}


def run_decode(b: Bench) -> dict[str, Any]:
    w = b.w
    llm = b.llm()
    res: dict[str, Any] = {"cases": [], "skipped": []}
    for case, (batch, n) in enumerate(decode_cases(w)):
        if b.budget.part_over("decode"):
            res["skipped"].append({"batch": batch, "adapters": n})
            print(f"  skipped batch {batch}, {n} adapters: time budget", flush=True)
            continue
        ids = adapter_ids_for(n, batch)
        decode_round(llm, random_prompts(b.facts.vocab_size, batch, w.prompt_tokens, 1000 + case), ids,
                     min(3, w.decode_tokens), b.device)  # warm-up: this batch size's kernels, adapters into slots
        rounds = [decode_round(llm, random_prompts(b.facts.vocab_size, batch, w.prompt_tokens, 2000 + 10 * case + r),
                               ids, w.decode_tokens, b.device) for r in range(w.repeats)]
        res["cases"].append(decode_case(b, batch, n, rounds))
        c = res["cases"][-1]
        print(f"  batch {batch:4d}, {n:3d} adapters: {c['tok_s']:9.0f} tok/s, {c['ms_per_step']:7.2f} ms/step"
              + (f", {c['roofline']['measured_over_roofline']:.1f}x roofline" if b.gbps else ""), flush=True)
    base = {c["batch"]: c["tok_s"] for c in res["cases"] if c["adapters"] == 0}
    for c in res["cases"]:
        c["vs_base"] = c["tok_s"] / base[c["batch"]] if c["batch"] in base else None
    res["bars"] = decode_bars(res["cases"], w)
    return res


def decode_case(b: Bench, batch: int, n: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One (batch, adapters) figure: the round of median tokens/s (of two, the faster), with its roofline."""
    for r in rounds:
        r["tok_s"] = r["tokens"] / r["seconds"]
    mid = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
    return {"batch": batch, "adapters": n, "tok_s": mid["tok_s"], "ms_per_step": 1e3 * mid["seconds"] / mid["steps"],
            "steps": mid["steps"], "rounds": rounds,
            "roofline": roofline(b.facts, b.gbps, mid["steps"], n, mid["kv_token_reads"], mid["seconds"])}


def decode_bars(cases: list[dict[str, Any]], w: GpuWorkload) -> dict[str, Any]:
    at = {(c["batch"], c["adapters"]): c for c in cases}
    bars: dict[str, Any] = {}
    base, lora = at.get((w.bar_batch, 0)), at.get((w.bar_batch, min(w.bar_adapters, w.bar_batch)))
    if base and lora:
        bars["adapters_vs_base"] = lora["tok_s"] / base["tok_s"]
    if base and "measured_over_roofline" in base["roofline"]:
        bars["base_vs_roofline"] = base["roofline"]["measured_over_roofline"]
    return bars


# ---------------------------------------------------------------- 2. kernels


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of one call: triton.testing.do_bench on a GPU (L2 flushed before each call), else a
    few wall-clock calls (the smoke run: the interpreter's figures mean nothing)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def kernel_row(name: str, run: Callable[[], torch.Tensor], check: Callable[[torch.Tensor], float], nbytes: int,
               device: torch.device, timed: Callable[[], object] | None = None) -> dict[str, Any]:
    """Check one implementation's output (`run()`) against the reference, then time `timed` (default: `run`)."""
    try:
        err = check(run())
        ms = time_ms(timed or run, device)
    except Exception as exc:  # one implementation failing leaves the others' rows
        traceback.print_exc()
        return {"impl": name, "error": f"{type(exc).__name__}: {exc}"}
    return {"impl": name, "ms": ms, "max_abs_err": err, "gb_s": nbytes / (ms * 1e-3) / 1e9}


def missing_reason(module: str, device: torch.device) -> str | None:
    """Why the Triton kernels in `module` cannot be benchmarked here, or None."""
    from lorax_lite.kernels import triton_unusable_reason

    reason = triton_unusable_reason(device)
    if reason is not None:
        return reason
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module} is not in this checkout"


def attention_inputs(b: Bench, batch: int, context: int) -> dict[str, Any]:
    """A paged cache holding `batch` sequences of `context` tokens in shuffled blocks, and one query each."""
    f, bs, gen = b.facts, b.w.block_size, torch.Generator(device=b.device).manual_seed(SEED)
    nb = -(-context // bs)
    shape = (batch * nb * bs, f.num_kv_heads, f.head_dim)
    k_cache = torch.randn(shape, generator=gen, device=b.device, dtype=b.dtype)
    v_cache = torch.randn(shape, generator=gen, device=b.device, dtype=b.dtype)
    tables = torch.randperm(batch * nb, generator=torch.Generator().manual_seed(SEED)).view(batch, nb).to(b.device)
    q = torch.randn(batch, f.num_heads, f.head_dim, generator=gen, device=b.device, dtype=b.dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=b.device)
    return {"q": q, "k": k_cache, "v": v_cache, "tables": tables, "seq_lens": seq_lens, "scale": f.head_dim ** -0.5}


def sdpa_decode_fn(x: dict[str, Any], block_size: int) -> tuple[str, Callable[[], torch.Tensor]]:
    """The SDPA backend's decode attention (engine/attention.py `_attend_group`: gather the blocks, then SDPA)."""
    from lorax_lite.engine.attention import AttentionGroup, _attend_group

    q, tables = x["q"], x["tables"]
    group = AttentionGroup(q_index=None, block_tables=tables, q_pos=(x["seq_lens"].long() - 1)[:, None],
                           valid=None, dest=None, block_size=block_size)
    group.mask(None)  # built once per step in the engine, shared by every layer
    return "SDPA backend (gather + SDPA)", lambda: _attend_group(q, x["k"], x["v"], group, x["scale"], None)


def attention_reference(x: dict[str, Any], block_size: int) -> torch.Tensor:
    """fp32 attention of each query to its sequence's keys: [B, Hq, D]."""
    q, tables = x["q"].float(), x["tables"]
    batch, heads, dim = q.shape
    kv_heads = x["k"].shape[1]
    rows = (tables[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)  # [B, L]
    rows = rows[:, : int(x["seq_lens"][0])]
    k = x["k"][rows].float().repeat_interleave(heads // kv_heads, dim=2)  # [B, L, Hq, D]
    v = x["v"][rows].float().repeat_interleave(heads // kv_heads, dim=2)
    weights = torch.softmax(torch.einsum("bhd,blhd->bhl", q, k) * x["scale"], dim=-1)
    return torch.einsum("bhl,blhd->bhd", weights, v)


def run_attention(b: Bench) -> dict[str, Any]:
    reason = missing_reason("lorax_lite.kernels.paged_attention", b.device)
    rows = []
    for batch in b.w.attn_batches:
        for context in b.w.attn_contexts:
            if b.budget.part_over("kernels"):
                rows.append({"batch": batch, "context": context, "skipped": "time budget"})
                continue
            x = attention_inputs(b, batch, context)
            ref = attention_reference(x, b.w.block_size)
            check = lambda out, ref=ref: float((out.float() - ref).abs().max())  # noqa: E731
            nbytes = 2 * batch * context * b.facts.num_kv_heads * b.facts.head_dim * b.facts.dtype_bytes
            impls = []
            if reason is None:
                from lorax_lite.kernels.paged_attention import paged_decode_attention

                tables32, out = x["tables"].to(torch.int32), torch.empty_like(x["q"])
                impls.append(kernel_row("Triton paged decode", lambda x=x, t=tables32, o=out: paged_decode_attention(
                    x["q"], x["k"], x["v"], t, x["seq_lens"], b.w.block_size, x["scale"], out=o), check, nbytes,
                    b.device))
            try:
                name, fn = sdpa_decode_fn(x, b.w.block_size)
                impls.append(kernel_row(name, fn, check, nbytes, b.device))
            except Exception as exc:
                traceback.print_exc()
                impls.append({"impl": "SDPA backend", "error": f"{type(exc).__name__}: {exc}"})
            rows.append({"batch": batch, "context": context, "kv_bytes": nbytes, "impls": impls})
            print(f"  attention batch {batch}, context {context}: "
                  + ", ".join(f"{i['impl']} {i['ms']:.3f} ms" if "ms" in i else f"{i['impl']} failed" for i in impls),
                  flush=True)
            del x, ref
            free_memory(b.device)
    return {"triton_skipped": reason, "rows": rows}


def lora_inputs(b: Bench, d_in: int, d_out: int) -> dict[str, Any]:
    """`lora_tokens` decode rows spread evenly over `bar_adapters` slots (in slot order), rank `w.rank`."""
    w, gen = b.w, torch.Generator(device=b.device).manual_seed(SEED)
    slots, tokens, r = min(w.bar_adapters, w.lora_tokens), w.lora_tokens, w.rank
    kw: dict[str, Any] = {"generator": gen, "device": b.device}
    x = torch.randn(tokens, d_in, **kw).to(b.dtype)
    lora_a = (torch.randn(slots, r, d_in, **kw) / d_in ** 0.5).to(b.dtype)
    lora_b = (torch.randn(slots, r, d_out, **kw) / r ** 0.5).to(b.dtype)
    seq_slots = [i * slots // tokens for i in range(tokens)]
    token_slots = torch.tensor(seq_slots, device=b.device)
    ref = torch.einsum("ti,tri,tro->to", x.float(), lora_a[token_slots].float(), lora_b[token_slots].float())
    return {"x": x, "a": lora_a, "b": lora_b, "seq_slots": seq_slots, "ranks": [r] * slots, "ref": ref,
            "slots": slots}


def lora_impls(b: Bench, li: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """(name, backend, mapping) of each LoRA path to time; and why the Triton backend is left out, if it is."""
    from lorax_lite.lora.ops import GroupedMatmulBackend, LoRAMapping, SegmentBackend

    tokens = [1] * len(li["seq_slots"])
    mapping = LoRAMapping.build(li["seq_slots"], tokens, li["ranks"], b.device)
    unpadded = dataclasses.replace(mapping, pad_len=None, pad_dest=None)
    impls: list[tuple[str, Any, Any]] = []
    reason = missing_reason("lorax_lite.kernels.lora", b.device)
    if reason is None:
        from lorax_lite.lora.ops import TritonLoRABackend

        kmap = LoRAMapping.build(li["seq_slots"], tokens, li["ranks"], b.device, kernel_meta=True)
        impls.append(("Triton backend, BGMV (decode steps)", TritonLoRABackend(), kmap))
        impls.append(("Triton backend, SGMV (segments)", TritonLoRABackend(), dataclasses.replace(kmap, decode=False)))
    impls += [("GroupedMatmulBackend / SegmentBackend on a decode step (padded bmm)", GroupedMatmulBackend(), mapping),
              ("GroupedMatmulBackend, grouped_mm path (uneven steps)", GroupedMatmulBackend(), unpadded),
              ("SegmentBackend, matmul pair per adapter (uneven steps)", SegmentBackend(), unpadded)]
    return impls, reason


def run_lora(b: Bench) -> dict[str, Any]:
    f, w = b.facts, b.w
    rows, reason = [], None
    for d_in, d_out in ((f.hidden_size, f.hidden_size), (f.hidden_size, f.intermediate_size)):
        if b.budget.part_over("kernels"):
            rows.append({"shape": [d_in, d_out], "skipped": "time budget"})
            continue
        li = lora_inputs(b, d_in, d_out)
        impls, reason = lora_impls(b, li)
        nbytes = (li["slots"] * w.rank * (d_in + d_out) + w.lora_tokens * (d_in + 2 * d_out)) * f.dtype_bytes
        y = torch.zeros(w.lora_tokens, d_out, device=b.device, dtype=b.dtype)  # timed calls accumulate into it

        def check(out: torch.Tensor, li: dict[str, Any] = li) -> float:
            return float((out.float() - li["ref"]).abs().max())

        timed = []
        for name, backend, mapping in impls:
            def run(backend: Any = backend, mapping: Any = mapping, li: dict[str, Any] = li,
                    y: torch.Tensor = y) -> torch.Tensor:
                out = torch.zeros_like(y)
                backend.add_delta(out, li["x"], li["a"], li["b"], mapping)
                return out

            def add(backend: Any = backend, mapping: Any = mapping, li: dict[str, Any] = li,
                    y: torch.Tensor = y) -> None:
                backend.add_delta(y, li["x"], li["a"], li["b"], mapping)

            timed.append(kernel_row(name, run, check, nbytes, b.device, timed=add))
        rows.append({"shape": [d_in, d_out], "tokens": w.lora_tokens, "adapters": li["slots"], "rank": w.rank,
                     "bytes": nbytes, "impls": timed})
        print(f"  LoRA {d_in}->{d_out}: " + ", ".join(
            f"{i['impl'].split(',')[0]} {i['ms'] * 1e3:.1f} us" if "ms" in i else f"{i['impl']} failed" for i in timed),
            flush=True)
    return {"triton_skipped": reason, "rows": rows}


def run_kernels(b: Bench) -> dict[str, Any]:
    return {"attention": run_attention(b), "lora": run_lora(b)}


# ---------------------------------------------------------------- 3. end to end: engine vs transformers and PEFT


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def engine_generate(llm: LLM, prompts: list[list[int]], ids: list[str | None], tokens: int) -> None:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, adapter_ids=ids)
    bad = [o for o in outs if o.finish_reason != "length" or len(o.token_ids) != tokens]
    if bad:
        raise RuntimeError(f"engine request ended with {bad[0].finish_reason}, {len(bad[0].token_ids)} tokens: "
                           f"{bad[0].error}")


def hf_generate(model: Any, prompts: list[list[int]], tokens: int, pad_id: int,
                adapter_names: list[str] | None = None) -> None:
    """transformers/PEFT `generate`: one batch (the prompts are all the same length: no padding), exactly `tokens`."""
    ids = torch.tensor(prompts, device=model.device)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id, **extra)
    if out.shape[1] != ids.shape[1] + tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {tokens}")


def run_generate(b: Bench) -> dict[str, Any]:
    """The engine and transformers on the base model, then the engine and PEFT with `bar_adapters` adapters."""
    from transformers import AutoModelForCausalLM

    w, device = b.w, b.device
    batch, n, tokens = w.bar_batch, min(w.bar_adapters, w.bar_batch), w.generate_tokens
    prompts = random_prompts(b.facts.vocab_size, batch, w.prompt_tokens, 3000)
    warm = random_prompts(b.facts.vocab_size, batch, w.prompt_tokens, 3001)
    base_ids, lora_ids = adapter_ids_for(0, batch), adapter_ids_for(n, batch)
    llm = b.llm()
    for ids in (base_ids, lora_ids):
        engine_generate(llm, warm, ids, 2)
    model = AutoModelForCausalLM.from_pretrained(b.model_dir, dtype=b.dtype).to(device).eval()
    pad_id = pad_token_id(model)
    hf_generate(model, warm, 2, pad_id)
    seconds: dict[str, list[float]] = {"engine_base": [], "hf_base": [], "engine_lora": []}
    for _ in range(w.repeats):
        seconds["engine_base"].append(timed_call(partial(engine_generate, llm, prompts, base_ids, tokens), device))
        seconds["hf_base"].append(timed_call(partial(hf_generate, model, prompts, tokens, pad_id), device))
        seconds["engine_lora"].append(timed_call(partial(engine_generate, llm, prompts, lora_ids, tokens), device))
    print(f"  engine base {median(seconds['engine_base']):.2f} s, transformers {median(seconds['hf_base']):.2f} s, "
          f"engine {n} adapters {median(seconds['engine_lora']):.2f} s", flush=True)
    res: dict[str, Any] = {"batch": batch, "adapters": n, "tokens": tokens, "seconds": seconds,
                           "hf_attention": getattr(model.config, "_attn_implementation", None)}
    try:
        seconds["peft_lora"] = [peft_seconds(b, model, prompts, warm, [str(a) for a in lora_ids], pad_id)]
        print(f"  PEFT {n} adapters {seconds['peft_lora'][0]:.2f} s", flush=True)
    except Exception as exc:  # the engine and transformers figures stand without it
        traceback.print_exc()
        res["peft_error"] = f"{type(exc).__name__}: {exc}"
    tok_s = {k: batch * tokens / median(v) for k, v in seconds.items()}
    res |= {"tok_s": tok_s, "engine_vs_hf": tok_s["engine_base"] / tok_s["hf_base"],
            "engine_vs_peft": tok_s["engine_lora"] / tok_s["peft_lora"] if "peft_lora" in tok_s else None}
    return res


def pad_token_id(model: Any) -> int:
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    return int(pad[0] if isinstance(pad, list) else pad)


def peft_seconds(b: Bench, model: Any, prompts: list[list[int]], warm: list[list[int]], names: list[str],
                 pad_id: int) -> float:
    """Load the adapters `names` use into one PeftModel around `model`, then time one mixed-batch generate."""
    from peft import PeftModel

    paths, used = b.adapter_paths(), sorted(set(names), key=names.index)
    peft = PeftModel.from_pretrained(model, paths[0], adapter_name=adapter_name(0))
    for name in used:
        if name != adapter_name(0):
            peft.load_adapter(paths[int(name.rsplit("-", 1)[1])], adapter_name=name)
    peft = peft.to(b.dtype).eval()  # PEFT keeps the adapters' saved fp32 otherwise
    hf_generate(peft, warm, 2, pad_id, names)
    return timed_call(partial(hf_generate, peft, prompts, b.w.generate_tokens, pad_id, names), b.device)


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def header(res: dict[str, Any], title: str) -> str:
    env, gpu = res["env"], res["gpu"]
    smoke = ("\n> **Smoke run (`--smoke`): a tiny random model on the CPU, Triton kernels in its interpreter, a "
             "made-up bandwidth: the figures mean nothing.**\n" if res["smoke"] else "")
    quick = "\n> **Quick run (`--quick`): fewer cases and tokens.**\n" if res["quick"] else ""
    software = f", peft {env['peft']}, triton {env['triton']}, CUDA {env['cuda']}"
    bandwidth = fmt(res["hbm_gbps"], ".0f", " GB/s")
    return f"""## {title}
{smoke}{quick}
Generated by `scripts/bench_gpu.py`.

{run_table(env, software_note=software)}| Command | {env['command']} |
| GPU | {gpu['name']}{gpu.get('detail', '')}; HBM bandwidth {bandwidth} ({res['hbm_source']}) |
| Run | whole run {res.get('total_seconds', 0):.0f} s; raw numbers `{res['json_path']}` |
"""


def engine_line(res: dict[str, Any]) -> str:
    info = res.get("engine") or {}
    if not info:
        return ""
    kw = ", ".join(f"{k}={v!r}" for k, v in info["kwargs"].items())
    fallback = res.get("engine_fallback")
    note = "" if not fallback else (
        f"**The engine with the asked-for backends failed (`{fallback}`); these figures come from an engine on the "
        f"torch backends ({', '.join(f'{k}={v!r}' for k, v in FALLBACK_ENGINE.items())}).**\n\n")
    return note + (f"Engine: `LLM(model, {kw})`: attention backend **{info['attention_backend']}**, LoRA backend "
            f"**{info['lora_backend']}**, CUDA graphs for batch sizes "
            f"{(info.get('backends') or {}).get('cuda_graph_batch_sizes') or 'none (eager)'}, started (with its "
            f"adapters added and graphs captured) in {info['seconds_to_start']:.1f} s.\n")


def part_failed(res: dict[str, Any], part: str) -> str | None:
    p = res.get(part)
    if p is None:
        return "not run (see --parts)"
    return p.get("error")


def render_decode(res: dict[str, Any]) -> str:
    w, facts = res["workload"], res["facts"]
    text = header(res, "GPU decode: tokens/s by batch size and distinct adapters, beside the roofline")
    failed = part_failed(res, "decode")
    if failed:
        return text + f"\n**This part failed:** `{failed}`\n"
    d = res["decode"]
    rows = []
    for c in sorted(d["cases"], key=lambda c: (c["batch"], c["adapters"])):
        rf = c["roofline"]
        rows.append(f"| {c['batch']} | {c['adapters'] or 'base'} | {c['tok_s']:.0f} | {c['ms_per_step']:.2f} | "
                    f"{fmt(c['vs_base'], '.2f', '×')} | {rf['bytes_per_step'] / 1e6:.1f} | "
                    f"{fmt(rf.get('roofline_ms_per_step'), '.3f')} | "
                    f"{fmt(rf.get('measured_over_roofline'), '.1f', '×')} |")
    skipped = "".join(f"\nSkipped (time budget): batch {s['batch']} with {s['adapters']} adapters."
                      for s in d["skipped"])
    return text + f"""
{engine_line(res)}
Workload: B requests of {w['prompt_tokens']} random prompt tokens (seeded), each `max_tokens={w['decode_tokens']}`
greedy with `ignore_eos`, submitted together to `LLMEngine`; the engine is stepped until every request has its first
token (the prefill), then the decode steps are timed until all finish (`torch.cuda.synchronize` at both ends). The
round of median tokens/s of {w['repeats']} is shown (of two, the faster). Adapters: rank {w['rank']} random PEFT
adapters ({facts['adapter_bytes'] / 1e6:.1f} MB each) on all seven projections; request i uses adapter i mod n (n ≤ B).

Roofline: the bytes a decode step must read from HBM, ÷ the bandwidth: the weights
({facts['weight_bytes'] / 1e6:.0f} MB), the A and B of each distinct adapter in the step, and each sequence's K/V
(context × {facts['num_layers']} layers × 2 × {facts['num_kv_heads']} KV heads × {facts['head_dim']} ×
{facts['dtype_bytes']} bytes), averaged over the timed steps. Activations, logits and K/V writes are left out.

| batch | adapters | tok/s | ms/step | vs base | MB read/step | roofline ms/step | measured / roofline |
|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
{skipped}
{decode_bars_md(res)}"""


def decode_bars_md(res: dict[str, Any]) -> str:
    w, bars = res["workload"], res["decode"]["bars"]
    n, batch = min(w["bar_adapters"], w["bar_batch"]), w["bar_batch"]
    lines = []
    if "adapters_vs_base" in bars:
        v = bars["adapters_vs_base"]
        lines.append(f"| {n} distinct adapters ≥ 0.9× the base model's decode tokens/s, batch {batch} | {v:.2f}× | "
                     f"{verdict(v >= 0.9)} |")
    if "base_vs_roofline" in bars:
        v = bars["base_vs_roofline"]
        lines.append(f"| decode at batch {batch} (base) within 2× of the roofline | {v:.1f}× | {verdict(v <= 2.0)} |")
    if not lines:
        return "Bars: not measured in this run.\n"
    return "Bars (measured, not asserted):\n\n| bar | measured | |\n|---|---:|---|\n" + "\n".join(lines) + "\n"


def render_kernels(res: dict[str, Any]) -> str:
    text = header(res, "GPU kernels: paged decode attention and the LoRA delta, Triton vs torch")
    failed = part_failed(res, "kernels")
    if failed:
        return text + f"\n**This part failed:** `{failed}`\n"
    k, f, w = res["kernels"], res["facts"], res["workload"]
    timer = ("`triton.testing.do_bench` (median; L2 flushed before each call)" if res["env"]["device"] != "cpu"
             else "wall clock, 3 calls (smoke run)")
    att_rows = kernel_rows(k["attention"]["rows"], lambda r: f"{r['batch']} | {r['context']}")
    lora_rows = kernel_rows(k["lora"]["rows"], lambda r: f"{r['shape'][0]}→{r['shape'][1]}")
    return text + f"""
Timer: {timer}. GB/s: the bytes the op must read (and write) ÷ its time. Error: max |out − fp32 reference|.

### Paged decode attention, one layer

One query per sequence, {f['num_heads']} query heads, {f['num_kv_heads']} KV heads, head dim {f['head_dim']},
{res['dtype']}, blocks of {w['block_size']} tokens shuffled in the cache. Bytes: the sequences' K and V.
{_skip_note(k['attention']['triton_skipped'])}
| batch | context | implementation | µs | GB/s | max abs error |
|---:|---:|---|---:|---:|---:|
{att_rows}

### LoRA delta, one layer

{w['lora_tokens']} decode tokens over {min(w['bar_adapters'], w['lora_tokens'])} adapters (in slot order, rank
{w['rank']}), `add_delta(y, x, lora_a, lora_b, mapping)`. Bytes: the adapters' A and B, x, and y read and written.
On decode steps GroupedMatmulBackend and SegmentBackend both take the padded-`bmm` path; their other paths (mixed
and prefill steps) are timed on the same tokens for comparison.
{_skip_note(k['lora']['triton_skipped'])}
| shape | implementation | µs | GB/s | max abs error |
|---|---|---:|---:|---:|
{lora_rows}
"""


def _skip_note(reason: str | None) -> str:
    return "" if reason is None else f"\nTriton rows skipped: {reason}.\n"


def kernel_rows(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> str:
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {key(r)} | skipped ({r['skipped']}) | | | |")
            continue
        for i in r["impls"]:
            if "error" in i:
                lines.append(f"| {key(r)} | {i['impl']}: failed, `{i['error'][:200]}` | | | |")
            else:
                lines.append(f"| {key(r)} | {i['impl']} | {1e3 * i['ms']:.1f} | {i['gb_s']:.0f} | "
                             f"{i['max_abs_err']:.2e} |")
    return "\n".join(lines)


def render_generate(res: dict[str, Any]) -> str:
    text = header(res, "GPU generate: the engine vs transformers and PEFT, end to end")
    failed = part_failed(res, "generate")
    if failed:
        return text + f"\n**This part failed:** `{failed}`\n"
    g, w = res["generate"], res["workload"]
    t, s = g["tok_s"], g["seconds"]

    def row(label: str, key: str, ratio: str = "") -> str:
        runs = " / ".join(f"{v:.2f}" for v in s[key])
        return f"| {label} | {median(s[key]):.2f} | {runs} | {t[key]:.0f} | {ratio} |"

    n = g["adapters"]
    if "peft_lora" in s:
        peft_row = row(f"PEFT `generate(adapter_names=…)`, {n} adapters", "peft_lora", f"{g['engine_vs_peft']:.1f}×")
        bar = (f"Bar (measured, not asserted): engine ≥ 5× PEFT batched at {n} adapters — {g['engine_vs_peft']:.1f}×, "
               f"{verdict(g['engine_vs_peft'] >= 5.0)}.")
    else:
        peft_row = f"| PEFT `generate(adapter_names=…)`, {n} adapters: failed, `{g.get('peft_error')}` | | | | |"
        bar = "Bar (engine ≥ 5× PEFT batched): not measured, PEFT failed."
    return text + f"""
{engine_line(res)}
Workload: {g['batch']} prompts of {w['prompt_tokens']} random tokens (the same for everyone, no padding needed),
{g['tokens']} greedy tokens each (`ignore_eos`; transformers `min_new_tokens=max_new_tokens={g['tokens']}`), timed from
the call to its return, prefill included. Engine: `LLM.generate`. transformers {res['env']['transformers']}:
`model.generate` in {res['dtype']}, the default (dynamic) cache, attention `{g['hf_attention']}`. PEFT
{res['env']['peft']}: the {n} adapters loaded into one `PeftModel` (cast to {res['dtype']}),
`generate(adapter_names=[...])` with request i on adapter i mod {n}; run once (it is slow), the others
{w['repeats']} times (medians).

| | median s | runs (s) | tok/s | engine / it |
|---|---:|---:|---:|---:|
{row('lorax-lite engine, base model', 'engine_base')}
{row('transformers `generate`, base model', 'hf_base', f"{g['engine_vs_hf']:.2f}×")}
{row(f'lorax-lite engine, {n} distinct adapters', 'engine_lora')}
{peft_row}

{bar}
"""


RENDER = {"decode": render_decode, "kernels": render_kernels, "generate": render_generate}


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--smoke", action="store_true",
                       help="toy run on the CPU (tiny random Llama, fp32, Triton interpreted); needs --out")
        p.add_argument("--hbm-gbps", type=float,
                       help="HBM bandwidth in GB/s for the roofline (default: from the GPU's name)")
        p.add_argument("--time-budget", type=float, default=270.0,
                       help="seconds the run may take (default 270); cases past a part's share are skipped, noted")
        p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                       help="which parts to run (default all)")
        p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
        p.add_argument("--lora-backend", choices=LORA_BACKENDS, default="auto")
        p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in the engine")
        p.add_argument("--commit", help="the commit to name in the report when git cannot tell (a copy of the tree)")
        p.add_argument("--merge-from", metavar="REPORT",
                       help="only copy the -cuda sections of REPORT (a GPU run's --output) into --output, then exit")
        p.add_argument("--random-weights", action="store_true",
                       help="random weights in the model's architecture (the default when its directory has none)")

    args = parse_bench_args(__doc__.splitlines()[0], JSON_NAME, argv, extra)
    if args.merge_from:
        return args
    if args.smoke:
        if repo_path(args.output) == repo_path("docs/benchmarks.md"):
            _usage_error("--smoke never writes docs/benchmarks.md; give --out PATH")
        if args.json.startswith(("docs/", "bench_results/quick_")):
            args.json = str(Path(args.output).with_suffix(".json"))
    elif args.device.type != "cuda":
        _usage_error("needs a CUDA GPU (torch sees none, or --device says cpu); --smoke runs it on the CPU")
    return args


def _usage_error(message: str) -> NoReturn:
    print(f"bench_gpu.py: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- the model

# models/SmolLM2-135M-Instruct/config.json: what the GPU run benchmarks when the directory did not travel with the
# working tree (its 538 MB of weights cannot: only 64 MiB does, and the device machine reaches no network).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
                    vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.02)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2


def prepare_model(args: argparse.Namespace, tmp: Path) -> tuple[str, str | None]:
    """The model directory to benchmark and, when its weights are random, a note saying so.

    Decode speed does not depend on the weights' values (greedy tokens, `ignore_eos`), so a directory with a config
    but no weights (or `--random-weights`) gets random ones, and the default model with no directory at all gets
    SmolLM2-135M's architecture with a synthetic tokenizer of its vocabulary size.
    """
    if args.smoke:
        return str(tiny_llama(tmp / "tiny-llama")), "a tiny random Llama (smoke run)"
    path = repo_path(args.model)
    weights = [f for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern)] if path.is_dir() else []
    if weights and not args.random_weights:
        return str(path), None
    if (path / "config.json").exists():
        missing = "" if weights else " (the directory has no weights)"
        note = f"random weights{missing} in {args.model}'s architecture"
        return str(random_weights_model(path, tmp / "random-weights")), note
    if Path(args.model).name == Path(DEFAULT_MODEL).name:
        return (str(random_weights_model(None, tmp / "random-weights")),
                f"random weights in SmolLM2-135M's architecture ({args.model} is not here), synthetic tokenizer")
    _usage_error(f"model directory {args.model} not found (its config.json and tokenizer suffice: random weights)")


def random_weights_model(source: Path | None, out: Path) -> Path:
    """Save a model with random weights: `source`'s config and tokenizer, or SmolLM2-135M's config and a synthetic
    tokenizer; bf16 on disk (the benchmark's dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    config = AutoConfig.from_pretrained(source) if source is not None else LlamaConfig(**SMOLLM2_135M)
    tok = AutoTokenizer.from_pretrained(source) if source is not None else synthetic_tokenizer(config.vocab_size)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if source is not None and (source / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"  random-weights model saved to {out}", flush=True)
    return out


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer of exactly `vocab_size` tokens (SmolLM2's special tokens first): any id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")


def tiny_llama(out: Path) -> Path:
    """A tiny random Llama (tied embeddings, like SmolLM2) and a byte-level BPE tokenizer, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. 0123456789"] * 8, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"name": "none (CPU smoke run)"}
    p = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "memory_gib": p.total_memory / 2**30,
            "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "detail": f", {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                      f"{p.multi_processor_count} SMs"}


def software(env: dict[str, Any]) -> dict[str, Any]:
    import peft

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return env | {"peft": peft.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none (CPU build)"}


def run_part(b: Bench, part: str, res: dict[str, Any]) -> None:
    """Run one part; a failure is recorded in its result and printed, and the run goes on."""
    fn = {"decode": run_decode, "kernels": run_kernels, "generate": run_generate}[part]
    print(f"{part}: starting at {b.budget.elapsed():.0f} s", flush=True)
    start = time.perf_counter()
    try:
        res[part] = fn(b)
    except Exception as exc:
        traceback.print_exc()
        res[part] = {"error": f"{type(exc).__name__}: {exc}"}
        if part != "kernels":
            b.drop_engine()
        if part == "decode" and b.can_fall_back and not b.budget.part_over(part):
            b.fallback = res[part]["error"]  # the parts after this one use the fallback engine too
            print(f"{part}: failed; once more with the torch backends {FALLBACK_ENGINE}", flush=True)
            try:
                res[part] = fn(b)
            except Exception as exc2:
                traceback.print_exc()
                res[part] = {"error": f"{type(exc2).__name__}: {exc2} (and before, with the asked-for backends: "
                                      f"{b.fallback})"}
                b.drop_engine()
    res[part]["part_seconds"] = time.perf_counter() - start
    res["engine"], res["engine_fallback"] = b.engine_info, b.fallback
    free_memory(b.device)
    print(f"{part}: {res[part]['part_seconds']:.0f} s{' (failed)' if 'error' in res[part] else ''}", flush=True)


def save(b: Bench, res: dict[str, Any], parts: Sequence[str]) -> None:
    """Write the JSON and the sections of `parts` (each rendered on its own: one that fails to render says so)."""
    res["total_seconds"] = b.budget.elapsed()
    res["env"]["loadavg_end"] = _loadavg()
    write(Path(b.args.json), json.dumps(res, indent=1, default=str))
    for part in parts:
        try:
            text = RENDER[part](res)
        except Exception as exc:
            traceback.print_exc()
            text = f"## bench_gpu.py: {part}\n\nRendering this section failed: `{type(exc).__name__}: {exc}`.\n"
        write_section(repo_path(b.args.output), section_name(part, b.device), text)


def merge_sections(source: Path, report: Path) -> list[str]:
    """Copy every `-cuda` section of the report `source` into `report`, keeping the others there; their names."""
    names = []
    for m in _SECTION.finditer(source.read_text()):
        if m["name"].endswith("-cuda"):
            write_section(report, m["name"], m["body"])
            names.append(m["name"])
    return names


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge_from:
        names = merge_sections(Path(args.merge_from), repo_path(args.output))
        print(f"copied {', '.join(names) or 'no -cuda sections'} from {args.merge_from} into {args.output}")
        return
    random.seed(SEED)
    torch.manual_seed(SEED)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    w = GpuWorkload.smoke() if args.smoke else GpuWorkload.quick() if args.quick else GpuWorkload()
    w.repeats = 1 if (args.smoke or args.quick) else args.repeats
    device = args.device
    dtype = torch.float32 if args.smoke else torch.bfloat16
    budget = Budget(args.time_budget)
    with tempfile.TemporaryDirectory(prefix="lorax-bench-gpu-") as tmp:
        model_dir, weights_note = prepare_model(args, Path(tmp))
        gpu = gpu_info(device)
        gbps, source = hbm_gbps(gpu["name"], args.hbm_gbps, args.smoke)
        facts = ModelFacts.of(model_dir, dtype, w.rank)
        b = Bench(args, w, device, dtype, model_dir, facts, Path(tmp), budget, gbps, source)
        env = software(environment(model_dir, command_line("bench_gpu.py", argv), device))
        env["dtype"] = str(dtype).removeprefix("torch.")
        env["model"] = weights_note if args.smoke else args.model if weights_note is None else \
            f"{args.model}: {weights_note}"
        if args.commit:
            env["commit"] = args.commit
        res: dict[str, Any] = {"env": env, "gpu": gpu, "hbm_gbps": gbps, "hbm_source": source,
                               "workload": asdict(w), "facts": asdict(facts), "smoke": args.smoke, "quick": args.quick,
                               "dtype": env["dtype"], "json_path": args.json, "parts": list(args.parts)}
        print(f"bench_gpu: {gpu['name']}, {env['dtype']}, model {model_dir}; HBM {fmt(gbps, '.0f')} GB/s ({source})",
              flush=True)
        done: list[str] = []
        for part in [p for p in PARTS if p in args.parts]:
            run_part(b, part, res)
            done.append(part)
            save(b, res, done)  # after each part: a run cut short keeps what it measured
        b.drop_engine()
    print(f"wrote {args.output} and {args.json} in {budget.elapsed():.0f} s")


if __name__ == "__main__":
    main()
