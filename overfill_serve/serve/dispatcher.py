"""`Dispatcher`: runs one request across the deployments — prefill → KV channel → decode — and keeps it alive
through failures.

- overfill: a prefill replica prefills and offers the KV (a ticket); a decode replica pulls it and decodes.
- full / pruned: one replica runs both stages on its own model (prefill replica: teacher; decode: student).
A decode replica that dies or runs out of KV blocks mid-request does not lose it: the prompt is re-prefilled
with the tokens generated so far and another decode replica continues exactly where it stopped (migration).
A prefill replica that dies is retried on another. When no replica is left the stream ends with a typed
error, never a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import PeerUnavailableError, PreemptedError, ServiceUnavailableError
from overfill_serve.request import Mode, Resume
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.transfer.control import TransferControl

log = logging.getLogger(__name__)
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class Dispatcher:
    def __init__(
        self, prefill: Any, decode: Any, transfers: TransferControl, max_migrations: int = 2
    ) -> None:
        """`prefill` / `decode`: Serve deployment handles of PrefillServer / DecodeServer. `transfers` reaches
        the KV server of the prefill replica holding a ticket's KV (a handle call could land on another)."""
        self.prefill, self.decode = prefill, decode
        self.transfers = transfers
        self.max_migrations = max_migrations

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, mode: Mode, request_id: str
    ) -> AsyncIterator[StepOutput]:
        _own_serve_request()
        if mode is Mode.OVERFILL:
            async for out in self._overfill(prompt_token_ids, params, request_id):
                yield out
            return
        handle = self.prefill if mode is Mode.FULL else self.decode
        stream = handle.options(stream=True).generate.remote(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        except REPLICA_GONE as e:
            raise ServiceUnavailableError(
                f"the {mode.value} replica serving {request_id} died: {e}"
            ) from None

    async def _overfill(
        self, prompt: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[StepOutput]:
        generated: list[int] = []
        emitted = 0  # characters of text sent: a migrated request's new replica sends what was held back
        for attempt in range(self.max_migrations + 1):
            ticket = await self._submit(prompt, params, request_id, generated, emitted)
            if ticket.outputs:  # it ended on its first token, on the prefill replica
                for out in ticket.outputs:
                    yield out
                return
            done = False
            try:
                stream = self.decode.options(stream=True).generate_from.remote(ticket)
                async for out in stream:
                    generated += out.token_ids
                    emitted += len(out.text)
                    yield out
                done = True
                return
            except PreemptedError as e:
                why = f"decode replica out of KV blocks after {len(e.output_token_ids)} tokens"
            except REPLICA_GONE as e:
                why = f"decode replica died: {type(e).__name__}"
            except PeerUnavailableError as e:  # the prefill replica died, or no longer holds the KV (lease)
                why = str(e)
            finally:
                if not done:  # whatever happened, the prefill side need not hold this KV any longer
                    reason = "the request ended before its KV was used"
                    await asyncio.to_thread(self.transfers.abort, ticket.address, ticket.transfer_id, reason)
            log.warning("request %s: %s; migrating (attempt %d)", request_id, why, attempt + 1)
        raise ServiceUnavailableError(
            f"request {request_id} failed after {self.max_migrations} migrations: {why}"
        )

    async def _submit(
        self, prompt: list[int], params: SamplingParams, request_id: str, generated: list[int], emitted: int
    ) -> Any:
        resume = Resume(tuple(generated), emitted) if generated else None
        for _ in range(self.max_migrations + 1):
            try:
                return await self.prefill.submit.remote(prompt, params, request_id, resume)
            except REPLICA_GONE as e:
                log.warning("request %s: prefill replica died (%s); retrying", request_id, type(e).__name__)
                last: Exception = e
        raise ServiceUnavailableError(f"no prefill replica could take request {request_id}: {last}")


def _own_serve_request() -> None:
    """Give the handle calls of this task (one choice of a request) a Serve request id of their own. Serve's
    handles inherit the incoming request's internal id and its request router keeps one pending entry per
    id, so the n choices of one HTTP request would collide there: all but one wait until they time out."""
    from ray.serve import context

    current = context._get_serve_request_context()
    fresh = dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex)
    context._serve_request_context.set(fresh)  # type: ignore[arg-type]
