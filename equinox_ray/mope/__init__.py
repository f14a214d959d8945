"""MoPE: a deterministic mixture of XGBoost prediction experts (output tokens, latency, throughput, utilization)."""
