"""lm-eval's model for an overfill-serve app: `local-completions` plus the OverFill continuation split.

Registered with lm-eval as `overfill-completions` when this module is imported (`overfill-serve eval` does).
It sends exactly what lm-eval's `LocalCompletionsAPI` sends (token-id prompts, `echo`, `logprobs: 1`,
`max_tokens: 1`, batched prompts as one request) and parses the answers the same way, with one addition: a
loglikelihood request carries `continuation_start`, each prompt's context length (a list, one per prompt of
a batch). In OverFill mode the server then scores the context and the first continuation token on the
teacher and the rest of the continuation on the student decoding on the teacher's KV, the distribution
OverFill samples from; `<pair>:full` and `<pair>:pruned` score everything on one model either way.

Tokenization: the server's own (lm-eval's remote tokenizer), unless `tokenizer=<local dir>` is given, which
takes lm-eval's Hugging Face path. The context length defaults to the server's `max_model_len`.
"""

from __future__ import annotations

from typing import Any

import requests
from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.utils import RemoteTokenizer

from overfill_serve.errors import InvalidRequestError
from overfill_serve.tools.client import HTTPClient, api_error

MODEL_NAME = "overfill-completions"
COMPLETIONS_PATH = "/v1/completions"


def server_root(completions_url: str) -> str:
    """http://host:port[/prefix] of a .../v1/completions URL (what lm-eval's `base_url` names)."""
    url = completions_url.rstrip("/")
    return url[: -len(COMPLETIONS_PATH)] if url.endswith(COMPLETIONS_PATH) else url


class CachedRemoteTokenizer(RemoteTokenizer):
    """lm-eval's remote tokenizer sending each text to the server once: lm-eval encodes a context once per
    choice, and `overfill-serve eval` again in every mode (one instance serves them all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ids: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = tuple(super().encode(text))
        return list(ids)


@register_model(MODEL_NAME)
class OverfillCompletions(LocalCompletionsAPI):
    """`remote_tokenizer`: one shared by several instances (one per mode); by default one of its own."""

    def __init__(
        self,
        base_url: str | None = None,
        tokenizer: str | None = None,
        remote_tokenizer: CachedRemoteTokenizer | None = None,
        **kwargs: Any,
    ) -> None:
        if not base_url:
            raise InvalidRequestError("base_url is required (http://host:port/v1/completions)", "base_url")
        own_max_length = "max_length" not in kwargs
        # A local tokenizer directory takes lm-eval's Hugging Face path; without one, the server's own
        # (lm-eval's remote backend, over vLLM's /tokenizer_info, /tokenize and /detokenize), cached.
        super().__init__(
            base_url=base_url,
            tokenizer=tokenizer,
            tokenizer_backend="huggingface" if tokenizer else None,
            **kwargs,
        )
        if tokenizer is None:
            self.tokenizer_backend, self.tokenized_requests = "remote", True
            self.tokenizer = remote_tokenizer or CachedRemoteTokenizer(
                self.base_url, self.timeout, self.verify_certificate, self.ca_cert_path, self.auth_token
            )
        self._scored: tuple[list[list[int]], list[int]] | None = None
        if own_max_length:
            client = HTTPClient(server_root(base_url), api_key=self.api_key or None, timeout=self.timeout)
            self.max_length = int(client.tokenize("")["max_model_len"]) - 1  # as TemplateAPI: 1 generated

    def batch_loglikelihood_requests(self, chunks: Any) -> tuple[list[list[int]], list[int], list[Any]]:
        inputs, ctxlens, cache_keys = super().batch_loglikelihood_requests(chunks)
        # The sequential path hands `inputs` itself to model_call next, without the context lengths.
        self._scored = (inputs, ctxlens)
        return inputs, ctxlens, cache_keys

    def model_call(self, messages: Any, *, generate: bool = True, **kwargs: Any) -> dict | None:
        if not generate and self._scored is not None and messages is self._scored[0]:
            kwargs["continuation_start"] = list(self._scored[1])
        try:
            return super().model_call(messages, generate=generate, **kwargs)
        except requests.HTTPError as e:  # lm-eval's own error names the status only, not the server's reason
            if e.response is None:
                raise
            raise api_error(e.response.status_code, e.response.content) from e

    async def amodel_call(
        self,
        session: Any,
        sem: Any,
        messages: Any,
        *,
        generate: bool = True,
        ctxlens: list[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        if not generate and ctxlens is not None:  # the concurrent path has them at hand
            kwargs["continuation_start"] = list(ctxlens)
        return await super().amodel_call(session, sem, messages, generate=generate, ctxlens=ctxlens, **kwargs)

    def _create_payload(
        self,
        messages: Any,
        generate: bool = False,
        gen_kwargs: dict | None = None,
        seed: int = 1234,
        eos: str | None = None,
        continuation_start: list[int] | None = None,
        **kwargs: Any,
    ) -> dict:
        payload = super()._create_payload(
            messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos, **kwargs
        )
        if continuation_start is not None:
            batched = isinstance(messages, list) and bool(messages) and not isinstance(messages[0], int)
            payload["continuation_start"] = continuation_start if batched else continuation_start[0]
        return payload
