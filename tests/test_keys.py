"""API keys in the config: digests or references to where a key is, never the key itself."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from equinox_ray.serve.config import AppConfig
from equinox_ray.serve.keys import KeyRef, digest
from serve_helpers import app_args


def test_a_key_is_read_from_its_digest_an_env_var_or_a_file(tmp_path, monkeypatch):
    assert KeyRef(sha256=digest("sk-x")).resolve() == digest("sk-x")
    monkeypatch.setenv("EQUINOX_TEST_KEY", "sk-from-env\n")
    assert KeyRef(env="EQUINOX_TEST_KEY").resolve() == digest("sk-from-env")
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    assert KeyRef(file=str(secret)).resolve() == digest("sk-from-file")
    with pytest.raises(KeyError, match="EQUINOX_MISSING"):
        KeyRef(env="EQUINOX_MISSING").resolve()


def test_a_key_ref_names_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one"):
        KeyRef(sha256=digest("a"), env="B")
    with pytest.raises(ValidationError, match="exactly one"):
        KeyRef()
    with pytest.raises(ValidationError):
        KeyRef(sha256="not-a-digest")


def test_a_plain_key_in_the_config_is_refused_with_the_way_to_write_it():
    args = app_args("equinox.yaml")
    args["users"][0] = {"name": "alice", "api_key": "sk-alice-demo-key"}
    with pytest.raises(ValidationError, match="keys are not written in the config.*equinox_ray.serve.keys"):
        AppConfig.model_validate(args)


def test_two_users_with_one_digest_are_refused():
    args = app_args("equinox.yaml")
    args["users"][1]["key"] = args["users"][0]["key"]
    with pytest.raises(ValidationError, match="duplicate key"):
        AppConfig.model_validate(args)


def test_the_key_tool_prints_a_fresh_key_and_its_digest():
    out = subprocess.run([sys.executable, "-m", "equinox_ray.serve.keys", "new"], capture_output=True, text=True,
                         check=True).stdout
    key = out.split("key:")[1].split()[0]
    assert key.startswith("sk-") and len(key) > 30 and f"sha256: {digest(key)}" in out
