"""The output stage: the requests a step advanced -> RequestOutputs, with their text.

The scheduler keeps the books (tokens, budgets, blocks, eos / stop token ids / length); this stage
does the text work after it: incremental detokenization, stop strings (a stop string ends the
request through the scheduler, and its text is cut before it), and each request's outputs in its
OutputKind. A DELTA output carries only what is new, so streaming a request costs time linear in
its length; a FINAL_ONLY request gets one output, at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from transformers import PreTrainedTokenizerBase

from lorax_lite.engine.detokenizer import IncrementalDetokenizer
from lorax_lite.engine.request import FinishReason, OutputKind, Request, RequestOutput

FinishFn = Callable[[Request, FinishReason], None]


@dataclass
class _OutputState:
    detokenizer: IncrementalDetokenizer
    num_detokenized: int = 0  # output tokens fed to the detokenizer
    num_sent_tokens: int = 0  # output tokens already in a DELTA output
    num_sent_chars: int = 0  # characters of text already in a DELTA output


class OutputProcessor:
    """Detokenizes, applies stop strings and builds outputs; `add` each request before its first step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _OutputState] = {}

    def add(self, request: Request) -> None:
        stop = cast(list[str], request.sampling_params.stop)  # a list once SamplingParams checked it
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, stop)
        self._states[request.request_id] = _OutputState(detokenizer)

    def process(self, requests: list[Request], finish: FinishFn) -> list[RequestOutput]:
        """Outputs for `requests` (each advanced, failed or aborted this step); a request that hits a stop
        string is finished through `finish`. Finished requests are forgotten here."""
        outputs = []
        for req in requests:
            state = self._states[req.request_id]  # every request is added (LLMEngine.add) before it can advance
            self._detokenize(req, state, finish)
            out = self._output(req, state)
            if out is not None:
                outputs.append(out)
            if req.is_finished:
                self._states.pop(req.request_id, None)
        return outputs

    @staticmethod
    def _detokenize(req: Request, state: _OutputState, finish: FinishFn) -> None:
        detokenizer = state.detokenizer
        was_stopped = detokenizer.stopped
        for token_id in req.output_token_ids[state.num_detokenized :]:
            detokenizer.append(token_id)
        state.num_detokenized = req.num_generated_tokens
        if detokenizer.stopped and not was_stopped:
            if not req.is_finished:
                finish(req, FinishReason.STOP)
            elif req.finish_reason is FinishReason.LENGTH:  # the last token both completed a stop string and hit
                req.finish_reason = FinishReason.STOP  # the length limit: the stop string wins, as it always has

    @staticmethod
    def _output(req: Request, state: _OutputState) -> RequestOutput | None:
        finished = req.is_finished
        if req.output_kind is OutputKind.FINAL_ONLY and not finished:
            return None
        text, end = state.detokenizer.output_text, state.detokenizer.num_visible_chars(finished)
        if req.output_kind is OutputKind.DELTA:
            start, state.num_sent_tokens = state.num_sent_tokens, req.num_generated_tokens
            token_ids, logprobs = req.output_token_ids[start:], req.output_logprobs[start:]
            text, state.num_sent_chars = text[state.num_sent_chars : end], end
        else:
            token_ids, logprobs, text = list(req.output_token_ids), list(req.output_logprobs), text[:end]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=token_ids,
            text=text,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            finished=finished,
            num_generated_tokens=req.num_generated_tokens,
            adapter_id=req.adapter_id,
            error=req.error,
            metrics=dataclasses.replace(req.metrics),
            exception=req.exception,
            logprobs=logprobs,
            seed=req.seed,
            num_cached_tokens=req.num_cached_tokens or 0,
        )


__all__ = ["OutputProcessor"]
