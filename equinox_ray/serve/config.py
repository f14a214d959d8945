"""The application's configuration: one pydantic model that Serve validates the YAML `args` against, so a wrong
config fails at deploy time with a message that names the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from equinox_ray.engines.sim_engine import SimEngineConfig
from equinox_ray.engines.vllm_engine import VLLMEngineConfig
from equinox_ray.fairness.equinox import Efficiency, EquinoxWeights
from equinox_ray.fairness.pools import PoolFacts
from equinox_ray.serve.keys import KeyRef
from equinox_ray.telemetry.config import TelemetryConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserConfig(Strict):
    name: str = Field(min_length=1)
    key: KeyRef = Field(description="the user's API key: its sha256 digest, or an env var or file that holds it")
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_plain_keys(cls, data):
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key: keys are not written in the config (Serve stores and shows its args); give "
                             "key: {sha256: <digest>} (python -m equinox_ray.serve.keys hash KEY), {env: VAR} or "
                             "{file: PATH}")
        return data


class WeightsConfig(Strict):
    """Equinox's tunable weights (docs/design.md); zero latency and resource weights make it VTC."""

    latency: float = Field(0.0, ge=0, description="alpha; 0 by measurement (docs/design.md)")
    resource: float = Field(0.0, ge=0, description="beta; 0 by measurement (docs/design.md)")
    latency_scale_tokens: float = Field(512.0, ge=0)
    latency_cap: float = Field(2.0, ge=0)
    latency_smoothing: float = Field(0.3, gt=0, le=1)
    latency_floor_s: float = Field(0.25, ge=0)
    tokens_per_busy_second: float = Field(1000.0, ge=0)

    def to_core(self) -> EquinoxWeights:
        return EquinoxWeights(**self.model_dump())


class EfficiencyConfig(Strict):
    """Equinox's ordering inside the fairness bound (docs/design.md); zero turns each switch off."""

    max_overtakes: int = Field(16, ge=0, description="(a) each user's queue cheapest first; a request overtaken "
                                                     "this often goes next. 0: FIFO")
    max_reorder_depth: int = Field(8, ge=0, description="(a) the order applies while the user has at most this "
                                                        "many requests waiting; deeper, FIFO. 0: any depth")
    slack_tokens: float | None = Field(
        None, ge=0, description="(b) Delta: users within this of the smallest counter compete by virtual finish. 0: "
                                "smallest counter only; none: input_weight x the pools' largest max_model_len")
    candidates: int = Field(8, ge=1, description="(b) users compared per decision")
    pairing: bool = Field(True, description="(c) on mixed GPU types with the fastest dispatch, give a free pool the "
                                            "request among those users that it slows least against the cluster's "
                                            "fastest pool")
    pairing_band: float = Field(0.25, ge=0, description="(c) relative times within one band of this width count as "
                                                        "equally suited; the virtual finish decides. 0: exact")
    fresh_first: bool = Field(True, description="(b) a user backlogged from idle ranks by its counter alone, not "
                                                 "its virtual finish, among the users within Delta until its first "
                                                 "grant")
    finish_by_oldest: bool = Field(False, description="(b) a user's virtual finish counts its oldest waiting "
                                                      "request's cost, not that of the request (a) put first, so "
                                                      "that (b) does not favour the deepest queues")
    max_passes: int = Field(32, ge=0, description="(b), (c) a user passed this often by grants to users with larger "
                                                  "keys goes next, ranked by its key alone. 0: no limit")

    def to_core(self) -> Efficiency:
        return Efficiency(**self.model_dump())


class PolicyConfig(Strict):
    name: Literal["fcfs", "vtc", "vtc-predict", "equinox"] = "equinox"
    input_weight: float = Field(1.0, ge=0)
    output_weight: float = Field(2.0, ge=0)
    weights: WeightsConfig = WeightsConfig()
    efficiency: EfficiencyConfig = EfficiencyConfig()
    prepaid_output: bool = Field(False, description="equinox: charge the predicted output at admission and correct "
                                                    "it at finish (VTC_predict) instead of VTC's exact per-token "
                                                    "charge")
    dispatch: Literal["fastest", "cost", "least_loaded"] = Field(
        "fastest", description="Equinox's pool choice: fastest predicted, or cheapest that meets e2e_slo_s")
    e2e_slo_s: float | None = Field(None, gt=0)
    predictor: Literal["mope", "moving-average"] = Field(
        "mope", description="what vtc-predict and equinox predict with; mope falls back to the moving average "
                            "(logged) when its models are missing")
    models: str = Field("predictors/models", description="MoPE model directory")


class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_requests_per_replica: float = Field(8.0, gt=0, description="running + backlog per replica to aim for")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(12.0, gt=0, description="window the replicas' metrics are averaged over")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class AdmissionConfig(Strict):
    max_window: int = Field(32, ge=1)
    initial_window: int = Field(8, ge=1)
    target_tpot_ms: float | None = Field(None, gt=0, description="None: the window stays at max_window")


class PoolConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    gpu_type: str = Field("CPU", description="a Ray accelerator type such as H100, A100, L4; CPU for none")
    engine: Literal["vllm", "sim"] = "vllm"
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    sim: SimEngineConfig = SimEngineConfig()
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on CPU machines and for sim pools)")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica; a CPU engine computes with this many threads "
                                                  "(Ray sets OMP_NUM_THREADS to it)")
    cost_weight: float = Field(1.0, gt=0, description="relative price of a busy-second on this pool")
    stream_interval_ms: float = Field(
        50.0, ge=0, description="a replica sends each ingress replica the tokens of all its requests once per "
                                "interval (a request's first token and last chunk at once); 0: every engine step")
    admission: AdmissionConfig = AdmissionConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()

    @property
    def deployment_name(self) -> str:
        return f"Pool-{self.name}"

    @property
    def max_model_len(self) -> int:
        return self.vllm.max_model_len if self.engine == "vllm" else self.sim.max_model_len

    def facts(self) -> PoolFacts:
        """A simulated pool's nominal speeds come from its GPU's step model (at its time scale); a vLLM pool's are
        the defaults until its replicas report measured ones (only decode speed is measured)."""
        if self.engine == "sim":
            batch = min(self.admission.max_window, self.sim.max_num_seqs)
            return self.sim.step_model().nominal_facts(self.name, batch, self.sim.max_num_batched_tokens,
                                                       self.max_model_len, self.cost_weight, self.sim.time_scale)
        return PoolFacts(self.name, self.gpu_type, self.cost_weight, self.max_model_len)

    @property
    def seeded_sampling_crashes(self) -> bool:
        """vLLM built for the CPU kills its engine on a seeded request (temperature > 0) whose prefill is split
        into chunks (`RuntimeError: CPU Generator does not use offset`), which any prompt can be under load."""
        return self.engine == "vllm" and not self.num_gpus


class LimitsConfig(Strict):
    max_queue_per_user: int = Field(64, ge=1, description="waiting requests per user; past it, 429")
    retry_after_s: int = Field(1, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1, description="largest max_tokens a client may ask for")
    max_body_bytes: int = Field(4 * 1024**2, ge=1024, description="largest request body; past it, 413 before parsing")
    max_prompt_tokens: int | None = Field(None, ge=1, description="largest prompt in tokens (None: the context "
                                                                   "length of the largest pool)")


class IngressConfig(Strict):
    """The HTTP front: replicas that authenticate, tokenize and stream, each talking to the one controller."""

    num_replicas: int = Field(1, ge=1, description="ingress replicas when autoscaling is not set")
    autoscaling: AutoscalingConfig | None = Field(None, description="Serve's autoscaling on ongoing requests; "
                                                                     "target_requests_per_replica is their target")
    max_ongoing_requests: int = Field(4096, ge=1)
    num_cpus: float = Field(0, ge=0)
    batch_interval_ms: float = Field(
        5.0, ge=0, description="least time between two updates to the controller that carry new requests, finishes or "
                               "withdrawals (one after a pause goes at once)")
    progress_interval_ms: float = Field(20.0, ge=0, description="least time between updates of progress alone")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM or SIGINT (`equinox-serve`), how long requests "
                                                          "already accepted may take to finish; new ones get 503")


class ModelConfig(Strict):
    name: str = Field("tiny-llama", description="the model name clients send")
    tokenizer: str | None = Field("models/tiny-llama", description="tokenizer directory; None counts words")


class CheckpointConfig(Strict):
    """Where the controller keeps what must outlive it (per-user counters, usage totals, the predictor's online
    corrections), and how often it writes them."""

    store: Literal["gcs", "file", "none"] = Field("gcs", description="gcs: Ray's GCS key-value store (outlives "
                                                                   "the controller's process); file: `path`")
    path: str | None = Field(None, description="the file, for store: file (on storage every node sees)")
    key: str = Field("equinox-ray/checkpoint", description="the GCS key (the application name is appended)")
    interval_s: float = Field(1.0, gt=0, description="the most charges a restart can forget are this long's")

    @model_validator(mode="after")
    def _path(self) -> "CheckpointConfig":
        if self.store == "file" and not self.path:
            raise ValueError("checkpoint.store file needs checkpoint.path")
        return self


class AppConfig(Strict):
    model: ModelConfig = ModelConfig()
    ingress: IngressConfig = IngressConfig()
    pools: list[PoolConfig] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    users: list[UserConfig] = Field(default_factory=list)
    admin_keys: list[KeyRef] = Field(default_factory=list, description="keys of the admin API (and /metrics)")
    metrics_keys: list[KeyRef] = Field(default_factory=list, description="keys that may read /metrics too")
    metrics_public: bool = Field(False, description="serve /metrics without a key (a private scrape network)")
    auth: bool = Field(True, description="False: no keys, the OpenAI `user` field names the user (local demos)")
    limits: LimitsConfig = LimitsConfig()
    report_interval_s: float = Field(0.5, gt=0, le=1.0)
    records_path: str | None = Field(None, description="append a JSONL completion record per finished request "
                                                       "(equinox_ray/mope/records.py), to train MoPE on")
    telemetry: TelemetryConfig = TelemetryConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _unique(self) -> "AppConfig":
        keys = [u.key for u in self.users] + self.admin_keys
        for what, names in [("pool", [p.name for p in self.pools]), ("user", [u.name for u in self.users]),
                            ("key", [k for k in keys if k.sha256 is not None])]:
            if len(names) != len(set(names)):
                raise ValueError(f"duplicate {what} in config")
        if self.auth and not self.users:
            raise ValueError("auth is on but no users are configured")
        return self
