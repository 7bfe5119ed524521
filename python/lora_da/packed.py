"""The Gram's packed lower triangle (SPEC §6: column-major, the statistics file's order)
on a torch device, one block of ``GRAM_BLOCK`` columns at a time, so that neither way
needs an ``n × n`` temporary beyond the result: :func:`packed_columns` packs the row
blocks the device sums (:func:`lora_da.collect.device_sums.add_gram_lower`) for a
file, :func:`symmetric_mean_from_packed` unpacks a file's triangle into ``Z`` (SPEC §2)
with the same arithmetic as the core's ``InputFactor.packed_mean_into``."""

from __future__ import annotations

import torch

from lora_da.errors import InvalidArgumentError, ShapeError
from lora_da.plan import gram_block_rows


def _kept(k: int, width: int, device) -> torch.Tensor:
    """Row ``i`` of a ``k × width`` slab keeps its entries from ``i`` on: in a column block
    ``c0 : c0 + k`` laid out as rows, column ``c0 + i``'s rows from the diagonal down."""
    return torch.ones(k, width, dtype=torch.bool, device=device).triu_()


def packed_columns(rows: list[torch.Tensor], n: int):
    """``(start, part)``: the packed triangle's elements from ``start`` on, one column block
    at a time, from the lower block triangle's row blocks ``rows`` (rows ``a:b``, columns ``0:b``)."""
    blocks = gram_block_rows(n)
    start = 0
    for i, (c0, c1) in enumerate(blocks):
        # the row blocks from the diagonal one down hold the columns' rows c0…
        slab = torch.cat([blk[:, c0:c1] for blk in rows[i:]]).T
        part = slab[_kept(c1 - c0, n - c0, slab.device)]
        yield start, part
        start += part.numel()


def symmetric_mean_from_packed(packed: torch.Tensor, n: int, tokens: int) -> torch.Tensor:
    """``Z = Σ x xᵀ / tokens`` (SPEC §2), symmetric ``n × n``, from a packed triangle without
    compensation: every entry ``(s + 0) · (1 / tokens)``, the core's arithmetic, so the bits
    are those of ``InputFactor.packed_mean_into``."""
    if tokens <= 0:
        raise InvalidArgumentError(f"packed: Z's mean needs at least one token, got tokens = {tokens}")
    scale = 1.0 / tokens
    Z = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    start = 0
    for c0, c1 in gram_block_rows(n):
        k = c1 - c0
        keep = _kept(k, n - c0, packed.device)
        size = k * (n - c0) - k * (k - 1) // 2
        slab = torch.zeros(k, n - c0, dtype=packed.dtype, device=packed.device)
        slab[keep] = packed[start:start + size].add(0.0).mul_(scale)
        start += size
        Z[c0:c1, c1:] = slab[:, k:]  # the rows of the column block right of it: the triangle's mirror
        Z[c1:, c0:c1] = slab[:, k:].T
        d = slab[:, :k]  # the diagonal block's upper triangle
        Z[c0:c1, c0:c1] = d + torch.triu(d, 1).T
    if start != packed.numel():
        raise ShapeError(f"packed: {packed.numel()} packed entries for n = {n}, expected {start}")
    return Z
