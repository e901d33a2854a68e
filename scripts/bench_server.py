"""Benchmark the seed's classification against the HTTP server; writes its section of docs/benchmarks.md.

The seed 000 scenario end to end: `lorax-lite serve` runs in a subprocess (fp32, on the chosen `--device`, a free
port, an empty registry, the server's default batch limits) and this script is its client. The engine
benchmark's 16 article titles, each a chat conversation with the seed's system prompt rendered with
the model's chat template, are classified through the native API (`lorax_lite.client`; greedy,
stopping at EOS):

(a) sequential: `Client.generate` for each title, one after another (max_new_tokens 8);
(b) one prompt: one `Client.generate` whose user message holds all titles as JSON (max_new_tokens 128);
(c) concurrent: `AsyncClient.generate_many` of the 16 prompts, concurrency 16 (max_new_tokens 8).

After one warm-up request the three modes run alternately (the order reversed every other round)
for `--repeats` rounds; medians are reported. The compute happens in the server, so `--threads N`
sets OMP_NUM_THREADS for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from bench_engine import CLASSIFY_SYSTEM, ARTICLE_TITLES, Workload, _loadavg, environment, timed, write
from bench_report import REPO_ROOT, command_line, median, parse_bench_args, repo_path, run_table, section_name, write_section
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorax_lite.client import AsyncClient, Client, GenerateResult
from lorax_lite.llm import render_chat

SERVED_NAME = "smollm2"
CONCURRENCY = 16  # the seed's api_call_batch_size
REQUEST_TIMEOUT = 600.0  # seconds; a busy CPU can take minutes over the one long prompt
MODES = ("sequential", "one_prompt", "concurrent")
Mode = Callable[[], list[GenerateResult]]  # one timed run of a mode
Round = dict[str, tuple[float, list[GenerateResult]]]  # mode -> (wall seconds, results)


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_dir: str, threads: int, device: str = "cpu", startup_timeout: float = 180.0) -> Iterator[str]:
    """Run `lorax-lite serve` on a free port with an empty registry; yields its base URL; always stops it."""
    with tempfile.TemporaryDirectory(prefix="lorax-bench-server-") as tmp:
        port, log_path = free_port(), Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", model_dir, "--port", str(port),
               "--registry", f"sqlite:///{tmp}/registry.db", "--dtype", "float32", "--device", device,
               "--served-model-name", SERVED_NAME]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(proc, base, log_path, startup_timeout)
            yield base
        finally:
            stop(proc, log_path)


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout: float) -> None:
    """Poll GET /health until 200; exit 1 with the server's output if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    with Client(base, timeout=1.0) as client:
        while not client.health():
            if proc.poll() is not None:
                sys.exit(f"server exited with {proc.returncode} before it was healthy:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                sys.exit(f"server not healthy after {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.2)


def stop(proc: subprocess.Popen, log_path: Path) -> None:
    if proc.poll() is not None and proc.returncode != 0:  # it died under us: show why
        print(f"server exited with {proc.returncode}:\n{_tail(log_path)}", file=sys.stderr)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


# ---------------------------------------------------------------- the three modes


def build_prompts(tok: PreTrainedTokenizerBase, w: Workload) -> tuple[list[str], str]:
    """One chat prompt per title, and the one prompt holding all titles."""
    titles = ARTICLE_TITLES[: w.num_titles]
    return [_chat_prompt(tok, t) for t in titles], _chat_prompt(tok, json.dumps([titles]))


def _chat_prompt(tok: PreTrainedTokenizerBase, user: str) -> str:
    return render_chat(tok, [{"role": "system", "content": CLASSIFY_SYSTEM}, {"role": "user", "content": user}])[0]


def run_modes(base: str, prompts: list[str], one_prompt: str, w: Workload) -> dict[str, Any]:
    """Warm up, then `w.repeats` rounds of the three modes, alternating their order."""
    short = {"max_new_tokens": w.classify_max_tokens}
    with Client(base, timeout=REQUEST_TIMEOUT) as client, asyncio.Runner() as loop:
        aclient = AsyncClient(base, timeout=REQUEST_TIMEOUT)  # one loop and one pool for every round
        modes: dict[str, Mode] = {
            "sequential": lambda: [client.generate(p, **short) for p in prompts],
            "one_prompt": lambda: [client.generate(one_prompt, max_new_tokens=w.one_prompt_max_tokens)],
            "concurrent": lambda: loop.run(aclient.generate_many(prompts, concurrency=CONCURRENCY, **short)),
        }
        client.generate(prompts[0], max_new_tokens=2)  # warm-up
        rounds = [_round(modes, r) for r in range(w.repeats)]
        loop.run(aclient.aclose())
    return _summary(rounds)


def _round(modes: dict[str, Mode], r: int) -> Round:
    done = {name: timed(modes[name]) for name in (MODES if r % 2 == 0 else MODES[::-1])}
    print(f"  round {r + 1}: " + ", ".join(f"{name} {done[name][0]:.2f}s" for name in MODES), flush=True)
    return done


def _summary(rounds: list[Round]) -> dict[str, Any]:
    seconds = {name: [r[name][0] for r in rounds] for name in MODES}
    last = {name: rounds[-1][name][1] for name in MODES}
    texts = [{name: [o.generated_text for o in r[name][1]] for name in MODES} for r in rounds]
    return {
        "seconds": seconds, "median": {name: median(s) for name, s in seconds.items()},
        "tokens": {name: sum(o.details.generated_tokens for o in outs) for name, outs in last.items()},
        "prompt_tokens": [o.details.prompt_tokens for o in last["sequential"]],
        "one_prompt_tokens": last["one_prompt"][0].details.prompt_tokens,
        "finish_reasons": {name: [o.details.finish_reason for o in outs] for name, outs in last.items()},
        "same_answers": all(t["sequential"] == t["concurrent"] for t in texts),
        "answers": texts[-1]["concurrent"], "one_prompt_answer": texts[-1]["one_prompt"][0], "texts": texts,
    }


# ---------------------------------------------------------------- report


def render(res: dict[str, Any]) -> str:
    return "\n".join([_header(res), _table_md(res), _reading_md(res)])


def _header(res: dict[str, Any]) -> str:
    env, w = res["env"], res["workload"]
    quick = "\n> **Quick smoke run (`--quick`): tiny workload, figures not meaningful.**\n" if res["quick"] else ""
    return f"""## Server: the seed's classification over HTTP (seed 000)
{quick}
Generated by `scripts/bench_server.py`.

{run_table(env, machine_note=" (the server's torch threads)")}| Server | `lorax-lite serve --dtype float32 --device {env['device']} --served-model-name {SERVED_NAME}` (default limits: max 64 sequences, 512 tokens a step), in a subprocess |
| Command | {env['command']} |
| Repeats | {w['repeats']} round(s) (medians reported), whole run {res['total_seconds']:.0f} s including the server's start |

Raw numbers: `{res['json_path']}`.
"""


def _table_md(res: dict[str, Any]) -> str:
    c, w = res["classification"], res["workload"]
    m, n, p = c["median"], w["num_titles"], c["prompt_tokens"]
    rows = {
        "sequential": "(a) sequential: `Client.generate` per title, one after another",
        "one_prompt": f"(b) one prompt holding all {n} titles as JSON (max_new_tokens {w['one_prompt_max_tokens']})",
        "concurrent": f"(c) concurrent: `AsyncClient.generate_many(prompts, concurrency={CONCURRENCY})`",
    }
    table = "\n".join(f"| {label} | {m[name]:.2f} | {_fmt_list(c['seconds'][name])} | {c['tokens'][name]} | "
                      f"{m['sequential'] / m[name]:.2f}× |" for name, label in rows.items())
    answers = ", ".join(f"`{a.strip()}`" for a in c["answers"])
    cut = c["finish_reasons"]["concurrent"].count("length")
    return f"""
### Wall time of each mode

The seed's {n} article titles, each a chat conversation (the seed's system prompt, the title as the
user message; {min(p)}–{max(p)} prompt tokens) rendered with the model's chat template on the client and
sent to the native `/generate` API; greedy, max_new_tokens {w['classify_max_tokens']}, stopping at EOS. The one
prompt is {c['one_prompt_tokens']} tokens. Wall time is measured in the client, from the first request sent
to the last answer received.

| mode | median wall time (s) | all rounds (s) | generated tokens | speedup vs sequential |
|---|---:|---:|---:|---:|
{table}

No bar. (a) and (c) gave identical texts in every round: {'yes' if c['same_answers'] else '**no**'}.
Answers of (c) (135M model, so quality is not the point; {cut} of {n} stopped at max_new_tokens, not at EOS):
{answers}.
"""


def _reading_md(res: dict[str, Any]) -> str:
    c, w, env = res["classification"], res["workload"], res["env"]
    m, n = c["median"], w["num_titles"]
    return f"""
### Reading

- **Concurrency.** The {n} concurrent requests finished {m['sequential'] / m['concurrent']:.2f}× faster than one at a time. They
  arrive together, and the server's continuous batching prefills the {n}
  prompts together in a few packed steps and then decodes all of them in each step; one at a time, each
  request pays its own prefill, its own decode loop and an HTTP round trip while the engine idles
  between requests.
- **One prompt.** Its time depends on how much the model writes: {c['tokens']['one_prompt']} tokens here
  (limit {w['one_prompt_max_tokens']}), decoded one token a step for a single sequence, and a 135M model does not return a
  usable array of {n} labels, so it is no fair comparison: a model that answered with just the labels
  would pay one prefill of the longer prompt and a short decode.
- **Noise.** The load average went from {env['loadavg_start']} to {env['loadavg_end']} on {env['cores']} cores; the server ran
  {env['torch_threads']} torch thread(s). The medians and the alternating order are there to absorb other load.
"""


def _fmt_list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_bench_args(__doc__.splitlines()[0], "benchmarks_server", argv)


def run_all(model_dir: str, w: Workload, threads: int, device: str) -> dict[str, Any]:
    prompts, one_prompt = build_prompts(AutoTokenizer.from_pretrained(model_dir), w)
    print(f"starting the server ({model_dir})", flush=True)
    with serve(str(Path(model_dir).resolve()), threads, device) as base:
        print(f"classifying {w.num_titles} titles: sequential, one prompt, concurrent; rounds: {w.repeats}", flush=True)
        return {"workload": asdict(w), "classification": run_modes(base, prompts, one_prompt, w)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    w = Workload.quick() if args.quick else Workload()
    w.repeats = 1 if args.quick else args.repeats
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # so `environment` reports the server's thread count
    start = time.perf_counter()
    env = environment(args.model, command_line("bench_server.py", argv), args.device)
    res = run_all(args.model, w, args.threads, str(args.device))
    res.update(env=env | {"loadavg_end": _loadavg()}, quick=args.quick, json_path=args.json)
    res["total_seconds"] = time.perf_counter() - start
    write(Path(args.json), json.dumps(res, indent=2, default=str))
    write_section(repo_path(args.output), section_name("server", args.device), render(res))
    print(f"wrote {args.output} and {args.json} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
