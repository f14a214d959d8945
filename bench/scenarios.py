"""The benchmark scenarios: seeded workloads from the vendored traces or VTC's suites, and the clusters they run on.

Load levels. The VTC artifact ran its suites and the LMSYS trace on an A10G; our A100 profile moves memory 3.4 times
faster (2,039 against 600 GB/s), and decoding is memory-bound. Scenarios 1 and 2 therefore compress arrival times
by 3.4 so that the A100 is as loaded as the artifact's A10G was. The Azure trace is about 8% of the mixed cluster's
capacity at its real pace; scenarios 4 and 5 compress it to a busy cluster (factors below). Every factor is printed
in the result tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from equinox_ray.sim import PoolSpec
from equinox_ray.workloads import synthetic, traces
from equinox_ray.workloads.workload import Workload

A10G_TO_A100 = 2039.0 / 600.0
ZIPF_WEIGHTS = (1.0, 2.0, 4.0)
COST = {"H100": 3.0, "A100": 2.0, "L4": 1.0, "A10G": 1.0}  # relative price of a busy-second


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    pools: tuple[PoolSpec, ...]
    workloads: Callable[[bool], list[Workload]]  # smoke=True: a small version that runs in seconds
    time_scale: float  # arrival times divided by this
    max_tokens_cap: int | None  # the client's max_tokens; None: the true length (the VTC artifact's setting)
    window_s: float  # window for service, Jain's index and the service difference
    policies: tuple[str, ...] = ("fcfs", "vtc", "vtc-predict", "equinox", "equinox-fifo", "equinox-no-slack",
                                 "equinox-no-fresh", "equinox-holistic")

    @property
    def metrics_window_s(self) -> float:
        """The metrics window on the compressed clock."""
        return self.window_s / self.time_scale


def pool(name: str, gpu: str, replicas: int, max_num_seqs: int = 32) -> PoolSpec:
    return PoolSpec(name, gpu, replicas, max_num_seqs=max_num_seqs, cost_weight=COST[gpu])


def _vtc_suites(smoke: bool) -> list[Workload]:
    if smoke:
        suites = [synthetic.overload(duration=120.0), synthetic.poisson_short_long(duration=60.0)]
    else:
        suites = [make() for make in synthetic.VTC_SUITES.values()]
    return [w.compressed(A10G_TO_A100) for w in suites]


def _lmsys(smoke: bool) -> list[Workload]:
    w = traces.lmsys_arena()
    if smoke:
        w = Workload(w.name, w.users, w.requests[:300])
    return [w.compressed(A10G_TO_A100, "lmsys-arena")]


def _sharegpt(smoke: bool) -> list[Workload]:
    n = 600 if smoke else 12_000
    rate = 4.5 if smoke else 36.0  # about 1.2 times what the pool serves: the fair queue decides who waits
    return [synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=n, rate=rate,
                                 weights=ZIPF_WEIGHTS, seed=0, name="sharegpt-zipf")]


AZURE_SCALE = 12.0
SCALE_SCALE = 50.0


def _azure(smoke: bool) -> list[Workload]:
    timed = traces.azure_conversations()[: 800 if smoke else 10_000]
    w = synthetic.zipf_users([(p, o) for _, p, o in timed], n_users=50, n_requests=len(timed),
                             arrivals=[t for t, _, _ in timed], weights=ZIPF_WEIGHTS, seed=0, name="azure-mixed")
    return [w.compressed(AZURE_SCALE / (4 if smoke else 1))]


def _scale(smoke: bool) -> list[Workload]:
    """The Azure trace tiled end to end until it has 100,000 arrivals, with 200 Zipf users."""
    n = 4_000 if smoke else 100_000
    timed = traces.azure_conversations()
    period = timed[-1][0] + 1.0
    arrivals = [t + k * period for k in range(n // len(timed) + 1) for t, _, _ in timed][:n]
    lengths = [(p, o) for _, p, o in timed]
    w = synthetic.zipf_users(lengths, n_users=200, n_requests=n, arrivals=arrivals, weights=ZIPF_WEIGHTS, seed=0,
                             name="scale-100k")
    return [w.compressed(SCALE_SCALE)]


MIXED = (pool("h100", "H100", 2), pool("a100", "A100", 4), pool("l4", "L4", 8, max_num_seqs=16))
SCALE_CLUSTER = (pool("h100", "H100", 8), pool("a100", "A100", 16), pool("l4", "L4", 40, max_num_seqs=16))

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("vtc-suites", "1. VTC's synthetic suites on one A100 (Llama-2-7B)", (pool("a100", "A100", 1),),
             _vtc_suites, A10G_TO_A100, None, 30.0),
    Scenario("lmsys", "2. LMSYS Arena, 27 clients, one A100 (Llama-2-7B)", (pool("a100", "A100", 1),), _lmsys,
             A10G_TO_A100, 1024, 30.0),
    Scenario("sharegpt-zipf", "3. ShareGPT lengths, 50 Zipf users with weights 1/2/4, 8 A100s",
             (pool("a100", "A100", 8),), _sharegpt, 1.0, 1024, 30.0),
    Scenario("azure-mixed", "4. Azure conversation arrivals, 50 Zipf users, 2 H100 + 4 A100 + 8 L4", MIXED, _azure,
             AZURE_SCALE, 1024, 30.0, Scenario.policies + ("equinox-no-pairing",)),
    Scenario("scale", "5. Scale: the Azure trace tiled to 100,000 requests, 200 users, 8 H100 + 16 A100 + 40 L4",
             SCALE_CLUSTER, _scale, SCALE_SCALE, 1024, 30.0, ("fcfs", "vtc", "equinox")),
]}
