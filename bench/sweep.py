"""One Equinox setting at several values, each against VTC in the same simulated runs: how a default is chosen.

Prints and writes bench/results/sweep-<setting>.md: per scenario and value, Equinox's ratios to VTC on the goals'
metrics (steady throughput, TTFT p50 and p99, the light users' TTFT p99, Jain's index) and whether the backlogged
pair gap stayed within the bound claimed for that value.

    python -m bench sweep efficiency.slack_tokens 1024 2048 4096 8192 [--scenario lmsys sharegpt-zipf ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import goal_ratios, metrics, yes_no
from bench.scenarios import SCENARIOS
from bench.suite import policy_config, run_scenario
from equinox_ray.serve.config import PolicyConfig

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("lmsys", "sharegpt-zipf", "azure-mixed", "scale")


def config_with(setting: str, value: str) -> PolicyConfig:
    """Equinox's default config with one dotted setting (`efficiency.slack_tokens`) at `value`, validated."""
    section, _, field = setting.rpartition(".")
    base = policy_config("equinox").model_dump()
    target = base
    for part in filter(None, section.split(".")):
        target = target[part]
    if field not in target:
        raise SystemExit(f"no setting {setting!r} in the policy config")
    target[field] = json.loads(value)
    return PolicyConfig.model_validate(base)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """`--set SETTING VALUE`, for the commands that run Equinox against VTC (loads, generalize, jitter)."""
    parser.add_argument("--set", nargs=2, metavar=("SETTING", "VALUE"), help="Equinox with one setting changed from "
                        "its default (as bench sweep takes it); the results' file names end in -SETTING-VALUE")


def set_config(setting: list[str] | None) -> PolicyConfig | None:
    """The config `--set` asks for (None: Equinox's defaults)."""
    return config_with(*setting) if setting else None


def set_flag(setting: list[str] | None) -> str:
    """The `--set` part of a command line, as a result's title quotes it."""
    return f" --set {' '.join(setting)}" if setting else ""


def set_suffix(setting: list[str] | None) -> str:
    """The end of a result's file name for `--set`."""
    return "-" + "-".join(setting) if setting else ""


def sweep(setting: str, values: list[str], scenarios: list[str]) -> str:
    lines = [f"# Sweep of `{setting}` (`python -m bench sweep {setting} {' '.join(values)} --scenario "
             f"{' '.join(scenarios)}`)", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| scenario | workload | value | steady throughput | TTFT p50 | TTFT p99 | light TTFT p99 | Jain | "
             "pair gap within bound |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    configs = {f"{setting}={value}": config_with(setting, value) for value in values}
    for name in scenarios:
        runs = run_scenario(SCENARIOS[name], policies=("vtc",), configs=configs)
        for workload in dict.fromkeys(run.workload.name for run in runs):
            rows = {run.label: metrics(run) for run in runs if run.workload.name == workload}
            for label, value in zip(configs, values):
                r = goal_ratios(rows[label], rows["vtc"])
                lines.append(f"| {name} | {workload} | {value} | {r['steady_throughput']:.3f}x | "
                             f"{r['ttft_p50']:.3f}x | {r['ttft_p99']:.3f}x | {r['light_ttft_p99']:.3f}x | "
                             f"{r['jain']:.3f}x | {yes_no(r['gap_within_bound'])} |")
            print("\n".join(lines[-len(values):]), flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", help="a dotted policy setting, for example efficiency.slack_tokens")
    parser.add_argument("values", nargs="+", help="its values, as JSON")
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = sweep(args.setting, args.values, args.scenario)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep-{args.setting.replace('.', '-')}.md").write_text(text)
    print(text)
    return 0
