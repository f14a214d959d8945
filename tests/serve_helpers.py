"""Shared set-up for the Serve tests: a local Ray cluster and the app built from a deploy/ config."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:8000"
MODEL = "tiny-llama"
ALICE, BOB, CAROL, ADMIN = "sk-alice-demo-key", "sk-bob-demo-key", "sk-carol-demo-key", "sk-admin-demo-key"


def app_args(config: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / config).read_text())["applications"][0]["args"]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def fairness(key: str) -> dict:
    return httpx.get(f"{BASE}/v1/fairness", headers=auth(key), timeout=10).json()


def client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=60)


def error(response) -> dict:
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body
