import hashlib
import json

from equinox_ray.engines.tiny_model import write_tiny_model


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_vllm_cpu_compatible(tmp_path):
    a = write_tiny_model(tmp_path / "a", seed=0)
    b = write_tiny_model(tmp_path / "b", seed=0)
    assert digest(a) == digest(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    config = json.loads((a / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM's CPU attention rejects 16
    assert not list(tmp_path.glob(".a-*"))  # the staging directory is gone

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a)
    ids = tokenizer("ka lo mi ne fin dor")["input_ids"]
    assert 0 < len(ids) < 20 and max(ids) < config["vocab_size"]
    assert tokenizer.decode(ids) == "ka lo mi ne fin dor"
