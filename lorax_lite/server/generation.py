"""One native-API generation: validation into an engine request, then the engine's cumulative
outputs turned into LoRAX tokens, details, stream events and response headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.engine.request import RequestOutput
from lorax_lite.server.errors import ServerError, as_server_error
from lorax_lite.server.schemas import (
    Details,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


@dataclass
class Generation:
    """A started request: `first` is its first output (validation and adapter errors are already raised)."""

    body: GenerateRequest
    adapter_id: str | None
    model_name: str  # what x-adapter-id says for the base model
    outputs: AsyncIterator[RequestOutput]
    first: RequestOutput
    special_ids: frozenset[int]
    tokens: list[Token] = field(default_factory=list)
    text: str = ""

    @classmethod
    async def start(cls, llm: AsyncLLM, body: GenerateRequest, adapter_id: str | None, model_name: str) -> Generation:
        """Validate, submit, and wait for the first output; raises ServerError with the right status."""
        try:
            params = body.parameters.to_sampling_params()
            prompt_ids = llm.tokenizer(body.inputs).input_ids
            _check_length(len(prompt_ids), params.max_tokens, llm.engine.max_model_len)
            outputs = llm.generate(prompt_ids, params, adapter_id=adapter_id, prompt_text=body.inputs)
            first = await _next_output(outputs)
            _raise_if_failed(first)
        except Exception as exc:
            raise as_server_error(exc) from exc
        special_ids = frozenset(llm.tokenizer.all_special_ids)
        return cls(body, adapter_id, model_name, outputs, first, special_ids)

    async def close(self) -> None:
        """Leave the stream; an unfinished request is aborted and its KV blocks freed."""
        with anyio.CancelScope(shield=True):
            await self.outputs.aclose()

    async def run_to_end(self) -> RequestOutput:
        """Consume every output (building the token list); returns the finished one."""
        out = self.first
        self.advance(out)
        while not out.finished:
            out = await _next_output(self.outputs)
            self.advance(out)
        return out

    async def stream_events(self) -> AsyncIterator[dict]:
        """One event per generated token; the last carries generated_text and details. Errors become an
        error event (the status line is already sent)."""
        try:
            out = self.first
            while True:
                for event in self._events_for(out):
                    yield event
                if out.finished:
                    return
                out = await _next_output(self.outputs)
        except Exception as exc:
            yield as_server_error(exc).to_json()
        finally:
            await self.close()

    def advance(self, out: RequestOutput) -> list[Token]:
        """Turn the tokens new in `out` into LoRAX tokens; new text goes on the last new token."""
        _raise_if_failed(out)
        if not out.text.startswith(self.text):
            raise RuntimeError(f"engine text is not cumulative: {self.text!r} -> {out.text!r}")
        delta, self.text = out.text[len(self.text) :], out.text
        new_ids = out.token_ids[len(self.tokens) :]
        new = [
            Token(id=tid, text=delta if i == len(new_ids) - 1 else "", logprob=lp, special=tid in self.special_ids)
            for i, (tid, lp) in enumerate(zip(new_ids, out.logprobs[len(self.tokens) :]))
        ]
        self.tokens.extend(new)
        return new

    def _events_for(self, out: RequestOutput) -> list[dict]:
        new = self.advance(out)
        if out.finished and not new:  # nothing new but the end: repeat the last token with no text
            new = [self.tokens[-1].model_copy(update={"text": ""})] if self.tokens else []
        events = [StreamResponse(token=t) for t in new]
        if out.finished and events:
            events[-1].generated_text = self.generated_text(out)
            events[-1].details = StreamDetails(**self._details_fields(out))
        return [e.model_dump() for e in events]

    def generated_text(self, out: RequestOutput) -> str:
        return self.body.inputs + out.text if self.body.parameters.return_full_text else out.text

    def response(self, out: RequestOutput) -> GenerateResponse:
        details = None
        if self.body.parameters.details:
            details = Details(**self._details_fields(out), prefill=self._prefill(out), tokens=self.tokens)
        return GenerateResponse(generated_text=self.generated_text(out), details=details)

    def _details_fields(self, out: RequestOutput) -> dict:
        return {
            "finish_reason": FINISH_REASONS[out.finish_reason],
            "prompt_tokens": len(out.prompt_token_ids),
            "generated_tokens": len(out.token_ids),
            "seed": out.seed,
        }

    def _prefill(self, out: RequestOutput) -> list[InputToken]:
        if not self.body.parameters.decoder_input_details:
            return []
        return [InputToken(id=tid, text="", logprob=None) for tid in out.prompt_token_ids]

    def headers(self, out: RequestOutput | None = None) -> dict[str, str]:
        """x-* headers; with the finished output they include token counts and timings (ms)."""
        out = out or self.first
        headers = {"x-adapter-id": self.adapter_id or self.model_name, "x-prompt-tokens": str(len(out.prompt_token_ids))}
        if not out.finished or out.metrics is None:
            return headers
        m = out.metrics
        headers["x-generated-tokens"] = str(len(out.token_ids))
        headers["x-queue-time"] = _ms(m.queue_time)
        headers["x-time-to-first-token"] = _ms(m.time_to_first_token)
        if m.first_scheduled_time is not None and m.finished_time is not None:
            headers["x-inference-time"] = _ms(m.finished_time - m.first_scheduled_time)
        return headers


async def _next_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        raise RuntimeError("the engine closed the stream before the request finished") from None


def _raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise as_server_error(out.exception or RuntimeError(out.error or "unknown error"))
    if out.finish_reason == "abort":
        raise ServerError(500, "the request was aborted before it finished", "incomplete_generation")


def _check_length(num_prompt_tokens: int, max_new_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens + max_new_tokens > max_model_len:
        raise ValueError(
            f"inputs ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) must be <= "
            f"{max_model_len} (max_model_len); lower max_new_tokens or shorten the inputs"
        )


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(round(seconds * 1000))
