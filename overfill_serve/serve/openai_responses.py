"""OpenAI-compatible responses: completions, chat completions and their SSE streams, built from StepOutputs.

Pure protocol code (no Ray, no HTTP framework). Per HTTP request the ingress makes one `CompletionResponder` or
`ChatResponder` (see `make_responder`) and feeds it `(choice_index, StepOutput)` pairs as they arrive: `add`
returns the streaming chunks to send, `response()` the final non-streaming body. `sse_stream` wraps the whole
streaming exchange, error event and `[DONE]` included; `merge_choices` interleaves the n choices' streams.
Request parsing lives in `openai_requests`, errors in `openai_errors`, model names and the model list in
`model_names`.
"""

from __future__ import annotations

import abc
import asyncio
import codecs
import json
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.request import FinishReason, TokenLogprob
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import AnyRequest, ChatCompletionRequest, CompletionRequest
from overfill_serve.serve.served_by import ServedBy
from overfill_serve.serve.token_strings import TokenStrings

SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'), allow_nan=False)}\n\n"


def sse_error(e: BaseException) -> str:
    """The SSE event for an error that happens mid-stream (the openai client raises APIError on it)."""
    return sse(from_exception(e).to_json())


def _logprob(value: float) -> float:
    return value if value == value and value > _MIN_LOGPROB else _MIN_LOGPROB  # also maps NaN


# --------------------------------------------------------------------------------------------------- choices


class ChoiceState:
    """Everything one choice has produced so far: text, token ids, logprobs and finish reason."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text_offsets: list[int] = []  # character offset of each logprob's token in `text`
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 1, 2, ... when scored
        self.num_cached_tokens = 0  # prompt tokens whose KV the prefix cache held
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def consume(self, step: StepOutput, strings: TokenStrings | None = None) -> None:
        """Append one step. `strings` (needed only with logprobs) places multi-token steps' offsets."""
        if self.finished:
            raise RuntimeError(f"choice {self.index} received output after it finished")
        if step.finish_reason is FinishReason.ABORT:
            # Client disconnects never reach here (the ingress stops reading); an abort is the server's doing.
            raise ApiError.unavailable("The request was aborted by the server", code="request_aborted")
        start, end = len(self.text), len(self.text) + len(step.text)
        offset = start
        for lp in step.logprobs:
            self.text_offsets.append(min(offset, end))
            offset += len(strings.text(lp.token_id)) if strings is not None else 0
        self.text += step.text
        self.token_ids.extend(step.token_ids)
        self.logprobs.extend(step.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or step.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, step.num_cached_tokens)
        if step.finished:
            self.finish_reason = (step.finish_reason or FinishReason.STOP).value


# ------------------------------------------------------------------------------------------------ responders


def _choice(choice: ChoiceState, key: str, value: Any, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": choice.index, key: value, "logprobs": logprobs, "finish_reason": choice.finish_reason}


class _Responder(abc.ABC):
    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(
        self,
        request: AnyRequest,
        served_by: ServedBy,
        tokenizer: Any,
        *,
        prompt_tokens: int,
        request_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.request = request
        self.served_by = served_by
        self.prompt_tokens = prompt_tokens
        self.id = request_id or f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time()) if created is None else created
        self.strings = TokenStrings(tokenizer)
        self.choices = [ChoiceState(i) for i in range(request.num_outputs)]
        # Completions: logprobs=0..5 (0 still wants the chosen token's); chat: logprobs=true.
        self.logprobs_wanted = request.logprobs is not None and request.logprobs is not False

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def usage(self) -> dict[str, Any]:
        """Usage so far (every prompt's tokens once, whatever n; its cached tokens as its choices found most)."""
        completion = sum(len(c.token_ids) for c in self.choices)
        n = self.request.num_choices
        cached = sum(
            max(c.num_cached_tokens for c in self.choices[i : i + n]) for i in range(0, len(self.choices), n)
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.request.model}
        out |= {"choices": choices, "overfill": self.served_by.to_json()}
        return out

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._envelope(self.chunk_object, choices)
        if self.request.continuous_usage:
            out["usage"] = self.usage()  # vLLM's continuous_usage_stats: usage so far on every chunk
        elif self.request.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
        return out

    def start(self) -> list[dict[str, Any]]:
        """Chunks to send before any output (streaming only)."""
        return []

    def add(self, index: int, step: StepOutput) -> list[dict[str, Any]]:
        """Record one step of choice `index`; returns the streaming chunks for it (possibly none)."""
        choice = self.choices[index]
        logprobs = self.logprobs_wanted
        before = len(choice.logprobs)
        choice.consume(step, self.strings if logprobs else None)
        if not (step.text or step.finished or (logprobs and step.logprobs)):
            return []  # text held back (stop-string or partial character): nothing to say yet
        lps = self._logprobs(choice, before) if logprobs else None
        return [self._chunk([self._delta(choice, step.text, lps)])]

    def finish(self) -> list[dict[str, Any]]:
        """Chunks to send after every choice finished: the usage chunk when the client asked for it."""
        if not self.request.include_usage:
            return []
        out = self._chunk([])
        out["usage"] = self.usage()
        return [out]

    def response(self) -> dict[str, Any]:
        """The non-streaming body; every choice must have finished."""
        for c in self.choices:
            if not c.finished:
                raise RuntimeError(f"choice {c.index} has not finished")
        logprobs = self.logprobs_wanted
        choices = [self._final(c, self._logprobs(c, 0) if logprobs else None) for c in self.choices]
        out = self._envelope(self.object_name, choices)
        out["usage"] = self.usage()
        return out

    async def sse_stream(self, outputs: AsyncIterable[tuple[int, StepOutput]]) -> AsyncIterator[str]:
        """The whole SSE body: start chunks, one event per chunk, usage, `[DONE]`; an exception raised by
        `outputs` (or here) becomes one error event before `[DONE]`."""
        try:
            for chunk in self.start():
                yield sse(chunk)
            async for index, step in outputs:
                for chunk in self.add(index, step):
                    yield sse(chunk)
            for chunk in self.finish():
                yield sse(chunk)
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE

    # Endpoint-specific parts.
    @abc.abstractmethod
    def _logprobs(self, choice: ChoiceState, start: int) -> dict[str, Any]: ...
    @abc.abstractmethod
    def _delta(self, choice: ChoiceState, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def _final(self, choice: ChoiceState, logprobs: dict[str, Any] | None) -> dict[str, Any]: ...


class CompletionResponder(_Responder):
    """Echo with logprobs (how lm-eval scores through the API) lists the prompt's tokens first, the first one
    without a logprob, as vLLM does; streaming, the echo chunk then comes with the choice's first output,
    which carries the prompt's scores. `prompt_logprobs` (vLLM's extension) adds vLLM's per-token dicts."""

    object_name = chunk_object = "text_completion"  # the legacy API streams the same object type
    id_prefix = "cmpl"
    request: CompletionRequest

    def __init__(
        self,
        request: CompletionRequest,
        served_by: ServedBy,
        tokenizer: Any,
        *,
        prompt_token_ids: Sequence[Sequence[int]] = (),
        **kw: Any,
    ) -> None:
        super().__init__(request, served_by, tokenizer, **kw)
        self.prompt_ids = list(prompt_token_ids)  # each prompt's token ids: scored echo lists them
        self.echo_texts: list[str] = []  # each prompt's text, when echoed
        if request.echo:
            self.echo_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in request.prompts]
        # Choices whose first chunk is still to come: it carries the echo (when scored) / prompt_logprobs.
        self._echo_pending = set(range(len(self.choices))) if request.echo_logprobs else set()
        self._scores_pending = set(range(len(self.choices))) if request.prompt_logprobs is not None else set()

    def _prompt_index(self, choice: ChoiceState) -> int:
        return choice.index // self.request.num_choices  # prompt i's choices are i * n .. i * n + n - 1

    def _echo(self, choice: ChoiceState) -> str:
        return self.echo_texts[self._prompt_index(choice)] if self.echo_texts else ""

    def start(self) -> list[dict[str, Any]]:
        if not self.echo_texts or self._echo_pending:
            return []
        return [self._chunk([self._delta(c, self._echo(c), None)]) for c in self.choices]

    def add(self, index: int, step: StepOutput) -> list[dict[str, Any]]:
        chunks = super().add(index, step)
        if index in self._echo_pending:
            self._echo_pending.discard(index)
            choice = self.choices[index]
            echo = _choice(choice, "text", self._echo(choice), self._prompt_entries(choice))
            chunks.insert(0, self._chunk([echo | {"finish_reason": None}]))
        if chunks and index in self._scores_pending:  # with the choice's first chunk
            self._scores_pending.discard(index)
            chunks[0]["choices"][0]["prompt_logprobs"] = self._vllm_prompt_logprobs(self.choices[index])
        return chunks

    def _entries(
        self, logprobs: Sequence[TokenLogprob], offsets: Sequence[int], k: int
    ) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
        for lp, offset in zip(logprobs, offsets):
            out["tokens"].append(self.strings.text(lp.token_id))
            out["token_logprobs"].append(_logprob(lp.logprob))
            # Legacy format: a dict of the alternatives plus the chosen token, keyed by token text.
            top = {self.strings.text(t): _logprob(v) for t, v in lp.top[:k]}
            top.setdefault(self.strings.text(lp.token_id), _logprob(lp.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
        return out

    def _logprobs(self, choice: ChoiceState, start: int) -> dict[str, Any]:
        shift = len(self._echo(choice))  # offsets count from the start of the text, echo included
        offsets = [o + shift for o in choice.text_offsets[start:]]
        return self._entries(choice.logprobs[start:], offsets, self.request.logprobs or 0)

    def _prompt_entries(self, choice: ChoiceState) -> dict[str, list[Any]]:
        """The prompt's tokens as logprobs entries: the first without a logprob (nothing comes before it)."""
        ids = self.prompt_ids[self._prompt_index(choice)]
        first = self.strings.text(ids[0])
        # Each token's offset in the decoded prompt: its bytes decoded incrementally, so a token ending inside
        # a character counts only once the character is complete (offsets never run past the text).
        utf8, offsets, at = codecs.getincrementaldecoder("utf-8")("replace"), [], 0
        for t in ids:
            offsets.append(at)
            at += len(utf8.decode(bytes(self.strings(t)[1])))
        out = self._entries(choice.prompt_logprobs, offsets[1:], self.request.logprobs or 0)
        for key, value in (
            ("tokens", first),
            ("token_logprobs", None),
            ("top_logprobs", None),
            ("text_offset", 0),
        ):
            out[key].insert(0, value)
        return out

    def _vllm_prompt_logprobs(self, choice: ChoiceState) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token, {token id: {logprob, rank, decoded_token}} for the token
        and its top alternatives; None for the first token."""
        k = self.request.prompt_logprobs or 0
        out: list[dict[str, Any] | None] = [None]
        for lp in choice.prompt_logprobs:
            entry = {str(t): self._vllm_entry(t, v, rank) for rank, (t, v) in enumerate(lp.top[:k], 1)}
            entry[str(lp.token_id)] = self._vllm_entry(lp.token_id, lp.logprob, lp.rank)
            out.append(entry)
        return out

    def _vllm_entry(self, token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _logprob(logprob), "rank": rank, "decoded_token": self.strings.text(token_id)}

    def _delta(self, choice: ChoiceState, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return _choice(choice, "text", text, logprobs)

    def _final(self, choice: ChoiceState, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        if logprobs is not None and self.request.echo_logprobs:
            prompt = self._prompt_entries(choice)
            logprobs = {key: prompt[key] + logprobs[key] for key in prompt}
        out = self._delta(choice, self._echo(choice) + choice.text, logprobs)
        if self.request.prompt_logprobs is not None:
            out["prompt_logprobs"] = self._vllm_prompt_logprobs(choice)
        return out


class ChatResponder(_Responder):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    request: ChatCompletionRequest

    def start(self) -> list[dict[str, Any]]:
        # OpenAI opens every choice's stream with the role and empty content.
        role = {"role": "assistant", "content": ""}
        return [self._chunk([_choice(c, "delta", role, None)]) for c in self.choices]

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.strings(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": raw}

    def _logprobs(self, choice: ChoiceState, start: int) -> dict[str, Any]:
        content = []
        for lp in choice.logprobs[start:]:
            entry = self._entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _delta(self, choice: ChoiceState, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        delta = {"content": text} if text or not choice.finished else {}
        return _choice(choice, "delta", delta, logprobs)

    def _final(self, choice: ChoiceState, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return _choice(choice, "message", {"role": "assistant", "content": choice.text}, logprobs)


async def merge_choices(
    streams: Sequence[AsyncIterator[StepOutput]],
) -> AsyncIterator[tuple[int, StepOutput]]:
    """The n choices' StepOutput streams as `(choice_index, step)` pairs, in arrival order. An error in one
    stream cancels the others and is raised here; closing this generator (client gone) cancels them all."""
    if len(streams) == 1:  # the common case needs no tasks
        async for step in streams[0]:
            yield 0, step
        return
    queue: asyncio.Queue[tuple[int, StepOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StepOutput]) -> None:
        try:
            async for step in stream:
                await queue.put((index, step))
            await queue.put((index, None))
        except Exception as e:
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_responder(request: AnyRequest, *args: Any, **kwargs: Any) -> CompletionResponder | ChatResponder:
    """The responder for the request's endpoint; the other arguments are the responders' own."""
    if isinstance(request, CompletionRequest):
        return CompletionResponder(request, *args, **kwargs)
    return ChatResponder(request, *args, **kwargs)
