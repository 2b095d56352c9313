"""The serving API without Ray: request parsing and its refusals, the completion object, the client's
request body (what the server tests send goes through the same functions)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import random_image
from llada_export.serve.api import (MAX_BODY_BYTES, APIError, check_body_size, completion, decode_data_url,
                                    decode_json, parse_chat)
from llada_export.serve.client import Client, ServerError, chat_body, image_data_url


def png_url(w=40, h=30, seed=0) -> str:
    return image_data_url(random_image(w, h, seed))


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


IMG = {"type": "image_url", "image_url": {"url": png_url()}}


def text(t):
    return {"type": "text", "text": t}


def test_chat_request_with_settings():
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [IMG, text("What colour?")]}],
            "max_tokens": 8, "temperature": 0, "seed": 3, "steps": 4, "block_length": 8, "cache": True,
            "refresh": "never", "factor": 1, "unpruned": True}
    c = parse_chat(body)
    assert (c.prompt, c.system, c.seed, c.unpruned, c.model) == ("What colour?", "Be brief.", 3, True, "m")
    assert c.settings == {"gen_length": 8, "temperature": 0.0, "steps": 4, "block_length": 8, "cache": True,
                          "refresh": None, "factor": 1.0}
    assert c.image.size == (40, 30) and c.image.mode == "RGB"
    assert np.array_equal(np.asarray(c.image), np.asarray(random_image(40, 30, 0)))  # lossless round trip


def test_image_position_follows_the_parts():
    assert parse_chat(user(IMG, text("a"), text("b"))).prompt == "a\nb"  # image first: the default place
    assert parse_chat(user(text("Look:"), IMG, text("what is it?"))).prompt == "Look:\n<image>\nwhat is it?"
    assert parse_chat(user(text("What is in"), IMG)).prompt == "What is in\n<image>"


def test_client_body_parses_back(tmp_path):
    path = tmp_path / "x.png"
    random_image(20, 10, 1).save(path)
    c = parse_chat(chat_body("Q?", path, system="S", max_tokens=4, cache=None))
    assert (c.prompt, c.system, c.settings) == ("Q?", "S", {"gen_length": 4})
    assert np.array_equal(np.asarray(c.image), np.asarray(random_image(20, 10, 1)))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BAD = [  # (body, status, code or message fragment)
    ([1, 2], 400, "JSON object"),
    ({"messages": []}, 400, "non-empty list"),
    (user(IMG, IMG, text("two")), 400, "too_many_images"),
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}, text("q")), 400,
     "invalid_base64"),
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b"not an image")}}, text("q")),
     400, "invalid_image"),
    (user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text("q")), 400,
     "invalid_image_url"),
    (user({"type": "image_url", "image_url": {"url": "data:image/png," + "x"}}, text("q")), 400, "invalid_image_url"),
    (user({"type": "audio"}, IMG), 400, "type 'audio'"),
    (user(IMG, text("where <image> goes")), 400, "<image>"),
    ({**user(IMG, text("q")), "top_k": 5}, 400, "unknown_field"),
    ({**user(IMG, text("q")), "max_tokens": 0}, 400, "max_tokens"),
    ({**user(IMG, text("q")), "max_tokens": "8"}, 400, "max_tokens"),
    ({**user(IMG, text("q")), "cache": "yes"}, 400, "cache"),
    ({**user(IMG, text("q")), "stream": "yes"}, 400, "stream must be true or false"),
    ({**user(IMG, text("q")), "n": 2}, 400, "n 2 is not supported: one answer per request; send 1"),
    ({"messages": [{"role": "user", "content": [IMG, text("q")]}, {"role": "assistant", "content": "a"}]}, 400,
     "the last message is the assistant's: end with the user message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, 400, "(there is none)"),
    ({"messages": [{"role": "system", "content": "s"}]}, 400, "(there is none)"),
    ({**user(IMG, text("q")), "seed": "1"}, 400, "seed must be an integer"),
    ({**user(IMG, text("q")), "seed": 1.5}, 400, "seed must be an integer"),
    ({**user(IMG, text("q")), "temperature": "hot"}, 400, "temperature must be a number"),
    ({**user(IMG, text("q")), "temperature": 10**400}, 400, "temperature must be a finite number"),
    ({"messages": [{"role": "user", "content": [IMG]}, {"role": "system", "content": "late"}]}, 400,
     "end with the user message"),
    ({"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": [IMG, text("q")]}]}, 400, "the image goes in the first user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "x"}]}, 400,
     "this server calls no tools"),
]


@pytest.mark.parametrize("body, status, expect", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_refused_with_a_reason(body, status, expect):
    with pytest.raises(APIError) as e:
        parse_chat(body)
    assert e.value.status == status
    assert expect in (e.value.code or "") or expect in e.value.message, e.value.message
    assert json.loads(json.dumps(e.value.body()))["error"]["message"] == e.value.message
    assert "object at 0x" not in e.value.message  # no repr of Pillow's buffer (it was <_io.BytesIO object at 0x..>)


def test_body_limit_and_json_that_nests_too_deeply():
    check_body_size(MAX_BODY_BYTES)
    with pytest.raises(APIError) as e:
        check_body_size(MAX_BODY_BYTES + 1)
    assert e.value.status == 413 and e.value.code == "request_too_large" and "16 MiB" in e.value.message
    with pytest.raises(APIError) as e:
        decode_json(b"[" * 100_000)  # json.loads: RecursionError, which was a plain-text 500
    assert e.value.status == 400 and e.value.code == "invalid_json" and "too deeply" in e.value.message
    assert decode_json(b"[[1], {\"a\": 2}]") == [[1], {"a": 2}]


def test_image_over_the_size_limit_is_413_before_decoding():
    big = "data:image/png;base64," + "A" * (2 * 2**20)
    with pytest.raises(APIError) as e:
        decode_data_url(big, max_bytes=2**20)
    assert e.value.status == 413 and e.value.code == "image_too_large"


def test_huge_image_is_refused_before_it_is_decoded():
    buf = io.BytesIO()
    Image.new("RGB", (8000, 6000)).save(buf, format="PNG")  # 48 Mpixel: 140 KB of PNG, 144 MB decoded
    with pytest.raises(APIError) as e:
        decode_data_url("data:image/png;base64," + b64(buf.getvalue()))
    assert e.value.status == 413 and "8000x6000" in e.value.message


def _result(ids, finish_reason):
    from llada_export.runtime.pipeline import GenerationResult

    return GenerationResult("x", ids, kept_visual=[1, 2, 3], n_visual=10, forwards=2,
                            settings={"gen_length": 8, "seed": 3}, finish_reason=finish_reason)


def test_completion_reports_stop_usage_and_the_settings():
    c = completion("m", _result([5, 6], "stop"), prompt_tokens=30, gen_length=8)
    assert c["choices"][0]["finish_reason"] == c["llada"]["finish_reason"] == "stop" and c["usage"] == {
        "prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}
    assert c["llada"]["kept_visual_tokens"] == 3 and c["llada"]["visual_tokens"] == 10
    assert c["llada"]["settings"] == {"gen_length": 8, "seed": 3}  # what reproduces the answer
    assert completion("m", _result(list(range(8)), "length"), 30, 8)["choices"][0]["finish_reason"] == "length"


def test_client_places_the_image_where_the_prompt_marks_it():
    img = random_image(8, 8, 0)
    assert parse_chat(chat_body("<image>\nWhat?", img)).prompt == "What?"  # the pipeline adds "<image>\n" back
    assert parse_chat(chat_body("Look:\n<image>\nwhat is it?", img)).prompt == "Look:\n<image>\nwhat is it?"
    kinds = [p["type"] for p in chat_body("Look:\n<image>\nwhat is it?", img)["messages"][0]["content"]]
    assert kinds == ["text", "image_url", "text"]


# ---------------------------------------------------------------------- the client against a local http.server
class _Flaky:
    """A stdlib HTTP server on loopback: GET /flaky answers 503 (a JSON error) twice, then 200; GET /bad
    always 400; GET /overloaded 503 with ``Retry-After: 1`` (what an overloaded llada-serve sends) at every
    odd request, 200 at every even one. ``hits`` counts the requests per path, ``times`` their arrivals."""

    def __init__(self):
        import http.server
        import threading
        import time

        hits: dict[str, int] = {}
        times: dict[str, list[float]] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                n = hits[self.path] = hits.get(self.path, 0) + 1
                times.setdefault(self.path, []).append(time.perf_counter())
                status, body = ((503, {"error": {"message": "replica restarting"}}) if self.path == "/flaky" and n <= 2
                                else (400, {"error": {"message": "seed must be an integer in [0, 2**63)"}})
                                if self.path == "/bad" else
                                (503, {"error": {"message": "the server is overloaded", "code": "server_overloaded"}})
                                if self.path == "/overloaded" and n % 2 else (200, {"ok": n}))
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 503 and self.path == "/overloaded":
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.hits, self.times = hits, times
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    server = _Flaky()
    yield server
    server.close()


def test_client_retries_server_failures_and_never_a_bad_request(flaky):
    client = Client(flaky.url, retries=3, backoff_s=0.01)
    assert client.get("/flaky") == {"ok": 3} and flaky.hits["/flaky"] == 3  # 503, 503, then the answer
    with pytest.raises(ServerError) as e:
        client.get("/bad")
    assert flaky.hits["/bad"] == 1  # a 4xx is the caller's to fix: sent once
    assert e.value.status == 400 and str(e.value) == "HTTP 400: seed must be an integer in [0, 2**63)"
    flaky.hits.clear()
    with pytest.raises(ServerError) as e:
        Client(flaky.url, retries=1, backoff_s=0.01).get("/flaky")
    assert e.value.status == 503 and flaky.hits["/flaky"] == 2  # retries=1: two attempts, then the error


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://127.0.0.1:8000", "http://"])
def test_client_refuses_a_url_that_is_no_http_url(url):
    with pytest.raises(ValueError, match="is not an http:// or https:// URL"):
        Client(url)
    assert Client("http://127.0.0.1:8000/").url == "http://127.0.0.1:8000"


# ---------------------------------------------------------------------- OpenAI fields, conversations, streaming
def test_every_openai_field_at_an_honoured_value_is_accepted():
    """Each field of the official client's chat.completions.create (openai 3.63) at a value this server honours,
    or null (the client sends null for a field given as None): accepted, with what it asks for."""
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    honoured = {"model": "m", "max_completion_tokens": 8, "temperature": 0.5, "seed": 7, "n": 1, "stream": True,
                "stream_options": {"include_usage": True}, "stop": ["\n", "END"], "user": "u",
                "safety_identifier": "s", "prompt_cache_key": "k", "metadata": {"a": "b"}, "store": False,
                "service_tier": "auto", "top_p": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
                "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "functions": [],
                "function_call": "none", "modalities": ["text"], "reasoning_effort": "none", "verbosity": "medium"}
    sent = set(CompletionCreateParamsBase.__annotations__) - {"messages", "max_tokens"}
    c = parse_chat({**user(IMG, text("q")), **honoured})
    assert (c.seed, c.stream, c.include_usage, c.stop, c.model) == (7, True, True, ("\n", "END"), "m")
    assert c.settings == {"gen_length": 8, "temperature": 0.5}
    nulls = parse_chat({**user(IMG, text("q")), **{k: None for k in sent | {"max_tokens"}}})
    assert (nulls.stream, nulls.stop, nulls.settings, nulls.seed) == (False, (), {}, 0)
    assert sent - set(honoured) <= {"audio", "prediction", "web_search_options", "moderation",
                                    "prompt_cache_options", "prompt_cache_retention"}  # null only: checked below


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("top_p", 0.5), ("top_p", True), ("presence_penalty", 0.1), ("frequency_penalty", 2),
    ("logit_bias", {"1": 2}), ("logprobs", True), ("top_logprobs", 2), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}), ("modalities", ["text", "audio"]),
    ("store", True), ("service_tier", "flex"), ("reasoning_effort", "low"), ("verbosity", "high"),
    ("audio", {"voice": "alloy"}), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("moderation", {}), ("prompt_cache_retention", "24h")])
def test_openai_values_the_model_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(APIError) as e:
        parse_chat({**user(IMG, text("q")), field: value})
    assert (e.value.status, e.value.param, e.value.code) == (400, field, "unsupported_value")
    assert e.value.message.startswith(f"{field} {json.dumps(value)[:20]}") and "is not supported: " in e.value.message
    assert f"leave {field} out" in e.value.message


@pytest.mark.parametrize("body, expect", [
    ({"stop": ""}, "stop must be a non-empty string"), ({"stop": ["a", 1]}, "stop must be"),
    ({"stop": list("abcde")}, "at most 4"), ({"stream_options": {"include_usage": True}}, "only allowed with stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage must be true or false"),
    ({"stream": True, "stream_options": {"chunks": 2}}, "stream_options.chunks is not supported"),
    ({"user": 3}, "user must be a string"), ({"metadata": {"a": 1}}, "metadata must be an object of strings"),
    ({"max_tokens": 4, "max_completion_tokens": 4}, "not both"),
    ({"max_completion_tokens": 0}, "max_completion_tokens")])
def test_openai_fields_with_bad_values(body, expect):
    with pytest.raises(APIError) as e:
        parse_chat({**user(IMG, text("q")), **body})
    assert e.value.status == 400 and expect in e.value.message, e.value.message


def test_text_only_and_conversations_parse_to_turns():
    """No image: image None. A conversation: the leading system (or developer) message, the earlier turns in
    order, the last user message as the prompt; the image of the first user turn."""
    c = parse_chat({"messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    assert (c.image, c.prompt, c.system, c.history) == (None, "What is 2 + 2?", None, ())
    c = parse_chat({"messages": [{"role": "developer", "content": [text("Be brief.")]},
                                 {"role": "user", "content": [IMG, text("What colour?")], "name": "ann"},
                                 {"role": "assistant", "content": "red"},
                                 {"role": "system", "content": "Now in French."},
                                 {"role": "user", "content": "And the shape?"}]})
    assert (c.system, c.prompt, c.image.size) == ("Be brief.", "And the shape?", (40, 30))
    assert c.history == (("user", "What colour?"), ("assistant", "red"), ("system", "Now in French."))


def test_conversations_render_with_the_official_chat_template():
    """Per message ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` after the BOS, the
    assistant header last; the image marker in the first user turn (written out here by hand)."""
    from llada_export.demo import DEMO_MODEL
    from llada_export.tokenizer import IMAGE_SENTINEL, encode_prompt, format_prompt, load_tokenizer

    tok = load_tokenizer(DEMO_MODEL)
    history = [("user", "What colour?"), ("assistant", "red")]
    expect = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd the shape?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert format_prompt(tok, "And the shape?", "Be brief.", [("user", "<image>\nWhat colour?"), history[1]]) == expect
    before, after = encode_prompt(tok, "And the shape?", has_image=True, system="Be brief.", history=history)
    head, tail = expect.split("<image>\n")  # the official tokenizer_image_token drops the "\n" after <image>
    assert (tok.decode(before), tok.decode(after)) == (head, tail) and IMAGE_SENTINEL not in before + after
    ids, none = encode_prompt(tok, "And the shape?", has_image=False, system="Be brief.", history=history)
    assert tok.decode(ids) == expect.replace("<image>\n", "") and none == []


def test_text_stream_sends_the_committed_prefix_and_holds_back_a_possible_stop():
    """Deltas concatenate to the final answer; text that may start a stop string waits; a stop string ends it."""
    from llada_export.serve.stream import TextStream, answer_with_stop, committed_prefix

    M, E = 99, 98
    assert committed_prefix([1, 2, M, 3, M], M, E) == ([1, 2], False)
    assert committed_prefix([1, E, M, 3], M, E) == ([1], True)
    assert committed_prefix([M, 1], M, E) == ([], False)
    decode = "".join
    s = TextStream(decode, stop=("END",))
    assert [s.feed(list("ab")), s.feed(list("ab")), s.feed(list("abE")), s.feed(list("abEN")), s.feed(list("abENx"))] \
        == ["ab", "", "", "", "ENx"]
    assert s.finish("abENxy") == "y" and s.sent == "abENxy" and not s.stopped
    s = TextStream(decode, stop=("END", "!"))
    assert s.feed(list("hi EN")) == "hi " and s.feed(list("hi END and")) == "" and s.stopped and s.stop_tokens == 10
    assert s.finish("hi END and more") == "" and s.sent == "hi "
    assert answer_with_stop(decode, list("hi END and"), "hi END and", ("END",)) == ("hi ", 6, True)
    assert answer_with_stop(decode, list("hi"), "hi", ("END",)) == ("hi", 2, False)


def test_client_body_without_an_image_is_text_only():
    c = parse_chat(chat_body("What is 2 + 2?", None, system="S", stream=True, stop=["\n"]))
    assert (c.image, c.prompt, c.system, c.stream, c.stop) == (None, "What is 2 + 2?", "S", True, ("\n",))


@pytest.mark.parametrize("given, want", [
    (["*"], ("*",)), (["http://localhost:3000"], ("http://localhost:3000",)),
    (["HTTPS://App.Example", "https://app.example"], ("https://app.example",)),  # as browsers spell it, once
    (["http://[::1]:8080"], ("http://[::1]:8080",))])
def test_allowed_origins_take_what_a_browser_sends(given, want):
    from llada_export.serve.cors import check_origins

    assert check_origins(given) == want


@pytest.mark.parametrize("bad", ["localhost:3000", "http://localhost:3000/", "http://x/app", "ftp://x", "http://",
                                 "http://x:0", "http://x:70000", "http://u:p@x", "http://x?y", "null", ""])
def test_what_is_no_origin_is_refused_with_the_form(bad):
    from llada_export.serve.cors import check_origins

    with pytest.raises(ValueError, match=r"is not an origin; give '\*' or scheme://host\[:port\]"):
        check_origins([bad])


def test_cors_headers_only_for_an_allowed_origin():
    from llada_export.serve.cors import answer_headers, preflight_headers

    allowed = ("http://localhost:3000",)
    assert answer_headers("http://localhost:3000", allowed) == {
        "Access-Control-Allow-Origin": "http://localhost:3000", "Vary": "Origin"}
    assert answer_headers("http://localhost:3001", allowed) == {} == answer_headers(None, allowed)
    assert answer_headers("http://localhost:3000", ()) == {}  # the default: no CORS at all
    assert answer_headers("http://any.example", ("*",)) == {"Access-Control-Allow-Origin": "*"}
    pre = preflight_headers("http://localhost:3000", None, allowed)
    assert pre["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert pre["Access-Control-Allow-Headers"] == "authorization, content-type"  # what the openai clients send
    assert "Access-Control-Allow-Credentials" not in pre and preflight_headers("http://evil", None, allowed) is None


def test_client_waits_out_an_overloaded_servers_retry_after_then_gets_the_answer(flaky):
    """A 503 with ``Retry-After: 1``, then the answer: the client resends after at least that second (its own
    backoff is 10 ms); a client without retries raises the 503 with the server's message."""
    assert Client(flaky.url, retries=1, backoff_s=0.01).get("/overloaded") == {"ok": 2}
    first, second = flaky.times["/overloaded"]
    assert second - first >= 1.0, (first, second)
    with pytest.raises(ServerError) as e:
        Client(flaky.url, retries=0).get("/overloaded")
    assert e.value.status == 503 and "overloaded" in str(e.value)


@pytest.mark.parametrize("value, seconds", [(None, 0.0), ("2", 2.0), ("0.5", 0.5), ("600", 60.0), ("-3", 0.0),
                                            ("nan", 0.0), ("inf", 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_takes_delay_seconds_up_to_a_minute_and_ignores_the_rest(value, seconds):
    from llada_export.serve.client import retry_after

    assert retry_after(value) == seconds
