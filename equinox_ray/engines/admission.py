"""The replica's admission window: how many requests it lets into its engine at once.

AIMD on the measured time per output token (TPOT): while a smoothed TPOT stays at or under the target, the window
grows by one request per window's worth of completions; when it goes over, the window halves, at most once per
window's worth of completions, so one burst of slow tokens does not collapse it. With no target, the window stays
at its maximum (the engine's own limit).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdmissionWindow:
    maximum: int = 64
    minimum: int = 1
    initial: int = 4
    target_tpot_s: float | None = None
    smoothing: float = 0.3
    decrease: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        if self.target_tpot_s is not None and self.target_tpot_s <= 0:
            raise ValueError("target_tpot_s must be > 0")
        self._size = float(self.maximum if self.target_tpot_s is None else
                           min(max(self.initial, self.minimum), self.maximum))
        self.tpot_s: float | None = None
        self._since_decrease = 0

    @property
    def size(self) -> int:
        return int(self._size)

    def observe(self, output_tokens: int, ttft_s: float, e2e_s: float) -> None:
        """A finished request's measurements."""
        if output_tokens < 2:
            return
        tpot = (e2e_s - ttft_s) / (output_tokens - 1)
        self.tpot_s = tpot if self.tpot_s is None else self.tpot_s + self.smoothing * (tpot - self.tpot_s)
        if self.target_tpot_s is None:
            return
        self._since_decrease += 1
        if self.tpot_s <= self.target_tpot_s:
            self._size = min(self.maximum, self._size + 1.0 / max(self._size, 1.0))
        elif self._since_decrease >= self.size:
            self._size = max(self.minimum, self._size * self.decrease)
            self._since_decrease = 0
