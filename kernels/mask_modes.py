"""The vocabulary of mask specs, shared by the spec, its kernels and the CPU fast paths: how keep(row, gene) is
decided, which positions the loss reads, and the random mask's 16-bit threshold. A leaf: imports nothing of ours."""
from __future__ import annotations

RANDOM, DROP_BITS, KEEP_BITS = 0, 1, 2      # how keep(row, gene) is decided
TARGET_MASKED, TARGET_GENE = 0, 2           # the loss reads the masked positions, or one gene per row


def threshold16(rate: float) -> int:
    """A gene is kept when its 16-bit uniform is at least this: the rate is honoured to 1/65,536."""
    return round(rate * 65536)
