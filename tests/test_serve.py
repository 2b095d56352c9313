"""llada-serve end to end on the CPU: the CLI starts a local Ray cluster with two replicas of the demo
model's engines (batch size 4, prefix cache); answers over HTTP are checked against the pipeline
in this process, errors against the API, and the faults (a replica killed during load, a client
that hangs up, shutdown) against what a client and the machine see.

One server for the module (`make test` runs pytest-xdist with --dist loadfile: a module stays on one
worker).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llada_export.demo import DEMO_KEEP

from helpers import load_tool
from test_cancel import ServeCancellation
from llada_export import vqa_task
from llada_export.serve.client import Client, ServerError, chat_body, image_data_url

ROOT = Path(__file__).resolve().parents[1]
REPLICA = "ServeReplica:llada:LLaDAServer"


# ---------------------------------------------------------------------- processes
def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def replicas(server) -> list[int]:
    return [p for p in descendants(server["proc"].pid) if REPLICA in cmdline(p) and alive(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALLOWED_ORIGIN = "http://app.example:3000"  # the one origin whose pages the server's --allowed-origins lets call it
MAX_QUEUED = 16  # per replica: the 16 requests at once that other tests send fit even if all go to one replica


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def serve_engines(demo_cache_engines):
    """The demo model's engines with make demo's pruning (K 3, keep 0.75) and the prefix cache, batch size 4
    (conftest's, shared with test_cache)."""
    return demo_cache_engines


@pytest.fixture(scope="module")
def server(serve_engines):
    """``llada-serve`` as a user runs it: 2 replicas, max batch 4, 1 thread each, a fixed metrics port, no
    --temp-dir (Ray's temp root, RAY_TMPDIR, is a short folder of this module's: the session folder in it
    is the server's to remove when it stops)."""
    tmp = tempfile.mkdtemp(prefix="llsv_", dir="/tmp")
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
    cmd = [sys.executable, "-m", "llada_export.cli.serve", "--engines", str(serve_engines), "--replicas", "2",
           "--port", str(port), "--threads", "1", "--batch-wait-ms", "100",
           "--cpus-per-replica", "0.5", "--model-name", "demo", "--metrics-port", str(metrics_port),
           "--allowed-origins", ALLOWED_ORIGIN, "--max-queued", str(MAX_QUEUED)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ready = threading.Event()
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    t0 = time.perf_counter()
    while not ready.wait(1):
        if proc.poll() is not None or time.perf_counter() - t0 > 300:
            proc.kill()
            pytest.fail(f"llada-serve did not start (rc {proc.poll()}): {proc.stderr.read()[-3000:]}")
    print(f"llada-serve ready in {time.perf_counter() - t0:.0f} s: {''.join(lines)}")
    info = {"proc": proc, "url": f"http://127.0.0.1:{port}", "tmp": tmp, "lines": lines, "metrics_port": metrics_port}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def direct(serve_engines):
    """The single-request pipeline on the same engines, in this process: the oracle."""
    from llada_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(serve_engines)
    cache: dict = {}

    def answer(i: int, **settings) -> str:
        key = (i, tuple(sorted(settings.items())))
        if key not in cache:
            img, q, _ = ITEMS[i]
            cache[key] = pipe.generate(img, q, **settings).text
        return cache[key]

    answer.pipe = pipe  # for requests beyond ITEMS' (text only, conversations)
    return answer


ITEMS = [(s.image(), s.prompt, s.answer) for s in vqa_task.make_split("test", 12)]


def ask(url: str, i: int, **fields) -> dict:
    img, q, _ = ITEMS[i]
    return Client(url, timeout_s=120, retries=0).chat(q, img, **fields)


def text_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------- answers
def test_concurrent_requests_are_batched_and_answer_as_the_pipeline(server, direct):
    """8 different images and questions at once: batched (some batch > 1), each answer identical to
    the single-request pipeline and right on the task (the demo model is trained)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        replies = list(ex.map(lambda i: ask(server["url"], i), range(8)))
    for i, r in enumerate(replies):
        assert text_of(r) == direct(i), i
        assert r["model"] == "demo" and r["object"] == "chat.completion"
        # the demo model answers in up to 15 tokens and <|eot_id|>: "length" when it used all 16 (one wrong list)
        assert r["choices"][0]["finish_reason"] == ("stop" if r["usage"]["completion_tokens"] < 16 else "length")
        assert r["llada"]["visual_tokens"] == 594 and r["llada"]["kept_visual_tokens"] == round(594 * DEMO_KEEP)
        assert r["usage"]["completion_tokens"] >= 1
    assert max(r["llada"]["batch"]["size"] for r in replies) > 1
    assert sum(text_of(r).strip() == ITEMS[i][2] for i, r in enumerate(replies)) >= 7


def test_requests_that_arrive_during_a_batch_join_the_next_one(server, direct):
    """Steady arrivals, each later than the server's batch wait (100 ms) after the one before: Serve's
    batcher alone closes every batch with the one request of its window while the engine is busy
    (mean batch 1.0, queues growing); requests that arrive during a batch must share the next one."""
    replies: dict[int, dict] = {}

    def send(i: int):
        replies[i] = ask(server["url"], i)

    threads = []
    for i in range(10):
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        time.sleep(0.15)
    for t in threads:
        t.join(120)
    assert sorted(replies) == list(range(10))
    assert all(text_of(replies[i]) == direct(i) for i in range(10))
    sizes = [replies[i]["llada"]["batch"]["size"] for i in range(10)]
    # the first few may meet by chance while the replicas are idle; from then on the engines are busy.
    # Measured: without the wait for an idle engine sizes[4:] were all 1, with it 3 to 4 each.
    assert sum(size > 1 for size in sizes[4:]) >= 3, sizes


def test_a_short_answer_is_sent_when_its_row_is_done(server, direct):
    """Short and long answers in one batch (block length 4: a one-word answer is done after its first block,
    one forward; a list needs four): each reply leaves when its own row is done, not when its batch ends. In
    a batch, a row that needed fewer forwards than another was answered after fewer of the batch's graph
    calls (``llada.graph_calls`` counts them up to the answer) and sooner (``llada.batch.seconds``). Every
    answer is the pipeline's. Two replicas share the requests: rounds repeat until a batch held both kinds."""
    from concurrent.futures import ThreadPoolExecutor

    order = [4, 1, 6, 5, 8, 7, 9, 11]  # 4, 6, 8: lists (4 forwards); the others one word or number (1)
    mixed = 0
    for _ in range(4):
        with ThreadPoolExecutor(len(order)) as ex:
            replies = dict(zip(order, ex.map(lambda i: ask(server["url"], i, block_length=4), order)))
        assert {i: text_of(r) for i, r in replies.items()} == {i: direct(i, block_length=4) for i in order}
        batches: dict[str, list[dict]] = {}
        for r in replies.values():
            batches.setdefault(r["llada"]["batch"]["id"], []).append(r["llada"])
        for rows in batches.values():
            longest = max(rows, key=lambda x: x["forwards"])
            for x in rows:
                if x["forwards"] < longest["forwards"]:
                    mixed += 1
                    assert sum(x["graph_calls"].values()) < sum(longest["graph_calls"].values()), rows
                    assert x["batch"]["seconds"] < longest["batch"]["seconds"], rows
        if mixed:
            break
    assert mixed, "no batch held a short and a long answer in four rounds"


def test_settings_are_honoured_and_batched_apart(server, direct):
    """A request without the cache and one with a parallel rule answer as the pipeline does with
    those settings; requests of different settings never share a batch."""
    from concurrent.futures import ThreadPoolExecutor

    settings = [{"cache": False}, {"threshold": 0.8}, {}, {"cache": False}]  # the default rule: threshold 0.9
    with ThreadPoolExecutor(4) as ex:
        replies = list(ex.map(lambda a: ask(server["url"], a[0], **a[1]), enumerate(settings)))
    for (i, s), r in zip(enumerate(settings), replies):
        assert text_of(r) == direct(i, **s)
        assert ("cache" in r["llada"]["setting"]) == (s.get("cache", True))
    assert "threshold 0.8" in replies[1]["llada"]["setting"] and replies[1]["llada"]["batch"]["size"] == 1
    assert replies[2]["llada"]["batch"]["size"] == 1


def test_models_and_health(server):
    c = Client(server["url"])
    assert c.health()["status"] == "ok"
    m = c.models()["data"][0]
    assert m["id"] == "demo" and m["llada"]["batch_size"] == 4 and m["llada"]["prefix_cache"] is True
    assert m["llada"]["max_tokens"] == 16 and m["llada"]["backend"] == "onnxruntime"


def http_call(url: str, method: str, headers: dict, data: bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one plain HTTP call, errors included."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_browser_pages_of_the_allowed_origin_may_call_it_and_no_other(server, direct):
    """CORS as a browser does it: the preflight of a page of the allowed origin gets a 204 naming the methods
    and the headers it asked for, and the answers it then gets (plain and streamed) carry its origin; another
    origin's preflight is a 403 and its answers carry no CORS header (its browser hands the page nothing);
    a call without an Origin header (curl, the openai client) gets none either."""
    chat = server["url"] + "/v1/chat/completions"
    ask_ = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    status, headers, body = http_call(chat, "OPTIONS", ask_)
    assert status == 204 and body == b"", (status, body)
    assert headers["access-control-allow-origin"] == ALLOWED_ORIGIN and headers["vary"] == "Origin"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    status, headers, body = http_call(chat, "OPTIONS", {**ask_, "Origin": "http://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in headers

    img, q, _ = ITEMS[1]
    plain = json.dumps(chat_body(q, img)).encode()
    json_type = {"Content-Type": "application/json"}
    status, headers, body = http_call(chat, "POST", {**json_type, "Origin": ALLOWED_ORIGIN}, plain)
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert text_of(json.loads(body)) == direct(1)
    streamed = json.dumps({**chat_body(q, img), "stream": True}).encode()
    status, headers, body = http_call(chat, "POST", {**json_type, "Origin": ALLOWED_ORIGIN}, streamed)
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert headers["content-type"].startswith("text/event-stream") and body.rstrip().endswith(b"data: [DONE]")
    for origin in ("http://evil.example", None):
        status, headers, body = http_call(server["url"] + "/v1/models", "GET", {"Origin": origin} if origin else {})
        assert status == 200 and json.loads(body)["data"][0]["id"] == "demo"
        assert not any(k.startswith("access-control-") for k in headers), headers
    status, headers, _ = http_call(server["url"] + "/nowhere", "GET", {"Origin": ALLOWED_ORIGIN})
    assert status == 404 and headers["access-control-allow-origin"] == ALLOWED_ORIGIN  # the page may read why


def test_llada_generate_server(server):
    img, q, truth = ITEMS[0]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "q.png"
        img.save(path)
        r = subprocess.run([sys.executable, "-m", "llada_export.cli.generate", "--server", server["url"],
                            "--image", str(path), "--prompt", q], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == truth


def replica_log_count(server, text: str) -> int:
    """How many times the replicas' logs say ``text``."""
    logs = Path(server["tmp"]) / "ray" / "session_latest" / "logs" / "serve"
    return sum(f.read_text(errors="replace").count(text) for f in logs.glob("replica_*.log"))


# The hang-up tests' setting: one token per step, so that a batch lasts 16 forwards. With the default threshold
# rule the demo model's batch ends in a forward or two, often before Serve's proxy has noticed the closed
# socket (under CPU load most of all): the row was then answered, not cancelled, and nothing was logged.
SLOW = {"fixed_schedule": True}


def send_then_hang_up(server, body: bytes, wait_for: bytes = b"") -> bytes:
    """POST ``body``, read until ``wait_for`` arrives (nothing by default), then close the socket while the
    request's batch runs; returns what was read."""
    host, port = server["url"].rsplit("/", 1)[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    read = b""
    while wait_for not in read:
        read += s.recv(4096)
    time.sleep(0.6)  # in its batch by now (batch wait 100 ms), and the batch not done (about a second)
    s.close()
    return read


# ---------------------------------------------------------------------- the official openai client
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def openai_user(i: int) -> list[dict]:
    """ITEMS[i] as the official client's users write it: the image part first, then the question."""
    img, q, _ = ITEMS[i]
    return [{"type": "image_url", "image_url": {"url": image_data_url(img), "detail": "auto"}},
            {"type": "text", "text": q.removeprefix("<image>\n")}]


def streamed(stream) -> tuple[list[str], list]:
    """``for chunk in stream``: (the content pieces, the chunks)."""
    pieces, chunks = [], []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, chunks


# every field the task names at the value the model honours (or the neutral value of one it does not use)
NEUTRAL_FIELDS = dict(temperature=0, seed=0, n=1, user="tester", logprobs=False, response_format={"type": "text"},
                      top_p=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, store=False,
                      service_tier="auto", tool_choice="none", parallel_tool_calls=False, modalities=["text"],
                      metadata={"run": "test"}, safety_identifier="s", prompt_cache_key="k")


def test_openai_client_plain_and_streamed_answers_are_the_pipelines(server, direct):
    """The official client, an image question with every honoured / neutral field set: the plain answer, a
    streamed one (``for chunk in stream``, usage included) and a streamed one with block_length 8 < gen 16
    (the committed prefix grows block by block: more than one piece) are the pipeline's, sent together
    (the streams batch with the plain requests)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server)

    def plain(i: int):
        return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": openai_user(i)}],
                                              max_completion_tokens=16, **NEUTRAL_FIELDS)

    def stream(i: int, **extra):
        return streamed(client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": openai_user(i)}], max_tokens=16, stream=True,
            stream_options={"include_usage": True}, **NEUTRAL_FIELDS, **extra))

    with ThreadPoolExecutor(6) as ex:
        plains = [ex.submit(plain, i) for i in (4, 6, 1)]
        streams = [ex.submit(stream, i) for i in (4, 6, 1)]
        blocks = ex.submit(stream, 6, extra_body={"block_length": 8})
        plains, streams = [f.result() for f in plains], [f.result() for f in streams]
        bpieces, bchunks = blocks.result()
    for i, p, (pieces, chunks) in zip((4, 6, 1), plains, streams):
        assert p.choices[0].message.content == direct(i) == "".join(pieces), i
        assert p.choices[0].finish_reason == chunks[-2].choices[0].finish_reason
        assert p.choices[0].finish_reason == ("stop" if p.usage.completion_tokens < 16 else "length")
        assert chunks[0].choices[0].delta.role == "assistant" and not chunks[-1].choices
        assert chunks[-1].usage.completion_tokens == p.usage.completion_tokens >= 1
        assert chunks[-1].usage.prompt_tokens == p.usage.prompt_tokens
        assert all(c.usage is None for c in chunks[:-1])
    assert max(c[-2].model_extra["llada"]["batch"]["size"] for _, c in streams) > 1  # streams batch like the rest
    assert "".join(bpieces) == direct(6, block_length=8) and len(bpieces) >= 2, bpieces
    assert len(direct(6, block_length=8)) > 0 and bchunks[-2].choices[0].finish_reason == "stop"


def test_openai_client_text_only_system_and_conversation(server, direct):
    """No image (the visual slots stay padded), a system message, and a conversation whose first user turn
    holds the image: each answer is Pipeline.generate's for the same turns, rendered by the chat template."""
    client = openai_client(server)
    pipe = direct.pipe
    img, q1, _ = ITEMS[1]  # "What digit is shown?": a short first turn (the engines take 71 text tokens)
    q1 = q1.removeprefix("<image>\n")

    def ask_openai(messages, **kw):
        r = client.chat.completions.create(model="demo", messages=messages, max_tokens=16, **kw)
        return r.choices[0].message.content

    text_only = ask_openai([{"role": "user", "content": "What digit is shown?"}])
    assert text_only == pipe.generate(None, "What digit is shown?").text
    system = ask_openai([{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}])
    assert system == pipe.generate(None, "Describe the image.", system="Answer in one word.").text
    turns = [{"role": "developer", "content": "Be brief."},  # the client's newer name for the system message
             {"role": "user", "content": openai_user(1)},
             {"role": "assistant", "content": direct(1)},
             {"role": "user", "content": "Read the number."}]
    chat = ask_openai(turns)
    expect = pipe.generate(img, "Read the number.", system="Be brief.",
                           history=(("user", q1), ("assistant", direct(1))))
    assert chat == expect.text and expect.settings["history"] == [["user", q1], ["assistant", direct(1)]]
    pieces, _ = streamed(client.chat.completions.create(model="demo", messages=turns, max_tokens=16, stream=True))
    assert "".join(pieces) == chat


def test_openai_client_stop_strings(server, direct):
    """``stop``: the answer cut before the first stop string, finish_reason "stop", plain and streamed alike;
    a stop string the answer does not hold changes nothing."""
    client = openai_client(server)
    full = direct(6)  # "2 shapes: ..." (a long answer)
    cut_at = full.index(":")
    messages = [{"role": "user", "content": openai_user(6)}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=16, stop=[":", "zzz"])
    assert r.choices[0].message.content == full[:cut_at] and r.choices[0].finish_reason == "stop"
    assert 1 <= r.usage.completion_tokens < len(pipe_ids := direct.pipe.tokenizer(full).input_ids) + 2, pipe_ids
    pieces, chunks = streamed(client.chat.completions.create(model="demo", messages=messages, max_tokens=16,
                                                             stop=":", stream=True))
    assert "".join(pieces) == full[:cut_at] and chunks[-1].choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=16, stop="zzz")
    assert r.choices[0].message.content == full


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("top_p", 0.5), ("logprobs", True), ("response_format", {"type": "json_object"}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"42": 5}), ("top_logprobs", 3),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tool_choice", "required"),
    ("reasoning_effort", "high"), ("store", True), ("audio", {"voice": "alloy", "format": "wav"})])
def test_openai_client_refusals_name_the_field(server, field, value):
    """A value the model cannot honour: a 400 whose message names the field and what this server supports."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        openai_client(server).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What digit is shown?"}], **{field: value})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == field and err["code"] == "unsupported_value"
    assert err["message"].startswith(f"{field} ") and "is not supported" in err["message"]
    assert "leave" in err["message"], err["message"]


def test_streaming_client_that_hangs_up_does_not_break_its_batch(server, direct):
    """A streaming caller reads its first chunk and closes its socket while its batch runs: the requests sent
    with it answer as the pipeline does, the replica logs the hang-up, and a stream after it answers in full."""
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps(chat_body(*ITEMS[6][1::-1], stream=True, **SLOW)).encode()
    logged = "a streaming caller hung up"
    before = replica_log_count(server, logged)
    others = (5, 7, 8, 9, 10, 11)
    with ThreadPoolExecutor(7) as ex:
        gone = ex.submit(send_then_hang_up, server, body, b"data: ")  # the role chunk, sent before the batch runs
        time.sleep(0.02)
        replies = [ex.submit(ask, server["url"], i, **SLOW) for i in others]
        first, replies = gone.result(), [r.result() for r in replies]
    assert b"200 OK" in first and b"text/event-stream" in first and b'"role": "assistant"' in first, first
    assert [text_of(r) for r in replies] == [direct(i, **SLOW) for i in others]
    deadline = time.perf_counter() + 20
    while replica_log_count(server, logged) == before:
        assert time.perf_counter() < deadline, "no replica logged the streaming caller that hung up"
        time.sleep(0.5)
    img, q, _ = ITEMS[6]
    final: list = []
    pieces = list(Client(server["url"], timeout_s=120, retries=0).chat_stream(q, img, final=final))
    assert "".join(pieces) == direct(6) and final[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_llada_generate_stream_local_and_server(server, serve_engines, direct, monkeypatch, tmp_path):
    """``llada-generate --stream`` prints the committed prefix as it grows (block_length 8 < gen 16: more than one
    write of text before the end), locally and through the server; the printed answer is the pipeline's."""
    from llada_export.cli.generate import main

    img, q, _ = ITEMS[6]
    path = tmp_path / "q.png"
    img.save(path)
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    args = ["--image", str(path), "--prompt", q, "--block-length", "8", "--stream"]
    assert main(["--engines", str(serve_engines), *args]) == 0
    monkeypatch.undo()
    expect = direct(6, block_length=8)
    assert "".join(writes) == expect + "\n" and len([w for w in writes if w.strip()]) >= 2, writes
    r = subprocess.run([sys.executable, "-m", "llada_export.cli.generate", "--server", server["url"], *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == expect + "\n", r.stderr[-2000:]


# ---------------------------------------------------------------------- errors
def post_raw(url: str, data: bytes, path: str = "/v1/chat/completions", method: str = "POST"):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=data if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def runtime_refusal(value, field: str) -> str:
    """What the Python API says of ``value`` for ``field`` (a seed, or a sampler setting)."""
    from llada_export.runtime.pipeline import Request
    from llada_export.sampler import GenerationConfig

    with pytest.raises(ValueError) as e:
        if field == "seed":
            Request(None, "q", seed=value).validate()
        else:
            GenerationConfig(16, 16, 16, **{field: value}).validate()
    return str(e.value)


def test_bad_requests_get_4xx_and_nothing_else_is_affected(server, direct):
    """Every refusal the API defines, sent while good requests run: each bad one gets its status and a
    JSON error naming the fault; the good ones answer as before; the server answers afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    img, q, _ = ITEMS[0]
    good = chat_body(q, img)
    big = vqa_task.make_split("test", 1)[0].image().resize((1600, 1200))  # more visual tokens than the bucket
    two = chat_body(q, img)
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": image_data_url(img)}})
    bad_b64 = chat_body(q, img)
    bad_b64["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,%%%"
    bad_img = chat_body(q, img)
    bad_img["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,aGVsbG8="
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps(bad_b64).encode(), 400, "invalid_base64"),
        (json.dumps(bad_img).encode(), 400, "invalid_image"),
        (json.dumps({"messages": [{"role": "user", "content": q}]}).encode(), 400, "invalid_prompt"),  # <image>
        (json.dumps(two).encode(), 400, "too_many_images"),
        (json.dumps(chat_body("word " * 400, img)).encode(), 400, "context_length_exceeded"),
        (json.dumps(chat_body(q, big)).encode(), 400, "context_length_exceeded"),
        (json.dumps({**good, "top_p": 0.5}).encode(), 400, "unsupported_value"),
        (json.dumps({**good, "max_tokens": 64}).encode(), 400, "invalid_settings"),
        (json.dumps({**good, "block_length": 5}).encode(), 400, "invalid_settings"),
        (json.dumps({**good, "unpruned": True}).encode(), 400, "invalid_settings"),
        (json.dumps({**good, "model": "other"}).encode(), 404, "model_not_found"),
        (b"[" * 100_000, 400, "invalid_json"),  # was a plain-text 500 (RecursionError)
        (json.dumps({**good, "seed": 2**70}).encode(), 400, "invalid_settings"),  # was a 500, retried by the client
        (json.dumps({**good, "seed": -1}).encode(), 400, "invalid_settings"),
        (json.dumps(good)[:-1].encode() + b', "temperature": 1e999}', 400, "invalid_settings"),  # inf: was 200, ""
        (json.dumps(good)[:-1].encode() + b', "temperature": NaN}', 400, "invalid_settings"),  # was greedy
        (json.dumps({**good, "max_tokens": 100000}).encode(), 400, "invalid_settings"),
        (json.dumps({**good, "preset": "demo", "max_tokens": 16}).encode(), 400, "invalid_settings"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, None),
        (json.dumps(chat_body("  ", img)).encode(), 400, "invalid_prompt"),  # an image and a blank question
        (json.dumps({**good, "preset": "demo"}).encode(), 400, "invalid_settings"),
    ]
    with ThreadPoolExecutor(6) as ex:
        goods = [ex.submit(ask, server["url"], i) for i in range(3)]
        bads = list(ex.map(lambda c: post_raw(server["url"], c[0]), cases))
        answers = [g.result() for g in goods]
    for (data, status, code), (got, body) in zip(cases, bads):
        assert got == status and body["error"]["code"] == code, (code, got, body)
        assert body["error"]["message"] and "object at 0x" not in body["error"]["message"]  # no <_io.BytesIO ...>
    assert "--max-visual-tokens" in bads[6][1]["error"]["message"]  # says which export flag would fit it
    errors = [body["error"] for _, body in bads[12:]]
    assert [e["param"] for e in errors] == [None, "seed", "seed", "temperature", "temperature", "max_tokens",
                                            "preset", "messages", "messages", "preset"]
    assert "too deeply" in errors[0]["message"]
    for e, (value, check) in zip(errors[1:5], [(2**70, "seed"), (-1, "seed"), (math.inf, "temperature"),
                                               (math.nan, "temperature")]):
        assert e["message"] == runtime_refusal(value, check)  # the Python API's rule and words
    assert "maximum 16" in errors[5]["message"] and "divisible" not in errors[5]["message"]
    assert "preset 'demo' sets block_length 128, steps 128" in errors[6]["message"]
    assert "preset 'demo' sets max_tokens 128, block_length 128" in errors[9]["message"]  # the API's name
    assert "give max_tokens, block_length, steps too" in errors[9]["message"]
    assert "end with the user message to answer (there is none)" in errors[7]["message"]
    assert [text_of(a) for a in answers] == [direct(i) for i in range(3)]
    assert post_raw(server["url"], b"", "/v2/nothing", "GET")[0] == 404
    assert post_raw(server["url"], b"", "/v1/chat/completions", "GET")[0] == 405
    assert text_of(ask(server["url"], 3)) == direct(3)


def test_a_flood_past_max_queued_is_refused_at_once_and_every_request_let_in_is_answered(server, direct):
    """64 requests at once on 2 replicas that let 16 each wait for a batch (--max-queued 16, max batch 4):
    the surplus is refused at once with a 503 server_overloaded, a JSON error, a Retry-After and (from the
    allowed origin) the CORS header, and is counted; every request let in answers as the pipeline; the server
    takes requests again once the flood is served, and then has none waiting."""
    from concurrent.futures import ThreadPoolExecutor

    from test_cancel import metric, wait_for

    chat = server["url"] + "/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Origin": ALLOWED_ORIGIN}
    bodies = [json.dumps(chat_body(ITEMS[i % 12][1], ITEMS[i % 12][0])).encode() for i in range(64)]
    before = metric(server, "llada_overloaded")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as ex:
        replies = list(ex.map(lambda b: (*http_call(chat, "POST", headers, b), time.perf_counter() - t0), bodies))
    refused = [(i, h, json.loads(body), t) for i, (status, h, body, t) in enumerate(replies) if status == 503]
    answered = [(i, json.loads(body)) for i, (status, _, body, _) in enumerate(replies) if status == 200]
    assert len(refused) + len(answered) == 64, [r[0] for r in replies]
    print(f"{len(refused)} refused, {len(answered)} answered")
    assert refused and len(answered) >= MAX_QUEUED, (len(refused), len(answered))
    for _, h, body, t in refused:
        assert body["error"]["code"] == "server_overloaded" and body["error"]["type"] == "server_error"
        assert f"--max-queued {MAX_QUEUED}" in body["error"]["message"]
        assert int(h["retry-after"]) >= 1 and h["access-control-allow-origin"] == ALLOWED_ORIGIN
    # refused at once: before the slowest answer let in (which waited for the batches ahead of it)
    assert max(t for *_, t in refused) < max(t for status, _, _, t in replies if status == 200)
    assert [text_of(a) for _, a in answered] == [direct(i % 12) for i, _ in answered]
    wait_for("the overloaded counter", lambda: metric(server, "llada_overloaded") >= before + len(refused))
    assert text_of(ask(server["url"], 5)) == direct(5)  # room again
    assert Client(server["url"]).health()["waiting"] == 0


# ---------------------------------------------------------------------- faults
def test_client_that_hangs_up_does_not_break_its_batch(server, direct):
    """A caller sends a request and closes its socket: whether its row was already in a running batch (a
    batch whose size counts one more row than the answers that name it) or was left out of the next one
    while queued (with parallel decoding a batch lasts a forward or two, so either can happen), the other
    requests answer as the pipeline does, the replica logs the caller's cancellation, and the next
    request answers normally."""
    from concurrent.futures import ThreadPoolExecutor

    img, q, _ = ITEMS[4]
    body = json.dumps(chat_body(q, img, **SLOW)).encode()
    logged = "was cancelled (its caller hung up)"
    before = replica_log_count(server, logged)
    others = (5, 6, 7, 8, 9, 10, 11)  # with the dropped one, a full batch of 4 on each of the two replicas
    with ThreadPoolExecutor(8) as ex:
        gone = ex.submit(send_then_hang_up, server, body)
        time.sleep(0.02)  # the dropped request first: its replica's batch then fills with others
        replies = [ex.submit(ask, server["url"], i, **SLOW) for i in others]
        gone.result()
        replies = [r.result() for r in replies]
    assert [text_of(r) for r in replies] == [direct(i, **SLOW) for i in others]
    named: dict[str, int] = {}
    for r in replies:
        named[r["llada"]["batch"]["id"]] = named.get(r["llada"]["batch"]["id"], 0) + 1
    sizes = {r["llada"]["batch"]["id"]: r["llada"]["batch"]["size"] for r in replies}
    shared = [b for b in named if sizes[b] == named[b] + 1]  # one row answered no one: the dropped request's
    assert len(shared) <= 1 and all(sizes[b] == named[b] for b in named if b not in shared), (sizes, named)
    deadline = time.perf_counter() + 20
    while replica_log_count(server, logged) == before:
        assert time.perf_counter() < deadline, "no replica logged the cancelled request"
        time.sleep(0.5)
    assert text_of(ask(server["url"], 4)) == direct(4)


class TestCancellation(ServeCancellation):
    """test_cancel.py's cancellation tests through this module's server (one Ray cluster for both)."""


def test_replica_killed_during_load(server, direct):
    """kill -9 one of the two replicas while 4 clients send requests: every request ends (an answer
    identical to the pipeline's, or an error; the client retries server-side failures), none hangs,
    none is lost; the deployment is back to two replicas and answers correctly."""
    before = replicas(server)
    assert len(before) == 2, [cmdline(p) for p in descendants(server["proc"].pid)]
    results: list = []
    lock = threading.Lock()

    def client(c: int):
        cl = Client(server["url"], timeout_s=120, retries=3, backoff_s=1.0)
        for j in range(5):
            i = (c * 5 + j) % len(ITEMS)
            img, q, _ = ITEMS[i]
            try:
                out = (i, text_of(cl.chat(q, img)))
            except ServerError as e:
                out = (i, e)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(before[0], signal.SIGKILL)
    t0 = time.perf_counter()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 20  # none lost
    answered = [(i, a) for i, a in results if isinstance(a, str)]
    errors = [a for _, a in results if not isinstance(a, str)]
    assert all(a == direct(i) for i, a in answered)
    assert len(answered) >= 16, errors
    assert all(e.status is None or e.status >= 500 for e in errors)
    while len(replicas(server)) < 2 or before[0] in replicas(server):
        assert time.perf_counter() - t0 < 180, "the killed replica was not replaced"
        time.sleep(1)
    deadline = time.perf_counter() + 120
    while True:  # the new replica answers once it has loaded the engines
        try:
            assert all(text_of(ask(server["url"], i)) == direct(i) for i in range(4))
            break
        except ServerError:
            assert time.perf_counter() < deadline
            time.sleep(2)
    print(f"replica replaced {time.perf_counter() - t0:.0f} s after the kill; {len(errors)} request(s) failed "
          "after their retries")


def test_oversized_body_and_overlong_prompt_are_refused_at_once(server, direct):
    """A body over the documented 16 MiB: a 413 JSON error, the body never parsed. A 15 MiB text prompt
    (under the limit; tokenising it took over 30 s): refused from its byte length in a moment, while a
    good request sent meanwhile answers as usual."""
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    img, q, _ = ITEMS[0]
    huge = json.dumps(chat_body("x" * (17 * 2**20), img)).encode()
    status, body = post_raw(server["url"], huge)
    assert status == 413 and body["error"]["code"] == "request_too_large" and "16 MiB" in body["error"]["message"]
    long = json.dumps(chat_body("word " * (3 * 2**20), img)).encode()
    assert len(long) < 16 * 2**20
    with ThreadPoolExecutor(2) as ex:
        t0 = time.perf_counter()
        refused = ex.submit(post_raw, server["url"], long)
        time.sleep(0.1)
        good = ex.submit(ask, server["url"], 1)
        status, body = refused.result()
        took = time.perf_counter() - t0
        assert text_of(good.result()) == direct(1)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "--max-prompt-tokens" in body["error"]["message"] and took < 10, took
    with pytest.raises(urllib.error.HTTPError) as e:  # the Content-Length alone decides a far larger body
        urllib.request.urlopen(urllib.request.Request(
            server["url"] + "/v1/chat/completions", data=b"{}", method="POST",
            headers={"Content-Type": "application/json", "Content-Length": str(2**30)}), timeout=30)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"


def test_sampling_with_a_seed_answers_as_the_pipeline(server, direct):
    """temperature > 0 with a seed, batched on the server: each answer is Pipeline.generate's with the same
    seed (per-row generators); the seeds change the answers (they are honoured, not dropped). The fixed
    schedule: with the default threshold rule this trained model commits its answer in one confident forward,
    where the seeds rarely show."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [(i, seed) for i in (0, 3) for seed in range(3)]
    with ThreadPoolExecutor(6) as ex:
        replies = list(ex.map(lambda a: ask(server["url"], a[0], temperature=2.0, seed=a[1],
                                                fixed_schedule=True), asks))
    for (i, seed), r in zip(asks, replies):  # the reply records the settings that produced it
        settings = r["llada"]["settings"]
        assert (settings["seed"], settings["temperature"], settings["gen_length"]) == (seed, 2.0, 16)
        assert r["llada"]["finish_reason"] == r["choices"][0]["finish_reason"] == (
            "stop" if r["usage"]["completion_tokens"] < 16 else "length")
    # Pipeline.generate(image, prompt, **those settings): temperature 2.0 and the seed, the rest as defaulted
    expected = [direct(i, **r["llada"]["settings"]) for (i, _), r in zip(asks, replies)]
    assert [text_of(r) for r in replies] == expected
    assert len(set(expected[:3])) > 1 or len(set(expected[3:])) > 1, expected  # the seeds matter
    assert max(r["llada"]["batch"]["size"] for r in replies) > 1


def test_metrics_port_serves_prometheus_text(server):
    """--metrics-port: the printed URL on that port serves Ray Serve's metrics (batch sizes among them)."""
    import urllib.request

    url = f"http://127.0.0.1:{server['metrics_port']}/metrics"
    assert f"Metrics: {url}" in "".join(server["lines"])
    ask(server["url"], 0)
    deadline = time.perf_counter() + 60
    while True:  # the replicas report every few seconds
        with urllib.request.urlopen(url, timeout=30) as r:
            text = r.read().decode()
        if "ray_serve_actual_batch_size" in text or time.perf_counter() > deadline:
            break
        time.sleep(2)
    assert "ray_serve_actual_batch_size" in text and "ray_serve_num_http_requests" in text, text[:2000]


def test_load_test_small_run(server, serve_engines, tmp_path):
    tool = load_tool("load_test")
    out = tmp_path / "load"
    tool.main(["--engines", str(serve_engines), "--url", server["url"], "--concurrency", "1", "3",
               "--rate", "50", "--requests", "2", "--items", "6", "--stream", "0.5", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 3]
    for lv in res["levels"]:
        assert lv["sent"] == lv["concurrency"] * 2 and lv["answered"] == lv["sent"]
    [open_level] = res["open_levels"]  # 2 Poisson arrivals at 50 per second: sent together, not one after another
    assert open_level["offered_rps"] == 50 and open_level["sent"] == open_level["answered"] == 2
    for lv in res["levels"] + res["open_levels"]:
        assert lv["errors"] == lv["refused"] == lv["lost"] == lv["differ_from_pipeline"] == 0
        assert lv["latency_p50_s"] <= lv["latency_p99_s"] and lv["requests_per_s"] > 0
        assert lv["cancelled"] == 0  # the server's /health counter, read before and after the level
        assert lv["narrowed"] == 0  # one built batch size: a batch has no smaller size to go on at
    assert sum(lv["streamed"] for lv in res["levels"] + res["open_levels"]) >= 3  # --stream 0.5: every other one
    md = out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0 and "| 3 | 6 | 6 | 0 | 0 |" in md and "| 50 | 0 | 2 | 2 | 0 | 0 |" in md


def test_more_streaming_clients_than_a_batch_fill_every_batch(server, serve_engines, tmp_path):
    """16 closed-loop streaming clients on 2 replicas of max batch 4 (about 8 a replica: a batch running, a
    batch waiting): every batch full. Measured before the admission limit (tools/load_test.py, 8 streaming
    clients, 1 replica): batches of 4, 2, 2, 4, 2, 2, ..., mean 3.0: the requests let in beyond a full batch
    closed a partial batch of their own while the others waited for the engine. Flaky under a loaded full
    run (3.125 once; 24 clients gave 3.875 twice on an idle machine but 3.29 in a full run): a likely cause,
    not verified, is that a streaming row joins its batch queue only when its response generator is pulled
    again after its first chunk, so rows let in together reach Serve's batcher apart."""
    tool = load_tool("load_test")
    out = tmp_path / "full"
    tool.main(["--engines", str(serve_engines), "--url", server["url"], "--concurrency", "16", "--requests", "2",
               "--items", "12", "--stream", "--out", str(out)])
    [lv] = json.loads(out.with_suffix(".json").read_text())["levels"]
    assert lv["answered"] == lv["streamed"] == 32 and lv["differ_from_pipeline"] == 0
    assert lv["mean_batch"] >= 3.5, lv  # routing may leave a replica a partial batch at the end


def test_load_test_refuses_a_remote_server(serve_engines):
    tool = load_tool("load_test")
    with pytest.raises(SystemExit, match="not a loopback address"):
        tool.main(["--engines", str(serve_engines), "--url", "http://192.0.2.1:8000"])


def test_load_test_refuses_an_empty_run(capsys):
    tool = load_tool("load_test")
    with pytest.raises(SystemExit) as e:
        tool.main(["--engines", "E", "--concurrency"])
    assert e.value.code == 2 and "nothing to run" in capsys.readouterr().err


def test_sigterm_drains_then_leaves_no_processes(server, direct):
    """SIGTERM (a rolling restart, ``kubectl delete pod``) with requests in flight: the server drains (new
    chat requests get a 503 server_shutting_down with Retry-After, GET /health a 503 "draining"), answers
    every request it had taken as the pipeline does, then stops its cluster and exits 0; every process it
    started is gone, and so is the session folder it wrote under Ray's temp root (they piled up in /tmp/ray).
    Before the drain, SIGTERM ended the cluster at once and the requests in flight lost their connections."""
    from concurrent.futures import ThreadPoolExecutor

    proc = server["proc"]
    tree = descendants(proc.pid)
    assert len(tree) >= 4 and any(REPLICA in cmdline(p) for p in tree)
    assert len(list((Path(server["tmp"]) / "ray").glob("session_2*"))) == 1
    slow = {"threshold": 1.0}  # one token a forward: 8 requests on 2 replicas of batch 4 take seconds
    n = 8
    with ThreadPoolExecutor(n) as ex:
        replies = [ex.submit(ask, server["url"], i, **slow) for i in range(n)]
        time.sleep(0.3)  # taken by the replicas (in a batch or waiting for one)
        proc.send_signal(signal.SIGTERM)
        status = None
        deadline = time.perf_counter() + 30
        while status != 503:
            assert time.perf_counter() < deadline and not all(r.done() for r in replies), "no drain seen"
            status, _, raw = http_call(server["url"] + "/health", "GET", {})
        assert json.loads(raw)["status"] == "draining"
        status, headers, raw = http_call(server["url"] + "/v1/chat/completions", "POST",
                                         {"Content-Type": "application/json"},
                                         json.dumps(chat_body(ITEMS[0][1], ITEMS[0][0])).encode())
        err = json.loads(raw)["error"]
        assert status == 503 and (err["code"], err["type"]) == ("server_shutting_down", "server_error"), raw
        assert headers.get("retry-after") == "1"
        answers = [text_of(r.result(120)) for r in replies]
    assert answers == [direct(i, **slow) for i in range(n)]
    rc = proc.wait(90)
    err = proc.stderr.read()
    assert rc == 0 and "llada-serve: draining" in err and "llada-serve: drained in" in err, err[-2000:]
    assert "llada-serve: stopped" in err
    deadline = time.perf_counter() + 60
    while any(alive(p) for p in tree):
        assert time.perf_counter() < deadline, [cmdline(p) for p in tree if alive(p)]
        time.sleep(1)
    assert not [p for p in children_map() if server["tmp"] in cmdline(p)]
    assert not list((Path(server["tmp"]) / "ray").glob("session_*"))
