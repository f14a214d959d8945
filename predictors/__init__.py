"""Predictor training and the shipped models (see equinox_ray.mope for the runtime)."""
