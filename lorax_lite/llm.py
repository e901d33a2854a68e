"""The offline API: `LLM(...).generate(prompts)` runs the serving engine in the caller's thread."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.engine import LLMEngine, Prompt
from lorax_lite.engine.request import Request, RequestOutput, SamplingParams

Message = dict[str, str]


class LLM:
    """Batch generation with the same engine the server runs (continuous batching, paged KV cache).

    `LLM(model, **engine_config)`: `model` is an HF directory, a hub id or a .gguf file (default:
    `$LORAX_MODEL` or `models/SmolLM2-135M-Instruct`); engine settings are `EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, **engine_config: object) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_config))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(requests)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them, via the chat template."""
        conversations = _as_conversations(messages)
        params = _as_params_list(sampling_params, len(conversations))
        requests = []
        for conversation, sp in zip(conversations, params):
            text, token_ids = render_chat(self.tokenizer, conversation)
            requests.append(self.engine.make_request(token_ids, sp, prompt_text=text))
        return self._run(requests)

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
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False).input_ids


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts).__name__}")
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
