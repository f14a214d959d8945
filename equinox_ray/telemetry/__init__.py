"""Observability: OpenTelemetry traces of each request's path and fairness decision, Prometheus metrics, and the
live dashboard."""
