"""A new user's inputs pass: images as cameras and editors write them (EXIF-rotated, 16-bit), and flag values
that built engines or ran checks that could not do what was asked (engines that refuse every image, a
comparison that compared no tokens) are read as the user meant them or refused in one line."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from helpers import random_image
from llada_export.graphs.anyres import image_size, load_image

ORIENTATION = 0x0112


def sideways(upright: Image.Image, path) -> None:
    """``upright`` stored as a phone stores a photo taken in portrait: the pixels turned 90 degrees clockwise
    and EXIF orientation 6 (rotate 90 degrees clockwise to view); PNG, so the pixels are exact."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def grey16_png(grey8: np.ndarray, path) -> None:
    """A 16-bit greyscale PNG of an 8-bit grey array (value v stored as v * 257, as image editors scale)."""
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)


# ---------------------------------------------------------------------- images
def test_an_exif_rotated_photo_is_read_upright(tmp_path):
    """A photo stored sideways with an EXIF orientation was read as stored: the model saw it turned by 90
    degrees, and its visual token count (so whether it fits the engines) was that of the turned image."""
    upright = random_image(380, 250, 1)
    sideways(upright, tmp_path / "photo.png")
    assert image_size(tmp_path / "photo.png") == (380, 250)
    assert np.array_equal(np.asarray(load_image(tmp_path / "photo.png")), np.asarray(upright))
    with Image.open(tmp_path / "photo.png") as im:  # a PIL image the caller opened
        assert image_size(im) == (380, 250)
        assert np.array_equal(np.asarray(load_image(im)), np.asarray(upright))


def test_an_exif_rotated_photo_gets_the_upright_answer(engines, images, tmp_path):
    from llada_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines)
    sideways(images["380x250"], tmp_path / "photo.png")
    want = pipe.generate(images["380x250"], "What is shown?", gen_length=16)
    got = pipe.generate(str(tmp_path / "photo.png"), "What is shown?", gen_length=16)
    assert (got.n_visual, got.ids) == (want.n_visual, want.ids)


def test_a_16_bit_greyscale_png_keeps_its_pixels(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit value above 255: every such PNG was read as a white image."""
    grey = np.asarray(random_image(64, 48, 3).convert("L"))
    grey16_png(grey, tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")  # what Pillow reads (I;16)
    rgb = np.asarray(load_image(tmp_path / "grey16.png"))
    assert np.array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))


def test_the_server_reads_a_16_bit_png_and_an_exif_rotation_as_a_file_is_read(tmp_path):
    from llada_export.serve.api import decode_data_url

    grey = np.asarray(random_image(64, 48, 4).convert("L"))
    grey16_png(grey, tmp_path / "grey16.png")
    upright = random_image(40, 30, 5)
    sideways(upright, tmp_path / "photo.png")
    for name, want in (("grey16.png", np.repeat(grey[:, :, None], 3, axis=2)), ("photo.png", np.asarray(upright))):
        url = "data:image/png;base64," + base64.b64encode((tmp_path / name).read_bytes()).decode()
        assert np.array_equal(np.asarray(decode_data_url(url)), want)


def test_the_client_sends_a_pil_image_as_the_engines_read_it(tmp_path):
    """llada-generate --server / Client with a PIL image: the client re-encodes it as PNG; a 16-bit one went
    out white."""
    from llada_export.serve.client import image_data_url

    grey = np.asarray(random_image(64, 48, 6).convert("L"))
    grey16_png(grey, tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        url = image_data_url(im)
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(sent.convert("RGB")), np.repeat(grey[:, :, None], 3, axis=2))


# ---------------------------------------------------------------------- flags
def test_export_refuses_max_visual_tokens_that_no_image_fits(tiny_ckpt, tmp_path):
    """--max-visual-tokens below the whole-image crop's tokens (which every image gives) wrote engines that
    refused every image at run time."""
    from helpers import export
    from llada_export.checkpoint.loader import read_config
    from llada_export.exporter.build import ExportError

    least = read_config(tiny_ckpt).vision.patches_per_side ** 2
    with pytest.raises(ExportError, match=rf"--max-visual-tokens {least - 1} is fewer than the {least} visual "
                                          rf"tokens every image gives.*--max-visual-tokens {least} or more"):
        export(tiny_ckpt, tmp_path / "out", image_size=None, max_visual_tokens=least - 1, gen_length=8)
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_empty_preset_list(tiny_ckpt, tmp_path, capsys):
    """--presets '' ran no end-to-end check (an empty agreement table) and still exited 0."""
    from llada_export.cli.compare import main

    for value in ("", " , "):
        with pytest.raises(SystemExit) as e:
            main(["--engines", str(tmp_path), "--model", str(tiny_ckpt), "--presets", value])
        assert e.value.code == 2
        assert "argument --presets: no preset named" in capsys.readouterr().err


def test_generate_refuses_an_empty_image_path(engines, capsys):
    """--image '' said '.: image file not found' (the current directory's name)."""
    from llada_export.cli.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--engines", str(engines), "--image", "", "--prompt", "What is shown?"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --image: empty path" in err and ".: image file" not in err


def test_the_size_of_a_png_is_read_from_its_header_only(tmp_path):
    """The orientation check must not decode a PNG (Pillow's getexif does, to look for a late eXIf chunk):
    the size of a PNG whose pixel data is cut off is still read from its header, as before."""
    random_image(300, 200, 7).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    assert image_size(tmp_path / "cut.png") == (300, 200)


def test_a_very_large_image_is_refused_in_one_line_and_a_large_one_without_a_python_warning(tmp_path, monkeypatch,
                                                                                         engines, capsys):
    """Between Pillow's pixel limit and twice it, llada-generate printed Pillow's DecompressionBombWarning
    with its source line; above it, 'cannot decode image' without the fix. (The limit is lowered here so that
    the images stay small; Pillow applies it the same way at its default, 89 Mpixels.)"""
    from llada_export.cli.generate import main
    from llada_export.graphs.anyres import ImageError

    random_image(60, 40, 8).save(tmp_path / "large.png")  # 2400 pixels: over 2000, under twice it
    random_image(100, 50, 9).save(tmp_path / "huge.png")  # 5000 pixels: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(tmp_path / "large.png") == (60, 40)
        assert load_image(tmp_path / "large.png").size == (60, 40)
    with pytest.raises(ImageError, match="huge.png: refused, too many pixels to decode safely .*downscale it first"):
        load_image(tmp_path / "huge.png")
    with pytest.raises(SystemExit):
        main(["--engines", str(engines), "--image", str(tmp_path / "huge.png"), "--prompt", "What is shown?"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "downscale it first" in err


@pytest.mark.parametrize("prog, argv", [
    ("generate", ["--engines", "", "--prompt", "What is shown?"]),
    ("generate", ["--engines", "{engines}", "--weights", " ", "--prompt", "What is shown?"]),
    ("compare", ["--engines", "{engines}", "--model", ""]),
    ("compare", ["--engines", "", "--model", "{ckpt}"]),
    ("export", ["--model", "", "-o", "{tmp}/out"]),
    ("serve", ["--engines", ""]),
])
def test_an_empty_directory_path_is_refused_not_read_as_the_current_directory(prog, argv, engines, tiny_ckpt,
                                                                              tmp_path, capsys, monkeypatch):
    """An empty --engines / --model / --weights was the current directory: '.: no manifest.json', 'config.json:
    no config.json', or llada-compare's '--report llada-compare.json is inside the checkpoint directory <cwd>'."""
    import importlib

    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"llada_export.cli.{prog}").main
    argv = [a.format(engines=engines, ckpt=tiny_ckpt, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "empty path: give a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_aoti_export_prints_no_torch_deprecation_warning(tmp_path):
    """llada-export --backend aoti (and all) printed torch's own FutureWarning about LeafSpec, with copyreg's source
    line, once per graph: noise a user cannot act on. A real AOTInductor compile of a small exported program."""
    import warnings

    import torch

    from llada_export.engines.aoti import _compile

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return (self.linear(x),)

    ep = torch.export.export(Small(), (torch.randn(2, 4),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile(ep, tmp_path / "small.pt2", {})
    assert (tmp_path / "small.pt2").is_file()
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_bfloat16_onnx_engines_exported_on_the_cpu_say_they_cannot_run_there(bf16_onnx_engines):
    """llada-export --dtype bfloat16 (onnxruntime, on the CPU) wrote its engines without a word; the first
    llada-generate on that machine then failed: ONNX Runtime's CPU provider has no bfloat16 kernels."""
    from llada_export.contract.manifest import Manifest
    from llada_export.runtime.pipeline import Pipeline

    out = bf16_onnx_engines
    notes = Manifest.read(out, verify=False).notes
    assert any(n.startswith("the bfloat16 onnxruntime engines do not run on this CPU") for n in notes), notes
    with pytest.raises(ValueError, match="no bfloat16 kernel"):  # what the note warns of
        Pipeline.load(out).generate(random_image(64, 64), "What is shown?")


def test_a_checkpoint_given_for_engines_and_engines_given_for_a_checkpoint_are_named(engines, tiny_ckpt, tmp_path,
                                                                                  capsys):
    """The two directories mixed up said only '<ckpt>: no manifest.json (not an engines directory ...)' and
    '<engines>/config.json: no config.json (is this a Hugging Face checkpoint directory?)'."""
    from llada_export.cli.export import main as export_main
    from llada_export.cli.generate import main as generate_main

    with pytest.raises(SystemExit):
        generate_main(["--engines", str(tiny_ckpt), "--prompt", "What is shown?"])
    err = capsys.readouterr().err
    assert f"{tiny_ckpt} is a checkpoint directory (it holds config.json), not engines: export it first" in err
    with pytest.raises(SystemExit):
        export_main(["--model", str(engines), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{engines} is an engines directory (it holds manifest.json), not a checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_a_pruning_that_keeps_every_visual_token_says_so(tiny_ckpt, tmp_path):
    """--keep 1 with pruning built stage A and the pruned graphs without a word, though they prune nothing."""
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, preflight

    def notes(keep: float) -> list[str]:
        opts = ExportOptions(model=str(tiny_ckpt), output=str(tmp_path / f"e{keep}"), prune=PruneSettings(2, keep),
                             image_size=(384, 384), max_prompt_tokens=192, progress=False)
        preflight(opts)
        return [n for n in opts.notes if n.startswith("--keep")]

    (said,) = notes(1.0)
    assert said.startswith("--keep 1 keeps all ") and "export with --no-prune for the unpruned engines" in said
    assert notes(0.5) == []


def test_the_checkpoint_preset_may_be_named_alone(tmp_path, capsys):
    """`llada-checkpoint tiny -o X` said only "the following arguments are required: --preset"."""
    from safetensors import safe_open

    from llada_export.cli.checkpoint import main

    assert main(["tiny", "-o", str(tmp_path / "a")]) == 0
    assert main(["--preset", "tiny", "-o", str(tmp_path / "b")]) == 0
    shards = [sorted((tmp_path / d).glob("*.safetensors")) for d in "ab"]
    assert len(shards[0]) == 1 and [p.name for p in shards[0]] == [p.name for p in shards[1]]
    with safe_open(str(shards[0][0]), "pt") as fa, safe_open(str(shards[1][0]), "pt") as fb:
        assert fa.keys() == fb.keys() and all(fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())
    for argv, said in ((["-o", str(tmp_path / "c")], "a preset is required: --preset {demo,full,tiny}"),
                       (["tiny", "--preset", "full", "-o", str(tmp_path / "c")], "two presets: --preset full and tiny")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_numpy_integers_are_taken_as_seeds_and_lengths(engines, images):
    """seed=np.int64(3) ended in torch's bare 'TypeError: an integer is required'; gen_length=np.int64(16) was
    refused as not 'a positive integer'; gen_length='16' raised "'<' not supported between str and int"."""
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.sampler import GenerationError

    pipe = Pipeline.load(engines)
    got = pipe.generate(images["380x250"], "What is shown?", seed=np.int64(3), gen_length=np.int64(16),
                        steps=np.int32(16), block_length=np.int64(16), temperature=1.0)
    want = pipe.generate(images["380x250"], "What is shown?", seed=3, gen_length=16, steps=16, block_length=16,
                         temperature=1.0)
    assert got.ids == want.ids
    assert type(got.settings["seed"]) is int and type(got.settings["gen_length"]) is int
    with pytest.raises(GenerationError, match=r"gen_length must be a positive integer, got '16'"):
        pipe.generate(images["380x250"], "What is shown?", gen_length="16")


@pytest.mark.parametrize("history, message", [
    ([("bot", "Red.")], r"history\[0\] has role 'bot'; the chat roles are system, user, assistant"),
    ([("user",)], r"history\[0\] must be a \(role, text\) pair"),
    ("Earlier I asked about the square.", r"history must be a list of \(role, text\) pairs, got a str"),
])
def test_a_history_that_is_not_role_text_pairs_is_refused_by_name(engines, images, history, message):
    """An unknown role ('bot') was rendered into the chat template as a header of its own without a word; a
    turn of one item or a history given as a string failed with 'not enough values to unpack'."""
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.tokenizer import PromptError

    pipe = Pipeline.load(engines)
    with pytest.raises(PromptError, match=message):
        pipe.generate(images["380x250"], "And its shape?", history=history)


def test_generate_server_takes_the_openai_clients_base_url(capsys):
    """--server http://HOST:PORT/v1 (the base_url of the README's openai example) asked for
    /v1/v1/chat/completions and printed the server's 404 'no route /v1/v1/chat/completions'."""
    import http.server
    import json
    import threading

    from llada_export.cli.generate import main

    paths = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            paths.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "red"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for base in (url, url + "/v1", url + "/v1/"):
            assert main(["--server", base, "--prompt", "What colour is the square?"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert paths == ["/v1/chat/completions"] * 3
    assert capsys.readouterr().out == "red\n" * 3


# ---------------------------------------------------------------------- directories a user modified
def test_overwrite_refuses_an_engines_directory_that_holds_the_users_own_files(tiny_ckpt, tmp_path, capsys):
    """--overwrite replaced an engines directory holding files llada-export never wrote (notes, results saved
    beside the engines) without a word: they were deleted with the old engines."""
    from helpers import export
    from llada_export.cli.export import main as export_main

    out = tmp_path / "eng"
    export(tiny_ckpt, out, prune=None, gen_length=8)
    manifest = (out / "manifest.json").read_bytes()
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "results.json").write_text("{}")
    argv = ["--model", str(tiny_ckpt), "-o", str(out), "--no-prune", "--max-prompt-tokens", "192",
            "--image-size", "384x384", "--gen-length", "8", "--overwrite", "-q"]
    with pytest.raises(SystemExit):
        export_main(argv)
    err = capsys.readouterr().err
    assert "holds files llada-export did not write (notes.txt, runs/results.json); --overwrite would delete" in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "runs" / "results.json").exists()
    assert (out / "manifest.json").read_bytes() == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eng")]  # no partial or lock left
    (out / "notes.txt").unlink()
    (out / "runs" / "results.json").unlink()
    assert export_main(argv) == 0  # the empty folder the user left is not a file of theirs


def test_checkpoint_overwrite_refuses_a_checkpoint_directory_that_holds_the_users_own_files(tmp_path, capsys):
    """llada-checkpoint --overwrite deleted the user's files in a checkpoint directory it had written."""
    from llada_export.cli.checkpoint import main

    out = tmp_path / "ckpt"
    assert main(["tiny", "-o", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["tiny", "-o", str(out), "--overwrite"])
    assert "holds files llada-checkpoint did not write (my_notes.txt); --overwrite would delete" in capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "mine"
    (out / "my_notes.txt").unlink()
    assert main(["tiny", "-o", str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------------- generate_batch's callbacks
def test_generate_batch_checks_its_callbacks_and_cancel_flags(engines, images):
    """on_step=5 or on_finish=5 ran the vision graph and a forward, then said only "'int' object is not
    callable"; a cancel() flag 'false' (or 'no') was read by its truth and cancelled the request, None kept it."""
    import torch

    from llada_export.runtime.pipeline import Pipeline, Request

    pipe = Pipeline.load(engines)
    req = [Request(images["380x250"], "What is shown?")]
    for name in ("on_step", "on_finish"):
        with pytest.raises(TypeError, match=rf"^{name} must be a callable or None, got a int; e\.g\. {name}=lambda"):
            pipe.generate_batch(req, gen_length=8, **{name: 5})
    for flags, shown in [(["false"], "'false'"), ([None], "None")]:
        with pytest.raises(ValueError, match=rf"^cancel\(\) returned {shown} for request 0: return True or False"):
            pipe.generate_batch(req, gen_length=8, cancel=lambda flags=flags: flags)
    # the booleans of a mask count still
    for mask, reason in [(np.array([True]), "cancelled"), (torch.tensor([False]), "length"), ([1], "cancelled")]:
        assert pipe.generate_batch(req, gen_length=8, cancel=lambda mask=mask: mask)[0].finish_reason in (
            {reason} if reason == "cancelled" else {"length", "stop"})


# ---------------------------------------------------------------------- llada-generate's output
def test_an_answer_that_stdout_cannot_encode_says_how_to_get_utf8(engines, images, tmp_path):
    """With a non-UTF-8 standard output (PYTHONIOENCODING=ascii, a Latin-1 locale) an answer holding other
    characters ended in "llada-generate: error: 'ascii' codec can't encode characters in position 2-3: ordinal
    not in range(128)", which named neither what could not be printed nor how to fix it."""
    import os
    import subprocess
    import sys

    from llada_export.runtime.pipeline import Pipeline

    images["380x250"].save(tmp_path / "a.png")
    prompt = "Line one\nLine two 🙂 مرحبا café"
    answer = Pipeline.load(engines).generate(str(tmp_path / "a.png"), prompt, gen_length=8).text
    assert not answer.isascii()  # the tiny random model's answer: byte tokens that decode to U+FFFD
    for stream in ([], ["--stream"]):
        run = subprocess.run([sys.executable, "-m", "llada_export.cli.generate", "--engines", str(engines), "--image",
                              str(tmp_path / "a.png"), "--prompt", prompt, "--gen-length", "8", *stream],
                             capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
        err = run.stderr.decode("ascii", "replace").strip().splitlines()
        assert run.returncode == 2 and len(err) == 1, err
        assert err[0].startswith("llada-generate: error: cannot print '\\u") and err[0].endswith(
            "standard output's encoding is ascii; set PYTHONIOENCODING=utf-8 (or a UTF-8 locale, e.g. "
            "LANG=C.UTF-8) and run it again")


def test_the_current_directory_is_refused_as_the_output(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """llada-export -o . from an empty directory wrote the engines, replaced the directory the shell stood in,
    then failed with '.: no manifest.json (not an engines directory written by llada-export)': the user's
    shell was left in a deleted folder that looked empty."""
    from llada_export.cli.export import main as export_main

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out, what in ((".", "is"), ("..", "holds")):
        if out == "..":
            (here / "sub").mkdir()
            monkeypatch.chdir(here / "sub")
        with pytest.raises(SystemExit):
            export_main(["--model", str(tiny_ckpt), "-o", out, "--no-prune", "--max-prompt-tokens", "192",
                         "--image-size", "384x384", "--gen-length", "8", "-q"])
        err = capsys.readouterr().err
        assert f"llada-export: error: {out} {what} the current directory: writing the engines directory replaces " \
               "it, which would leave this shell in a deleted folder; cd out of it" in err
    assert [p.name for p in here.iterdir()] == ["sub"] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
