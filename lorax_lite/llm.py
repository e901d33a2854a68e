"""The offline API: `LLM(...).generate(prompts)` runs the serving engine in the caller's thread."""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.catalog import ResolvedAdapter
from lorax_lite.engine.engine import LLMEngine, Prompt
from lorax_lite.engine.request import OutputKind, Request, RequestOutput, SamplingParams, deadline_after
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.registry.base import Registry
from lorax_lite.registry.factory import as_registry, as_store
from lorax_lite.registry.store import AdapterStore

Message = dict[str, str]


class LLM:
    """Batch generation with the same engine the server runs (continuous batching, paged KV cache).

    `LLM(model, **engine_config)`: `model` is an HF directory, a hub id or a .gguf file (default:
    `$LORAX_MODEL` or `models/SmolLM2-135M-Instruct`); engine settings are `EngineConfig` fields.
    Adapters: `add_adapter(adapter_id, path)`, then `generate(..., adapter_ids=...)`; with
    `registry` (a Registry or a URL such as "sqlite:///data/registry.db"), every adapter registered
    there (`lorax-lite adapters register`) is usable too, at its current version, read from the
    path its record names, or from `store` (a store directory) when given.
    """

    def __init__(
        self,
        model: str | None = None,
        registry: Registry | str | None = None,
        store: AdapterStore | str | os.PathLike | None = None,
        **engine_config: object,
    ) -> None:
        config = EngineConfig.from_kwargs(model, **engine_config)
        self.engine = LLMEngine(config, registry=as_registry(registry), store=as_store(store))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def add_adapter(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Read and validate a PEFT adapter directory now (raising a specific AdapterError) and make it usable."""
        check_adapter_id(adapter_id)  # before touching the filesystem
        self.engine.add_adapter(adapter_id, path, self.engine.read_adapter(path))

    def remove_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; an unknown id raises AdapterNotFoundError."""
        self.engine.remove_adapter(adapter_id)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter_ids: str | None | Sequence[str | None] = None,
        *,
        timeout: float | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        `adapter_ids`: one adapter id for all prompts, or one per prompt; None means the base model.
        A request that fails (its adapter fails to load, say) finishes with finish_reason "error" (its
        `exception` says why); the others are unaffected. `timeout`: seconds from this call after which
        every request not done yet finishes with finish_reason "timeout" and what it has so far.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        resolved = self._resolve(_as_per_prompt(adapter_ids, len(prompts), "adapter_ids"))
        deadline = deadline_after(timeout)
        requests = [self._make_request(p, sp, a, deadline=deadline)
                    for p, sp, a in zip(prompts, params, resolved, strict=True)]
        return self._run(requests)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter_id: str | None | Sequence[str | None] = None,
        *,
        timeout: float | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them, via the chat template.

        `adapter_id`: one for all conversations or one per conversation; None means the base model.
        `timeout`: as in `generate`.
        """
        conversations = _as_conversations(messages)
        params = _as_params_list(sampling_params, len(conversations))
        resolved = self._resolve(_as_per_prompt(adapter_id, len(conversations), "adapter_id"))
        deadline = deadline_after(timeout)
        requests = []
        for conversation, sp, a in zip(conversations, params, resolved, strict=True):
            text, token_ids = render_chat(self.tokenizer, conversation)
            requests.append(self._make_request(token_ids, sp, a, prompt_text=text, deadline=deadline))
        return self._run(requests)

    def _resolve(self, adapter_ids: list[str | None]) -> list[ResolvedAdapter | None]:
        """Each distinct id resolved once (one registry read), so one call's prompts share one version."""
        resolved = {a: self.engine.resolve_adapter(a) for a in dict.fromkeys(adapter_ids) if a is not None}
        return [resolved[a] if a is not None else None for a in adapter_ids]

    def _make_request(self, prompt: Prompt, params: SamplingParams, adapter: ResolvedAdapter | None,
                      prompt_text: str | None = None, deadline: float | None = None) -> Request:
        request = self.engine.make_request(prompt, params, adapter=adapter, prompt_text=prompt_text,
                                           output_kind=OutputKind.FINAL_ONLY)
        request.deadline = deadline  # one for the whole call, counted from its start
        return request

    def _run(self, requests: list[Request]) -> list[RequestOutput]:
        for req in requests:
            self.engine.add(req)
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(requests):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for req in requests:
                if req.request_id not in final:
                    self.engine.abort_request(req.request_id)
        return [final[r.request_id] for r in requests]


def render_chat(tokenizer: PreTrainedTokenizerBase, conversation: list[Message]) -> tuple[str, list[int]]:
    """Apply the tokenizer's chat template (with the generation prompt); returns text and token ids."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
    text = str(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    return text, tokenizer(text, add_special_tokens=False).input_ids


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(
            f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError("prompts is empty")
    if all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts; pass one, or one per prompt")
    return params


def _as_per_prompt(value: str | None | Sequence[str | None], n: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be an adapter id, None, or a list of them; got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} for {n} prompts; pass one, or one per prompt")
    return list(value)


def _as_conversations(messages: list[Message] | list[list[Message]]) -> list[list[Message]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for conversation in conversations:
        _check_conversation(conversation)
    return conversations


def _check_conversation(conversation: list[Message]) -> None:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    for m in conversation:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a string 'role' and 'content', got {m!r}")
