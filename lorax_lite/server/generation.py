"""One native-API generation: the LoRAX body turned into an engine request (an EngineCall), then the
engine's outputs (each with only the new tokens and text) turned into LoRAX tokens, details, stream
events and response headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from lorax_lite.engine.request import RequestOutput
from lorax_lite.server.calls import EngineCall, finish_reason_of
from lorax_lite.server.errors import as_server_error
from lorax_lite.server.schemas import (
    Details,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from lorax_lite.server.state import ServerState

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence", "timeout": "timeout"}


@dataclass
class Generation:
    """A started native request (validation and adapter errors are already raised as ServerError)."""

    body: GenerateRequest
    call: EngineCall
    tokenizer: PreTrainedTokenizerBase
    special_ids: frozenset[int]
    tokens: list[Token] = field(default_factory=list)

    @classmethod
    async def start(cls, state: ServerState, request: Request, body: GenerateRequest,
                    adapter_id: str | None) -> Generation:
        """Check the parameters, resolve the adapter and tokenize (each once, in worker threads), and submit."""
        try:
            params = body.parameters.to_sampling_params()
        except Exception as exc:
            raise as_server_error(exc) from exc
        state.check_prompt_chars(len(body.inputs), "inputs")  # before tokenizing: a huge prompt costs nothing
        adapter = await state.resolve_adapter(request, adapter_id)
        tokenizer = state.llm.tokenizer
        prompt_ids = (await run_in_threadpool(tokenizer, body.inputs)).input_ids
        call = await EngineCall.start(state, request, prompt_ids, params, adapter, body.inputs,
                                      timeout=body.parameters.timeout)
        return cls(body, call, tokenizer, state.special_ids)

    async def stream_events(self) -> AsyncIterator[dict]:
        """One event per generated token; the last carries generated_text and details. Errors become an
        error event (the status line is already sent)."""
        try:
            async for out in self.call.outputs():
                for event in self._events_for(out):
                    yield event
        except Exception as exc:
            yield as_server_error(exc).to_json()
        finally:
            await self.call.close()

    def advance(self, out: RequestOutput) -> list[Token]:
        """Turn the tokens new in `out` into LoRAX tokens; the new text goes on the last of them."""
        last = len(out.token_ids) - 1
        new = [
            Token(id=tid, text=out.text if i == last else "", logprob=lp, special=tid in self.special_ids)
            for i, (tid, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True))
        ]
        self.tokens.extend(new)
        return new

    def _events_for(self, out: RequestOutput) -> list[dict]:
        new = self.advance(out)
        if out.finished and not new:  # nothing new but the end: repeat the last token with no text
            new = [self.tokens[-1].model_copy(update={"text": ""})] if self.tokens else []
        events = [StreamResponse(token=t) for t in new]
        if out.finished and events:
            events[-1].generated_text = self.generated_text()
            events[-1].details = StreamDetails(**self._details_fields(out))
        return [e.model_dump() for e in events]

    def generated_text(self) -> str:
        text = self.call.text
        return self.body.inputs + text if self.body.parameters.return_full_text else text

    async def response(self, out: RequestOutput) -> GenerateResponse:
        details = None
        if self.body.parameters.details:
            prefill = await self._prefill(out)
            details = Details(**self._details_fields(out), prefill=prefill, tokens=self.tokens)
        return GenerateResponse(generated_text=self.generated_text(), details=details)

    def _details_fields(self, out: RequestOutput) -> dict:
        return {
            "finish_reason": FINISH_REASONS[finish_reason_of(out)],
            "prompt_tokens": len(out.prompt_token_ids),
            "generated_tokens": out.num_generated_tokens,
            "seed": out.seed,
        }

    async def _prefill(self, out: RequestOutput) -> list[InputToken]:
        if not self.body.parameters.decoder_input_details:
            return []
        ids = out.prompt_token_ids
        texts = await run_in_threadpool(self.tokenizer.batch_decode, [[tid] for tid in ids])  # off the event loop
        # Prompt logprobs would need the prefill's logits for every position; they are not computed.
        return [InputToken(id=tid, text=text, logprob=None) for tid, text in zip(ids, texts, strict=True)]
