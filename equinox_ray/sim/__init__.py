"""The cluster simulator: the fairness core's policies over pools of simulated GPUs, under a virtual clock."""

from equinox_ray.sim.cluster import ClusterSim, SimCompletion, SimResult, scheduler_view
from equinox_ray.sim.replica import PoolSpec, SimReplica

__all__ = ["ClusterSim", "PoolSpec", "SimCompletion", "SimReplica", "SimResult", "scheduler_view"]
