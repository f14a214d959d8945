"""The simulated GPU's scheduler: continuous batching with chunked prefill, pure and clock-free.

Each `step()` spends a token budget: first one token for every decoding sequence (decodes never stall behind a
long prompt), then prompt chunks for sequences still in prefill, in admission order. A sequence is admitted from
the waiting line when a slot is free and the KV cache can hold its prompt plus max_tokens (reserved up front, so
there is no preemption); otherwise it waits. The step's duration comes from the roofline `StepModel`.
The real-time engine (`sim_engine.py`) and the cluster simulator both drive this same class.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from equinox_ray.engines.gpu_profiles import StepModel


@dataclass
class SimSequence:
    id: str
    prompt_tokens: int
    max_tokens: int
    prefilled: int = 0
    generated: int = 0

    @property
    def kv_reservation(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_tokens


@dataclass
class StepResult:
    duration: float
    tokens: dict[str, int] = field(default_factory=dict)  # tokens processed per sequence (prefill + decode)
    emitted: list[str] = field(default_factory=list)  # sequences that produced one output token
    finished: list[str] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0


class SimBatcher:
    def __init__(self, step_model: StepModel, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 kv_capacity_tokens: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.step_model = step_model
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.kv_capacity = kv_capacity_tokens or step_model.kv_capacity_tokens
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []
        self.kv_reserved = 0
        self.kv_used = 0  # KV tokens the running sequences hold now: sum of prefilled + generated

    def add(self, seq: SimSequence) -> None:
        if seq.kv_reservation > self.kv_capacity:
            raise ValueError(f"sequence {seq.id!r} needs {seq.kv_reservation} KV tokens, "
                             f"the cache holds {self.kv_capacity}")
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> bool:
        for i, seq in enumerate(self.running):
            if seq.id == seq_id:
                del self.running[i]
                self.kv_reserved -= seq.kv_reservation
                self.kv_used -= seq.prefilled + seq.generated
                return True
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv_used / self.kv_capacity

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            head = self.waiting[0]
            if self.kv_reserved + head.kv_reservation > self.kv_capacity:
                return  # the head waits for KV space; FIFO, no skipping
            self.waiting.popleft()
            self.kv_reserved += head.kv_reservation
            self.running.append(head)

    def step(self) -> StepResult:
        self._admit()
        result = StepResult(0.0)
        budget = self.budget
        decode_context = prefill_context = 0
        for seq in self.running:
            if not seq.in_prefill and budget > 0:
                budget -= 1
                decode_context += seq.prompt_tokens + seq.generated
                result.tokens[seq.id] = 1
                result.emitted.append(seq.id)
        result.decode_tokens = len(result.emitted)
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunk = min(budget, seq.prompt_tokens - seq.prefilled)
                budget -= chunk
                # token i of the chunk attends to prefilled + i + 1 positions
                prefill_context += chunk * seq.prefilled + chunk * (chunk + 1) // 2
                seq.prefilled += chunk
                result.tokens[seq.id] = chunk
                result.prefill_tokens += chunk
                if not seq.in_prefill:
                    result.emitted.append(seq.id)  # the last prefill chunk yields the first token
        result.duration = self.step_model.step_time(result.prefill_tokens, prefill_context, result.decode_tokens,
                                                    decode_context)
        self._emit(result)
        return result

    def _emit(self, result: StepResult) -> None:
        by_id = {s.id: s for s in self.running}
        self.kv_used += result.prefill_tokens + len(result.emitted)
        for seq_id in result.emitted:
            seq = by_id[seq_id]
            seq.generated += 1
            if seq.generated >= seq.max_tokens:
                result.finished.append(seq_id)
        if result.finished:
            done = set(result.finished)
            for seq in self.running:
                if seq.id in done:
                    self.kv_reserved -= seq.kv_reservation
                    self.kv_used -= seq.prefilled + seq.generated
            self.running = [s for s in self.running if s.id not in done]
