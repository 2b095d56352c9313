"""A new user's robustness pass: damaged engines directories and refused HTTP requests say what is wrong
and how to fix it (one line, the right status), never a raw traceback or a 500."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llada_export.contract.manifest import MANIFEST, Manifest, ManifestError
from llada_export.outdir import OutputDirError, atomic_output_dir
from llada_export.runtime.pipeline import Pipeline


# ---------------------------------------------------------------------- damaged engines directories
@pytest.fixture
def copy(engines, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst)
    return dst


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", bytes(range(200, 256)) * 4])
def test_a_manifest_that_is_not_utf8_is_a_damaged_directory(tmp_path, raw):
    """A binary or non-UTF-8 manifest.json was a bare UnicodeDecodeError ('utf-8' codec can't decode byte
    0xff in position 0), naming neither the file nor the fix."""
    (tmp_path / MANIFEST).write_bytes(raw)
    with pytest.raises(ManifestError) as e:
        Manifest.read(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "re-run llada-export" in str(e.value)


@pytest.mark.parametrize("damage, what", [
    (lambda root: (root / "onnx/weights.bin").unlink(), "missing"),
    (lambda root: (root / "onnx/weights.bin").write_bytes(b"\0" * 1000), "truncated"),
    (lambda root: (root / "onnx/stage_b.onnx").write_bytes(bytes(b ^ 1 for b in (root / "onnx/stage_b.onnx")
                                                                 .read_bytes())), "SHA-256")])
def test_a_damaged_artifact_names_the_file_and_the_fix(copy, damage, what):
    """Missing, truncated or altered files said what was wrong but not what to do about it."""
    damage(copy)
    with pytest.raises(ManifestError, match=what) as e:
        Pipeline.load(copy)
    assert "re-run llada-export" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("version, expect", [("5", "format_version '5' is not an integer"),
                                             (None, "format_version None is not an integer")])
def test_a_format_version_of_the_wrong_type_is_named(copy, version, expect):
    """A string "5" read 'engines format version 5 ... is not supported by ... (format 5)': a contradiction."""
    path = copy / MANIFEST
    m = json.loads(path.read_text())
    m["format_version"] = version
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError) as e:
        Pipeline.load(copy)
    assert expect in str(e.value) and "re-run llada-export" in str(e.value)


# ---------------------------------------------------------------------- a full disk while writing an output
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a real ENOSPC on every write)")
@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path, existing):
    """A write() that fills the disk raises OSError(ENOSPC) with no file name: llada-export said only
    "error: [Errno 28] No space left on device". Now it names the output and the fix; an earlier directory
    there is kept as it was, and no partial folder is left."""
    out = tmp_path / "engines"
    if existing:
        out.mkdir()
        (out / "manifest.json").write_text("old")
    with pytest.raises(OutputDirError) as e:
        with atomic_output_dir(out, overwrite=True, owned=lambda p: True) as tmp:
            (tmp / "manifest.json").write_text("new")
            with open("/dev/full", "wb") as f:  # what a full file system answers a write
                f.write(b"weights")
    assert str(e.value) == (f"cannot write {out}: No space left on device while it was being written; free some "
                            "space or choose another path")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["engines"] if existing else [])
    assert not existing or (out / "manifest.json").read_text() == "old"


def test_compare_that_cannot_write_its_files_says_where_and_what_to_do(engines, tiny_ckpt, tmp_path):
    """llada-compare's Polygraphy files: an OSError writing them was printed bare ("[Errno 28] No space left on
    device" on a full disk, checked on an 8 MB tmpfs); now it names the folder and --save-dir. Here the real
    OSError is a folder below a file."""
    from llada_export.compare import CompareError, run_compare

    (tmp_path / "file").write_text("x")
    with pytest.raises(CompareError) as e:
        run_compare(engines, tiny_ckpt, save_dir=tmp_path / "file" / "sub", backends=["onnxruntime"])
    assert str(e.value) == (f"cannot write the Polygraphy files to {tmp_path / 'file' / 'sub'}: Not a directory; "
                            "free some space or pass another --save-dir")


@pytest.mark.parametrize("target", ["engines", "checkpoint"])
def test_compare_refuses_a_report_inside_the_engines_or_the_checkpoint(copy, tiny_ckpt, tmp_path, capsys, target):
    """``llada-compare --report ENGINES/manifest.json`` ran the comparison and then wrote its report over the
    manifest: the engines no longer loaded ("not a llada-export engines manifest"); CKPT/config.json the same.
    Refused before anything runs, as --save-dir there is; both directories are left as they were."""
    from helpers import cli_here
    from llada_export.cli.compare import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    victim = copy / MANIFEST if target == "engines" else ckpt / "config.json"
    before = victim.read_bytes()
    r = cli_here(main, "llada-compare", capsys, "--engines", str(copy), "--model", str(ckpt), "--presets", "mc",
                 "--report", str(victim))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"llada-compare: error: --report {victim} is inside the {target} directory {victim.parent.resolve()}, which "
        "llada-compare does not write to: give another path"), r.stderr
    assert victim.read_bytes() == before and not victim.with_suffix(".md").exists()


@pytest.mark.parametrize("own", ["notes.json", "notes.md"])
def test_compare_refuses_a_report_path_over_the_users_own_files(copy, tiny_ckpt, tmp_path, capsys, own):
    """``llada-compare --report notes.json`` wrote its JSON over the user's notes.json and its summary over a
    notes.md beside it. Refused before anything runs; an earlier llada-compare report there is replaced."""
    from helpers import cli_here
    from llada_export.cli.compare import check_report_path, main
    from llada_export.compare import CompareReport, is_report, write_report

    (tmp_path / "out").mkdir()
    victim = tmp_path / "out" / own
    victim.write_text('{"mine": 1}\n' if own.endswith(".json") else "# my notes\n")
    report = tmp_path / "out" / "notes.json"
    r = cli_here(main, "llada-compare", capsys, "--engines", str(copy), "--model", str(tiny_ckpt), "--presets", "mc",
                 "--report", str(report))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"llada-compare: error: --report {report}: {victim} exists and is not a llada-compare report (the report "
        "writes notes.json and notes.md); give another path or remove it"), r.stderr
    assert victim.read_text() in ('{"mine": 1}\n', "# my notes\n") and sorted(p.name for p in victim.parent.iterdir()) == [own]
    victim.unlink()
    js, md = write_report(CompareReport(str(copy), str(tiny_ckpt), "float32", error="a first run"), report)
    assert is_report(js) and is_report(md) and not is_report(tmp_path / "out" / "missing.json")
    check_report_path(report, str(copy), str(tiny_ckpt))  # its own earlier report: written over
    assert sorted(p.name for p in report.parent.iterdir()) == ["notes.json", "notes.md"]  # no .partial left


# ---------------------------------------------------------------------- the HTTP API without Ray
def test_an_integer_too_long_to_parse_is_a_400_not_a_500():
    """json.loads raises a plain ValueError (Python's 4300-digit limit) for a long integer literal: the server
    answered it with a 500 internal error."""
    from llada_export.serve.api import APIError, decode_json

    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
    with pytest.raises(APIError) as e:
        decode_json(body)
    assert (e.value.status, e.value.code) == (400, "invalid_json") and "too many digits" in e.value.message
    assert decode_json(b'{"max_tokens": ' + b"9" * 4000 + b"}")["max_tokens"] == int("9" * 4000)


def _asgi(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    """One request through ``LLaDAServer.__call__`` as Serve's proxy hands it over (a Starlette request), without
    Ray: only what is answered before a request joins a batch (the batches are Ray Serve's)."""
    status, _, answer = _asgi_headers(server, method, path, body, headers)
    return status, answer


def _asgi_headers(server, method: str, path: str, body: bytes = b"",
                  headers: dict | None = None) -> tuple[int, dict, dict]:
    """:func:`_asgi`'s status and body, and the answer's headers (lower-case names)."""
    import asyncio

    from starlette.requests import Request

    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    hdrs.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": hdrs, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 1), "root_path": ""}
    inbox, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        response = await server(Request(scope, receive))
        await response(scope, receive, send)

    asyncio.run(run())
    answer_headers = {k.decode().lower(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], answer_headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.fixture(scope="module")
def server(engines):
    from dataclasses import asdict

    from llada_export.serve.app import LLaDAServer, ServeOptions

    return LLaDAServer(asdict(ServeOptions(engines=str(engines), model_name="tiny")))


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}).encode()


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_declared_json_is_refused(server, content_type):
    """A JSON body sent as text/plain or as a form was parsed and run: what any web page can make a browser send
    to a server on loopback without a CORS preflight (the FastAPI CSRF advisory GHSA-8h2j-cgx8-6xv7)."""
    status, body = _asgi(server, "POST", "/v1/chat/completions", CHAT, {"content-type": content_type})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type", body
    assert "application/json" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{"content-type": "application/json"},
                                     {"Content-Type": "Application/JSON; charset=utf-8"},
                                     {"content-type": "application/vnd.api+json"}, {}])
def test_json_or_no_content_type_is_read(server, headers):
    """Read as JSON, the body gets as far as its model check (another model: 404), where the old code got too."""
    status, body = _asgi(server, "POST", "/v1/chat/completions", CHAT, headers)
    assert status == 404 and body["error"]["code"] == "model_not_found", body


def test_a_draining_server_refuses_new_chats_and_its_health_says_so(server):
    """serve/drain.py: while the server drains (stopping), a chat request gets a 503 server_shutting_down with
    Retry-After and GET /health a 503 "draining" (a load balancer's check takes the server out of its pool);
    the model list is still answered. Requests refused on their checks (here: another model) leave nothing
    counted in flight, which the drain waits for."""
    import time

    chat = {"content-type": "application/json"}
    assert _asgi(server, "POST", "/v1/chat/completions", CHAT, chat)[0] == 404  # model_not_found
    status, health = _asgi(server, "GET", "/health")
    assert (status, health["status"], health["in_flight"]) == (200, "ok", 0)
    server.flights.draining_since = time.monotonic()
    try:
        good = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        status, headers, answer = _asgi_headers(server, "POST", "/v1/chat/completions", good, chat)
        assert status == 503 and headers["retry-after"] == "1", (status, headers, answer)
        assert (answer["error"]["code"], answer["error"]["type"]) == ("server_shutting_down", "server_error")
        status, health = _asgi(server, "GET", "/health")
        assert (status, health["status"], health["in_flight"]) == (503, "draining", 0)
        assert _asgi(server, "GET", "/v1/models")[0] == 200
    finally:
        server.flights.draining_since = None
    assert _asgi(server, "GET", "/health")[0] == 200


def test_a_model_is_retrieved_by_its_name(server):
    """The official client's models.retrieve(name) is GET /v1/models/{name}: it was a 404 no route."""
    status, listing = _asgi(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny"]
    status, entry = _asgi(server, "GET", "/v1/models/tiny")
    assert status == 200 and entry == listing["data"][0] and entry["object"] == "model"
    status, body = _asgi(server, "GET", "/v1/models/gpt-4o")
    assert status == 404 and (body["error"]["code"], body["error"]["param"]) == ("model_not_found", "model")
    assert "'gpt-4o' is not served here; this server serves 'tiny'" in body["error"]["message"]
    status, body = _asgi(server, "DELETE", "/v1/models/tiny")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_response_length_over_the_engines_names_the_field_sent(server, field):
    """The official client sends max_completion_tokens (max_tokens is deprecated there): a length over the
    engines' was refused as "max_tokens 9999 ...", param max_tokens, naming a field the caller never sent."""
    body = {"messages": [{"role": "user", "content": "hi"}], field: 9999}
    status, answer = _asgi(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"content-type": "application/json"})
    err = answer["error"]
    assert status == 400 and (err["param"], err["code"]) == (field, "invalid_settings")
    assert err["message"].startswith(f"{field} 9999 is over these engines' maximum 128 ")


def test_a_body_just_over_the_limit_says_by_how_much():
    """The size was printed in MiB to one decimal: a body one byte over 16 MiB was "over 16 MiB (16.0 MiB)"."""
    from llada_export.serve.api import MAX_BODY_BYTES, APIError, check_body_size

    with pytest.raises(APIError) as e:
        check_body_size(MAX_BODY_BYTES + 1)
    assert e.value.status == 413 and e.value.message.startswith(
        "the request body is over 16 MiB (16,777,217 bytes): send a smaller image")


def test_unpruned_on_engines_without_it_names_the_field_not_the_servers_path(multi_size_engines):
    """``unpruned: true`` on engines exported without --baseline: the runtime's refusal starts with the engines'
    directory, which the server sent to its caller with param null."""
    from dataclasses import asdict

    from llada_export.serve.app import LLaDAServer, ServeOptions

    server = LLaDAServer(asdict(ServeOptions(engines=str(multi_size_engines), model_name="tiny")))
    body = {"messages": [{"role": "user", "content": "hi"}], "unpruned": True}
    status, answer = _asgi(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"content-type": "application/json"})
    err = answer["error"]
    assert status == 400 and (err["param"], err["code"]) == ("unpruned", "invalid_settings"), err
    assert "no unpruned graph" in err["message"] and str(multi_size_engines) not in err["message"], err
    body["unpruned"] = False  # without it the request passes every check, to the batch queue (Ray's: 500 here)
    status, answer = _asgi(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"content-type": "application/json"})
    assert status == 500 and "Ray Serve deployment" in answer["error"]["message"], answer


@pytest.mark.parametrize("setting, said", [({"cache": True}, "the engines directory has no prefix-cache graphs"),
                                           ({"refresh": 3}, "and the engines directory was exported without --cache")])
def test_a_settings_refusal_does_not_show_the_servers_path(server, engines, setting, said):
    """The runtime's refusals of cache settings on engines exported without --cache name the engines' directory;
    over HTTP they went to the caller with the server's filesystem path in them."""
    body = {"messages": [{"role": "user", "content": "hi"}], **setting}
    status, answer = _asgi(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"content-type": "application/json"})
    err = answer["error"]
    assert status == 400 and err["code"] == "invalid_settings" and said in err["message"], err
    assert str(engines) not in err["message"] and str(engines.resolve()) not in err["message"], err


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_settings_refusal_names_the_length_by_the_field_sent(server, field):
    """The sampler's rule "gen_length 8 is not a multiple of block_length 3" reached the caller in the runtime's
    words: gen_length is no field of the API."""
    body = {"messages": [{"role": "user", "content": "hi"}], field: 8, "block_length": 3}
    status, answer = _asgi(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"content-type": "application/json"})
    err = answer["error"]
    assert status == 400 and (err["code"], err["param"]) == ("invalid_settings", field), err
    assert err["message"].startswith(f"{field} 8 is not a multiple of block_length 3"), err
    assert "gen_length" not in err["message"], err


def test_a_relative_engines_path_leaves_the_word_engines_alone(engines, monkeypatch):
    """Served as ``--engines engines`` (a relative path that is also a word of the messages), only the places
    where the runtime puts the path are replaced, not every "engines"."""
    from dataclasses import asdict

    from llada_export.contract.layout import RequestError
    from llada_export.serve.api import ChatRequest
    from llada_export.serve.app import LLaDAServer, ServeOptions

    monkeypatch.chdir(engines.parent)
    server = LLaDAServer(asdict(ServeOptions(engines=engines.name, model_name="tiny")))
    root = str(server.pipe.root)
    assert root == engines.name
    refusal = RequestError(f"{root} has no prefix-cache graphs; which does not fit these {root} "
                           f"(responses of at most 128 tokens), the {root}' maximum")
    msg = server._refused(refusal, ChatRequest("hi", None)).message
    assert msg == (f"the engines directory has no prefix-cache graphs; which does not fit these {root} "
                   f"(responses of at most 128 tokens), the {root}' maximum"), msg
