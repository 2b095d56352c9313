"""New-user mistakes get one clear line (a QA pass found raw Python errors, silent no-ops and errors that
echoed kilobytes of input): the Python API's options and callbacks, on the tiny cache engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import random_image
from llada_export.runtime.pipeline import Pipeline, Request


@pytest.fixture(scope="module")
def pipe(cache_engines):
    return Pipeline.load(cache_engines)


@pytest.mark.parametrize("call", ["generate", "generate_batch"])
def test_unknown_options_are_named_with_the_accepted_ones(pipe, call):
    """``bogus=1`` gave Python's "got an unexpected keyword argument" from generation_config, naming neither
    the call the user made nor what it takes."""
    run = (lambda **kw: pipe.generate(None, "hi", **kw)) if call == "generate" else \
        (lambda **kw: pipe.generate_batch([Request(None, "hi")], **kw))
    with pytest.raises(TypeError) as e:
        run(bogus=1, gen_lenght=8)
    msg = str(e.value)
    assert msg.startswith(f"{call}() got unknown options 'bogus', 'gen_lenght' (did you mean 'gen_length'")
    for accepted in ("unpruned", "on_step", "cancel", "gen_length", "threshold", "refresh", "fixed_schedule"):
        assert accepted in msg
    assert ("seed" in msg) == (call == "generate") and "\n" not in msg
    assert pipe.generate(None, "hi", gen_length=8).ids  # the accepted options still pass


def test_cancel_is_checked(pipe):
    """``cancel`` must be one callable returning one flag per request: a list of callables gave a raw "'list'
    object is not callable" at the first forward; a flag list of the wrong length was silently cut or padded
    (a row meant to stop ran on)."""
    reqs = [Request(None, "hi"), Request(random_image(64, 64), "What is here?")]
    with pytest.raises(TypeError, match=r"^cancel must be one callable that returns a list of 2 flag\(s\), one per "
                                        r"request, got a list; e\.g\. cancel=lambda: \[False\] \* 2$"):
        pipe.generate_batch(reqs, gen_length=8, cancel=[lambda: False, lambda: False])
    for flags, what in (([True], "1 flag(s)"), ([False] * 3, "3 flag(s)"), (None, "a NoneType"), (True, "a bool")):
        with pytest.raises(ValueError, match=rf"^cancel\(\) returned {what.replace('(', '[(]').replace(')', '[)]')} "
                                             r"for 2 request\(s\): return a list of 2 booleans"):
            pipe.generate_batch(reqs, gen_length=8, cancel=lambda: flags)
    with pytest.raises(TypeError, match="cancel must be one callable"):
        pipe.generate(None, "hi", cancel=[False])
    got = pipe.generate_batch(reqs, gen_length=8, cancel=lambda: [True, False])
    assert [r.finish_reason for r in got] == ["cancelled", got[1].finish_reason] and got[1].finish_reason != "cancelled"


LONG = "why is the sky blue? " * 200  # 4,200 characters


def short(message: str, length: int) -> bool:
    """An error message that repeats a caller's value of ``length`` characters: a line, with its start and
    length, not the value itself."""
    return f"... ({length} characters)" in message and len(message) < 400 and "\n" not in message


def test_long_values_are_not_echoed_in_full(pipe, capsys):
    """A data: URL, a long path, a long prompt or a long bad value was repeated whole in the error (thousands of
    characters; a path too long for the file system gave Python's raw OSError "File name too long")."""
    from helpers import cli_here
    from llada_export.cli import generate as generate_cli
    from llada_export.compare import CompareError, plan_compare
    from llada_export.graphs.anyres import ImageError
    from llada_export.runtime.inputs import GenerationError, check_number
    from llada_export.serve.api import APIError, parse_chat

    data_url = "data:image/png;base64," + "iVBORw0KGgo" * 400
    with pytest.raises(ImageError, match=r"^data:image/png;base64,iVBOR.*: a URL; images are read from local files "
                                         r"\(decode it to a file first, or pass a PIL image\)$") as e:
        pipe.generate(data_url, "What is here?")
    assert short(str(e.value), len(data_url))
    with pytest.raises(ImageError) as e:  # a URL keeps its start
        pipe.generate(url := "https://example.com/" + "x" * 3000, "What is here?")
    assert short(str(e.value), len(url))
    with pytest.raises(ImageError) as e:  # a path keeps its end, the file's name
        pipe.generate(path := "x" * 5000 + "/photo.png", "What is here?")
    msg = str(e.value)
    assert msg.startswith("...") and "x/photo.png (5010 characters): image file not found" in msg and len(msg) < 400
    for settings in (dict(preset=LONG), dict(remasking=LONG), dict(temperature=LONG), dict(seed=LONG)):
        with pytest.raises(GenerationError) as e:
            pipe.generate(None, "hi", **settings)
        assert short(str(e.value), len(LONG) + 2)  # repr's quotes
    with pytest.raises(CompareError, match=r"^prompt 'why is") as e:  # llada-compare --prompt
        plan_compare(pipe, [(None, LONG)], None, (), {})
    assert str(e.value).count("why is the sky blue?") < 10 and short(str(e.value), len(LONG) + 2)
    user = {"role": "user", "content": "hi"}
    for body in ({"messages": [{"role": LONG, "content": "hi"}]}, {"messages": [user], "stream": LONG},
                 {"messages": [user], LONG: 1}, {"messages": [user], "stream": True, "stream_options": {LONG: 1}},
                 {"messages": [{"role": "user", "content": [{"type": LONG}]}]}):
        with pytest.raises(APIError) as e:  # the server's 400s
            parse_chat(body)
        assert "characters)" in str(e.value) and str(e.value).count("why is") < 10
    with pytest.raises(GenerationError) as e:
        check_number(LONG, "temperature")
    assert short(str(e.value), len(LONG) + 2)
    r = cli_here(generate_cli.main, "llada-generate", capsys, "--engines", str(pipe.root), "--prompt", "hi",
                 "--temperature", LONG)
    assert r.returncode == 2 and short(r.stderr.strip(), len(LONG) + 2), r.stderr[:300]


def test_a_checkpoint_without_its_chat_template_is_named(tmp_path, capsys):
    """The demo checkpoint without chat_template.jinja: llada-export said transformers' "Cannot use chat template
    functions because tokenizer.chat_template is not set ..." (a pointer to its templating docs); it names the
    missing file, before any graph is built."""
    import shutil

    from helpers import cli_here
    from llada_export.cli import export as export_cli
    from llada_export.demo import DEMO_MODEL

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO_MODEL, ckpt, ignore=shutil.ignore_patterns("chat_template.jinja"))
    r = cli_here(export_cli.main, "llada-export", capsys, "--model", str(ckpt), "-o", str(tmp_path / "out"), "--no-prune")
    assert r.returncode == 2 and r.stderr == (
        f"llada-export: error: {ckpt}: no chat template: chat_template.jinja is missing (the official LLaDA-V "
        "checkpoint ships it beside tokenizer_config.json); copy it there from the model's release\n")
    shutil.copy(Path(DEMO_MODEL) / "chat_template.jinja", ckpt)  # the fix the message gives: the template renders
    from llada_export.tokenizer import encode_prompt, load_tokenizer
    assert encode_prompt(load_tokenizer(ckpt), "hi", has_image=False)[0]


def test_refresh_on_engines_without_cache_graphs_names_the_export_flag(engines, cache_engines, capsys):
    """``llada-generate --refresh 2`` on engines exported without --cache said "use it with cache=True
    (--cache)", and --cache was then refused by the same engines: the fix is in the export."""
    from helpers import cli_here
    from llada_export.cli import generate as generate_cli

    for refresh in ("2", "never"):
        r = cli_here(generate_cli.main, "llada-generate", capsys, "--engines", str(engines), "--prompt", "hi",
                     "--refresh", refresh)
        assert r.returncode == 2 and r.stderr == (
            f"llada-generate: error: refresh applies to the prefix cache only, and {engines} was exported without "
            "--cache (no prefix-cache graphs for the pruned path): re-export with llada-export ... --cache to use "
            "refresh, or leave refresh out\n")
    # engines with the cache graphs, the cache turned off: --cache is the fix there
    with pytest.raises(ValueError, match=r"use it with cache=True \(--cache\)$"):
        Pipeline.load(cache_engines).generate(None, "hi", cache=False, refresh=2)


def test_a_batch_names_the_request_whose_image_or_prompt_is_too_large(pipe):
    """An image too large for the bucket (and a prompt too long for it) in generate_batch lacked the
    ``requests[i]:`` prefix that the other per-request errors carry; alone, a request has none."""
    from llada_export.contract.layout import RequestError

    big, fits = random_image(900, 900), random_image(64, 64)
    with pytest.raises(RequestError, match=r"^requests\[1\]: the image gives \d+ visual tokens; these engines take "
                                           r"at most \d+: re-export with --max-visual-tokens"):
        pipe.generate_batch([(fits, "What is here?"), (big, "What is here?")], gen_length=8)
    with pytest.raises(RequestError, match=r"^requests\[0\]: the prompt has \d+ text tokens"):
        pipe.generate_batch([(None, "why? " * 400), (fits, "What is here?")], gen_length=8)
    with pytest.raises(RequestError, match=r"^the image gives \d+ visual tokens"):
        pipe.generate(big, "What is here?", gen_length=8)


def test_a_checkpoint_of_another_model_is_named_briefly(pipe):
    """llada-compare --model of another checkpoint (the demo model against the tiny engines) printed whole values:
    image_grid_pinpoints' two lists took 1,500 characters. Each differing field once, long values cut."""
    from llada_export.checkpoint.loader import read_config
    from llada_export.compare import CompareError, check_same_model
    from llada_export.demo import DEMO_MODEL

    cfg = read_config(DEMO_MODEL)
    with pytest.raises(CompareError) as e:
        check_same_model(pipe, cfg, DEMO_MODEL)
    msg = str(e.value)
    mine, theirs = cfg.to_dict(), pipe.manifest.config
    differ = sorted(k for k in mine if mine[k] != theirs[k] and not isinstance(mine[k], dict))
    assert "image_grid_pinpoints" in differ and "vision_config.patch_size" in msg
    assert all(msg.count(f" {k} ") + msg.count(f" {k},") + msg.count(f" {k})") == 1 for k in differ), msg
    assert len(msg) < 900 and "characters) vs" in msg and "\n" not in msg


def test_batch_sizes_auto_prints_its_plan_before_the_build(tiny_ckpt, tmp_path, capsys):
    """``--batch-sizes auto`` named the sizes it chose only in the notes printed at the end, after the long
    build: the plan (sizes, and the arithmetic that chose them) is on stderr before the weights are read. Here
    the checkpoint's weights file is gone, so the build's first step (loading the weights) fails right after."""
    import shutil

    from helpers import cli_here
    from llada_export.cli import export as export_cli

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    r = cli_here(export_cli.main, "llada-export", capsys, "--model", str(ckpt), "-o", str(tmp_path / "e"),
                 "--prune-layer", "2", "--cache", "--image-size", "384x384", "--gen-length", "16",
                 "--max-prompt-tokens", "112", "--batch-sizes", "auto", "--device-memory", "64GiB")
    plan, error = r.stderr.strip().splitlines()
    assert plan.startswith("batch sizes planned by --batch-sizes auto: 1, 2, 4, 8, 16, 32, 64, 128, 256; the largest "
                           "pruned + cache batch that fits 64.0 GiB (--device-memory) is ") and "building them now" in plan
    assert r.returncode == 2 and error.startswith("llada-export: error: ") and "safetensors" in error
    r = cli_here(export_cli.main, "llada-export", capsys, "--model", str(ckpt), "-o", str(tmp_path / "e"), "-q",
                 "--prune-layer", "2", "--cache", "--image-size", "384x384", "--gen-length", "16",
                 "--max-prompt-tokens", "112", "--batch-sizes", "auto", "--device-memory", "64GiB")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1  # -q: the error only


def test_the_client_refuses_an_image_it_cannot_read_briefly(tmp_path):
    """``llada-generate --server URL --image data:...`` (or a missing file) gave Python's raw OSError with the
    whole name (File name too long: 'data:image/png;base64,...'); it says what llada-generate --engines says."""
    from llada_export.serve.client import image_data_url

    data_url = "data:image/png;base64," + "iVBORw0KGgo" * 400
    with pytest.raises(ValueError, match=r"^data:image/png;base64,iVBOR.*\.\.\. \(4422 characters\): a URL; images "
                                         r"are read from local files$"):
        image_data_url(data_url)
    with pytest.raises(ValueError, match=r"nope\.jpg: image file not found$"):
        image_data_url(tmp_path / "nope.jpg")
    random_image(8, 8).save(tmp_path / "ok.png")
    assert image_data_url(str(tmp_path / "ok.png")).startswith("data:image/png;base64,iVBOR")
