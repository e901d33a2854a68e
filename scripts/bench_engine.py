"""Benchmark the lorax-lite engine against transformers on this machine; writes docs/benchmarks.md.

What is measured, all in one run, on one model (fp32; on the CPU with torch's default threads unless
--threads, or on the GPU with `--device cuda`, the default when torch sees one):

1. Throughput: the same 32 prompts (fixed seed, ~10-120 tokens each) x 64 greedy tokens with
   `ignore_eos`, as one `LLM.generate` call, against transformers `model.generate` on the same
   batch (left-padded, `min_new_tokens` = `max_new_tokens` = 64). Both are warmed up, then run
   alternately for `--repeats` rounds; we report medians and the ratio engine / transformers.
   A few prompts are also run alone through transformers (batch 1, no padding) to check the
   engine's greedy tokens are the same.
2. Continuous batching (the seed's 100/10/10 experiment): three pirate-chat requests submitted
   together with max_tokens 100, 10, 10; each short one's latency beside the long one is
   compared with its latency when it runs alone. Times come from the engine's RequestMetrics.
The seed's third experiment (sequential vs one prompt vs concurrent classification of 16 article
titles) runs against the HTTP server in bench_server.py, which uses this script's titles and prompt.

Timings are wall-clock medians; the machine is shared and noisy, so only ratios measured in the
same run are compared. Raw numbers go to the JSON file. `make bench` runs this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_report import (REPO_ROOT, command_line, median, parse_bench_args, repo_path, run_table, section_name, sync,
                          write_section)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(REPO_ROOT))  # import this checkout's lorax_lite whatever the editable install says

from lorax_lite import LLM, SamplingParams  # noqa: E402
from lorax_lite.llm import render_chat  # noqa: E402

PROMPT_SEED = 1234

# Short business questions and instructions; each prompt is some context sentences + one of these.
QUESTIONS = [
    "Summarize the main risks in our third-quarter sales forecast.",
    "Draft a polite email asking a supplier to confirm the new delivery date.",
    "What are three ways to reduce customer churn for a subscription software product?",
    "Explain the difference between gross margin and operating margin.",
    "Write a short agenda for a one-hour product planning meeting.",
    "How should a small retailer prepare for the holiday season?",
    "List the key points to include in a vendor contract renewal.",
    "Suggest a name for an internal dashboard that tracks warehouse inventory.",
    "What questions should we ask when interviewing a candidate for a data analyst role?",
    "Rewrite this sentence to sound more professional: we messed up the shipment.",
    "Give me a checklist for onboarding a new remote employee.",
    "How can a finance team shorten the month-end close?",
    "Describe a simple process for handling customer refund requests.",
    "What metrics should a customer support team report every week?",
    "Write a two-sentence update for the board about the delayed product launch.",
    "What is a reasonable budget split between marketing channels for a new startup?",
    "Explain why cash flow matters more than profit for a young company.",
    "Draft a job posting for a part-time bookkeeper.",
    "How do we decide whether to build or buy a new CRM system?",
    "Give three tips for running an effective quarterly business review.",
    "What should be in a risk register for a construction project?",
    "Summarize the pros and cons of moving our servers to the cloud.",
    "Write a short thank-you note to a long-standing client.",
    "How can a sales team qualify leads faster?",
    "Explain what a service level agreement is to a new manager.",
    "Propose a fair policy for remote work in a team of twenty people.",
    "What steps should we take after a data breach is discovered?",
    "Suggest ways to cut travel expenses without hurting client relationships.",
    "How do we measure the return on a training program for staff?",
    "Write a brief announcement of a new office opening in Austin.",
    "What are common mistakes when setting prices for a new product?",
    "Outline a plan to improve on-time delivery from 85% to 95%.",
]

CONTEXT = [
    "Our company sells accounting software to small and medium-sized businesses across North America.",
    "Revenue grew eight percent last quarter, but new customer sign-ups slowed in the final month.",
    "The operations team recently moved to a new warehouse management system.",
    "Several large clients have asked for more flexible payment terms this year.",
    "The board expects a clear plan before the next budget review in March.",
    "Our main competitor cut its prices by fifteen percent in the spring.",
    "The customer support team handles about four hundred tickets every week.",
    "We have twelve sales representatives, most of whom joined in the last two years.",
    "Shipping costs rose sharply after our logistics partner changed its rates.",
    "Employee surveys show that people want clearer goals and more feedback from managers.",
    "The finance department still reconciles many accounts by hand in spreadsheets.",
    "Marketing spend is currently split between search ads, trade shows and email campaigns.",
    "Two key suppliers are located overseas, which makes delivery times hard to predict.",
    "Leadership wants to expand into Europe within the next eighteen months.",
    "Our product roadmap includes a mobile app and better reporting features.",
    "Last year an outage of our billing system lasted almost a full business day.",
]

PIRATE_SYSTEM = "You are a friendly chatbot who always responds in the style of a pirate"
PIRATE_QUESTIONS = [
    "If you could have dinner with any historical figure, who would it be and why?",
    "What is one technological innovation you believe will have the most impact on society in the next decade?",
    "If you had to live in another country for a year, which one would you choose and what would you most look forward to experiencing there?",
]

CLASSIFY_SYSTEM = (
    "You are an helpful AI assistant that categorizes the text in one of the two categories : SCIENCE, AI. \n"
    "###Important :\nDo not add any additional information"
)
ARTICLE_TITLES = [
    "GPT-3 (Generative Pre-trained Transformer 3) - OpenAI's powerful language model capable of writing like a human",
    "DALL-E - OpenAI's AI system that can create images from textual descriptions",
    "Scientific research has led to significant advancements in medicine and healthcare.",
    "CLIP (Contrastive Language-Image Pretraining) - OpenAI's model that understands images in the context of natural language",
    "Science has contributed to our understanding of the natural world and the universe.",
    "Codex - OpenAI's AI system that can understand and generate code, powering GitHub Copilot",
    "GPT-4 - OpenAI's rumored next iteration of their language model with anticipated improvements",
    "Azure AI - Microsoft's suite of AI services, including machine learning, cognitive services, and conversational AI",
    "The collaboration and exchange of scientific knowledge across international borders have facilitated global progress in various fields.",
    "Scientific innovations have improved communication and connectivity through technology.",
    "Microsoft Turing Models - A series of large-scale language models developed by Microsoft",
    "Microsoft Project Brainwave - Real-time AI platform for cloud and edge computing",
    "Microsoft AI for Earth - A program applying AI to environmental challenges",
    "Microsoft AI for Health - An initiative leveraging AI for health-related research",
    "Scientific innovations have improved communication and connectivity through technology.",
    "OpenAI's API - Providing access to GPT-3 and other models for various applications",
]


@dataclass
class Workload:
    """The sizes of every scenario; `--quick` shrinks them for a smoke run."""

    num_prompts: int = 32
    max_tokens: int = 64
    min_prompt_tokens: int = 10
    max_prompt_tokens: int = 120
    repeats: int = 2
    num_correctness_prompts: int = 4
    latency_max_tokens: tuple[int, ...] = (100, 10, 10)
    num_titles: int = 16  # this and the next two: bench_server.py's classification
    classify_max_tokens: int = 8
    one_prompt_max_tokens: int = 128

    @classmethod
    def quick(cls) -> "Workload":
        return cls(num_prompts=4, max_tokens=8, repeats=1, num_correctness_prompts=2,
                   latency_max_tokens=(20, 4, 4), num_titles=4, one_prompt_max_tokens=16)


# ---------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of `fn()` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def build_prompts(tokenizer: PreTrainedTokenizerBase, w: Workload, seed: int = PROMPT_SEED) -> list[str]:
    """Deterministic prompts: context sentences then a question, each grown to a random target length."""
    rng = random.Random(seed)
    prompts = []
    for i in range(w.num_prompts):
        target = rng.randint(w.min_prompt_tokens, w.max_prompt_tokens)
        sentences = rng.sample(CONTEXT, len(CONTEXT))
        prompt = QUESTIONS[i % len(QUESTIONS)]
        for sentence in sentences:
            longer = f"{sentence} {prompt}"
            if len(tokenizer(longer).input_ids) > target:
                break
            prompt = longer
        prompts.append(prompt)
    return prompts


def greedy(max_tokens: int, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)


# ---------------------------------------------------------------- 1. throughput


def engine_generate(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[float, list[list[int]]]:
    seconds, outs = timed(lambda: llm.generate(prompts, greedy(max_tokens)))
    return seconds, [list(o.token_ids) for o in outs]


def hf_generate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], max_tokens: int
) -> tuple[float, list[list[int]]]:
    """transformers' batched generate, timed from text in to text out like the engine's."""

    def run() -> list[list[int]]:
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:].tolist()
        tok.batch_decode(new, skip_special_tokens=True)
        return new

    return timed(run)


class ForwardTimer:
    """Times each forward of a model: prefill calls (several tokens per sequence) vs decode calls."""

    def __init__(self, model: PreTrainedModel, num_seqs: int) -> None:
        self.num_seqs, self.calls, self._start = num_seqs, [], 0.0
        self._is_prefill, self._device = False, next(model.parameters()).device
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after)]

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)  # engine: [1, T] flat; transformers: [B, L]
        self._is_prefill = ids is not None and (ids.shape[1] > 1 if ids.shape[0] > 1 else ids.numel() > self.num_seqs)
        sync(self._device)
        self._start = time.perf_counter()

    def _after(self, *args: object) -> None:
        sync(self._device)
        self.calls.append((self._is_prefill, time.perf_counter() - self._start))

    def split(self, elapsed: float) -> dict[str, float]:
        """Seconds in prefill forwards, median decode forward, and seconds outside the model."""
        prefill = sum(t for p, t in self.calls if p)
        decode = [t for p, t in self.calls if not p]
        outside = elapsed - prefill - sum(decode)
        return {"prefill_s": prefill, "decode_step_s": median(decode) if decode else 0.0, "outside_s": outside}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def run_throughput(llm: LLM, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   prompts: list[str], w: Workload) -> dict[str, Any]:
    """Warm both up, then alternate engine and transformers (who goes first too) for `w.repeats` rounds."""
    runs = {"engine": lambda n: engine_generate(llm, prompts, n), "hf": lambda n: hf_generate(model, tok, prompts, n)}
    for run in runs.values():
        run(4)
    timers = {"engine": ForwardTimer(llm.engine.runner.model, len(prompts)), "hf": ForwardTimer(model, len(prompts))}
    seconds: dict[str, list[float]] = {"engine": [], "hf": []}
    splits: dict[str, list[dict[str, float]]] = {"engine": [], "hf": []}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(w.repeats):
        for name in ("engine", "hf") if r % 2 == 0 else ("hf", "engine"):
            timers[name].calls.clear()
            elapsed, tokens[name] = runs[name](w.max_tokens)
            seconds[name].append(elapsed)
            splits[name].append(timers[name].split(elapsed))
            if any(len(t) != w.max_tokens for t in tokens[name]):
                raise RuntimeError(f"{name} made fewer than {w.max_tokens} tokens for some prompt")
        print(f"  round {r + 1}: engine {seconds['engine'][-1]:.2f}s, transformers {seconds['hf'][-1]:.2f}s", flush=True)
    for timer in timers.values():
        timer.remove()
    return _throughput_summary(seconds, splits, len(prompts) * w.max_tokens) | {
        "correctness": check_correctness(model, tok, prompts, tokens["engine"], w)}


def _throughput_summary(seconds: dict[str, list[float]], splits: dict[str, list[dict[str, float]]],
                        total: int) -> dict[str, Any]:
    eng_tps, hf_tps = total / median(seconds["engine"]), total / median(seconds["hf"])
    split_medians = {name: {k: median([s[k] for s in runs]) for k in runs[0]} for name, runs in splits.items()}
    return {
        "generated_tokens": total, "engine_seconds": seconds["engine"], "hf_seconds": seconds["hf"],
        "engine_tok_s": eng_tps, "hf_tok_s": hf_tps, "ratio": eng_tps / hf_tps,
        "ratio_best_runs": min(seconds["hf"]) / min(seconds["engine"]),
        "split": split_medians, "split_runs": splits,
    }


def correctness_indices(prompts: list[str], tok: PreTrainedTokenizerBase, n: int) -> list[int]:
    """The shortest, the longest and evenly spaced prompts between them."""
    by_len = sorted(range(len(prompts)), key=lambda i: len(tok(prompts[i]).input_ids))
    picks = [by_len[round(k * (len(by_len) - 1) / max(n - 1, 1))] for k in range(n)]
    return list(dict.fromkeys(picks))


def check_correctness(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
                      engine_tokens: list[list[int]], w: Workload) -> list[dict[str, Any]]:
    """Engine tokens vs transformers `generate` on each prompt alone (batch 1, no padding, no EOS stop)."""
    results = []
    for i in correctness_indices(prompts, tok, w.num_correctness_prompts):
        enc = tok(prompts[i], return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=w.max_tokens, do_sample=False,
                                 eos_token_id=[], pad_token_id=tok.pad_token_id)  # no EOS: like ignore_eos
        ref, got = out[0, enc.input_ids.shape[1]:].tolist(), engine_tokens[i]
        same = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
        results.append({"prompt_index": i, "prompt_tokens": enc.input_ids.shape[1],
                        "compared_tokens": len(ref), "identical": got == ref, "first_divergence": same})
    return results


# ---------------------------------------------------------------- 2. continuous batching latency


@dataclass
class RequestTiming:
    """One request's life in seconds from its arrival, and the engine's raw metrics."""

    max_tokens: int
    ttft: float
    latency: float
    num_tokens: int
    finish_rank: int  # 0 = first request of its group to finish
    engine_metrics: dict[str, float | None] = field(default_factory=dict)


def submit_together(llm: LLM, prompts: list[list[int]], max_tokens: Sequence[int]) -> list[RequestTiming]:
    """Add all requests at once, step the engine until all finish; time each request."""
    engine = llm.engine
    arrival, ids = [], []
    for prompt, n in zip(prompts, max_tokens):
        arrival.append(time.time())
        ids.append(engine.add_request(prompt, greedy(n)).request_id)
    first: dict[str, float] = {}
    done: dict[str, tuple[float, Any]] = {}
    while len(done) < len(ids):
        for out in engine.step():
            now = time.time()
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, out)
    ranks = {rid: k for k, rid in enumerate(sorted(done, key=lambda r: done[r][0]))}
    return [_timing(done[rid], first[rid], t0, n, ranks[rid]) for rid, t0, n in zip(ids, arrival, max_tokens)]


def _timing(done: tuple[float, Any], first: float, arrival: float, max_tokens: int, rank: int) -> RequestTiming:
    """Times from the engine's RequestMetrics; our stamps around `step()` stand in for any it lacks."""
    finished, out = done
    m = asdict(out.metrics) if out.metrics is not None else {}
    arrival = m.get("arrival_time") or arrival
    first, finished = m.get("first_token_time") or first, m.get("finished_time") or finished
    return RequestTiming(max_tokens, first - arrival, finished - arrival, len(out.token_ids), rank, m)


def hf_decode_step(model: PreTrainedModel, batch: int, repeats: int, context: int = 50) -> float:
    """Median seconds of one transformers decode step (KV cache, `context` tokens) for `batch` sequences."""
    times = []
    with torch.inference_mode():
        ids = torch.randint(100, 10000, (batch, context), generator=torch.Generator().manual_seed(0)).to(model.device)
        cache = model(ids, use_cache=True).past_key_values
        for _ in range(4 * repeats):
            step = ids[:, -1:]
            sync(model.device)
            seconds, _ = timed(lambda: (model(step, past_key_values=cache, use_cache=True, logits_to_keep=1),
                                        sync(model.device)))
            times.append(seconds)
    return median(times)


def run_latency(llm: LLM, model: PreTrainedModel, w: Workload) -> dict[str, Any]:
    """The seed's 100/10/10 experiment: each request beside the others vs the same request alone."""
    prompts = [render_chat(llm.tokenizer, [{"role": "system", "content": PIRATE_SYSTEM},
                                           {"role": "user", "content": q}])[1] for q in PIRATE_QUESTIONS]
    n = w.latency_max_tokens
    submit_together(llm, prompts[:1], [4])  # warm-up
    together: list[list[RequestTiming]] = []
    alone: list[list[RequestTiming]] = []
    for r in range(w.repeats):
        together.append(submit_together(llm, prompts, n))
        alone.append([submit_together(llm, [p], [m])[0] for p, m in zip(prompts, n)])
        print(f"  round {r + 1}: together {[round(t.latency, 2) for t in together[-1]]}s, "
              f"alone {[round(t.latency, 2) for t in alone[-1]]}s", flush=True)
    rows = [_latency_row(i, n[i], len(prompts[i]), [t[i] for t in together], [a[i] for a in alone])
            for i in range(len(prompts))]
    shorts_first = all(t[i].latency < t[0].latency for t in together for i in range(1, len(prompts)))
    return {"rows": rows, "shorts_finished_first": shorts_first,
            "hf_decode_step": {str(b): hf_decode_step(model, b, w.repeats) for b in (1, len(prompts))},
            "raw_together": [[asdict(x) for x in t] for t in together],
            "raw_alone": [[asdict(x) for x in a] for a in alone]}


def _latency_row(i: int, max_tokens: int, prompt_tokens: int,
                 together: list[RequestTiming], alone: list[RequestTiming]) -> dict[str, Any]:
    lat_t, lat_a = median([t.latency for t in together]), median([a.latency for a in alone])
    ttft_t, ttft_a = median([t.ttft for t in together]), median([a.ttft for a in alone])
    steps = max(max_tokens - 1, 1)
    return {"request": i, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
            "latency_together": lat_t, "latency_alone": lat_a, "slowdown": lat_t / lat_a,
            "ttft_together": ttft_t, "ttft_alone": ttft_a,
            "decode_step_together": (lat_t - ttft_t) / steps, "decode_step_alone": (lat_a - ttft_a) / steps}


# ---------------------------------------------------------------- environment and report


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(model_dir: str, command: str, device: torch.device) -> dict[str, Any]:
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs")  # docs/: reports
    cpu, threads = cpu_model(), torch.get_num_threads()
    machine = f"{cpu}, {os.cpu_count()} cores, torch threads {threads}"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}; host {machine}"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": sh("git", "rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "machine": machine,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": model_dir, "dtype": "float32", "device": str(device), "command": command,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def render(res: dict[str, Any]) -> str:
    """The whole of docs/benchmarks.md."""
    return "\n".join([_header(res), _throughput_md(res), _latency_md(res), _reading_md(res)])


def _header(res: dict[str, Any]) -> str:
    env, w = res["env"], res["workload"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    return f"""## Engine core: continuous batching vs transformers
{quick}
Generated by `scripts/bench_engine.py`.

{run_table(env)}| Command | {env['command']} |
| Repeats | {w['repeats']} per figure (medians reported), whole run {res['total_seconds']:.0f} s |

The machine is shared, so absolute times are noisy; compare the ratios, which are measured
side by side in the same run. Raw numbers: `{res['json_path']}`.
"""


def _throughput_md(res: dict[str, Any]) -> str:
    t, w, p = res["throughput"], res["workload"], res["prompt_tokens"]
    corr, sp = t["correctness"], t["split"]
    n_ok = sum(c["identical"] for c in corr)
    corr_rows = "\n".join(f"| {c['prompt_index']} | {c['prompt_tokens']} | {c['compared_tokens']} | "
                          f"{'yes' if c['identical'] else 'no, from token ' + str(c['first_divergence'])} |" for c in corr)
    return f"""
### 1. Throughput: one batch of {w['num_prompts']} prompts

Workload: {w['num_prompts']} prompts (seed {PROMPT_SEED}; {min(p)}–{max(p)} tokens, median {median(p):.0f}),
{w['max_tokens']} greedy tokens each with `ignore_eos`, so {t['generated_tokens']} generated tokens per run.
Engine: `LLM(model, dtype="float32", device="{res['env']['device']}", max_num_seqs=64, max_num_batched_tokens=512).generate(prompts, ...)`.
Baseline: transformers `model.generate` on the same {w['num_prompts']} prompts as one left-padded batch
(`max_new_tokens=min_new_tokens={w['max_tokens']}`, `do_sample=False`). Both timed from text in to text out.

| | median time (s) | all runs (s) | tokens/s |
|---|---:|---:|---:|
| lorax-lite engine | {median(t['engine_seconds']):.2f} | {_fmt_list(t['engine_seconds'])} | {t['engine_tok_s']:.1f} |
| transformers generate | {median(t['hf_seconds']):.2f} | {_fmt_list(t['hf_seconds'])} | {t['hf_tok_s']:.1f} |
| **ratio engine / transformers** | | | **{t['ratio']:.2f}×** |

Bar: ratio ≥ 1.0× — {verdict(t['ratio'] >= 1.0)}. (Ratio of the fastest run of each, less sensitive to
other load on the machine: {t['ratio_best_runs']:.2f}×.)

Where the time goes (medians; forward passes timed with hooks on each model):

| | prefill forwards (s) | one decode forward (ms) | outside the model (s) |
|---|---:|---:|---:|
| lorax-lite engine | {sp['engine']['prefill_s']:.2f} | {sp['engine']['decode_step_s'] * 1000:.0f} | {sp['engine']['outside_s']:.2f} |
| transformers generate | {sp['hf']['prefill_s']:.2f} | {sp['hf']['decode_step_s'] * 1000:.0f} | {sp['hf']['outside_s']:.2f} |

Correctness: the engine's greedy tokens vs transformers `generate` on the prompt alone (batch 1, no
padding, EOS not stopping it, like `ignore_eos`): {n_ok}/{len(corr)} identical — {verdict(n_ok == len(corr))}.

| prompt | prompt tokens | tokens compared | identical |
|---:|---:|---:|---|
{corr_rows}
"""


def _latency_md(res: dict[str, Any]) -> str:
    lat, w = res["latency"], res["workload"]
    rows = lat["rows"]
    shorts = rows[1:]
    bar_ok = all(r["slowdown"] <= 2.0 for r in shorts)
    hf = {int(k): v for k, v in lat["hf_decode_step"].items()}
    table = "\n".join(
        f"| {r['request']} ({'long' if r['request'] == 0 else 'short'}) | {r['max_tokens']} | {r['prompt_tokens']} | "
        f"{r['latency_together']:.2f} | {r['latency_alone']:.2f} | {r['slowdown']:.2f}× | "
        f"{r['ttft_together'] * 1000:.0f} | {r['ttft_alone'] * 1000:.0f} | "
        f"{r['decode_step_together'] * 1000:.0f} | {r['decode_step_alone'] * 1000:.0f} |" for r in rows)
    return f"""
### 2. Continuous batching: the 100/10/10 experiment

Three chat requests (system prompt: “{PIRATE_SYSTEM}”; the seed's three questions) are submitted
together to `LLMEngine` with max_tokens {', '.join(map(str, w['latency_max_tokens']))} (greedy, `ignore_eos`), and each is
also run alone. Latency = `finished_time − arrival_time` and TTFT = `first_token_time − arrival_time`
from the engine's `RequestMetrics`; medians of {w['repeats']} rounds. “ms per later token” is
(latency − TTFT) / (max_tokens − 1), the average decode step while the request ran.

| request | max_tokens | prompt tokens | latency together (s) | latency alone (s) | together / alone | TTFT together (ms) | TTFT alone (ms) | ms per later token, together | ms per later token, alone |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{table}

For reference, a transformers decode step (KV cache, 50-token context) takes {hf[1] * 1000:.0f} ms for one
sequence and {hf[3] * 1000:.0f} ms for three ({hf[3] / hf[1]:.2f}×) on this machine.

Bar: each short request beside the long one takes ≤ 2× its solo latency — {verdict(bar_ok)}
(worst {max(r['slowdown'] for r in shorts):.2f}×). The short requests finished before the long one in every round — {verdict(lat['shorts_finished_first'])}.
"""


def _reading_md(res: dict[str, Any]) -> str:
    parts = [_read_throughput(res), _read_latency(res), _read_noise(res)]
    return "\n### Reading\n\n" + "\n".join(parts) + "\n"


def _read_noise(res: dict[str, Any]) -> str:
    t, env = res["throughput"], res["env"]
    spread = {k: max(v) / min(v) - 1 for k, v in (("engine", t["engine_seconds"]), ("hf", t["hf_seconds"]))}
    return f"""- **Noise.** Runs of the same batch differed by up to {100 * spread['engine']:.0f}% (engine) and
  {100 * spread['hf']:.0f}% (transformers); the load average went from {env['loadavg_start']} to {env['loadavg_end']}.
  {_threads_note(env)} The medians, the alternating order and the best-run ratio are there to absorb other load.{_disturbed(res)}"""


def _threads_note(env: dict[str, Any]) -> str:
    if env["device"] != "cpu":
        return ""
    if env["torch_threads"] < env["cores"]:
        return f"Torch ran {env['torch_threads']} thread(s) on {env['cores']} cores (`--threads`), leaving room for other load."
    return (f"With torch using every core ({env['torch_threads']} threads), any other busy process stalls its thread\n"
            "  pool and a round can take several times longer; `--threads 1` is steadier on a shared machine.")


def _disturbed(res: dict[str, Any]) -> str:
    t, env = res["throughput"], res["env"]
    spread = max(max(v) / min(v) for v in (t["engine_seconds"], t["hf_seconds"])) - 1
    busy = float(env["loadavg_end"].split()[0]) > env["torch_threads"] + 1  # others kept a core busy too
    if spread < 0.25 and not busy:
        return ""
    return "\n  **This run was disturbed by other load: rerun on an idle machine before trusting its figures.**"


def _read_throughput(res: dict[str, Any]) -> str:
    t, w, p = res["throughput"], res["workload"], res["prompt_tokens"]
    eng, hf = t["split"]["engine"], t["split"]["hf"]
    padded = w["num_prompts"] * max(p)
    return f"""- **Throughput.** The engine ran at {t['ratio']:.2f}× transformers' tokens/s. Both run the same HF modules,
  so the difference is in what the engine feeds them. Prefill: the engine packs the prompts without
  padding ({sum(p)} real tokens, in chunks of up to 512) where the left-padded batch computes
  {w['num_prompts']} × {max(p)} = {padded} positions ({100 * (1 - sum(p) / padded):.0f}% padding): {eng['prefill_s']:.2f} s vs {hf['prefill_s']:.2f} s. Decode: one
  token per sequence in both, {eng['decode_step_s'] * 1000:.0f} ms vs {hf['decode_step_s'] * 1000:.0f} ms a step ({eng['decode_step_s'] / hf['decode_step_s']:.2f}×); the engine's
  paged attention gathers every sequence's K/V blocks into a padded tensor in each layer, where
  transformers' cache is already contiguous. Outside the model (scheduling, building the step's
  tensors, sampling, detokenizing; for transformers its generate loop): {eng['outside_s']:.2f} s vs {hf['outside_s']:.2f} s."""


def _read_latency(res: dict[str, Any]) -> str:
    rows = res["latency"]["rows"]
    short = rows[1:]
    s0 = short[0]
    hf = {int(k): v for k, v in res["latency"]["hf_decode_step"].items()}
    ok = all(r["slowdown"] <= 2.0 for r in short)
    return f"""- **Continuous batching.** Beside the long request, the short ones took
  {' and '.join(f"{r['slowdown']:.2f}×" for r in short)} their solo latency (bar: ≤ 2×, {'met' if ok else 'missed'}); they joined the running batch at
  once and left after their {s0['max_tokens']} tokens instead of waiting for the long request's {rows[0]['max_tokens']} (which
  itself took {rows[0]['slowdown']:.2f}× its solo latency). What they pay is shared steps: the first step
  prefills all three prompts (TTFT {s0['ttft_together'] * 1000:.0f} ms vs {s0['ttft_alone'] * 1000:.0f} ms alone) and each later step decodes three
  sequences ({s0['decode_step_together'] * 1000:.0f} ms vs {s0['decode_step_alone'] * 1000:.0f} ms per token alone). {_step_cost(res, hf)}"""


def _step_cost(res: dict[str, Any], hf: dict[int, float]) -> str:
    ratio = f"transformers' own decode step takes {hf[3] / hf[1]:.2f}× as long for three sequences as for one"
    if res["env"]["device"] != "cpu":
        return f"On this GPU {ratio}."
    return f"""On a GPU a decode step
  costs about the same for one sequence or three; on this CPU its fp32 matrix multiplies grow
  with the rows: {ratio} (note under the table). So a short request sharing its steps pays about that factor."""


def _fmt_list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_bench_args(__doc__.splitlines()[0], "benchmarks", argv)


def load(model_dir: str, device: torch.device) -> tuple[LLM, PreTrainedModel, PreTrainedTokenizerBase]:
    llm = LLM(model_dir, dtype="float32", device=str(device), max_num_seqs=64, max_num_batched_tokens=512)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return llm, model, tok


def run_all(model_dir: str, w: Workload, device: torch.device) -> dict[str, Any]:
    """The two scenarios, one after the other, on one loaded engine and one transformers model."""
    llm, model, tok = load(model_dir, device)
    prompts = build_prompts(tok, w)
    res: dict[str, Any] = {"workload": asdict(w), "prompts": prompts,
                           "prompt_tokens": [len(tok(p).input_ids) for p in prompts]}
    print(f"1/2 throughput: {w.num_prompts} prompts x {w.max_tokens} tokens, {w.repeats} rounds", flush=True)
    res["throughput"] = run_throughput(llm, model, tok, prompts, w)
    print("2/2 continuous batching latency", flush=True)
    res["latency"] = run_latency(llm, model, w)
    return res


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    w = Workload.quick() if args.quick else Workload()
    w.repeats = 1 if args.quick else args.repeats
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_engine.py", argv), args.device)
    res = run_all(args.model, w, args.device)
    res.update(env=env | {"loadavg_end": _loadavg()}, quick=args.quick, json_path=args.json)
    res["total_seconds"] = time.perf_counter() - start
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    write_section(repo_path(args.output), section_name("engine", args.device), render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


def write(path: Path, text: str) -> None:
    path = repo_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("" if text.endswith("\n") else "\n"))


if __name__ == "__main__":
    main()
