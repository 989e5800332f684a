"""The tokenizer a running overfill-serve app serves, over its `POST /tokenize` and `/detokenize`.

It has the interface lm-eval's `TemplateAPI` asks of a "remote" tokenizer (`encode`, `decode`, `batch_decode`,
`eos_token`, `bos_token` and their ids), so an evaluation needs no local copy of the model's tokenizer.
lm-eval's own `RemoteTokenizer` cannot be used: it needs vLLM's `GET /tokenizer_info`, which this server does
not have, so the special tokens are unknown here (None) unless the caller names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from overfill_serve.tools.client import HTTPClient


class ServerTokenizer:
    """`encode` caches what it returns: lm-eval encodes every context twice per request, and again per mode."""

    def __init__(
        self,
        client: HTTPClient,
        *,
        add_special_tokens: bool = False,
        eos_token: str | None = None,
        bos_token: str | None = None,
    ) -> None:
        self.client = client
        self.add_special_tokens = add_special_tokens  # lm-eval encodes without them unless add_bos_token
        self.eos_token, self.bos_token = eos_token, bos_token
        self._cache: dict[str, list[int]] = {}
        self._max_model_len: int | None = None

    def _tokenize(self, text: str) -> dict[str, Any]:
        return self.client.tokenize(text, add_special_tokens=self.add_special_tokens)

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = [int(t) for t in self._tokenize(text)["tokens"]]
        return list(ids)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.client.detokenize(tokens)

    def batch_decode(self, tokens_list: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(tokens) for tokens in tokens_list]

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    @property
    def max_model_len(self) -> int:
        """The server's context length (prompt plus generated tokens)."""
        if self._max_model_len is None:
            self._max_model_len = int(self._tokenize("")["max_model_len"])
        return self._max_model_len

    @property
    def eos_token_id(self) -> int | None:
        return self._single_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._single_id(self.bos_token)

    @property
    def eot_token(self) -> int | None:
        return self.eos_token_id

    def _single_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None
