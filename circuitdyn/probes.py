"""Probe sets (facts to recall) and the attribution inputs built from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FactPrompt:
    """One fact as the attribution engine consumes it: token ids only, already templated.

    The engine runs `clean_tokens + answer_tokens` (teacher-forced) and the corrupted twin
    `corrupted_tokens + answer_tokens`; both prompts have the same length so positions align.
    For noise corruption `corrupted_tokens == clean_tokens` and the engine adds Gaussian noise
    (3x the embedding std, seeded) to the input embeddings at `noise_positions`.
    """

    fact_id: str
    clean_tokens: tuple[int, ...]
    corrupted_tokens: tuple[int, ...]
    answer_tokens: tuple[int, ...]
    corruption: str
    noise_positions: tuple[int, ...] = ()
    contrast_token: int | None = None
