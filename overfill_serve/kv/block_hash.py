"""Block hashes for prefix caching: a chain over a prompt's full KV blocks.

A block's hash covers its parent's hash, its token ids and the model that computes its KV (in OverFill the
teacher and the student write different KV for the same tokens; a depth-pruned student writes only its kept
layers). Equal hashes therefore mean equal KV: a block the student computed never answers a lookup made for
the teacher, and the other way round. The digest is stable across processes (no per-process hash seed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DIGEST_BYTES = 16


def block_hashes(
    token_ids: Sequence[int], block_size: int, model: str, known: Sequence[bytes] = ()
) -> list[bytes]:
    """The chained hash of each full block of `token_ids` (a partial last block has none), as computed by
    the model named `model`; `known`: the hashes of its first blocks, already computed (only the blocks after
    them are hashed)."""
    tag = model.encode()
    out = list(known)
    parent = out[-1] if out else b""
    tokens = np.asarray(token_ids[len(out) * block_size :], dtype=np.int64)  # the blocks not hashed yet
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
        h.update(len(tag).to_bytes(4, "little") + tag)
        h.update(tokens[start : start + block_size].tobytes())
        parent = h.digest()
        out.append(parent)
    return out
