"""Build the configured policy from the pure core."""

from __future__ import annotations

from equinox_ray.fairness import FCFS, VTC, Equinox, MovingAveragePredictor, Policy, Predictor, User
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.serve.paths import resolve


def make_predictor(config: PolicyConfig) -> Predictor:
    if config.predictor == "moving-average":
        return MovingAveragePredictor()
    from equinox_ray.mope.predictor import MoPE

    return MoPE(resolve(config.models))


def make_policy(config: PolicyConfig, users: list[User], predictor: Predictor | None = None) -> Policy:
    if config.name == "fcfs":
        return FCFS(users)
    if config.name == "vtc":
        return VTC(users, input_weight=config.input_weight, output_weight=config.output_weight)
    predictor = predictor or make_predictor(config)
    if config.name == "vtc-predict":
        return VTC(users, input_weight=config.input_weight, output_weight=config.output_weight, predictor=predictor)
    return Equinox(users, weights=config.weights.to_core(), efficiency=config.efficiency.to_core(),
                   predictor=predictor, dispatch=config.dispatch, e2e_slo_s=config.e2e_slo_s,
                   prepaid_output=config.prepaid_output, input_weight=config.input_weight,
                   output_weight=config.output_weight)
