"""Sampler: turns one row of logits per request into one token id per request.

Order of operations follows transformers' `generate`: repetition penalty -> temperature -> top_k ->
top_p -> softmax -> draw. Everything runs batched over the rows on the logits' device, the draw included (an
exponential race: argmax(log p - log E), E ~ Exp(1)); only the noise E is drawn row by row, each row from its own
`torch.Generator`, so a seeded request draws the same tokens whatever else shares its batch. One host copy of
the chosen tokens and their log-probs per step.

One row never breaks another. A row whose logits are unusable (NaN, +inf, or nothing above -inf:
a corrupt adapter's output, say) or whose draw raises is reported in `SamplerOutput.errors`, and
every other row is computed, and drawn from its own generator, exactly as without it. No parameter
in its accepted range (see SamplingParams) makes a valid row inf/nan: logits are divided by the
temperature after the row's max is subtracted (nothing can overflow upwards), a value the penalty
pushes past float32's range is clamped to the largest float, and top_p always keeps the top token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorax_lite.engine.request import Request

FLOAT_MAX = torch.finfo(torch.float32).max
TINY = torch.finfo(torch.float32).tiny  # the noise is clamped to it: log(0) would be -inf


class SamplingError(RuntimeError):
    """No token can be sampled for a request (its logits are not finite)."""


@dataclass
class SamplerOutput:
    """The chosen token per request and its log-probability.

    `logprobs[i]` is taken from the distribution row i was actually drawn from: for a sampled
    row, the log-softmax of the processed logits (penalty, temperature, top_k, top_p applied);
    for a greedy row, the log-softmax of the raw logits (before the repetition penalty).
    """

    token_ids: list[int]
    logprobs: list[float]
    errors: dict[int, Exception] = field(default_factory=dict)  # row -> why it failed (its entries above are 0)


class Sampler:
    """Picks one token per row of `logits`, following each request's `sampling_params`."""

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [N, V], row i belongs to requests[i]; any float dtype/device (computed in fp32).

        A failed row is in the output's `errors`; the call raises only for a wrongly shaped `logits`.
        """
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [N, V] with N={len(requests)}, got {tuple(logits.shape)}")
        raw = logits.float()  # [N, V]
        # Rows with no usable logits (a NaN, a +inf, or only -inf) fail. Every step below works row by row, so such
        # a row changes no other; which rows they are is read with the tokens, in the step's one device-to-host copy.
        bad = ~torch.isfinite(raw.amax(dim=-1))  # [N]; amax is NaN when the row has one
        penalized = self._apply_repetition_penalty(raw, requests)  # [N, V]
        # [3, N] on the device: the chosen token ids, their log-probs and the bad-row flags (float64 holds every
        # token id exactly)
        picked = torch.zeros(3, len(requests), dtype=torch.float64, device=logits.device)
        errors: dict[int, Exception] = {}
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.is_greedy]
        sampled = [i for i, r in enumerate(requests) if not r.sampling_params.is_greedy]
        if greedy:
            self._pick_greedy(raw, penalized, greedy, picked)
        # a failed row's generator is put back as it was, as if the row had never been drawn
        generators = {i: g for i in sampled if isinstance(g := requests[i].generator, torch.Generator)}
        states = {i: g.get_state() for i, g in generators.items()}
        if sampled:
            self._pick_sampled(penalized, [requests[i] for i in sampled], sampled, picked, errors)
        picked[2].copy_(bad)
        on_host = picked.cpu()  # the step's one device-to-host copy
        for i in on_host[2].nonzero().flatten().tolist():
            if i in states:
                generators[i].set_state(states[i])
            errors[i] = SamplingError("the model's logits for this request are not finite (NaN or inf), so no token "
                                      "can be sampled; an adapter with NaN or inf weights does this")
        for i in errors:
            on_host[0:2, i] = 0
        return SamplerOutput(token_ids=on_host[0].long().tolist(), logprobs=on_host[1].float().tolist(), errors=errors)

    # -- repetition penalty ---------------------------------------------------------------------

    def _apply_repetition_penalty(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """HF RepetitionPenaltyLogitsProcessor per row: seen ids get logit*p if < 0 else logit/p."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
        if not rows:
            return logits
        vocab_size = logits.shape[1]
        seen = self._seen_mask([requests[i].all_token_ids for i in rows], vocab_size, logits.device)  # [R, V]
        penalty = torch.tensor(
            [requests[i].sampling_params.repetition_penalty for i in rows], dtype=torch.float32, device=logits.device
        )[:, None]  # [R, 1]
        index = torch.tensor(rows, device=logits.device)
        sub = logits[index]  # [R, V]
        penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
        penalized = torch.where(torch.isneginf(sub), sub, penalized.clamp(-FLOAT_MAX, FLOAT_MAX))  # overflow: clamp
        out = logits.clone()
        out[index] = torch.where(seen, penalized, sub)
        return out

    @staticmethod
    def _seen_mask(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
        """[R, V] bool: token v appears in list r. Ids >= V are ignored (as HF does)."""
        width = max(1, max(len(t) for t in token_lists))
        ids = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)  # pad with V, dropped below
        for r, tokens in enumerate(token_lists):
            ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long).clamp(max=vocab_size)
        mask = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.bool, device=device)
        mask.scatter_(1, ids.to(device), True)
        return mask[:, :vocab_size]

    # -- greedy ---------------------------------------------------------------------------------

    @staticmethod
    def _pick_greedy(raw: torch.Tensor, penalized: torch.Tensor, rows: list[int], picked: torch.Tensor) -> None:
        if len(rows) == raw.shape[0]:  # every row greedy (the common case): no [G, V] copies
            rows_raw, rows_penalized = raw, penalized
        else:
            index = torch.tensor(rows, device=raw.device)
            rows_raw = raw.index_select(0, index)  # [G, V]
            rows_penalized = rows_raw if penalized is raw else penalized.index_select(0, index)
        chosen = rows_penalized.argmax(dim=-1)  # [G]
        lp = rows_raw.gather(1, chosen[:, None])[:, 0] - torch.logsumexp(rows_raw, dim=-1)  # [G]
        if len(rows) == raw.shape[0]:
            picked[0].copy_(chosen)
            picked[1].copy_(lp)
        else:
            picked[:2, rows] = torch.stack([chosen.double(), lp.double()])

    # -- sampled --------------------------------------------------------------------------------

    def _pick_sampled(
        self,
        penalized: torch.Tensor,
        requests: list[Request],
        rows: list[int],
        picked: torch.Tensor,
        errors: dict[int, Exception],
    ) -> None:
        device = penalized.device
        params = [r.sampling_params for r in requests]
        # temperature >= GREEDY_TEMPERATURE here; a huge one is capped so that it stays finite in float32
        temperature = torch.tensor([min(p.temperature, FLOAT_MAX) for p in params], dtype=torch.float32, device=device)
        unscaled = penalized[torch.tensor(rows, device=device)]  # [S, V], each row's max finite
        shifted = unscaled - unscaled.amax(dim=-1, keepdim=True)  # <= 0, the top token 0: "/ temperature" cannot
        logits = shifted / temperature[:, None]  # overflow (a tiny one sends the others to -inf, as its limit does)
        logits = self._apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        log_probs = torch.log_softmax(logits, dim=-1)  # [S, V], stays on the device
        # The draw, batched: argmax(log p - log E) with E ~ Exp(1) i.i.d. picks token i with probability p_i (the
        # first of independent exponential clocks with rates p_i to ring). Only the noise is drawn per row, from
        # the request's own generator, so a seeded row draws the same whatever shares its batch.
        noise = torch.ones(len(rows), log_probs.shape[1], dtype=torch.float32, device=device)
        drawn = []
        for s, (row, request) in enumerate(zip(rows, requests, strict=True)):
            try:
                self._draw_noise(noise[s], request)
            except Exception as exc:  # this row fails; the others are drawn as if it were not there
                errors[row] = exc
                continue
            drawn.append(s)
        if not drawn:
            return
        keys = log_probs - noise.clamp_(min=TINY).log_()  # a masked token (log p = -inf) never wins
        chosen = keys.argmax(dim=-1)  # [S]
        chosen_lp = log_probs.gather(1, chosen[:, None])[:, 0]
        which = torch.tensor(drawn, device=device)
        index = torch.tensor([rows[s] for s in drawn], device=device)
        picked[:2, index] = torch.stack([chosen.double(), chosen_lp.double()])[:, which]

    @staticmethod
    def _draw_noise(noise: torch.Tensor, request: Request) -> None:
        if request.generator is None:
            raise RuntimeError(f"request {request.request_id} samples but has no generator")
        noise.exponential_(generator=request.generator)

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """Mask to -inf what top_k (0 = off) and then top_p (1.0 = off) remove. logits: [S, V]."""
        if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits
        num_rows, vocab_size = logits.shape
        device = logits.device
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)  # [S, V]
        # top_k: keep values >= the k-th largest (ties with it are kept, like HF's TopKLogitsWarper).
        k = torch.tensor([min(k, vocab_size) if k > 0 else vocab_size for k in top_k], device=device)
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [S, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        # top_p: drop a token once the mass strictly above it already reaches top_p. The top token always
        # stays, even when top_p rounds to 0 in float32.
        p = torch.tensor(top_p, dtype=torch.float32, device=device)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
        drop = (mass_above >= p[:, None]) & (p < 1.0)[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


__all__ = ["FLOAT_MAX", "Sampler", "SamplerOutput", "SamplingError"]
