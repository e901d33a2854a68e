"""OpenAI API bodies (chat completions, completions, models) and their conversion into SamplingParams.

Fields are OpenAI's names and defaults (temperature 1, top_p 1; completions default to 16 tokens,
chat to whatever fits in the context). Parameters lorax-lite cannot honour with a non-default value
(n > 1, penalties, tools, logprobs, ...) are refused with a 400 naming them; unknown fields are refused.
`top_k` and `repetition_penalty` are accepted as extensions, as vLLM and LoRAX do.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from lorax_lite.engine.request import SamplingParams
from lorax_lite.server.schemas import Text, UnsupportedParameterError

Number = StrictInt | StrictFloat
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: Text | list[Text] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    user: Text | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: StrictInt | None = None
    # Extensions (vLLM, LoRAX).
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: Number | None = Field(default=None, gt=0)
    ignore_eos: StrictBool = False
    timeout: Number | None = Field(default=None, gt=0, allow_inf_nan=False)  # seconds; lorax-lite's extension

    def _refusals(self) -> list[tuple[str, bool, str]]:
        return [
            ("n", self.n not in (None, 1), "one choice is generated per request; send several requests"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "use repetition_penalty instead"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "use repetition_penalty instead"),
            ("logit_bias", bool(self.logit_bias), "logit bias is not implemented"),
            ("logprobs", self.logprobs not in (None, False), "logprobs are returned by the native API (details)"),
            ("top_logprobs", self.top_logprobs not in (None, 0), "alternative tokens are not returned"),
            ("stream_options", self.stream_options is not None and not self.stream, "only allowed with stream: true"),
        ]

    def check_supported(self) -> None:
        """Raise UnsupportedParameterError naming the first parameter we cannot honour."""
        for name, is_set, why in self._refusals():
            if is_set:
                raise UnsupportedParameterError(name, getattr(self, name), why)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_list(self) -> list[str] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
        if stop and any(not s for s in stop):
            raise ValueError("stop: sequences must not be empty")
        return stop or None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            seed=self.seed,
            stop=self.stop_list,
            ignore_eos=self.ignore_eos,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_message(self) -> dict[str, str]:
        """What the chat template reads; a developer message is a system message to these models."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    parallel_tool_calls: StrictBool | None = None

    def _refusals(self) -> list[tuple[str, bool, str]]:
        return super()._refusals() + [
            ("response_format", self.response_format not in (None, {"type": "text"}),
             "constrained (JSON) decoding is not implemented"),
            ("tools", bool(self.tools), "tool calling is not implemented"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool calling is not implemented"),
            ("functions", bool(self.functions), "function calling is not implemented"),
            ("max_completion_tokens", self.max_tokens is not None and self.max_completion_tokens is not None
             and self.max_tokens != self.max_completion_tokens, "give max_tokens or max_completion_tokens, not both"),
        ]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[StrictInt]
    echo: StrictBool = False
    suffix: Text | None = None
    best_of: StrictInt | None = None

    def _refusals(self) -> list[tuple[str, bool, str]]:
        return super()._refusals() + [
            ("suffix", bool(self.suffix), "insertion (suffix) is not supported"),
            ("best_of", self.best_of not in (None, 1), "one sequence is generated per request"),
        ]

    def prompt_value(self) -> str | list[int]:
        """One prompt: text or token ids; a list of several prompts is refused (send several requests)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise UnsupportedParameterError(
                    "prompt", f"<{len(prompt)} prompts>", "one prompt per request; send several requests"
                )
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return cast(str | list[int], prompt)  # a list of strings was one prompt, taken out above


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache (OpenAI's and vLLM's field)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None  # the base model, for adapters


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
