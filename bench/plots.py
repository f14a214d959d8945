"""Plots of a scenario's runs: service over time per user, TTFT CDFs, and Jain's index over time."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import lightest_users  # noqa: E402
from bench.suite import Run  # noqa: E402
from equinox_ray.fairness.metrics import jain_per_window, windowed_service  # noqa: E402

MAX_USERS_DRAWN = 8
SHOWN = ("fcfs", "vtc", "equinox")


def service_over_time(runs: Sequence[Run], path: Path) -> None:
    shown = [r for r in runs if r.label in SHOWN]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], shown):
        ws = windowed_service(run.result.records, run.workload.users, run.scenario.metrics_window_s)
        totals = ws.service.sum(axis=1)
        drawn = np.argsort(-totals)[:MAX_USERS_DRAWN]
        for i in sorted(drawn):
            ax.plot(ws.edges[1:], ws.service[i] / run.scenario.metrics_window_s, label=ws.users[i], lw=1)
        ax.set_title(run.label)
        ax.set_xlabel("time (s)")
    axes[0][0].set_ylabel("service rate per user\n(weighted tokens/s)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{runs[0].workload.name}: service over time (up to {MAX_USERS_DRAWN} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ttft_cdf(runs: Sequence[Run], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for run in runs:
        light = lightest_users(run.workload)
        for ax, records in ((axes[0], run.result.records),
                            (axes[1], [r for r in run.result.records if r.user in light])):
            x = np.sort([r.ttft for r in records])
            if x.size:
                ax.plot(np.maximum(x, 1e-3), np.arange(1, x.size + 1) / x.size, label=run.label, lw=1.2)
    for ax, title in zip(axes, ("all requests", "lightest quarter of users")):
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (s)")
        ax.set_title(title)
    axes[0].set_ylabel("CDF")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{runs[0].workload.name}: time to first token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jain_over_time(runs: Sequence[Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for run in runs:
        ws = windowed_service(run.result.records, run.workload.users, run.scenario.metrics_window_s)
        ax.plot(ws.edges[1:], jain_per_window(ws), label=run.label, lw=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Jain's index (backlogged users)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"{runs[0].workload.name}: Jain's index per window")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(runs: Sequence[Run], out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}-service.png", out / f"{stem}-ttft.png", out / f"{stem}-jain.png"]
    service_over_time(runs, paths[0])
    ttft_cdf(runs, paths[1])
    jain_over_time(runs, paths[2])
    return paths
