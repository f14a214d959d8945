import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The serving path as deployed (ray_env.py), set before any test starts Ray, whose processes read it at start.
# Ingress replicas drain for half a second, not 30 s.
from equinox_ray.serve.ray_env import use_fast_path  # noqa: E402

use_fast_path()
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0.5")

import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# `.ci/run` sets HYPOTHESIS_PROFILE=ci: the property tests draw the same examples on every CI run, so whether a
# change lands is not decided by a new random draw. Without it (`make test` by hand) they draw new examples each run,
# which is how the slack bound's counterexample was found; a failure prints the blob that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "explore"))


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, installed on first use (the dashboard test drives a real browser)."""
    path = shutil.which("chromium")
    if path is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=True)
            subprocess.run(install, env=env, capture_output=True, timeout=900, check=True)
        path = shutil.which("chromium")
    assert path, "chromium could not be installed"
    return path
