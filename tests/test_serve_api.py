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
from llada_export.serve.api import APIError, completion, decode_data_url, parse_chat
from llada_export.serve.client import chat_body, image_data_url


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
    ({"messages": [{"role": "user", "content": "no picture"}]}, 400, "no_image"),
    (user(text("no picture")), 400, "no_image"),
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
    ({**user(IMG, text("q")), "top_p": 0.9}, 400, "unknown_field"),
    ({**user(IMG, text("q")), "max_tokens": 0}, 400, "max_tokens"),
    ({**user(IMG, text("q")), "max_tokens": "8"}, 400, "max_tokens"),
    ({**user(IMG, text("q")), "cache": "yes"}, 400, "cache"),
    ({**user(IMG, text("q")), "stream": True}, 400, "stream"),
    ({**user(IMG, text("q")), "n": 2}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": [IMG, text("q")]}, {"role": "assistant", "content": "a"}]}, 400,
     "multi-turn"),
    ({"messages": [{"role": "user", "content": [IMG]}, {"role": "system", "content": "late"}]}, 400,
     "one system message"),
]


@pytest.mark.parametrize("body, status, expect", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_refused_with_a_reason(body, status, expect):
    with pytest.raises(APIError) as e:
        parse_chat(body)
    assert e.value.status == status
    assert expect in (e.value.code or "") or expect in e.value.message, e.value.message
    assert json.loads(json.dumps(e.value.body()))["error"]["message"] == e.value.message


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


class _Result:
    def __init__(self, ids):
        self.ids, self.text, self.n_visual, self.kept_visual = ids, "x", 10, [1, 2, 3]
        self.forwards, self.timings, self.graph_calls = 2, {}, {}


def test_completion_reports_stop_and_usage():
    c = completion("m", _Result([5, 6]), prompt_tokens=30, gen_length=8)
    assert c["choices"][0]["finish_reason"] == "stop" and c["usage"] == {
        "prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}
    assert c["llada"]["kept_visual_tokens"] == 3 and c["llada"]["visual_tokens"] == 10
    assert completion("m", _Result(list(range(8))), 30, 8)["choices"][0]["finish_reason"] == "length"


def test_client_places_the_image_where_the_prompt_marks_it():
    img = random_image(8, 8, 0)
    assert parse_chat(chat_body("<image>\nWhat?", img)).prompt == "What?"  # the pipeline adds "<image>\n" back
    assert parse_chat(chat_body("Look:\n<image>\nwhat is it?", img)).prompt == "Look:\n<image>\nwhat is it?"
    kinds = [p["type"] for p in chat_body("Look:\n<image>\nwhat is it?", img)["messages"][0]["content"]]
    assert kinds == ["text", "image_url", "text"]
