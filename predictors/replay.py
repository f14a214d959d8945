"""Training records from replaying a workload through the cluster simulator: one pool of one simulated GPU, first
come first served, the records written by an observer of the run.

    python -m predictors.replay --trace lmsys --gpu A100 --scale 1.0 --out records.jsonl

It is the simulator the benchmarks run and the controller's view of the pool: requests wait in the scheduler's
queue, not in the engine, and are granted while the replica has a free slot; each record holds the `PoolView` the
grant was made on, as the serving path's records do. The engine sees the true output length (it is the trace); the
scheduler and the records see the client's cap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from equinox_ray.fairness import FCFS
from equinox_ray.mope import records as rec
from equinox_ray.mope.records import TrainingRecord
from equinox_ray.sim import ClusterSim, PoolSpec, SimCompletion
from equinox_ray.workloads.workload import Workload


class RecordWriter:
    """Observes a simulated run and keeps a training record per finished request."""

    def __init__(self) -> None:
        self.records: list[TrainingRecord] = []

    def __call__(self, done: SimCompletion) -> None:
        r = done.record
        self.records.append(TrainingRecord.of(done.request, done.admission, done.at_finish, r.output_tokens,
                                              r.first_token - r.granted, r.finish - r.granted, r.finish))


def replay(workload: Workload, gpu: str = "A100", model: str = "Llama-2-7B", rate_scale: float = 1.0,
           max_tokens_cap: int = 1024, max_num_seqs: int = 32, window_s: float = 5.0) -> list[TrainingRecord]:
    writer = RecordWriter()
    pool = PoolSpec("replay", gpu, replicas=1, model=model, max_num_seqs=max_num_seqs)
    ClusterSim([pool], FCFS(), max_tokens_cap=max_tokens_cap, stats_window_s=window_s,
               on_completion=writer).run(workload.compressed(rate_scale))
    return sorted(writer.records, key=lambda r: r.arrival_s)


def main() -> None:
    from equinox_ray.workloads import synthetic, traces

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=["lmsys", "sharegpt"], default="lmsys")
    parser.add_argument("--gpu", default="A100")
    parser.add_argument("--scale", type=float, default=1.0, help="arrival rate multiplier")
    parser.add_argument("--requests", type=int, default=3000, help="sharegpt: how many requests")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.trace == "lmsys":
        workload = traces.lmsys_arena()
    else:
        workload = synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=args.requests, rate=3.0,
                                        seed=0, name="sharegpt")
    records = replay(workload, gpu=args.gpu, rate_scale=args.scale)
    rec.write(args.out, records)
    print(f"{len(records)} records written to {args.out}")


if __name__ == "__main__":
    main()
