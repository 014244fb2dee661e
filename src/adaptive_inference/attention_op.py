"""One decode step's attention as one op, `adaptive_inference::decode_attention`: RoPE on q and the new k, k / v
written into one layer's static cache at the step's slot, that slot marked written in the cache's bias, and
attention of every q head over the whole cache under the bias. Its implementation here is those torch ops (any
device; what a CPU test runs); `triton_kernels` registers the CUDA kernel that does it in one launch per (row,
kv head). The op writes the caches in place: torch.compile calls it on the cache itself, no copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + [-x2, x1] * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@torch.library.custom_op("adaptive_inference::decode_attention", mutates_args=("k_cache", "v_cache", "bias"))
def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int,
                     kv_heads: int) -> torch.Tensor:
    """qkv [B, (H + 2 Hkv) D] before RoPE; k / v caches [B, Hkv, S, D] and bias [B, S] (0 written, -inf not) of
    one layer, written at slot positions[0]; cos / sin [1, D] at that position. Returns [B, H D]. The slots after
    positions[0] are unwritten (a cache starts with every slot masked and is written in order), so a kernel may
    leave them unread."""
    b, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = (t.reshape(b, 1, n, d).transpose(1, 2) for t, n in
               zip(qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1), (heads, kv_heads, kv_heads), strict=True))
    k_cache.index_copy_(2, positions, apply_rope(k, cos, sin))
    v_cache.index_copy_(2, positions, v)
    bias.index_fill_(1, positions, 0.0)
    out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k_cache, v_cache, attn_mask=bias[:, None, None, :],
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(b, heads * d)


@decode_attention.register_fake
def _(qkv, k_cache, v_cache, bias, cos, sin, positions, heads, kv_heads):
    return qkv.new_empty((qkv.shape[0], heads * k_cache.shape[-1]))


def decode_attention_ok(cfg, dtype: torch.dtype) -> bool:
    """Shapes and dtypes the CUDA kernel takes: a power-of-two head_dim >= 16, 16-bit activations."""
    d = cfg.head_dim
    return dtype in (torch.bfloat16, torch.float16) and d >= 16 and d & (d - 1) == 0 and \
        cfg.num_attention_heads % cfg.num_key_value_heads == 0
