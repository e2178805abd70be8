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

``register_packed_gqa(causal_prefill=True)`` also lets a compiled forward over a prompt with no cache before
it and no ``attention_mask`` run SDPA's causal flash path. Why: under ``torch.compile`` transformers cannot
look at ``position_ids`` for packed sequences (several sequences in one row), so it builds the full
q x kv mask and attention runs every tile of it; at 2048 tokens on Llama-3-8B that was 8.1 ms of a 54 ms
compiled prefill on an H100. Turn it on only where compiled forwards never see packed ``position_ids``
(the ones a model makes itself never are).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PACKED_GQA = "sdpa_packed_gqa"
_NOT_SDPA = {"softcap": "logit soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks"}


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
    # SDPA has no logit soft-capping and no attention sinks. transformers' own ``sdpa`` refuses a
    # soft-cap in some releases and drops it without a word in others (5.17), so refuse here.
    refused = [name for name in _NOT_SDPA if kwargs.get(name) is not None]
    if refused:
        raise ValueError(
            f"attn_implementation={PACKED_GQA!r}: SDPA cannot apply {', '.join(refused)} "
            f"({', '.join(_NOT_SDPA[n] for n in refused)}), which this model asks for; "
            "load it with attn_implementation='eager' or 'flex_attention'"
        )
    # a position bias is something transformers' function folds into the mask
    extras = kwargs.get("position_bias") is not None
    if groups == 1 or q_len != 1 or not mask_ok or extras or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    rows = query.reshape(b, heads // groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def causal_prefill_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, except under ``torch.compile`` for a plain causal mask over the query's own
    tokens: no ``attention_mask``, nothing cached before them (offsets 0, as many keys as queries), no
    sliding window or other mask pattern. Then it returns None, and transformers' SDPA call runs with
    ``is_causal=True`` (the flash kernels skip the tiles above the diagonal). Under compile transformers adds a
    packed-sequence term built from ``position_ids`` (it cannot check them without reading the tensor); this
    function drops that term only, on the promise ``causal_prefill=True`` made. In eager mode such a term
    appears only for inputs that really are packed, so eager calls get transformers' own mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    fn = causal_mask_function if mask_function is None else mask_function
    plain = fn is causal_mask_function or (torch.compiler.is_compiling() and _causal_and_packed(fn, kwargs))
    if (
        plain
        and attention_mask is None
        and local_size is None
        and _is_zero(q_offset)
        and _is_zero(kv_offset)
        and q_length == kv_length
    ):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=fn,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


def _is_zero(v: Any) -> bool:
    """An offset known to be 0 when the graph is traced (a tensor offset, as static caches pass, is not)."""
    return isinstance(v, int) and v == 0


# transformers' ``and_masks`` closure's code object, set by ``register_packed_gqa`` (outside any trace): under
# torch.compile a function's code can be compared, its closure cannot be read
_AND_MASKS_CODE: Any = None


def _causal_and_packed(fn: Any, kwargs: dict) -> bool:
    """Whether ``create_causal_mask`` built ``fn`` as ``and_masks(causal, packed_sequence_mask_function(...))``:
    an ``and_masks`` closure without ``use_vmap`` (which an ``and_mask_function`` or ``or_mask_function``
    argument would have set) and not a bidirectional mask's call."""
    return (
        _AND_MASKS_CODE is not None
        and getattr(fn, "__code__", None) is _AND_MASKS_CODE
        and not kwargs.get("use_vmap", False)
        and "allow_is_bidirectional_skip" not in kwargs
    )


def register_packed_gqa(causal_prefill: bool = False) -> str:
    """Make ``"sdpa_packed_gqa"`` a transformers attention implementation (with SDPA's mask); returns the
    name to pass as ``attn_implementation``. ``causal_prefill=True``: a compiled forward over a prompt with no
    cache before it and no ``attention_mask`` runs causal flash attention instead of a materialised mask
    (``causal_prefill_mask``); only for inputs whose ``position_ids`` are not packed sequences. Calling it
    again replaces the setting."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function, sdpa_mask

    global _AND_MASKS_CODE
    _AND_MASKS_CODE = and_masks(causal_mask_function).__code__
    AttentionInterface.register(PACKED_GQA, packed_gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_GQA, causal_prefill_mask if causal_prefill else sdpa_mask)
    return PACKED_GQA
