"""The live fairness dashboard: one self-contained page (no external scripts) that polls /v1/fairness."""

from __future__ import annotations

from pathlib import Path

DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text()
