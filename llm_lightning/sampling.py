"""What a sampling call may ask for, checked once, in one place.

``generate``, ``stream``, ``generate.py`` and ``evaluate`` all build a ``SamplingOptions``, so a
bad value is refused the same way wherever it comes from: one line naming the setting, the value
and what was expected. Beam search is deterministic and ranks whole continuations, so the
options that reshape a sampling distribution (temperature, top-k, top-p) are refused with beams
rather than silently ignored; the repetition penalty applies to beams as to sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llm_lightning.errors import SettingError


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k filter
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (benchmarks, forced lengths)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 is greedy)")
        _require(self.top_k is None or self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 or null: off)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(self.num_beams >= 1, "num_beams", self.num_beams, "an integer >= 1")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
                 "a number > 0 (1 is off)")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", self.min_new_tokens,
                 f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if self.num_beams > 1:
            for name, value, off in (("temperature", self.temperature, 0.0), ("top_k", self.top_k or None, None),
                                     ("top_p", self.top_p, 1.0)):
                if value != off:
                    raise SettingError(f"{name}={value} with num_beams={self.num_beams}: beam search is "
                                       f"deterministic and does not sample; use num_beams=1 to sample")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise SettingError(f"{name}={value}: expected {expected}")


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if any(not isinstance(s, str) for s in stop):
        raise SettingError(f"stop={list(stop)}: expected a list of strings")
    return tuple(s for s in stop if s)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string: they
    are held back until the next token decides, so no caller ever sees part of a stop string."""
    longest = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:length]):
                longest = length
                break
    return longest


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [text.find(s) for s in stop if s in text]
    return (text[: min(hits)], True) if hits else (text, False)
