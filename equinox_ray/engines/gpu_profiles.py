"""GPU and model profiles and the roofline step-time model of the simulated engine.

One step processes some prefill tokens and one token for each decoding sequence. Its time is

    t = max(FLOPs / (tp * peak_flops), bytes / (tp * peak_bandwidth)) + overhead

FLOPs = 2 * params * tokens (the linear layers) + 4 * layers * q_width * attended context (QK^T and PV). Bytes =
the weights, read once a step, plus the KV cache the step attends to. The peaks are the vendors' published dense
bf16 tensor throughput and memory bandwidth, with no efficiency discount. The fixed overhead stands for scheduling
and kernel launches. These are assumptions: they were not checked against a real GPU here (none was available).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from equinox_ray.fairness.pools import PoolFacts

BYTES_BF16 = 2


@dataclass(frozen=True)
class GPUProfile:
    name: str
    bf16_tflops: float  # dense peak, no sparsity
    memory_bandwidth_gbs: float
    memory_gb: float
    source: str


@dataclass(frozen=True)
class ModelProfile:
    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_BF16

    @property
    def weight_bytes(self) -> float:
        return self.params * BYTES_BF16


GPUS: dict[str, GPUProfile] = {
    "H100": GPUProfile("H100", 989.4, 3350.0, 80.0, "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s"),
    "A100": GPUProfile("A100", 312.0, 2039.0, 80.0, "NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s BF16, 2,039 GB/s"),
    "L4": GPUProfile("L4", 121.0, 300.0, 24.0, "NVIDIA L4 datasheet: 242 TFLOP/s BF16 with sparsity (121 dense), 300 GB/s"),
    "A10G": GPUProfile("A10G", 125.0, 600.0, 24.0,
                       "NVIDIA A10 datasheet (A10G is AWS's variant): 125 TFLOP/s BF16 dense, 600 GB/s"),
}

MODELS: dict[str, ModelProfile] = {
    "Llama-2-7B": ModelProfile("Llama-2-7B", 6.74e9, 32, 4096, 32, 32),
    "Llama-3-8B": ModelProfile("Llama-3-8B", 8.03e9, 32, 4096, 32, 8),
    "Llama-2-70B": ModelProfile("Llama-2-70B", 68.98e9, 80, 8192, 64, 8),
}

GPUName = Literal["H100", "A100", "L4", "A10G"]
ModelName = Literal["Llama-2-7B", "Llama-3-8B", "Llama-2-70B"]


@dataclass(frozen=True)
class StepModel:
    gpu: GPUProfile
    model: ModelProfile
    tp: int = 1
    overhead_s: float = 0.004
    memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        if self.kv_capacity_tokens <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp} x {self.gpu.name} "
                             f"({self.model.weight_bytes / 1e9:.0f} GB of weights): raise tp")

    @classmethod
    def of(cls, gpu: str, model: str, tp: int = 1, overhead_s: float = 0.004) -> "StepModel":
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        return cls(GPUS[gpu], MODELS[model], tp, overhead_s)

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.tp * self.gpu.memory_gb * 1e9 * self.memory_utilization - self.model.weight_bytes
        return int(free // self.model.kv_bytes_per_token)

    def flops(self, tokens: int, attended_context: int) -> float:
        m = self.model
        return 2.0 * m.params * tokens + 4.0 * m.layers * m.hidden * attended_context

    def bytes_moved(self, attended_kv_tokens: int) -> float:
        return self.model.weight_bytes + self.model.kv_bytes_per_token * attended_kv_tokens

    def nominal_facts(self, name: str, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                      cost_weight: float = 1.0, time_scale: float = 1.0) -> PoolFacts:
        """A pool of replicas on this GPU, as the policy assumes it until measurements come: prefill tokens/s of a
        full chunk; one sequence's decode tokens/s and the replica's tokens/s in a half-full batch."""
        prefill = max_num_batched_tokens / self.step_time(max_num_batched_tokens,
                                                         max_num_batched_tokens * (max_num_batched_tokens + 1) // 2,
                                                         0, 0)
        batch = max(1, max_num_seqs // 2)
        decode = 1.0 / self.step_time(0, 0, batch, batch * 1024)
        return PoolFacts(name, self.gpu.name, cost_weight, max_model_len, prefill * time_scale,
                         decode * time_scale, batch * decode * time_scale)

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        """prefill_context: sum over prefill tokens of the positions they attend to; decode_context: sum of the
        decoding sequences' lengths."""
        tokens = prefill_tokens + decode_seqs
        if tokens == 0:
            return 0.0
        compute = self.flops(tokens, prefill_context + decode_context) / (self.tp * self.gpu.bf16_tflops * 1e12)
        # a prefill chunk reads its sequence's KV once, not once per token
        memory = self.bytes_moved(decode_context + prefill_tokens) / (self.tp * self.gpu.memory_bandwidth_gbs * 1e9)
        return max(compute, memory) + self.overhead_s
