"""The cluster simulator: the fairness core's policies over pools of simulated GPUs, under a virtual clock."""

from equinox_ray.sim.cluster import ClusterSim, SimResult
from equinox_ray.sim.replica import PoolSpec, SimReplica

__all__ = ["ClusterSim", "PoolSpec", "SimReplica", "SimResult"]
