"""Benchmark the int8 quantized base model against fp32 (and bf16) on the CPU; writes its section of docs/benchmarks.md.

All in one run, on one model (`LLM(model, quantize="int8", dtype="float32")` against the same engine unquantized):

1. Memory: bytes of the decoder's linear weights (fp32 vs int8 + per-channel scales; bar <= 0.30x), the whole
   model's parameter + buffer bytes (like transformers' `get_memory_footprint`, the quantized layers' buffers
   counted), and the process's resident memory (VmRSS) and peak (VmHWM) after loading the engine, each mode in
   its own subprocess (`--child memory`) so the figures are clean.
2. Speed: a 64-token greedy answer (`ignore_eos`) to one chat-formatted prompt (batch 1), and 32 chat-formatted
   prompts x 64 tokens as one `generate` call (batch 32), fp32 vs int8 vs bf16 (no quantization), same prompts,
   each engine warmed up, the modes run alternately for `--repeats` rounds; medians and ratios (bars: int8 >=
   1.5x fp32 at batch 1, >= 1.3x at batch 32). A per-op profile (torch.profiler) of one decode step at batch 32
   for each mode shows where the time goes.
3. Quality: greedy token agreement of int8 with fp32 on the 32 prompts x 64 tokens (per prompt, the identical
   prefix / 64); perplexity of a fixed ~600-token text by a plain forward pass of the HF model, fp32 vs the same
   model after `quantize_decoder(model, "int8")` (decoder linears and LM head); both also with the LM head kept
   in fp32 (`head=False`), the alternative the library does not ship; and the shipped
   adapters' held-out accuracy on the fp32 and int8 base (scripts/eval_adapters.py).

Timings are wall-clock medians on a shared machine: compare the ratios, measured side by side in the same run.
Raw numbers go to docs/benchmarks_quant.json. `make bench` runs this script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import inspect
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_engine import CONTEXT, QUESTIONS, _loadavg, environment, greedy, verdict, write
from bench_report import REPO_ROOT, command_line, median, parse_bench_args, repo_path, run_table, write_section
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

sys.path.insert(0, str(REPO_ROOT))  # import this checkout's lorax_lite whatever the editable install says

from lorax_lite import LLM  # noqa: E402
from lorax_lite.engine.attention import ATTN_IMPLEMENTATION, paged_attention_forward  # noqa: E402
from lorax_lite.llm import render_chat  # noqa: E402
from lorax_lite.lora.layers import LoRALinear, find_decoder_layers  # noqa: E402
from lorax_lite.quantize import InputQuantizer, QuantizedLinear, linear_weight_bytes  # noqa: E402

# mode -> (dtype, quantize); fp32 is every ratio's baseline
MODES = {"fp32": ("float32", "none"), "int8": ("float32", "int8"), "bf16": ("bfloat16", "none")}
HEAD = "int8_fp32_head"  # the int8 engine with its LM head put back in fp32 by hand: measured, not shipped
KV_CACHE_GB = 0.25  # enough for 32 sequences of ~150 tokens; small, so that it does not swamp the RSS figures
BARS = {"linear_bytes": 0.30, "batch1": 1.5, "batch32": 1.3}
MIB = 2**20

# A fixed English text for perplexity (about 600 tokens with the default model's tokenizer).
TEXT = """\
When a company sets the price of a product, it has to look far beyond its own factory gate. The cost of raw \
materials, the rates charged by carriers, the exchange rate of the currency in which suppliers are paid, and the \
time it takes for goods to cross an ocean all end up in the number printed on the price list. A pricing team that \
ignores the supply chain will sooner or later discover that its margins have quietly disappeared.

Consider a mid-sized manufacturer of kitchen appliances. It buys steel from two mills, electric motors from a \
supplier in Asia, and packaging from a local firm. Last year the price of steel rose by twelve percent in a single \
quarter, while the cost of shipping a container from Shanghai to Rotterdam more than doubled during a period of \
port congestion. The company had signed annual contracts with its largest retail customers at fixed prices, so it \
could not pass the increase on. By the end of the year, a product line that had earned a healthy margin was \
barely breaking even.

The lesson the finance director drew from that year was simple: prices and supply contracts must be designed \
together. The company now includes an index clause in its contracts with large customers, which adjusts the price \
every quarter when the published price of steel moves by more than five percent. In return, customers receive a \
longer payment term and a guaranteed allocation of stock during peak season. The sales team was worried that \
customers would refuse, but most of them accepted, because they valued a reliable supply more than a fixed price.

On the supply side, the company reduced its dependence on a single route. It qualified a second motor supplier in \
Eastern Europe, which costs about six percent more per unit but delivers in eight days by truck instead of six \
weeks by sea. Holding less inventory in transit freed working capital, and the shorter lead time made it possible \
to react to changes in demand without large safety stocks. The planners now review lead times, freight rates and \
supplier performance every month, and they share a forecast with the pricing team before each quarterly review.

Discounts are handled with the same discipline. A sales representative may offer up to five percent for orders \
above five hundred units; anything more needs the approval of the regional manager, who checks the margin after \
freight and duties. Volume discounts are tied to delivery windows, so that a large order placed early in the \
quarter earns a better price than the same order placed in the final week, when factories and trucks are fully \
booked. Customers who collect goods from the warehouse themselves receive a small rebate that reflects the \
transport cost they save.

None of these measures is complicated, but together they changed how the company thinks about price. A price is \
no longer a number fixed once a year; it is a promise that rests on the whole chain of suppliers, carriers and \
warehouses behind it. When that chain is visible to the people who set prices, the company can offer fair terms \
to its customers and still protect its margins when the next disruption arrives.
"""


@dataclass
class QuantWorkload:
    """The sizes of every measurement; `--quick` shrinks them for a smoke run."""

    num_prompts: int = 32
    max_tokens: int = 64
    warmup_tokens: int = 4
    repeats: int = 2
    profile_warm_steps: int = 2  # decode steps run before the profiled ones
    profile_steps: int = 5  # decode steps profiled one by one; the report shows the median one
    ppl_tokens: int = 0  # 0: the whole text
    eval_adapters: bool = True

    @classmethod
    def quick(cls) -> QuantWorkload:
        return cls(num_prompts=4, max_tokens=8, warmup_tokens=2, repeats=1, profile_warm_steps=1, profile_steps=1,
                   ppl_tokens=96,
                   eval_adapters=False)


def engine_kwargs(mode: str) -> dict[str, Any]:
    """The engine every measurement of `mode` uses: bench_engine.py's, with a small KV cache. Full precision runs
    `F.linear` (linear_backend torch): the plain weights int8 replaces, so the memory rows compare like with like
    (oneDNN's prepacked fp32, the CPU default since, is measured in the `vllm` and `profile` sections)."""
    dtype, quantize = MODES[mode]
    return dict(dtype=dtype, quantize=quantize, device="cpu", max_num_seqs=64, max_num_batched_tokens=512,
                kv_cache_memory_gb=KV_CACHE_GB, linear_backend="torch")


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """n chat-formatted prompts (the chat template, generation prompt added): a context sentence and a question."""
    messages = [f"{CONTEXT[i % len(CONTEXT)]} {QUESTIONS[i % len(QUESTIONS)]}" for i in range(n)]
    return [render_chat(tokenizer, [{"role": "user", "content": m}])[1] for m in messages]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ---------------------------------------------------------------- 1. memory (one subprocess per mode)


def memory_status() -> dict[str, float]:
    """This process's VmRSS, VmHWM (peak RSS), RssAnon and RssFile from /proc/self/status, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024 / MIB
    return fields


def footprint_bytes(model: nn.Module) -> int:
    """Parameters + buffers, numel * element_size (transformers' get_memory_footprint; a tied weight counted once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def lora_slot_bytes(model: nn.Module) -> int:
    return sum(m.lora_a.numel() * m.lora_a.element_size() + m.lora_b.numel() * m.lora_b.element_size()
               for m in model.modules() if isinstance(m, LoRALinear))


def checkpoint_mapped(model: nn.Module) -> list[str]:
    """Names of the tensors whose memory is a mapping of a .safetensors file (the checkpoint, memory-mapped)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if any(start <= t.data_ptr() < end for start, end in ranges)]


def trimmed_status() -> dict[str, float] | None:
    """memory_status() after glibc's malloc_trim(0) hands the heap's free pages back to the OS (None without glibc):
    what the allocator kept of freed memory, such as the temporaries of quantization."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return memory_status()


def memory_child(model_dir: str, mode: str) -> dict[str, Any]:
    """Load the engine of `mode` in this (fresh) process, then serve one short request: its weight bytes and this
    process's memory at each point."""
    gc.collect()
    before = memory_status()
    llm = LLM(model_dir, **engine_kwargs(mode))
    gc.collect()
    loaded = memory_status()
    llm.generate(chat_prompts(llm.engine.tokenizer, 1), greedy(2))  # every weight read once
    engine, model = llm.engine, llm.engine.runner.model
    kv = engine.runner.kv_cache
    slots = lora_slot_bytes(model)
    served = memory_status() | {"checkpoint": checkpoint_rss_mib()}
    out = {"mode": mode, "imports": before, "loaded": loaded, "served": served, "trimmed": trimmed_status(),
           "linear_weight_bytes": linear_weight_bytes(model), "footprint_bytes": footprint_bytes(model) - slots,
           "lora_slot_bytes": slots, "kv_cache_bytes": sum(t.numel() * t.element_size() for t in [*kv.key, *kv.value]),
           "checkpoint_mapped": checkpoint_mapped(model),
           "quantization": None if engine.quantization is None else engine.quantization.to_dict()}
    copy_out_of_checkpoint(model, out["checkpoint_mapped"])
    return out | {"unmapped": (trimmed_status() or memory_status()) | {"checkpoint": checkpoint_rss_mib()}}


def checkpoint_rss_mib() -> float:
    """Resident MiB of this process's mappings of .safetensors files (from /proc/self/smaps)."""
    total, in_checkpoint = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            in_checkpoint = fields[-1].endswith(".safetensors")
        elif in_checkpoint and fields[0] == "Rss:":
            total += int(fields[1])
    return total * 1024 / MIB


@torch.no_grad()
def copy_out_of_checkpoint(model: nn.Module, names: list[str]) -> None:
    """Give the tensors `names` memory of their own: the checkpoint's mapping is unmapped once none is left in it
    (what a loader that copies the weights would leave resident)."""
    params = dict(model.named_parameters())
    for name in names:
        tensor = params[name] if name in params else model.get_buffer(name)
        tensor.data = tensor.data.clone()
    gc.collect()


def run_memory_children(model_dir: str, threads: int) -> dict[str, dict[str, Any]]:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "memory", "--mode", mode,
               "--model", model_dir, "--device", "cpu", "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {mode}: RSS {out[mode]['served']['VmRSS']:.0f} MiB, decoder linears "
              f"{out[mode]['linear_weight_bytes'] / MIB:.1f} MiB", flush=True)
    return out


# ---------------------------------------------------------------- 2. speed


def generate_tokens(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    seconds, outs = timed(lambda: llm.generate(prompts, greedy(max_tokens)))
    tokens = [list(o.token_ids) for o in outs]
    if any(len(t) != max_tokens for t in tokens):
        raise RuntimeError(f"some request made fewer than {max_tokens} tokens")
    return seconds, tokens


def warm_up(llm: LLM, prompts: list[list[int]], w: QuantWorkload) -> None:
    generate_tokens(llm, prompts[:1], w.warmup_tokens)
    generate_tokens(llm, prompts, w.warmup_tokens)


def run_speed(engines: dict[str, LLM], prompts: list[list[int]], w: QuantWorkload) -> dict[str, Any]:
    """Batch 1 (prompts[0]) and batch len(prompts), every mode in each round, the order rotating between rounds."""
    for llm in engines.values():
        warm_up(llm, prompts, w)
    names = list(engines)
    runs: dict[str, dict[str, Any]] = {m: {"batch1_seconds": [], "batch32_seconds": []} for m in names}
    for r in range(w.repeats):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            one, (runs[mode]["batch1_tokens"],) = generate_tokens(engines[mode], prompts[:1], w.max_tokens)
            many, tokens = generate_tokens(engines[mode], prompts, w.max_tokens)
            runs[mode]["deterministic"] = runs[mode].get("batch32_tokens", tokens) == tokens
            runs[mode]["batch32_tokens"] = tokens
            runs[mode]["batch1_seconds"].append(one)
            runs[mode]["batch32_seconds"].append(many)
        times = (f"{m} {runs[m]['batch1_seconds'][-1]:.2f}s / {runs[m]['batch32_seconds'][-1]:.2f}s" for m in names)
        print(f"  round {r + 1} (batch 1 / batch {len(prompts)}): " + ", ".join(times), flush=True)
    for run in runs.values():
        run["alone_vs_batched"] = prefix_share(run["batch1_tokens"], run["batch32_tokens"][0])
        run["batch1_tok_s"] = w.max_tokens / median(run["batch1_seconds"])
        run["batch32_tok_s"] = len(prompts) * w.max_tokens / median(run["batch32_seconds"])
    return runs


def fp32_head(model: PreTrainedModel, model_dir: str) -> None:
    """Put the checkpoint's fp32 LM head back into a quantized model (the shipped int8 quantizes it)."""
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.set_output_embeddings(fp32.get_output_embeddings())


# ---------------------------------------------------------------- per-op profile of one decode step

STEP, LINEARS, ACT_QUANT, ATTENTION, LM_HEAD = ("[decode step]", "[decoder linears]", "[activation quantization]",
                                                "[attention]", "[LM head]")
REGIONS = (LINEARS, ACT_QUANT, ATTENTION, LM_HEAD)


def _labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)
    return call


def _top_linears(model: PreTrainedModel) -> list[nn.Module]:
    """The decoder's linear layers as the attention and MLP blocks call them (a LoRALinear, not its base layer)."""
    found: list[str] = []
    modules = []
    for name, module in find_decoder_layers(model).named_modules():  # type: ignore[arg-type]
        inside = any(name.startswith(p + ".") for p in found)
        if isinstance(module, (nn.Linear, QuantizedLinear, LoRALinear)) and not inside:
            found.append(name)
            modules.append(module)
    return modules


@contextlib.contextmanager
def labelled_regions(model: PreTrainedModel) -> Iterator[None]:
    """Profiler labels around the decoder linears, the activation quantization, the attention and the LM head."""
    modules = [(m, LINEARS) for m in _top_linears(model)] + [(model.get_output_embeddings(), LM_HEAD)]
    for module, label in modules:
        module.forward = _labelled(module.forward, label)
    quantize = InputQuantizer.quantize
    InputQuantizer.quantize = _labelled(quantize, ACT_QUANT)  # type: ignore[method-assign]
    AttentionInterface.register(ATTN_IMPLEMENTATION, _labelled(paged_attention_forward, ATTENTION))
    try:
        yield
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
        InputQuantizer.quantize = quantize  # type: ignore[method-assign]
        for module, _ in modules:
            del module.forward


def profile_decode_step(llm: LLM, prompts: list[list[int]], w: QuantWorkload) -> dict[str, Any]:
    """Prefill the prompts, run a few decode steps, then profile `w.profile_steps` steps that decode all of them, one
    by one; the step whose time is the median, with every step's time."""
    engine = llm.engine
    requests = [engine.add_request(p, greedy(w.max_tokens)) for p in prompts]
    while not all(r.num_generated_tokens >= 1 for r in requests):
        engine.step()
    for _ in range(w.profile_warm_steps):
        engine.step()
    if any(r.is_finished for r in requests):
        raise RuntimeError("a request finished before the profiled steps: raise max_tokens")
    steps = []
    with labelled_regions(engine.runner.model):
        for _ in range(w.profile_steps):
            with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(STEP):
                engine.step()
            steps.append(summarize_profile(prof.key_averages()))
    if any(r.is_finished for r in requests):
        raise RuntimeError("a request finished during the profiled steps: raise max_tokens")
    for r in requests:
        engine.abort_request(r.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    middle = sorted(steps, key=lambda x: x["step_ms"])[len(steps) // 2]
    return middle | {"num_seqs": len(requests), "all_steps_ms": [x["step_ms"] for x in steps]}


def summarize_profile(events: Any) -> dict[str, Any]:
    """One profiled step: its time, the labelled regions (inclusive times) and the top ops by self time, in ms."""
    by_key = {e.key: e for e in events}
    step_ms = by_key[STEP].cpu_time_total / 1000
    regions = {label: by_key[label].cpu_time_total / 1000 if label in by_key else 0.0 for label in REGIONS}
    regions["[rest]"] = step_ms - regions[LINEARS] - regions[ATTENTION] - regions[LM_HEAD]
    ops = sorted((e for e in events if not e.key.startswith("[")), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in ops[:10]]
    return {"step_ms": step_ms, "regions_ms": regions, "top_ops": top,
            "ops_self_ms_total": sum(e.self_cpu_time_total for e in ops) / 1000}


# ---------------------------------------------------------------- 3. quality


def prefix_share(ref: list[int], got: list[int]) -> float:
    """The share of `ref` that `got` reproduces before their first difference."""
    same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    return same / len(ref)


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    shares = [prefix_share(a, b) for a, b in zip(ref, got, strict=True)]
    return {"mean": sum(shares) / len(shares), "min": min(shares), "identical": sum(s == 1.0 for s in shares),
            "n": len(shares), "per_prompt": shares}


@torch.inference_mode()
def perplexity(model: PreTrainedModel, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """exp(mean next-token NLL) of `ids` [1, T] in one plain forward pass, and the top-1 prediction at each position."""
    logits = model(input_ids=ids).logits.float()  # [1, T, vocab]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item()), logits[0, :-1].argmax(dim=-1)


def text_ids(tokenizer: Any, model: PreTrainedModel, w: QuantWorkload) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    longest = min(w.ppl_tokens or ids.shape[1], getattr(model.config, "max_position_embeddings", None) or ids.shape[1])
    return ids[:, :longest]


def run_perplexity(model_dir: str, tokenizer: Any, w: QuantWorkload) -> dict[str, Any]:
    """The HF model in fp32, after quantize_decoder (int8, LM head included), int8 with an fp32 LM head, and bf16."""
    from lorax_lite.quantize import quantize_decoder

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = text_ids(tokenizer, fp32, w)
    int8 = copy.deepcopy(fp32)
    quantize_decoder(int8, "int8")
    int8_fp32_head = copy.deepcopy(fp32)
    quantize_decoder(int8_fp32_head, "int8", head=False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"fp32": fp32, "int8": int8, HEAD: int8_fp32_head, "bf16": bf16}
    tied = fp32.get_output_embeddings().weight is fp32.get_input_embeddings().weight
    ppl, top1 = {}, {}
    for name, model in models.items():
        ppl[name], top1[name] = perplexity(model, ids)
    return {"tokens": ids.shape[1], "tied_head": tied, "ppl": ppl,
            "top1_agreement": {name: (top1[name] == top1["fp32"]).float().mean().item() for name in models},
            "footprint_bytes": {name: footprint_bytes(m) for name, m in models.items()}}


def run_head_engine(llm: LLM, prompts: list[list[int]], w: QuantWorkload, model_dir: str) -> dict[str, Any]:
    """The int8 engine with its LM head put back in fp32: its tokens and speed (measured only; the library
    quantizes the head)."""
    fp32_head(llm.engine.runner.model, model_dir)
    warm_up(llm, prompts, w)
    one, many = [], []
    for _ in range(w.repeats):
        seconds, (alone,) = generate_tokens(llm, prompts[:1], w.max_tokens)
        one.append(seconds)
        seconds, tokens = generate_tokens(llm, prompts, w.max_tokens)
        many.append(seconds)
    return {"batch1_seconds": one, "batch32_seconds": many, "batch1_tokens": alone, "batch32_tokens": tokens,
            "alone_vs_batched": prefix_share(alone, tokens[0]),
            "batch1_tok_s": w.max_tokens / median(one), "batch32_tok_s": len(prompts) * w.max_tokens / median(many)}


# ---------------------------------------------------------------- adapters' held-out accuracy (eval_adapters.py)


def run_adapter_eval(model_dir: str) -> dict[str, Any]:
    """eval_adapters.evaluate on the fp32 and the int8 base, as a function when build_llm takes `quantize`, else
    through its CLI (`--json --quantize int8`); "not measured" when neither exists."""
    import eval_adapters

    if "quantize" not in inspect.signature(eval_adapters.build_llm).parameters:
        return _adapter_eval_cli(model_dir)
    units = eval_adapters.discover_units(REPO_ROOT / "adapters")
    out: dict[str, Any] = {"status": "measured", "how": "eval_adapters.evaluate(build_llm(..., quantize=...))",
                           "results": {}}
    for mode in ("none", "int8"):
        start = time.perf_counter()
        results = eval_adapters.evaluate(eval_adapters.build_llm(model_dir, units, "cpu", quantize=mode), units)
        out["results"][mode] = {r.unit.name: r.as_json() for r in results}
        print(f"  quantize={mode}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def _adapter_eval_cli(model_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "measured", "how": "scripts/eval_adapters.py --json [--quantize int8]",
                           "results": {}}
    for mode, extra in (("none", []), ("int8", ["--quantize", "int8"])):
        cmd = [sys.executable, str(REPO_ROOT / "scripts" / "eval_adapters.py"), "--json", "--model", model_dir, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"status": f"not measured: eval_adapters.py {' '.join(extra)} exited {proc.returncode} "
                              f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'})"}
        out["results"][mode] = json.loads(proc.stdout)
    return out


# ---------------------------------------------------------------- report


def render(res: dict[str, Any]) -> str:
    return "\n".join([_header(res), _memory_md(res), _speed_md(res), _profile_md(res), _quality_md(res),
                      _reading_md(res)])


def _header(res: dict[str, Any]) -> str:
    env, w = res["env"], res["workload"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    return f"""## Quantized base model: int8 vs fp32 (and bf16) on the CPU
{quick}
Generated by `scripts/bench_quant.py`.

{run_table(env, software_note=f"; CPU kernels {env['cpu_capability']}, CPU flags {env['cpu_flags']}")}\
| Command | {env['command']} |
| Repeats | {w['repeats']} per speed figure (medians reported), whole run {res['total_seconds']:.0f} s |

Engines: `LLM(model, dtype=..., quantize=..., device="cpu", max_num_seqs=64, max_num_batched_tokens=512,
kv_cache_memory_gb={KV_CACHE_GB})`: fp32 = `dtype="float32"`; int8 = `dtype="float32", quantize="int8"`
({res['quant_kind']}; the LM head too, as an int8 copy; the embeddings stay fp32); bf16 = `dtype="bfloat16"`,
no quantization.
Raw numbers: `{res['json_path']}`.
"""


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _memory_row(m: dict[str, Any], label: str, get: Callable[[dict[str, Any]], float], fmt: str = "{:.0f}") -> str:
    f, q, b = (get(m[mode]) for mode in MODES)

    def ratio(x: float) -> str:  # fp32's packed linears hold nothing of the mapped checkpoint: 0
        return f"{x / f:.2f}×" if f else "–"

    return f"| {label} | {fmt.format(f)} | {fmt.format(q)} | {fmt.format(b)} | {ratio(q)} | {ratio(b)} |"


def _memory_md(res: dict[str, Any]) -> str:
    m = res["memory"]

    def size(key: str) -> Callable[[dict[str, Any]], float]:
        return lambda x: x[key] / MIB

    def rss(point: str, name: str) -> Callable[[dict[str, Any]], float]:
        return lambda x: x[point][name]

    rows = [_memory_row(m, "decoder linear weights (int8: + scales)", size("linear_weight_bytes"), "{:.1f}"),
            _memory_row(m, "model parameters + buffers (without LoRA slots)", size("footprint_bytes"), "{:.1f}"),
            _memory_row(m, "LoRA slot buffers (8 slots × rank 16)", size("lora_slot_bytes"), "{:.1f}"),
            _memory_row(m, "paged KV cache", size("kv_cache_bytes"), "{:.1f}"),
            _memory_row(m, "process RSS, imports only", rss("imports", "VmRSS")),
            _memory_row(m, "process RSS after loading the engine", rss("loaded", "VmRSS")),
            _memory_row(m, "**process RSS after its first request** (every weight read)", rss("served", "VmRSS")),
            _memory_row(m, "… of which anonymous (RssAnon)", rss("served", "RssAnon")),
            _memory_row(m, "… of which file-backed (RssFile)", rss("served", "RssFile")),
            _memory_row(m, "… of which pages of the memory-mapped checkpoint", rss("served", "checkpoint")),
            *([_memory_row(m, "anonymous after `malloc_trim(0)` (freed heap handed back)", rss("trimmed", "RssAnon"))]
              if all(m[mode]["trimmed"] for mode in MODES) else []),
            _memory_row(m, "peak RSS (VmHWM)", rss("served", "VmHWM")),
            _memory_row(m, "RSS, the still-mapped tensors copied out (mapping released)", rss("unmapped", "VmRSS"))]
    ratio = m["int8"]["linear_weight_bytes"] / m["fp32"]["linear_weight_bytes"]
    ok = verdict(ratio <= BARS["linear_bytes"])
    return f"""
### 1. Memory

Each mode loads its engine in a process of its own (`bench_quant.py --child memory --mode MODE`), then serves
one 2-token request; sizes in MiB.

| | fp32 | int8 | bf16 | int8 / fp32 | bf16 / fp32 |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Bar: decoder linear weights int8 / fp32 ≤ {BARS['linear_bytes']:.2f}× — {ok} ({ratio:.3f}×).
{_mapping_note(m)}"""


def _mapping_note(m: dict[str, Any]) -> str:
    mapped = {mode: m[mode]["checkpoint_mapped"] for mode in MODES}
    if not any(mapped.values()):
        return "No tensor of any engine lies in a memory-mapped checkpoint: the RSS rows are the tensors' own.\n"
    if not mapped["int8"]:
        return f"""
transformers memory-maps the checkpoint: {len(mapped['fp32'])} of the fp32 engine's tensors are pages of
`model.safetensors` (file-backed, paged in when first read, so “after loading” understates fp32). The int8 engine
reads every decoder weight once to quantize it, then `quantize_decoder` copies the tensors it leaves in full
precision out of the mapping, so no checkpoint page stays resident beside the int8 copies.
"""
    kept = ", ".join(f"`{n}`" for n in mapped["int8"][:2]) + (", …" if len(mapped["int8"]) > 2 else "")
    q = m["int8"]
    return f"""
transformers memory-maps the checkpoint: {len(mapped['fp32'])} of the fp32 engine's tensors are pages of
`model.safetensors` (file-backed, paged in when first read, so “after loading” understates fp32). The int8 engine
reads every decoder weight once to quantize it, and the {len(mapped['int8'])} tensors still in the mapping
({kept}) keep the whole mapping alive: the fp32 pages quantization read stay resident
({q['served']['checkpoint']:.0f} MiB of checkpoint pages beside the int8 copies), clean pages the kernel may drop
under memory pressure. The last row gives each of those tensors memory of its own, which unmaps the checkpoint:
what a loader that copies (or frees) the weights would leave resident.
"""


def _cells(s: dict[str, Any], names: Sequence[str], key: str) -> str:
    return " | ".join(f"{s[m][key]:.1f}" for m in names)


def _ratios(s: dict[str, Any], names: Sequence[str], key: str) -> str:
    return " | ".join(f"{s[m][key] / s['fp32'][key]:.2f}×" for m in names)


def _runs(s: dict[str, Any], names: Sequence[str], key: str) -> str:
    return " | ".join(", ".join(f"{x:.2f}" for x in s[m][key]) for m in names)


def _speedup(s: dict[str, Any], mode: str, key: str, base: str = "fp32") -> float:
    return float(s[mode][key] / s[base][key])


def _speed_md(res: dict[str, Any]) -> str:
    s, w, names = res["speed"], res["workload"], [*MODES, HEAD]
    n, pt = w["num_prompts"], res["prompt_tokens"]
    b1, bn = _speedup(s, "int8", "batch1_tok_s"), _speedup(s, "int8", "batch32_tok_s")
    ok1, okn = verdict(b1 >= BARS["batch1"]), verdict(bn >= BARS["batch32"])
    alone = " | ".join(f"{s[m]['alone_vs_batched']:.2f}" for m in names)
    return f"""
### 2. Speed

Workload: {n} chat-formatted prompts (the model's chat template; a context sentence and a business
question; {min(pt)}–{max(pt)} tokens). Batch 1 = the first prompt alone; batch {n} = all of them in one `generate`
call; {w['max_tokens']} greedy tokens each (`ignore_eos`). Every engine is warmed up, then the modes run alternately,
{w['repeats']} rounds; medians. “int8, fp32 head” is the int8 engine with its LM head put back in fp32 by hand
(the alternative; the library quantizes the head), timed after the other modes' rounds, not alternated with them.

| | fp32 | int8 | bf16 | int8, fp32 head |
|---|---:|---:|---:|---:|
| batch 1: tokens/s | {_cells(s, names, 'batch1_tok_s')} |
| batch 1: vs fp32 | {_ratios(s, names, 'batch1_tok_s')} |
| batch 1: all runs (s) | {_runs(s, names, 'batch1_seconds')} |
| batch {n}: tokens/s | {_cells(s, names, 'batch32_tok_s')} |
| batch {n}: vs fp32 | {_ratios(s, names, 'batch32_tok_s')} |
| batch {n}: all runs (s) | {_runs(s, names, 'batch32_seconds')} |
| prompt 0 alone vs in the batch: identical prefix | {alone} |

Bars: int8 ≥ {BARS['batch1']}× fp32 at batch 1 — {ok1} ({b1:.2f}×); int8 ≥ {BARS['batch32']}× fp32 at batch {n} —
{okn} ({bn:.2f}×).

The last row compares prompt 0's greedy tokens alone and in the batch (the identical prefix / {w['max_tokens']}).
The fp32 parts of every mode (attention over a padded batch, GEMMs of other shapes) need not give bit-identical results
for another batch; fp32 and bf16 carry such last-bit differences as they are, while int8 rounds each token's
activations to steps of 1/127 of its largest value, where a last-bit difference can cross a step.
"""


PROFILE_ROWS = ((LINEARS, "decoder linear layers (7 a layer)"), (ACT_QUANT, "… of which activation quantization"),
                (ATTENTION, "paged attention"), (LM_HEAD, "LM head"),
                ("[rest]", "the rest (norms, rotary, MLP activation, embedding, sampling, step set-up)"))


def _profile_md(res: dict[str, Any]) -> str:
    p, n = res["profile"], res["workload"]["num_prompts"]

    def cell(mode: str, key: str) -> str:
        ms = p[mode]["regions_ms"][key]
        return f"{ms:.1f} ({100 * ms / p[mode]['step_ms']:.0f}%)"

    rows = [f"| {text} | " + " | ".join(cell(m, key) for m in MODES) + " |" for key, text in PROFILE_ROWS]
    step_ms = " | ".join(f"**{p[m]['step_ms']:.1f}**" for m in MODES)
    warm, steps = res["workload"]["profile_warm_steps"], res["workload"]["profile_steps"]
    all_steps = "; ".join(f"{m} " + ", ".join(f"{t:.0f}" for t in p[m]["all_steps_ms"]) for m in MODES)
    return f"""
### Where the time goes: one decode step at batch {n}

torch.profiler (CPU) over {steps} engine steps, profiled one by one, that each decode all {n} sequences (after
{warm} decode steps unprofiled); below, the step whose time is the median (every step, ms: {all_steps}). Times
are under the profiler, which adds a little per op. The regions are labels the script puts around the modules'
calls (`record_function`); the time outside them is “the rest”.

| region | fp32 | int8 | bf16 |
|---|---:|---:|---:|
| **whole step (ms)** | {step_ms} |
{chr(10).join(rows)}

Top 10 ops by self CPU time in that step:

{chr(10).join(_top_ops_md(m, p[m]) for m in MODES)}"""


def _top_ops_md(mode: str, prof: dict[str, Any]) -> str:
    total = prof["ops_self_ms_total"]
    rows = "\n".join(f"| `{o['op']}` | {o['self_ms']:.1f} | {100 * o['self_ms'] / total:.0f}% | {o['calls']} |"
                     for o in prof["top_ops"])
    return f"""**{mode}** (all ops' self time: {total:.1f} ms)

| op | self ms | share | calls |
|---|---:|---:|---:|
{rows}
"""


QUALITY_ROWS = (("fp32", "fp32 (reference)"), ("int8", "**int8 (shipped: LM head int8 too)**"),
                (HEAD, "int8 with an fp32 LM head (not shipped)"), ("bf16", "bf16"))


def _quality_row(q: dict[str, Any], name: str, text: str) -> str:
    a, pp = q["agreement"].get(name), q["perplexity"]
    agree = "– | – | –" if a is None else f"{a['mean']:.3f} | {a['min']:.3f} | {a['identical']}/{a['n']}"
    ppl, top1 = pp["ppl"][name], pp["top1_agreement"][name]
    return (f"| {text} | {agree} | {top1:.3f} | {ppl:.3f} | {ppl / pp['ppl']['fp32']:.4f}× | "
            f"{_mib(pp['footprint_bytes'][name])} |")


def _quality_md(res: dict[str, Any]) -> str:
    q, w = res["quality"], res["workload"]
    n, k = w["num_prompts"], w["max_tokens"]
    tied = "tied to the input embeddings" if q["perplexity"]["tied_head"] else "not tied to the embeddings"
    vs = q["agreement"]["fp32_head_vs_int8"]
    return f"""
### 3. Quality

Greedy agreement with fp32 on the batch-{n} runs of section 2 ({n} prompts × {k} tokens): per prompt, the length
of the identical prefix / {k}. Perplexity of a fixed English text about pricing and supply chains
({q['perplexity']['tokens']} tokens) in one plain forward pass of the HF model: fp32; the same model after
`quantize_decoder(model, "int8")` (the engine's layers: decoder linears and the LM head, which is {tied}; its
int8 copy leaves the embeddings fp32); that with the LM head kept fp32 (`head=False`); and the model in bf16.
“Top-1 agreement”: in that forward pass (the same fp32 context at every position), the share of positions
whose most likely next token is fp32's. “Model MiB”: that HF model's parameters + buffers.

| | greedy agreement: mean | min | fully identical | top-1 agreement | perplexity | vs fp32 | model MiB |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(_quality_row(q, name, text) for name, text in QUALITY_ROWS)}

The int8 engine with an fp32 head against the shipped int8 engine (the head's own effect): greedy agreement mean
{vs['mean']:.3f}, min {vs['min']:.3f}, {vs['identical']}/{vs['n']} fully identical.

{_adapters_md(res)}"""


def _acc(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _adapters_md(res: dict[str, Any]) -> str:
    ev = res["quality"]["adapters"]
    if ev["status"] != "measured":
        return f"The shipped adapters' held-out accuracy (scripts/eval_adapters.py): {ev['status']}.\n"
    fp, q = ev["results"]["none"], ev["results"]["int8"]
    keys = ("adapter_accuracy", "base_accuracy", "other_adapter_accuracy")
    rows = "\n".join(f"| {u} | {fp[u]['n']} | " + " | ".join(f"{_acc(fp[u][k])} | {_acc(q[u][k])}" for k in keys)
                     + " |" for u in fp)
    return f"""The shipped adapters' held-out accuracy (the answer contains the key fact; `{ev['how']}`): the adapters,
trained on the fp32 base, served unchanged on the fp32 and on the int8 base.

| unit | questions | its adapter, fp32 | its adapter, int8 | base model, fp32 | base model, int8 | \
other unit's adapter, fp32 | other's, int8 |
|---|---:|---:|---:|---:|---:|---:|---:|
{rows}
"""


def _reading_md(res: dict[str, Any]) -> str:
    parts = [_read_speed(res), _read_bf16(res), _read_head(res), _read_memory(res), _read_noise(res)]
    return "\n### Reading\n\n" + "\n".join(parts) + "\n"


def _read_speed(res: dict[str, Any]) -> str:
    s, n = res["speed"], res["workload"]["num_prompts"]
    f32, i8 = res["profile"]["fp32"], res["profile"]["int8"]
    fr, ir = f32["regions_ms"], i8["regions_ms"]
    int_mm = next((o["self_ms"] for o in i8["top_ops"] if o["op"] == "aten::_int_mm"), 0.0)
    b1, bn = _speedup(s, "int8", "batch1_tok_s"), _speedup(s, "int8", "batch32_tok_s")
    return f"""- **Where int8 gains.** In a batch-{n} decode step the decoder linears took {fr[LINEARS]:.1f} ms in fp32
  and {ir[LINEARS]:.1f} ms in int8 (`aten::_int_mm` {int_mm:.1f} ms, the per-token activation quantization
  {ir[ACT_QUANT]:.1f} ms); the LM head took {fr[LM_HEAD]:.1f} ms in fp32 and {ir[LM_HEAD]:.1f} ms in int8.
  The attention ({fr[ATTENTION]:.1f} vs {ir[ATTENTION]:.1f} ms) does the same arithmetic in both modes; the whole
  step went from {f32['step_ms']:.1f} to {i8['step_ms']:.1f} ms.
  At batch 1 a step reads every weight for one token, and int8's decoder
  weights are a quarter of the bytes: int8 ran at {b1:.2f}× fp32's tokens/s at batch 1 and {bn:.2f}× at batch {n}."""


def _read_bf16(res: dict[str, Any]) -> str:
    s, n, env, ppl = res["speed"], res["workload"]["num_prompts"], res["env"], res["quality"]["perplexity"]["ppl"]
    b1, bn = _speedup(s, "bf16", "batch1_tok_s"), _speedup(s, "bf16", "batch32_tok_s")
    vs1, vsn = _speedup(s, "int8", "batch1_tok_s", "bf16"), _speedup(s, "int8", "batch32_tok_s", "bf16")
    flags = f"this CPU's flags: {env['cpu_flags']}; torch's CPU kernels: {env['cpu_capability']}"
    att = {m: res["profile"][m]["regions_ms"][ATTENTION] for m in ("fp32", "bf16")}
    lin = {m: res["profile"][m]["regions_ms"][LINEARS] for m in ("fp32", "bf16")}
    return f"""- **bf16** ({flags}) ran at {b1:.2f}× fp32's tokens/s at batch 1 and {bn:.2f}× at batch {n}; int8 ran
  at {vs1:.2f}× and {vsn:.2f}× bf16's. In the profiled step bf16's decoder linears took {lin['bf16']:.1f} ms (fp32
  {lin['fp32']:.1f}) and its attention {att['bf16']:.1f} ms (fp32 {att['fp32']:.1f}). Perplexity: int8
  {ppl['int8']:.3f}, bf16 {ppl['bf16']:.3f}, fp32 {ppl['fp32']:.3f}."""


def _read_head(res: dict[str, Any]) -> str:
    s, q, n = res["speed"], res["quality"], res["workload"]["num_prompts"]
    a, h, vs = q["agreement"]["int8"], q["agreement"][HEAD], q["agreement"]["fp32_head_vs_int8"]
    ppl, top1, mem = q["perplexity"]["ppl"], q["perplexity"]["top1_agreement"], q["perplexity"]["footprint_bytes"]
    b1, bn = _speedup(s, "int8", "batch1_tok_s", HEAD), _speedup(s, "int8", "batch32_tok_s", HEAD)
    tied = ("the head is tied to the embeddings, which the input still needs in fp32, so the int8 head is an extra "
            "copy" if q["perplexity"]["tied_head"] else "the head is not tied")
    return f"""- **The LM head (int8 in the shipped mode).** Against keeping it fp32: perplexity {ppl['int8']:.3f} vs
  {ppl[HEAD]:.3f} (fp32 {ppl['fp32']:.3f}), top-1 agreement {top1['int8']:.3f} vs {top1[HEAD]:.3f}, mean greedy
  agreement with fp32 {a['mean']:.3f} vs {h['mean']:.3f} (the two int8 engines against each other: {vs['mean']:.3f},
  {vs['identical']}/{vs['n']} identical); the int8 head ran at {b1:.2f}× the fp32 head's tokens/s at batch 1 and
  {bn:.2f}× at batch {n}. Memory: {tied}, so the model is {_mib(mem['int8'])} MiB with it, {_mib(mem[HEAD])} without."""


def _read_memory(res: dict[str, Any]) -> str:
    f, q = res["memory"]["fp32"], res["memory"]["int8"]
    fs, qs, fu, qu = f["served"], q["served"], f["unmapped"], q["unmapped"]
    rest = f["footprint_bytes"] - f["linear_weight_bytes"]
    linears, whole = q["linear_weight_bytes"] / f["linear_weight_bytes"], q["footprint_bytes"] / f["footprint_bytes"]
    return f"""- **Memory.** The int8 decoder linears are {linears:.2f}× fp32's bytes and the whole model {whole:.2f}×
  (the embeddings and norms, fp32 in both, and fp32's head are {_mib(rest)} of fp32's {_mib(f['footprint_bytes'])}
  MiB; int8 adds an int8 copy of the tied head). After a
  first request the process held {fs['VmRSS']:.0f} MiB (fp32) and {qs['VmRSS']:.0f} MiB (int8), of which
  {fs['checkpoint']:.0f} and {qs['checkpoint']:.0f} MiB pages of the memory-mapped checkpoint; with the still-mapped
  tensors copied out, {fu['VmRSS']:.0f} and {qu['VmRSS']:.0f} MiB ({qu['VmRSS'] / fu['VmRSS']:.2f}×). Both include the
  same LoRA slots ({_mib(f['lora_slot_bytes'])} MiB), KV cache ({_mib(f['kv_cache_bytes'])} MiB) and libraries."""


def _read_noise(res: dict[str, Any]) -> str:
    s, env = res["speed"], res["env"]
    spread = max(max(v) / min(v) for m in MODES for v in (s[m]["batch1_seconds"], s[m]["batch32_seconds"])) - 1
    return f"""- **Noise.** Runs of the same measurement differed by up to {100 * spread:.0f}%; the load average went
  from {env['loadavg_start']} to {env['loadavg_end']}. The modes alternate within each round, so other load hits
  them alike."""


# ---------------------------------------------------------------- main


def cpu_flags() -> str:
    """The CPU's flags that decide the int8 and bf16 kernels (VNNI: int8 dot products; bf16; AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--child", choices=["memory"], help=argparse.SUPPRESS)
        p.add_argument("--mode", choices=list(MODES), default="fp32", help=argparse.SUPPRESS)

    return parse_bench_args(__doc__.splitlines()[0], "benchmarks_quant", argv, extra)


def run_all(model_dir: str, w: QuantWorkload, threads: int) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = chat_prompts(tok, w.num_prompts)
    res: dict[str, Any] = {"workload": asdict(w), "prompt_tokens": [len(p) for p in prompts]}
    print("1/4 memory: one process per mode", flush=True)
    res["memory"] = run_memory_children(model_dir, threads)
    res["quant_kind"] = res["memory"]["int8"]["quantization"]["kind"]
    engines = {mode: LLM(model_dir, **engine_kwargs(mode)) for mode in MODES}
    print(f"2/4 speed: batch 1 and batch {w.num_prompts} x {w.max_tokens} tokens, {w.repeats} rounds", flush=True)
    res["speed"] = run_speed(engines, prompts, w)
    res["profile"] = {mode: profile_decode_step(llm, prompts, w) for mode, llm in engines.items()}
    print("3/4 quality: the int8 engine with an fp32 LM head, perplexity", flush=True)
    int8 = engines.pop("int8")
    del engines
    res["speed"][HEAD] = run_head_engine(int8, prompts, w, model_dir)
    del int8
    fp32_tokens = res["speed"]["fp32"]["batch32_tokens"]
    agree = {m: agreement(fp32_tokens, res["speed"][m]["batch32_tokens"]) for m in ("int8", HEAD, "bf16")}
    agree["fp32_head_vs_int8"] = agreement(res["speed"]["int8"]["batch32_tokens"], res["speed"][HEAD]["batch32_tokens"])
    res["quality"] = {"agreement": agree, "perplexity": run_perplexity(model_dir, tok, w)}
    print("4/4 adapters' held-out accuracy" + (" (skipped: --quick)" if not w.eval_adapters else ""), flush=True)
    skipped = {"status": "not measured (--quick)"}
    res["quality"]["adapters"] = run_adapter_eval(model_dir) if w.eval_adapters else skipped
    return res


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child == "memory":
        print(json.dumps(memory_child(args.model, args.mode)))
        return
    if args.device.type != "cpu":
        print(f"bench_quant.py measures the CPU int8 kernels: running on cpu, not {args.device}", flush=True)
    w = QuantWorkload.quick() if args.quick else QuantWorkload(repeats=args.repeats)
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_quant.py", argv), torch.device("cpu"))
    res = run_all(args.model, w, torch.get_num_threads())
    env |= {"loadavg_end": _loadavg(), "dtype": "float32 / int8 / bfloat16",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags()}
    res.update(env=env, quick=args.quick, json_path=args.json)
    res["total_seconds"] = time.perf_counter() - start
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    write_section(repo_path(args.output), "quant", render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
