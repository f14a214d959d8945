"""The pure fairness core: requests, policies, counters and metrics. No Ray, vLLM or I/O; any clock."""

from equinox_ray.fairness.equinox import Efficiency, Equinox, EquinoxWeights
from equinox_ray.fairness.fcfs import FCFS
from equinox_ray.fairness.policy import Grant, Policy
from equinox_ray.fairness.pools import PoolFacts, PoolView, ReplicaObservation, pick_replica, pool_view
from equinox_ray.fairness.prediction import MovingAveragePredictor, Outcome, Prediction, Predictor, ZeroOutputPredictor
from equinox_ray.fairness.request import InvalidRequest, Request, UnknownUser, User
from equinox_ray.fairness.vtc import VTC

__all__ = [
    "FCFS", "VTC", "Efficiency", "Equinox", "EquinoxWeights", "Grant", "Policy", "PoolFacts", "PoolView",
    "ReplicaObservation", "pick_replica", "pool_view", "Prediction", "Predictor",
    "MovingAveragePredictor", "ZeroOutputPredictor", "Outcome", "Request", "User", "InvalidRequest", "UnknownUser",
]
