"""An SDPA attention for transformers that runs one-token decode steps of grouped-query attention without
repeating k and v.

Why it lives here: 2:4 halves the linears' bytes, so the rest of a decode step decides what a user sees.
With a static cache (the recipe transformers documents for compiled generation) every step carries a
mask, and transformers' ``sdpa`` attention then repeats k and v to one copy per query head
(``repeat_kv``) before calling SDPA: for Llama-3-8B (32 query heads on 8 k/v heads) 4x the cache's bytes
written and read again in every layer of every step. On an H100 at batch 16 with a 512-token context
that was 4.6 ms of a 10.8 ms compiled dense step, against 0.8 ms here (``benchmarks/NOTES.md``). The
same model with it runs faster dense and faster 2:4.

    import sparseflow as sf
    sf.nn.register_packed_gqa()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa_packed_gqa")

Every call other than a masked one-token step of grouped-query attention is transformers' own ``sdpa``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PACKED_GQA = "sdpa_packed_gqa"


def packed_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. At a one-token step the query heads that share a k/v
    head become that head's rows: query (b, heads, 1, d) -> (b, kv_heads, groups, d), and SDPA reads the
    cache as stored. The rows are heads of one token, not positions, so no causal mask runs among them,
    and the step's mask (b, 1, 1, kv) applies to each alike."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and tuple(attention_mask.shape[1:3]) == (1, 1))
    # what SDPA's call here would drop (logit soft-capping, attention sinks, a position bias) goes
    # to transformers' function, which applies it or says it cannot
    extras = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks"))
    if groups == 1 or q_len != 1 or not mask_ok or extras or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    rows = query.reshape(b, heads // groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_packed_gqa() -> str:
    """Make ``"sdpa_packed_gqa"`` a transformers attention implementation (with SDPA's mask); returns the
    name to pass as ``attn_implementation``. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_GQA, packed_gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_GQA, sdpa_mask)
    return PACKED_GQA
