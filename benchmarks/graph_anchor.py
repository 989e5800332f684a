"""The plain CUDA-graph anchor of `gpu_check.py`: a hand-written Llama decode step in plain torch (fused qkv and
gate/up, SDPA over one contiguous KV buffer per layer, padded to the longest context with a mask), captured
as one CUDA graph. It is what a careful engineer gets without paged kernels: the method of the shared
`tools/gpu_graph_decode.py`, brought here so the check is self-contained. Random weights: shapes are what
matter for speed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_weights(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, vocab: int) -> dict:
    layers, hidden, inter, heads, kv, head_dim = shape

    def w(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype) * 0.02

    ones = torch.ones(hidden, device=device, dtype=dtype)
    return {
        "layers": [
            {
                "qkv": w((heads + 2 * kv) * head_dim, hidden),
                "o": w(hidden, heads * head_dim),
                "gate_up": w(2 * inter, hidden),
                "down": w(hidden, inter),
                "n1": ones,
                "n2": ones,
            }
            for _ in range(layers)
        ],
        "embed": w(vocab, hidden),
        "norm": ones,
        "heads": heads,
        "kv": kv,
        "head_dim": head_dim,
    }


def weight_bytes(m: dict) -> int:
    return sum(t.numel() * t.element_size() for layer in m["layers"] for t in layer.values()) + (
        m["embed"].numel() * m["embed"].element_size()
    )


def step(
    m: dict, tok: torch.Tensor, pos: torch.Tensor, k: list, v: list, cos: torch.Tensor, sin: torch.Tensor
):
    """One greedy decode step for a batch: tok, pos [B]; k[i], v[i] [B, kv, T, head_dim]."""
    b, h, kvh, d = tok.shape[0], m["heads"], m["kv"], m["head_dim"]
    x = m["embed"][tok]
    mask = (torch.arange(k[0].shape[2], device=tok.device)[None] <= pos[:, None])[:, None, None, :]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    rows = torch.arange(b, device=tok.device)

    def rope(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    for i, layer in enumerate(m["layers"]):
        hx = F.rms_norm(x, (x.shape[-1],), layer["n1"], 1e-5)
        q, kk, vv = (hx @ layer["qkv"].T).split([h * d, kvh * d, kvh * d], -1)
        q, kk = rope(q.view(b, h, d)), rope(kk.view(b, kvh, d))
        k[i][rows, :, pos] = kk
        v[i][rows, :, pos] = vv.view(b, kvh, d)
        o = F.scaled_dot_product_attention(q.view(b, h, 1, d), k[i], v[i], attn_mask=mask, enable_gqa=True)
        x = x + o.view(b, h * d) @ layer["o"].T
        gate, up = (F.rms_norm(x, (x.shape[-1],), layer["n2"], 1e-5) @ layer["gate_up"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ layer["down"].T
    return (F.rms_norm(x, (x.shape[-1],), m["norm"], 1e-5) @ m["embed"].T).argmax(-1)


def captured_step(m: dict, context_lens: list[int], dtype: torch.dtype):
    """A CUDA graph of `step` for a batch with these context lengths (KV buffers sized to the longest)."""
    device, layers = m["embed"].device, len(m["layers"])
    b, t = len(context_lens), max(context_lens)
    k = [torch.randn(b, m["kv"], t, m["head_dim"], device=device, dtype=dtype) for _ in range(layers)]
    v = [torch.randn_like(x) for x in k]
    half = m["head_dim"] // 2
    inv = 1.0 / (500000 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    tok = torch.randint(0, 32000, (b,), device=device)
    pos = torch.tensor([c - 1 for c in context_lens], device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(m, tok, pos, k, v, cos, sin)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(m, tok, pos, k, v, cos, sin)
    return graph
