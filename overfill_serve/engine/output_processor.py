"""`OutputProcessor`: appends sampled tokens to requests, detokenizes incrementally and decides when to stop.

Both stages use it: the prefill engine for the teacher's first token, the decode engine for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from overfill_serve.detokenizer import IncrementalDetokenizer
from overfill_serve.engine.sampler import SampledToken
from overfill_serve.request import FinishReason, Request, TokenLogprob
from overfill_serve.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepOutput:
    """What one step added to one request: the streaming unit."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of token_ids, when the request asked for them
    # With a request's first output: its prompt tokens 1, 2, ... scored (when it asked for them), and how many
    # of its prompt tokens' KV came from the prefix cache.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    num_cached_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def append(self, request: Request, sampled: SampledToken) -> StepOutput:
        """Add one token; on a stop condition set the request's finish reason (the engine frees its KV)."""
        token, params = sampled.token_id, request.params
        detok = self._detokenizer(request)  # before the append: its context is every token so far
        request.output_token_ids.append(token)
        if sampled.logprob is not None:
            request.output_logprobs.append(sampled.logprob)
        text = ""
        if self.stops_on(token, params, generated=len(request.output_token_ids)):
            request.finish_reason, request.stop_reason = FinishReason.STOP, token
        else:
            step = detok.step(token)
            text = step.delta
            if step.stop_string is not None:
                request.finish_reason, request.stop_reason = FinishReason.STOP, step.stop_string
            elif (
                len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len
            ):
                request.finish_reason = FinishReason.LENGTH
        finished = request.finish_reason is not None
        if finished:
            text += detok.finish()
        logprobs = (sampled.logprob,) if sampled.logprob is not None else ()
        out = StepOutput(request.request_id, (token,), text, finished, request.finish_reason, logprobs)
        return self._with_prompt(out, request) if len(request.output_token_ids) == 1 else out

    def finish_prompt(self, request: Request) -> StepOutput:
        """The one output of a request that generates nothing (max_tokens=0): its prompt scored."""
        return self._with_prompt(StepOutput(request.request_id, (), "", True, FinishReason.LENGTH), request)

    @staticmethod
    def _with_prompt(out: StepOutput, request: Request) -> StepOutput:
        """A request's first output: with what it says about the prompt."""
        return replace(
            out, prompt_logprobs=tuple(request.prompt_logprobs), num_cached_tokens=request.num_cached_tokens
        )

    def stops_on(self, token: int, params: SamplingParams, *, generated: int) -> bool:
        """The token-level stop rule: a stop token id, or eos unless ignored, once `params.min_tokens` are
        generated (`generated` counts `token`). A prefill worker also asks it whether the teacher's first
        token ends the request, so its KV need not travel."""
        if generated < params.min_tokens:
            return False
        return token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos)

    def release(self, request_id: str) -> None:
        self._detok.pop(request_id, None)

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        detok = self._detok.get(request.request_id)
        if detok is None:
            # A request resumed on another worker continues after the tokens and the text it already has.
            detok = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                request.params,
                request.output_token_ids,
                request.emitted_chars,
            )
            self._detok[request.request_id] = detok
        return detok
