"""A LLaMA decoder in einops, with the position encoding as a pluggable module.

Parameter names are Meta's (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...),
and queries/keys use the half-split rotary layout of HF transformers, so HF weights load
without any permutation (Meta's interleaved layout is permuted once, at load time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .args import ModelArgs
from .position import PositionEncoding, RoPE, Rotation, apply_rotation


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as Meta and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class LayerCache:
    """One layer's keys and values, preallocated to the longest context the cache will see."""

    keys: Tensor  # (b, kv_heads, max_len, head_dim)
    values: Tensor

    def write(self, start: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        end = start + keys.shape[2]
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental decoding (prefill, then one token at a time).

    For position encodings whose rotation depends on the context length (dynamic NTK) the
    keys are stored before rotation and rotated again at each step; otherwise after it.
    """

    def __init__(self, model: "Llama", batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        args, param = model.args, model.tok_embeddings.weight
        shape = (batch_size, args.kv_heads, max_len, args.head_dim)
        dtype = dtype or param.dtype
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=param.device), torch.zeros(shape, dtype=dtype, device=param.device))
            for _ in range(args.n_layers)
        ]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0  # tokens already in the cache
        self.raw_keys = model.position.length_dependent


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rot_q: Rotation | None,
        rot_k: Rotation | None,
        cache: LayerCache | None = None,
        start: int = 0,
        raw_keys: bool = False,
    ) -> Tensor:
        q = rearrange(self.wq(x), "b n (h d) -> b h n d", h=self.n_heads)
        k = rearrange(self.wk(x), "b n (h d) -> b h n d", h=self.n_kv_heads)
        v = rearrange(self.wv(x), "b n (h d) -> b h n d", h=self.n_kv_heads)
        if rot_q is not None:
            q = apply_rotation(q, rot_q)
        if cache is None:
            if rot_k is not None:
                k = apply_rotation(k, rot_k)
        else:
            if raw_keys:  # rot_k covers the whole context: rotate every cached key with today's table
                k, v = cache.write(start, k, v)
                k = apply_rotation(k, rot_k) if rot_k is not None else k
            else:
                if rot_k is not None:
                    k = apply_rotation(k, rot_k)
                k, v = cache.write(start, k, v)
        return self.wo(rearrange(causal_attention(q, k, v), "b h n d -> b n (h d)"))


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA of queries (b, h, n, d) that are the last n of the keys' and values' (b, kv_heads, m, d) positions.

    Chosen so that a fused kernel can take every call. On CUDA, flash attention takes no explicit mask and no
    float32, and the memory-efficient kernel no grouped-query heads; SDPA then falls back, silently, to its math
    kernel, which materialises (b, h, n, m) scores: 128 GiB for 32 heads at 32k tokens in float32. So queries
    that are the whole context (training, a prefill into an empty cache) use is_causal and no mask, and where
    a mask or float32 meets grouped heads on CUDA the keys and values are repeated per query head, which
    costs m x d per head instead of n x m.
    """
    n, m = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = None if n in (1, m) else _cached_mask(n, m, q.device)  # one query sees every key: no mask either
    if group > 1 and _no_fused_gqa_kernel(q, mask):
        k, v = (repeat(x, "b h m d -> b (h g) m d", g=group) for x in (k, v))  # query head i reads kv head i // g
        group = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=n == m and n > 1, enable_gqa=group > 1)


def _no_fused_gqa_kernel(q: Tensor, mask: Tensor | None) -> bool:
    """Whether SDPA on q's device would take grouped-query heads to its math kernel only (CUDA: a mask or float32)."""
    return q.is_cuda and (mask is not None or q.dtype == torch.float32)


def _cached_mask(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """Causal mask for queries that are the last n_queries of n_keys positions."""
    offset = n_keys - n_queries
    query_pos = torch.arange(n_queries, device=device)[:, None] + offset
    return torch.arange(n_keys, device=device)[None, :] <= query_pos


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        rot_q: Rotation | None,
        rot_k: Rotation | None,
        cache: LayerCache | None = None,
        start: int = 0,
        raw_keys: bool = False,
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rot_q, rot_k, cache, start, raw_keys)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The decoder. `hidden_states` stops before the output head so losses and evaluations
    can apply the head to the positions they need only."""

    def __init__(self, args: ModelArgs, position: PositionEncoding | None = None) -> None:
        super().__init__()
        self.args = args
        self.position = position if position is not None else RoPE(args.head_dim, args.rope_theta, original_window=args.max_seq_len)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layers)."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, std=std / (2 * self.args.n_layers) ** 0.5)
            else:
                nn.init.normal_(param, std=std)

    def hidden_states(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Final-normed hidden states (b, n, dim) for tokens (b, n), continuing `cache` if given."""
        n = tokens.shape[1]
        start = cache.length if cache is not None else 0
        context_len = start + n
        if cache is not None and context_len > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens; {context_len} were asked for.")
        if cache is not None and tokens.shape[0] != cache.batch_size:  # a write would broadcast into every row
            raise ValueError(f"the KV cache was made for a batch of {cache.batch_size}, not {tokens.shape[0]}.")
        h = self.position.embed(self.tok_embeddings(tokens), start)
        # One rotary table per forward, shared by every layer.
        rot_q = self.position.rotation(start, n, context_len, tokens.device)
        raw_keys = cache is not None and cache.raw_keys
        rot_k = self.position.rotation(0, context_len, context_len, tokens.device) if raw_keys else rot_q
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h = layer(h, rot_q, rot_k, layer_cache, start, raw_keys)
        if cache is not None:
            cache.length = context_len
        return self.norm(h)

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (b, n, vocab)."""
        return self.output(self.hidden_states(tokens, cache))

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self, batch_size, max_len, dtype)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total
