"""Native API bodies in LoRAX/TGI's wire format (see lorax-client's `lorax/types.py`), and their
conversion into the engine's SamplingParams.

Every parameter lorax-client sends is accepted at its default value; a parameter we cannot honour
with a non-default value is refused (422) by name, never silently ignored. Unknown fields are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from lorax_lite.engine.request import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's default when the request leaves max_new_tokens unset

Number = StrictInt | StrictFloat


def valid_unicode(text: str) -> str:
    """Refuse a string with a lone UTF-16 surrogate (JSON's "\\udfff"): it is not text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate at character {exc.start}, which is not valid "
                         "Unicode text") from None
    return text


Text = Annotated[StrictStr, AfterValidator(valid_unicode)]  # any text the server reads from a request


class UnsupportedParameterError(ValueError):
    """A LoRAX parameter that lorax-lite cannot honour was given a non-default value."""

    def __init__(self, name: str, value: object, why: str) -> None:
        super().__init__(f"parameter `{name}`={value!r} is not supported by lorax-lite: {why}")
        self.name = name


class Parameters(BaseModel):
    """LoRAX's `parameters` object, field for field."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: Text | None = None
    do_sample: StrictBool = False
    max_new_tokens: StrictInt | None = None
    ignore_eos_token: StrictBool = False
    repetition_penalty: Number | None = None
    return_full_text: StrictBool = False
    stop: list[Text] | Text = Field(default_factory=list)
    seed: StrictInt | None = None
    temperature: Number | None = None
    top_k: StrictInt | None = None
    top_p: Number | None = None
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    timeout: Number | None = Field(default=None, gt=0, allow_inf_nan=False)  # seconds; lorax-lite's extension
    # Accepted only at their defaults (see `check_supported`).
    adapter_source: str | None = None
    merged_adapters: dict[str, Any] | None = None
    api_token: str | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    return_k_alternatives: int | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """Raise UnsupportedParameterError naming the first parameter we cannot honour."""
        refusals = [
            ("best_of", self.best_of not in (None, 1), "only one sequence is generated per request"),
            ("response_format", self.response_format is not None, "constrained (JSON) decoding is not implemented"),
            ("merged_adapters", self.merged_adapters is not None, "adapter merging is not implemented; use adapter_id"),
            ("watermark", self.watermark, "watermarking is not implemented"),
            ("typical_p", self.typical_p not in (None, 1.0), "typical decoding is not implemented"),
            ("truncate", self.truncate is not None, "prompts are never truncated; shorten the prompt"),
            ("return_k_alternatives", self.return_k_alternatives not in (None, 0),
             "alternative tokens are not returned"),
            ("adapter_source", self.adapter_source is not None, "adapters come from this server's registry only"),
            ("api_token", self.api_token is not None, "adapters are not fetched from a hub"),
        ]
        for name, is_set, why in refusals:
            if is_set:
                raise UnsupportedParameterError(name, getattr(self, name), why)

    @property
    def is_sampling(self) -> bool:
        """LoRAX's rule: sampling when do_sample, or when any sampling warper is set to a non-neutral value."""
        warpers = (
            self.temperature not in (None, 1.0),
            self.top_k not in (None, 0),
            self.top_p not in (None, 1.0),
        )
        return self.do_sample or any(warpers)

    def to_sampling_params(self) -> SamplingParams:
        """SamplingParams for the engine; bad values raise ValueError naming the field (LoRAX's name)."""
        self.check_supported()
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        temperature = 0.0
        if self.is_sampling:
            temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=self.stop or None,
            ignore_eos=self.ignore_eos_token,
        )


class GenerateRequest(BaseModel):
    """Body of POST /generate, /generate_stream and / (where `stream` picks the mode)."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: StrictBool = False


FinishReasonName = Literal["length", "eos_token", "stop_sequence", "timeout"]


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float  # log-probability of the token under the distribution it was drawn from
    special: bool


class Details(BaseModel):
    finish_reason: FinishReasonName
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReasonName
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str
