"""The replica's admission window: how many requests it lets into its engine at once.

AIMD with slow start on the measured time per output token (TPOT), decided once per window's worth of completions
on their mean TPOT, since a single request's TPOT is noisy (it depends on whose prefill shared its steps):
- at or under the target: the window doubles while in slow start, else grows by one;
- over the target: the window shrinks by `decrease` and slow start ends.
With no target, the window stays at its maximum (the engine's own limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdmissionWindow:
    maximum: int = 64
    minimum: int = 1
    initial: int = 4
    target_tpot_s: float | None = None
    decrease: float = 0.75
    min_samples: int = 8
    tpot_s: float | None = None  # mean TPOT of the last decided batch of completions
    _samples: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        if self.target_tpot_s is not None and self.target_tpot_s <= 0:
            raise ValueError("target_tpot_s must be > 0")
        if not 0 < self.decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        self._size = float(self.maximum if self.target_tpot_s is None else
                           min(max(self.initial, self.minimum), self.maximum))
        self.slow_start = True

    @property
    def size(self) -> int:
        return int(self._size)

    def observe(self, output_tokens: int, ttft_s: float, e2e_s: float) -> None:
        """A finished request's measurements."""
        if output_tokens < 2:
            return
        self._samples.append((e2e_s - ttft_s) / (output_tokens - 1))
        if len(self._samples) < max(self.size, self.min_samples):
            return
        self.tpot_s = sum(self._samples) / len(self._samples)
        self._samples.clear()
        if self.target_tpot_s is None:
            return
        if self.tpot_s <= self.target_tpot_s:
            self._size = min(self.maximum, self._size * 2 if self.slow_start else self._size + 1)
        else:
            self._size = max(self.minimum, self._size * self.decrease)
            self.slow_start = False
