"""Launch settings shared by every kernel (one place, never re-derived per op)."""

from __future__ import annotations

#: the longest row the one-program-per-row kernel sorts on chip
MAX_FUSED_SIZE = 8192
#: elements per program of the chunked kernel that serves longer rows (after ``torch.sort``)
CHUNK_SIZE = 1024


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def calculate_settings(n: int) -> tuple[int, int]:
    """Block size (a power of two >= n, at least 16) and number of warps for rows of ``n`` elements."""
    if n > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {n} elements exceed the on-chip limit of {MAX_FUSED_SIZE}")
    block = max(16, next_power_of_2(n))
    num_warps = 4
    if block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps
