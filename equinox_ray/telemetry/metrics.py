"""Prometheus metrics at /metrics, read from the fairness controller at scrape time (plus a TTFT histogram observed
as requests finish). Names and labels are documented in docs/observability.md.

Label cardinality is bounded: the configured users, then the first users seen, up to `max_user_labels`, get their
own `user` label; everyone else is `other`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from equinox_ray.serve.fairness_view import jain, predictor_status, running_by_user

OTHER = "other"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class UserLabels:
    def __init__(self, limit: int, configured: Iterable[str] = ()) -> None:
        self.limit = limit
        self.named: dict[str, None] = {}
        for user in configured:
            self.label(user)

    def label(self, user: str) -> str:
        if user in self.named:
            return user
        if len(self.named) < self.limit:
            self.named[user] = None
            return user
        return OTHER


class ControllerCollector:
    """Gauges and counters from the controller's state, computed when Prometheus scrapes."""

    def __init__(self, controller, labels: UserLabels) -> None:
        self.controller = controller
        self.labels = labels

    def collect(self):
        c = self.controller
        queue = GaugeMetricFamily("equinox_user_queue_length", "requests waiting in the fair queue", labels=["user"])
        running = GaugeMetricFamily("equinox_user_running", "requests granted and not finished", labels=["user"])
        tokens = CounterMetricFamily("equinox_user_served_tokens", "tokens served", labels=["user", "kind"])
        requests = CounterMetricFamily("equinox_user_requests", "requests by outcome", labels=["user", "outcome"])
        counter = GaugeMetricFamily("equinox_user_counter", "the policy's fairness counters (mean over the users "
                                    "of a label)", labels=["user", "counter"])
        by_label: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        counters: dict[tuple[str, str], list[float]] = defaultdict(list)
        granted = running_by_user(c)
        for user in sorted(set(c.policy.users) | set(c.stats)):
            label, s = self.labels.label(user), c.stats[user]
            row = by_label[label]
            row["queue"] += c.policy.queue_length(user)
            row["running"] += granted[user]
            row["input"] += s.prompt_tokens
            row["output"] += s.output_tokens
            for outcome in ("finished", "rejected", "cancelled"):
                row[outcome] += getattr(s, outcome)
            if user in c.policy.users:
                for name, value in c.policy.counters(user).items():
                    counters[(label, name)].append(value)
        for label, row in by_label.items():
            queue.add_metric([label], row["queue"])
            running.add_metric([label], row["running"])
            tokens.add_metric([label, "input"], row["input"])
            tokens.add_metric([label, "output"], row["output"])
            for outcome in ("finished", "rejected", "cancelled"):
                requests.add_metric([label, outcome], row[outcome])
        for (label, name), values in counters.items():
            counter.add_metric([label, name], sum(values) / len(values))
        yield from (queue, running, tokens, requests, counter)
        yield from self._pools()
        index = jain(c, granted)
        yield GaugeMetricFamily("equinox_jain_index", f"Jain's index of weighted service over the last "
                                f"{c.service_window.window_s:g} s (NaN with fewer than two active users)",
                                value=float("nan") if index is None else index)
        status = predictor_status(c)
        error = GaugeMetricFamily("equinox_predictor_relative_error", "smoothed absolute relative error of the "
                                  "predictions at grant against the measured outcome", labels=["target"])
        for target, value in status["error"].items():
            error.add_metric([target], value)
        yield error
        yield CounterMetricFamily("equinox_predictor_fallbacks", "predictions made by the moving-average fallback "
                                  "because the models were missing or failed", value=status["fallbacks"])

    def _pools(self):
        c = self.controller
        families = {
            "throughput": GaugeMetricFamily("equinox_pool_throughput_tokens_per_second",
                                            "tokens/s the pool's replicas reported", labels=["pool", "gpu_type"]),
            "utilization": GaugeMetricFamily("equinox_pool_utilization", "mean engine busy fraction",
                                             labels=["pool", "gpu_type"]),
            "window": GaugeMetricFamily("equinox_pool_window", "sum of the replicas' admission windows",
                                        labels=["pool", "gpu_type"]),
            "replicas": GaugeMetricFamily("equinox_pool_replicas", "replicas reporting", labels=["pool", "gpu_type"]),
            "running": GaugeMetricFamily("equinox_pool_running", "requests granted to the pool and not finished",
                                         labels=["pool", "gpu_type"]),
        }
        for name, state in c.pools.items():
            labels = [name, state.config.gpu_type]
            reports = [r.report for r in state.replicas.values() if r.report is not None]
            families["throughput"].add_metric(labels, sum(r.stats.tokens_per_s for r in reports))
            families["utilization"].add_metric(labels, sum(r.stats.utilization for r in reports) / len(reports)
                                               if reports else 0.0)
            families["window"].add_metric(labels, state.capacity())
            families["replicas"].add_metric(labels, len(state.replicas))
            families["running"].add_metric(labels, state.running)
        return families.values()


class FairnessMetrics:
    def __init__(self, controller, max_user_labels: int = 20) -> None:
        self.registry = CollectorRegistry()
        self.labels = UserLabels(max_user_labels, [u.name for u in controller.config.users])
        self.registry.register(ControllerCollector(controller, self.labels))
        self.ttft = Histogram("equinox_user_ttft_seconds", "time to first token from arrival, as the controller "
                              "measures it", ["user"], buckets=TTFT_BUCKETS, registry=self.registry)

    def observe_ttft(self, user: str, seconds: float) -> None:
        self.ttft.labels(self.labels.label(user)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
