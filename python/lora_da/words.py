"""Counts in what lora-da prints: "1 sample", "2 samples" (one rule, so no message says "1 samples")."""

from __future__ import annotations


def count(n: int, singular: str, plural: str | None = None) -> str:
    """``"<n> <noun>"`` with the noun singular for exactly one, else ``plural`` (``singular + "s"`` by default)."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"
