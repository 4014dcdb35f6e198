"""T5's relative position buckets: instead of position embeddings, each head adds a learned bias
to its attention scores that depends only on the (bucketed) distance from query to key.

Distances below half the buckets get one bucket each; longer ones share logarithmically wider
buckets up to `max_distance`, beyond which all fall in the last. In an encoder (bidirectional)
half the buckets are for keys before the query and half for keys after it; in a decoder
(causal) all are for keys before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """The bucket of each key-minus-query distance in `relative` (integers), as T5 computes it."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets  # keys after the query: the upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # only keys at or before the query exist
    exact = num_buckets // 2
    # float32 log, truncated towards zero, as the reference does (so buckets match exactly)
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


def relative_bias(table: nn.Embedding, q_pos: torch.Tensor, k_pos: torch.Tensor, bidirectional: bool,
                  max_distance: int) -> torch.Tensor:
    """Attention-score bias [B, n_head, T, S] for queries at `q_pos` [B, T] (B may be 1) and keys
    at `k_pos` [S]; `table` holds one bias per bucket and head."""
    buckets = relative_position_bucket(k_pos[None, None, :] - q_pos[:, :, None], bidirectional,
                                       table.num_embeddings, max_distance)
    return table(buckets).permute(0, 3, 1, 2)
