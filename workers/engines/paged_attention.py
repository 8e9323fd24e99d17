"""Attention over transformers' paged KV cache, one request at a time.

transformers' ``paged|sdpa`` packs every request of a step into one attention call
with a block-diagonal mask, so each query token is scored against every key of the
step: the cost grows with the square of the requests running at once, and the mask
itself is rebuilt every step. Here each request attends only to its own keys. Single
token steps (decoding) go in one call, padded to the longest request; prompt chunks go
one call each, causal from where the chunk starts. The work is planned once per step
and reused by every layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PER_REQUEST_SDPA = "paged|per_request_sdpa"
"""The attention implementation's name in transformers' registry."""


@dataclass(frozen=True)
class _Chunk:
    """A request with several query tokens: a prompt, or a chunk of one."""

    q: slice
    k: slice
    mask: torch.Tensor | None  # None: the chunk is the whole sequence (plainly causal)


@dataclass(frozen=True)
class _Decodes:
    """The requests with one query token, attended in one call."""

    positions: torch.Tensor  # their query rows in the packed batch
    keys: torch.Tensor  # [requests, longest]: rows of the packed keys, padded with 0
    valid: torch.Tensor  # [requests, 1, 1, longest]: which of those are real


@dataclass(frozen=True)
class _Plan:
    chunks: list[_Chunk]
    decodes: _Decodes | None


_last = threading.local()  # each batching thread's (cu_seq_lens_q tensor, plan) of its step


def _plan(cu_q: torch.Tensor, cu_k: torch.Tensor) -> _Plan:
    """The step's plan, made by its first layer; the same tensor objects come back for
    every layer of a step, and new ones with the next step."""
    cached = getattr(_last, "step", None)
    if cached is not None and cached[0] is cu_q:
        plan: _Plan = cached[1]
        return plan
    qs, ks = cu_q.tolist(), cu_k.tolist()
    device = cu_q.device
    chunks: list[_Chunk] = []
    rows: list[int] = []
    starts: list[int] = []
    lengths: list[int] = []
    for i in range(len(qs) - 1):
        q0, q1, k0, k1 = qs[i], qs[i + 1], ks[i], ks[i + 1]
        q_len, k_len = q1 - q0, k1 - k0
        if q_len == 1:
            rows.append(q0)
            starts.append(k0)
            lengths.append(k_len)
        elif q_len > 1:  # zero: padding that makes shapes static
            mask = None
            if q_len != k_len:  # a later chunk: its rows start k_len - q_len keys in
                mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
            chunks.append(_Chunk(slice(q0, q1), slice(k0, k1), mask))
    decodes = None
    if rows:
        offsets = torch.arange(max(lengths), device=device)
        valid = offsets[None, :] < torch.tensor(lengths, device=device)[:, None]
        keys = torch.where(valid, torch.tensor(starts, device=device)[:, None] + offsets, 0)
        decodes = _Decodes(torch.tensor(rows, device=device), keys, valid[:, None, None, :])
    plan = _Plan(chunks, decodes)
    _last.step = (cu_q, plan)
    return plan


def per_request_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, query tokens, head dim]
    key: torch.Tensor,  # [1, kv heads, query tokens, head dim]: the step's new keys
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # not built for this implementation
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention for a step of continuous batching; the output is
    [1, query tokens, heads, head dim], as transformers' own paged attention's."""
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):
        cu_k = cu_k["full_attention"]
    # The step's keys and values, cached and new: [keys, kv heads, head dim], each
    # request's in a run of its own, in the order of cu_seq_lens_k.
    key, value = kwargs["cache"].update(
        key_states=key,
        value_states=value,
        layer_idx=module.layer_idx,
        read_index=kwargs["read_index"],
        write_index=kwargs["write_index"],
    )
    plan = _plan(kwargs["cu_seq_lens_q"], cu_k)
    q = query[0]  # [heads, query tokens, head dim]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
    for chunk in plan.chunks:
        attended = F.scaled_dot_product_attention(
            q[:, chunk.q].unsqueeze(0),
            key[chunk.k].transpose(0, 1).unsqueeze(0),
            value[chunk.k].transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        out[chunk.q] = attended[0].transpose(0, 1)
    decodes = plan.decodes
    if decodes is not None:
        attended = F.scaled_dot_product_attention(
            q[:, decodes.positions].transpose(0, 1).unsqueeze(2),  # [requests, heads, 1, dim]
            key[decodes.keys].permute(0, 2, 1, 3),  # [requests, kv heads, longest, dim]
            value[decodes.keys].permute(0, 2, 1, 3),
            attn_mask=decodes.valid,
            scale=scaling,
            enable_gqa=True,
        )
        out[decodes.positions] = attended[:, :, 0]
    return out.unsqueeze(0), None


AttentionInterface.register(PER_REQUEST_SDPA, per_request_sdpa)
