"""llada-compare on the README's demo and serving engines and on fp16 engines; a perturbed
checkpoint still fails; what a failed or refused run leaves behind. (Tiny engines of several
seeds: test_compare_seeds.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import shared
from helpers import export
from polygraphy.json import load_json
from safetensors.torch import load_file, save_file
from test_compare_seeds import compare, seed_engines

from llada_export.compare import BUNDLED
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings
from llada_export.demo import DEMO_IMAGE, DEMO_MODEL


def _copy(engines: Path, tmp_path: Path) -> Path:
    """A private copy (the shared fixtures' `<engines>-compare/` siblings are other tests' business)."""
    out = tmp_path / "eng"
    shutil.copytree(engines, out)
    return out


def test_compare_fails_on_engines_of_another_checkpoint_and_leaves_nothing(tmp_path_factory, tmp_path):
    """Engines against a checkpoint with one weight tensor changed (same config): exit 1 on the
    logits, the report says so, and no `<engines>-compare/` stays behind."""
    root = seed_engines(tmp_path_factory, 0)
    ck = tmp_path / "ck"
    shutil.copytree(root / "ck", ck)
    shard = next(ck.glob("*.safetensors"))
    weights = load_file(str(shard))
    weights["model.layers.3.mlp.down_proj.weight"] *= 1.05  # the last layer: both stages' logits
    save_file(weights, str(shard), metadata={"format": "pt"})
    eng = _copy(root / "eng", tmp_path)
    assert compare(eng, ck, tmp_path / "r.json", "--presets", "mc") == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    failed = {(g["graph"], o) for g in rep["graphs"] for o, s in g["stats"].items() if not s["passed"]}
    assert {("stage_a", "logits"), ("stage_b", "logits")} <= failed
    assert not rep["passed"] and any("removed" in n for n in rep["notes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "eng", "r.json", "r.md"]


def test_compare_fp16_engines_use_fp16_tolerances(tmp_path_factory, tmp_path):
    """`--dtype float16` ONNX Runtime engines pass with the fp16 tolerances (2e-2 of each output's
    scale; up to 10% of the kept visual tokens may differ). bf16 ONNX graphs need the CUDA EP."""
    root = seed_engines(tmp_path_factory, 0, "float16")
    assert Manifest.read(root / "eng").dtype == "float16"
    code = compare(root / "eng", root / "ck", tmp_path / "r.json", "--presets", "mc",
                   "--save-dir", str(tmp_path / "pg"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, rep
    assert rep["dtype"] == "float16"
    for g in rep["graphs"]:
        assert g["tolerances"]["logits" if "logits" in g["tolerances"] else "features"]["rtol"] == 2e-2
    kept = next(g for g in rep["graphs"] if g["graph"] == "stage_a")["tolerances"]["kept_index"]["atol"]
    assert kept == int(0.1 * round(0.35 * 118)) == 4  # 10% of the 41 kept visual tokens
    assert rep["agreement"] and not any(a["strict"] for a in rep["agreement"])


def test_prompt_replaces_the_built_ins_and_backend_selects(engines, tiny_ckpt, images, tmp_path):
    """`--image/--prompt` replace the built-in prompts; `--backend` picks the graphs checked."""
    img = tmp_path / "a.png"
    images["384x384"].save(img)  # 136 visual tokens (the bundled image gives 118)
    prompt = "<image>\nWhat is here?"
    code = compare(engines, tiny_ckpt, tmp_path / "r.json", "--image", str(img), "--prompt", prompt, "--backend",
                   "onnxruntime", "--presets", "mc", "--save-dir", str(tmp_path / "pg"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, rep
    assert [(a["image"], a["prompt"]) for a in rep["agreement"]] == [(str(img), prompt)]
    assert {g["backend"] for g in rep["graphs"]} == {"onnxruntime"}
    # the per-graph inputs come from the user's image too
    feeds = load_json(str(tmp_path / "pg" / "onnxruntime_stage_a_inputs.json"))[0]
    assert int((feeds["visual_mask"] & feeds["key_mask"].astype(bool)).sum()) == 136


def test_what_cannot_run_is_refused_before_comparing(engines, tiny_ckpt, tmp_path, capsys):
    """A user's prompt too long for the bucket, a backend not built: exit 2 in one line, before any
    comparison; the report (asked for) says why; no Polygraphy files."""
    eng = _copy(engines, tmp_path)
    long_prompt = "<image>\n" + "describe every colour and shape " * 60
    assert compare(eng, tiny_ckpt, tmp_path / "r.json", "--image", str(DEMO_IMAGE), "--prompt", long_prompt) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "these engines take at most 192" in err[0]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not rep["passed"] and "at most 192" in rep["error"] and not rep["graphs"]
    assert "Could not compare" in (tmp_path / "r.md").read_text()
    assert compare(eng, tiny_ckpt, tmp_path / "b.json", "--backend", "aoti") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'aoti' was not built" in err[0]
    assert "not built" in json.loads((tmp_path / "b.json").read_text())["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md", "eng", "r.json", "r.md"]


def _demo_engines(out: Path) -> Path:
    """The README's serving engines (`--prune-layer 3 --keep 0.5 --cache --image-size 384x288
    --gen-length 32 --max-prompt-tokens 72`) at batch size 1 (4 would only make the eager oracle
    slower). make demo's engines add the unpruned graphs (compared on tiny engines by test_compare)."""
    return export(DEMO_MODEL, out, prune=PruneSettings(3, 0.5), image_size=(384, 288), gen_length=32,
                  max_prompt_tokens=72, cache=True)


def test_compare_passes_on_the_readme_demo_and_serving_engines(tmp_path_factory, tmp_path, capsys):
    """Every built-in prompt fits the serving bucket (72 prompt tokens; the longer built-in takes 71)."""
    eng = shared(tmp_path_factory, "compare_demo_engines", _demo_engines)
    code = compare(eng, DEMO_MODEL, tmp_path / "r.json", "--save-dir", str(tmp_path / "pg"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, rep
    assert not [n for n in rep["notes"] if "skipped: " in n and "built-in prompt" in n]
    assert {a["prompt"] for a in rep["agreement"]} == {p for _, p in BUNDLED}
    assert {a["preset"] for a in rep["agreement"]} == {"mc", "chartqa"}
    assert {g["graph"] for g in rep["graphs"]} == {"vision", "stage_a", "stage_b", "prefill", "cached"}
    assert all(a["engine_vs_reference_exact"] for a in rep["agreement"])


def test_a_built_in_prompt_that_does_not_fit_is_skipped_and_said(multi_size_engines, tiny_ckpt, tmp_path, capsys):
    """A bucket of 112 prompt tokens (conftest's multi_size_engines: 384x288, G 16): with the tiny tokenizer the
    first built-in prompt takes 108, the second 120, so the second is skipped, and the output and the report say so."""
    eng = _copy(multi_size_engines, tmp_path)
    assert Manifest.read(eng).bucket.max_text_tokens == 112
    # its ONNX graphs (the Inductor ones beside them compile for minutes on a CPU; the prompts are checked first)
    code = compare(eng, tiny_ckpt, tmp_path / "r.json", "--backend", "onnxruntime", "--save-dir", str(tmp_path / "pg"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, rep
    (note,) = [n for n in rep["notes"] if "skipped" in n and "built-in prompt" in n]
    assert note.startswith(f"built-in prompt {BUNDLED[1][1]!r} skipped: ") and "120 text tokens" in note
    assert f"note: built-in prompt {BUNDLED[1][1]!r} skipped" in capsys.readouterr().err
    assert {a["prompt"] for a in rep["agreement"]} == {BUNDLED[0][1]}


def test_an_interrupted_run_keeps_an_earlier_runs_files(engines, tiny_ckpt, tmp_path):
    """Ctrl-C after this run set an earlier run's Polygraphy files aside and wrote its first own: exit 130 and
    `<engines>-compare/` holds the earlier files as they were (an earlier report's commands still work)."""
    eng = _copy(engines, tmp_path)
    save = tmp_path / "eng-compare"
    save.mkdir()
    earlier = {f"onnxruntime_vision{s}": f"earlier {s}" for s in ("_inputs.json", "_reference_outputs.json", "_check.py")}
    for name, text in earlier.items():
        (save / name).write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "llada_export.cli.compare", "--engines", str(eng), "--model",
                             str(tiny_ckpt), "--presets", "mc,chartqa"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    written = save / "onnxruntime_vision_reference_outputs.json"

    def own_written() -> bool:  # the earlier files set aside (the folder made before they move) and this run's there
        try:
            return bool(list(save.glob(".previous-*"))) and written.read_text() != earlier[written.name]
        except FileNotFoundError:  # between the move of the earlier file and the write of this run's
            return False

    deadline = time.monotonic() + 120
    while not own_written() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert written.read_text() != earlier[written.name]  # this run's own
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert {p.name: p.read_text() for p in save.iterdir()} == earlier


def test_an_interrupted_run_leaves_no_polygraphy_files(engines, tiny_ckpt, tmp_path):
    """Ctrl-C after the first graph's Polygraphy files were written: exit 130 and `<engines>-compare/`
    is gone (the end-to-end check with chartqa's 16 steps still had seconds to run)."""
    eng = _copy(engines, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "llada_export.cli.compare", "--engines", str(eng), "--model",
                             str(tiny_ckpt), "--presets", "mc,chartqa"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    written = tmp_path / "eng-compare" / "onnxruntime_vision_reference_outputs.json"
    deadline = time.monotonic() + 120
    while not written.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == "llada-compare: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
