"""The API people script against, through the stock ``openai`` SDK: every parameter honoured or
refused, structured outputs, tools, X-Request-Id, /tokenize, /detokenize, /version."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                           "days": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def models(cluster):
    for name, adapter in (("surface", "a1"),):
        assert cluster.upload("alice", name, adapter).status_code in (201, 409)
    return ["tiny", "tiny:surface"]


@pytest.fixture(scope="module")
def client(cluster):
    return cluster.client("alice")


def _greedy(client, model, **kw) -> str:
    return client.completions.create(model=model, prompt="the date is", temperature=0, max_tokens=24,
                                     **kw).choices[0].text


# ---------------------------------------------------------------- structured outputs


@pytest.mark.parametrize("which", [0, 1], ids=["base", "adapter"])
def test_json_schema_output_validates(client, models, which):
    r = client.chat.completions.create(model=models[which], messages=USER, max_tokens=120, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "weather", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_and_choice(client, models):
    r = client.chat.completions.create(model=models[1], messages=USER, max_tokens=120, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=models[0], messages=USER, max_tokens=8, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("which", [0, 1], ids=["base", "adapter"])
def test_required_tool_choice_gives_tool_calls_the_sdk_parses(client, models, which):
    r = client.chat.completions.create(model=models[which], messages=USER, tools=[WEATHER, TIME],
                                       tool_choice="required", parallel_tool_calls=which == 1, max_tokens=200,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        schema = {"get_weather": SCHEMA, "get_time": TIME["function"]["parameters"]}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_named_function_is_called_and_parallel_false_makes_one_call(client, models):
    r = client.chat.completions.create(model=models[1], messages=USER, tools=[WEATHER, TIME], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=60)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "stop"
    assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    r = client.chat.completions.create(model=models[0], messages=USER, tools=[WEATHER, TIME], temperature=0.8,
                                       seed=3, tool_choice="required", parallel_tool_calls=False, max_tokens=150)
    assert len(r.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_streamed_tool_call_deltas_assemble(client, models, choice):
    stream = client.chat.completions.create(model=models[0], messages=USER, tools=[WEATHER], tool_choice=choice,
                                            parallel_tool_calls=False, max_tokens=120, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or "" if d.function else ""
                call["arguments"] += d.function.arguments or "" if d.function else ""
    assert calls and all(c["name"] == "get_weather" for c in calls.values())
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMA)
    assert finish == ("tool_calls" if choice == "required" else "stop")


def test_a_tool_conversation_is_accepted(client, models):
    """role tool, content null with tool_calls, content as a list of text parts."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model=models[1], messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content is not None and not r.choices[0].message.tool_calls


def test_auto_tool_choice_without_a_parser_is_refused(client, models):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=models[0], messages=USER, tools=[WEATHER], tool_choice="auto",
                                       max_tokens=8)
    assert e.value.body["param"] == "tool_choice" and "--tool-call-parser" in e.value.body["message"]


# ---------------------------------------------------------------- sampling parameters


def test_penalties_change_the_output(client, models):
    for model in models:
        plain = _greedy(client, model, extra_body={"ignore_eos": True})
        for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                   {"extra_body": {"repetition_penalty": 2.0, "ignore_eos": True}}):
            kw.setdefault("extra_body", {"ignore_eos": True})
            assert _greedy(client, model, **kw) != plain, (model, kw)


def test_top_k_min_p_logit_bias_and_stop_token_ids(client, models, cluster):
    greedy = _greedy(client, models[0])
    assert client.completions.create(model=models[0], prompt="the date is", temperature=1.5, seed=7, max_tokens=24,
                                     extra_body={"top_k": 1}).choices[0].text == greedy
    assert client.completions.create(model=models[0], prompt="the date is", temperature=1.5, seed=7, max_tokens=24,
                                     extra_body={"min_p": 1.0}).choices[0].text == greedy
    with cluster.http("alice") as h:
        token = h.post("/tokenize", json={"prompt": " date", "add_special_tokens": False}).json()["tokens"][0]
    r = client.completions.create(model=models[1], prompt="the date is", temperature=0, max_tokens=6,
                                  logit_bias={str(token): 100}, extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == [token] * 6
    first = client.completions.create(model=models[0], prompt="the date is", temperature=0, max_tokens=8,
                                      extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0].token_ids
    r = client.completions.create(model=models[0], prompt="the date is", temperature=0, max_tokens=8,
                                  extra_body={"stop_token_ids": [first[2]], "return_token_ids": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].token_ids == first[:3]
    assert r.choices[0].model_extra["stop_reason"] == first[2]


def test_n_with_greedy_prompt_lists_echo_and_max_completion_tokens(client, models):
    r = client.completions.create(model=models[0], prompt="hello", n=2, temperature=0, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text
    r = client.completions.create(model=models[1], prompt=["hello", "the date is"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[2].text == _greedy(client, models[1])[:len(r.choices[2].text)]
    echoed = client.completions.create(model=models[0], prompt="the date is", echo=True, max_tokens=4, temperature=0)
    plain = client.completions.create(model=models[0], prompt="the date is", max_tokens=4, temperature=0)
    assert echoed.choices[0].text == "the date is" + plain.choices[0].text
    r = client.chat.completions.create(model=models[0], messages=USER, max_tokens=9, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3  # max_completion_tokens wins, as in vLLM


def test_logprobs_up_to_vllms_limit(client, models):
    r = client.chat.completions.create(model=models[0], messages=USER, max_tokens=3, logprobs=True, top_logprobs=20)
    assert all(len(t.top_logprobs) == 20 for t in r.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=models[0], messages=USER, max_tokens=3, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("kwargs, param", [
    ({"extra_body": {"suffix": "x"}}, "suffix"),
    ({"extra_body": {"best_of": 3}}, "best_of"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ({"extra_body": {"no_such_thing": 1}}, "no_such_thing"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= \"a\""}}}, "structured_outputs.grammar"),
    ({"extra_body": {"priority": 5}}, "priority"),
])
def test_unsupported_parameters_are_refused_by_name(client, models, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=models[0], prompt="x", max_tokens=2, **kwargs)
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == param


def test_non_text_content_parts_are_refused(client, models):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=models[0], max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}]}])
    assert e.value.body["code"] == "unsupported_parameter"


# ---------------------------------------------------------------- request ids, tokenize, version


def test_x_request_id_round_trips(cluster, models):
    with cluster.http("alice") as h:
        r = h.post("/v1/chat/completions", headers={"X-Request-Id": "trace-42"},
                   json={"model": models[1], "messages": USER, "max_tokens": 2})
        assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "trace-42"
        with h.stream("POST", "/v1/completions", headers={"X-Request-Id": "trace-43"},
                      json={"model": models[0], "prompt": "x", "max_tokens": 2, "stream": True}) as s:
            assert s.headers["x-request-id"] == "trace-43"
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert {c["id"] for c in chunks} == {"trace-43"}
        r = h.post("/v1/completions", json={"model": models[0], "prompt": "x", "max_tokens": 1})
        assert r.headers["x-request-id"] == r.json()["id"] and r.json()["id"].startswith("cmpl-")
        r = h.post("/v1/completions", headers={"X-Request-Id": "bad id"}, json={"model": models[0], "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_a_request_id_in_flight_is_not_reused_by_the_same_tenant(cluster, models):
    started = threading.Event()

    def long():
        with cluster.http("alice") as h, h.stream("POST", "/v1/completions", headers={"X-Request-Id": "dup-1"},
                                                  json={"model": models[0], "prompt": "x", "max_tokens": 200,
                                                        "stream": True, "ignore_eos": True}) as s:
            for _ in s.iter_lines():
                started.set()

    t = threading.Thread(target=long)
    t.start()
    assert started.wait(60)
    with cluster.http("alice") as h:
        r = h.post("/v1/completions", headers={"X-Request-Id": "dup-1"}, json={"model": models[0], "prompt": "x"})
        assert r.status_code == 409 and r.json()["error"]["param"] == "X-Request-Id"
    with cluster.http("bob") as h:  # another tenant's ids are its own
        assert h.post("/v1/completions", headers={"X-Request-Id": "dup-1"},
                      json={"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200
    t.join()


def test_tokenize_detokenize_and_version(cluster, models):
    with cluster.http("alice") as h:
        t = h.post("/tokenize", json={"model": models[1], "prompt": "hello world", "return_token_strs": True}).json()
        assert t["count"] == len(t["tokens"]) == len(t["token_strs"]) and t["max_model_len"] == 256
        assert h.post("/detokenize", json={"model": models[1], "tokens": t["tokens"]}).json()["prompt"] \
            .endswith("hello world")
        chat = h.post("/tokenize", json={"messages": USER}).json()
        assert chat["count"] > t["count"]
        e = h.post("/detokenize", json={"tokens": [10**9]}).json()["error"]
        assert e["param"] == "tokens"
    with cluster.http("bob") as h:
        assert h.post("/tokenize", json={"model": models[1], "prompt": "x"}).status_code == 404
    v = httpx.get(f"{cluster.url}/version").json()
    assert v["version"].startswith("0.") and v["loraplex"]
