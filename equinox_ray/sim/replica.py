"""One simulated GPU replica in the cluster simulator: the same `SimBatcher` the real-time `SimEngine` runs, stepped
under the simulator's virtual clock, with the measurements a real replica reports (windowed throughput and busy
fraction, mean time per output token, per-request busy-seconds), observed as the Serve controller observes a
replica's report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.busy_tracker import BusyTracker
from equinox_ray.engines.gpu_profiles import StepModel
from equinox_ray.engines.sim_batcher import SimBatcher, SimSequence, StepResult
from equinox_ray.fairness.pools import PoolFacts, ReplicaObservation


@dataclass(frozen=True)
class PoolSpec:
    """A pool of identical simulated replicas: one GPU type serving one model."""

    name: str
    gpu: str
    replicas: int
    model: str = "Llama-2-7B"
    max_num_seqs: int = 32  # the replica's admission window: requests the controller lets into it at once
    max_num_batched_tokens: int = 2048
    cost_weight: float = 1.0  # relative price of a busy-second on this GPU type
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"pool {self.name!r}: replicas must be >= 1")
        StepModel.of(self.gpu, self.model)  # unknown GPU or model, or a model that does not fit: fail now

    def facts(self) -> PoolFacts:
        return StepModel.of(self.gpu, self.model).nominal_facts(self.name, self.max_num_seqs,
                                                                self.max_num_batched_tokens, self.max_model_len,
                                                                self.cost_weight)


class SimReplica:
    def __init__(self, name: str, spec: PoolSpec, stats_window_s: float = 5.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.spec = spec
        self.step_model = StepModel.of(spec.gpu, spec.model)
        self.batcher = SimBatcher(self.step_model, spec.max_num_seqs, spec.max_num_batched_tokens)
        self.tracker = BusyTracker(stats_window_s)
        self.in_flight = 0
        self.kv_promised = 0  # KV tokens of the requests sent to this replica and not yet finished
        self.stepping: StepResult | None = None  # the step in progress, applied when it ends
        self.busy_seconds = 0.0
        self.window = AdmissionWindow(maximum=spec.max_num_seqs)  # fixed size; it measures TPOT as a real replica's does
        self._observed: ReplicaObservation | None = None  # until the replica changes
        self.on_change = on_change  # told of every change to what it is observed as (its pool's view is stale)
        self.last_rates = (0.0, 0.0, 0.0)  # (tokens/s, output tokens/s, busy fraction) at the last step's end

    @property
    def free_slots(self) -> int:
        return max(0, self.spec.max_num_seqs - self.in_flight)

    @property
    def free_kv_tokens(self) -> int:
        return self.batcher.kv_capacity - self.kv_promised

    def observation(self) -> ReplicaObservation:
        if self._observed is None:
            self._observed = self._observe()
        return self._observed

    def _changed(self) -> None:
        self._observed = None
        self.on_change()

    def _observe(self) -> ReplicaObservation:
        tokens_per_s, _, busy = self.last_rates
        return ReplicaObservation(free_slots=self.free_slots, running=self.in_flight,
                                  waiting=len(self.batcher.waiting), kv_usage=self.batcher.kv_usage,
                                  tokens_per_s=tokens_per_s, utilization=busy, tpot_s=self.window.tpot_s,
                                  free_kv_tokens=self.free_kv_tokens)

    def add(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        self.batcher.add(SimSequence(request_id, prompt_tokens, output_tokens))
        self._changed()
        self.in_flight += 1
        self.kv_promised += prompt_tokens + output_tokens

    def start_step(self) -> float:
        """Run the next step's scheduling now and return its duration; its tokens appear when it ends."""
        self.stepping = self.batcher.step()
        self._changed()
        return self.stepping.duration

    def end_step(self, now: float) -> StepResult:
        step, self.stepping = self.stepping, None
        self._changed()
        self.tracker.record_step(now, step.duration, step.tokens, step.decode_tokens)
        self.busy_seconds += step.duration
        self.last_rates = self.tracker.rates(now)
        return step

    def finished(self, request_id: str, prompt_tokens: int, output_tokens: int, ttft_s: float, e2e_s: float) -> float:
        """Release the request and return its busy-seconds."""
        self.in_flight -= 1
        self.kv_promised -= prompt_tokens + output_tokens
        self._changed()
        self.window.observe(output_tokens, ttft_s, e2e_s)
        return self.tracker.pop_request(request_id)
