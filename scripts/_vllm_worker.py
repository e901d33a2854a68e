"""bench_vllm.py's vLLM side: runs in vLLM's own virtualenv (`make vllm`), one command per stdin line.

Each line is a JSON command; each answer is one JSON line on the stdout this process was started with.
vLLM's own logs go to stderr (stdout is re-pointed there, so its worker processes log there too).

  {"cmd": "start", "model": ..., "lora": {"max_loras": 8, "max_cpu_loras": 32, "max_lora_rank": 8} | null,
   "streaming": false, "max_num_seqs": 64, "max_model_len": 2048}
      -> {"start_s": seconds, "settings": {...}}   (stops the engine started before, if any)
  {"cmd": "generate", "prompts": [[token ids], ...], "adapters": [[name, int id, path] | null, ...],
   "max_tokens": 32, "ignore_eos": true}            (offline engine)
      -> {"seconds": wall time of one LLM.generate, "token_ids": [[...], ...]}
  {"cmd": "chat", "conversations": [{"system": str | null, "questions": [...], "adapter": [name, id, path]}],
   "max_tokens": 48}                                (streaming engine)
      -> {"seconds": total, "turns": [{"conversation", "turn", "prompt_tokens", "ttft_s", "latency_s",
          "token_ids"}, ...]}
  {"cmd": "exit"}

Only the standard library and vLLM (with its transformers) are imported: nothing of lorax-lite. vLLM
spawns worker processes that import this module, hence the `__main__` guard.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from typing import Any


def _lora_request(spec: list[Any] | None) -> Any:
    from vllm.lora.request import LoRARequest

    return None if spec is None else LoRARequest(spec[0], int(spec[1]), spec[2])


def _settings(engine_config: Any) -> dict[str, Any]:
    """The engine's effective settings that matter to the comparison (best effort: names move between versions)."""
    out: dict[str, Any] = {}
    for section, names in (("cache_config", ("enable_prefix_caching", "block_size", "cache_dtype")),
                           ("scheduler_config", ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill")),
                           ("model_config", ("dtype", "max_model_len", "enforce_eager")),
                           ("lora_config", ("max_loras", "max_cpu_loras", "max_lora_rank")),
                           ("compilation_config", ("mode", "level", "backend"))):
        obj = getattr(engine_config, section, None)
        for name in names:
            if obj is not None and hasattr(obj, name):
                out[f"{section}.{name}"] = str(getattr(obj, name))
    return out


class Worker:
    """Holds one engine at a time: the offline `LLM` or the streaming `AsyncLLM`."""

    def __init__(self) -> None:
        self.llm: Any = None
        self.async_llm: Any = None
        self.tokenizer: Any = None
        self.loop = asyncio.new_event_loop()  # one loop for every chat: AsyncLLM's output task lives in it

    def stop(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
        if self.async_llm is not None:
            self.async_llm.shutdown()
        self.llm = self.async_llm = None

    def start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.stop()
        lora = cmd.get("lora") or {}
        kwargs = {"model": cmd["model"], "dtype": "float32", "max_num_seqs": cmd["max_num_seqs"],
                  "max_model_len": cmd["max_model_len"], "seed": 0, "enable_lora": bool(lora), **lora}
        start = time.perf_counter()
        if cmd.get("streaming"):
            self.async_llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
            config = self.async_llm.vllm_config
        else:
            self.llm = LLM(**kwargs)
            config = self.llm.llm_engine.vllm_config
        seconds = time.perf_counter() - start
        self.tokenizer = AutoTokenizer.from_pretrained(cmd["model"])
        return {"start_s": seconds, "settings": _settings(config), "kwargs": kwargs}

    def generate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=cmd["ignore_eos"])
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in cmd["prompts"]]
        loras = [_lora_request(a) for a in cmd["adapters"]]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, lora_request=loras if any(loras) else None, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "token_ids": [list(o.outputs[0].token_ids) for o in outs]}

    def chat(self, cmd: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        turns = self.loop.run_until_complete(self._chat_all(cmd["conversations"], cmd["max_tokens"]))
        return {"seconds": time.perf_counter() - start, "turns": turns}

    async def _chat_all(self, conversations: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
        per_conv = await asyncio.gather(*(self._conversation(i, c, max_tokens) for i, c in enumerate(conversations)))
        return [turn for conv in per_conv for turn in conv]

    async def _conversation(self, index: int, conv: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
        """Each turn resends the whole history; the next turn starts when this one has finished."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
        messages = [{"role": "system", "content": conv["system"]}] if conv.get("system") else []
        lora, turns = _lora_request(conv.get("adapter")), []
        for t, question in enumerate(conv["questions"]):
            messages.append({"role": "user", "content": question})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            sent, first, tokens = time.perf_counter(), None, []
            async for out in self.async_llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                     request_id=f"c{index}-t{t}", lora_request=lora):
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                tokens += out.outputs[0].token_ids
            end = time.perf_counter()
            answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
            turns.append({"conversation": index, "turn": t, "prompt_tokens": len(ids), "ttft_s": first - sent,
                          "latency_s": end - sent, "token_ids": tokens})
        return turns


def main() -> None:
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM (and the processes it starts) print to stdout: send that to stderr
    import torch
    import vllm

    worker = Worker()
    handlers = {"start": worker.start, "generate": worker.generate, "chat": worker.chat}
    results.write(json.dumps({"ready": True, "vllm": vllm.__version__, "torch": torch.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        try:
            answer = handlers[cmd["cmd"]](cmd)
        except Exception:  # the parent reports it, with this process's log
            answer = {"error": traceback.format_exc()}
        results.write(json.dumps(answer) + "\n")
    worker.stop()


if __name__ == "__main__":
    main()
