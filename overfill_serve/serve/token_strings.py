"""`TokenStrings`: the text and raw bytes of single tokens, as OpenAI logprobs report them, for any Hugging Face
tokenizer."""

from __future__ import annotations

import functools
import re
from typing import Any


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's byte <-> printable-unicode table, used by every byte-level BPE (Llama 3, Qwen, SmolLM).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """Text and raw bytes of single tokens for logprobs, for any Hugging Face tokenizer.

    Decoding one token of a multi-byte character gives U+FFFD; when the vocabulary entry maps back to raw
    bytes (byte-level BPE, or sentencepiece's <0xNN>) those bytes are reported, and the token is shown as
    `bytes:\\xNN` as OpenAI does.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        tok = self.tokenizer
        text = tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text  # sentencepiece drops the word-start space when decoding a lone token
        raw = _raw_bytes(piece) if isinstance(piece, str) else None
        # Trust the vocabulary bytes only where they agree with the decoded text (so not for e.g. a
        # sentencepiece "é", whose characters also happen to lie in the byte-level table).
        if raw is None or raw.decode("utf-8", "replace") != text:
            return text, list(text.encode("utf-8"))
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _raw_bytes(piece: str) -> bytes | None:
    m = _SP_BYTE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_level_decoder()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None
