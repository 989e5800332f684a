"""The public gRPC API's responses (protos/overfill/v1/generate.proto) from the engine's StepOutputs: chunks
for GenerateStream, one GenerateResponse for Generate, the model list. Pure conversions, no Ray."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.request import FinishReason, TokenLogprob
from overfill_serve.serve.grpc_requests import MODE_TO_PROTO
from overfill_serve.serve.model_names import model_ids
from overfill_serve.serve.served_by import ServedBy

if TYPE_CHECKING:
    from overfill_serve.engine.output_processor import StepOutput

FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def served_by_to_proto(served_by: ServedBy) -> pb.ServedBy:
    return pb.ServedBy(
        mode=MODE_TO_PROTO[served_by.mode],
        prefill_model=served_by.prefill_model,
        decode_model=served_by.decode_model,
    )


def logprobs_to_proto(logprobs: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            rank=lp.rank or 0,
        )
        for lp in logprobs
    ]


def chunk_to_proto(
    out: StepOutput,
    *,
    request_id: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    cached_tokens: int = 0,
    served_by: ServedBy | None = None,
    ttft_s: float | None = None,
    e2e_s: float | None = None,
) -> pb.GenerateChunk:
    """One StepOutput as a chunk. Pass usage, served_by and metrics on the last chunk only."""
    chunk = pb.GenerateChunk(
        request_id=request_id if request_id is not None else out.request_id,
        text=out.text,
        token_ids=list(out.token_ids),
        logprobs=logprobs_to_proto(out.logprobs),
        finish_reason=FINISH_TO_PROTO[out.finish_reason],
        prompt_logprobs=logprobs_to_proto(out.prompt_logprobs),
    )
    if prompt_tokens is not None:
        usage = pb.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens or 0, cached_tokens=cached_tokens
        )
        chunk.usage.CopyFrom(usage)
    if served_by is not None:
        chunk.served_by.CopyFrom(served_by_to_proto(served_by))
    if e2e_s is not None:
        chunk.metrics.CopyFrom(pb.Metrics(ttft_s=ttft_s or 0.0, e2e_s=e2e_s))
    return chunk


def response_to_proto(
    request_id: str,
    text: str,
    token_ids: Sequence[int],
    finish_reason: FinishReason | None,
    *,
    prompt_tokens: int,
    served_by: ServedBy,
    ttft_s: float,
    e2e_s: float,
    logprobs: Iterable[TokenLogprob] = (),
    stop_reason: str | int | None = None,
    prompt_logprobs: Iterable[TokenLogprob] = (),
    cached_tokens: int = 0,
) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        text=text,
        token_ids=list(token_ids),
        finish_reason=FINISH_TO_PROTO[finish_reason],
        usage=pb.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=len(token_ids), cached_tokens=cached_tokens
        ),
        served_by=served_by_to_proto(served_by),
        metrics=pb.Metrics(ttft_s=ttft_s, e2e_s=e2e_s),
        logprobs=logprobs_to_proto(logprobs),
        prompt_logprobs=logprobs_to_proto(prompt_logprobs),
    )
    if isinstance(stop_reason, str):
        response.stop_string = stop_reason
    elif isinstance(stop_reason, int):
        response.stop_token_id = stop_reason
    return response


class GenerationAccumulator:
    """One request's StepOutputs → GenerateChunks (`add`, for GenerateStream) and/or one GenerateResponse
    (`response`, for Generate). Counts tokens and times the first and last token from `arrival`."""

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        served_by: ServedBy,
        *,
        arrival: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.request_id, self.prompt_tokens, self.served_by = request_id, prompt_tokens, served_by
        self._clock = clock
        self.arrival = clock() if arrival is None else arrival
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self.num_cached_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.ttft_s: float | None = None
        self.e2e_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: StepOutput) -> pb.GenerateChunk:
        now = self._clock() - self.arrival
        if out.token_ids and self.ttft_s is None:
            self.ttft_s = now
        self.text_parts.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or out.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if not out.finished:
            return chunk_to_proto(out, request_id=self.request_id)
        self.finish_reason = out.finish_reason
        self.e2e_s = now
        return chunk_to_proto(
            out,
            request_id=self.request_id,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            cached_tokens=self.num_cached_tokens,
            served_by=self.served_by,
            ttft_s=self.ttft_s,
            e2e_s=self.e2e_s,
        )

    def response(self, stop_reason: str | int | None = None) -> pb.GenerateResponse:
        e2e = self.e2e_s if self.e2e_s is not None else self._clock() - self.arrival
        return response_to_proto(
            self.request_id,
            "".join(self.text_parts),
            self.token_ids,
            self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            served_by=self.served_by,
            ttft_s=self.ttft_s if self.ttft_s is not None else e2e,
            e2e_s=e2e,
            logprobs=self.logprobs,
            stop_reason=stop_reason,
            prompt_logprobs=self.prompt_logprobs,
            cached_tokens=self.num_cached_tokens,
        )


def models_to_proto(pair_name: str, teacher: str, student: str) -> pb.ListModelsResponse:
    served = [(model_id, ServedBy.of(mode, teacher, student)) for model_id, mode in model_ids(pair_name)]
    return pb.ListModelsResponse(
        models=[
            pb.Model(
                id=i, mode=MODE_TO_PROTO[s.mode], prefill_model=s.prefill_model, decode_model=s.decode_model
            )
            for i, s in served
        ]
    )
