"""Checkpoint writer / loader (official HF layout) and the llada-checkpoint CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_export.checkpoint.io import INDEX_NAME, VISION_LAYER_PREFIX, CheckpointError, LazyState, save_checkpoint
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.cli.checkpoint import main as cli_main
from llada_export.config import ConfigError, full_config, tiny_config
from llada_export.outdir import OutputDirError
from llada_export.synthetic.tokenizer import FULL_VOCAB_SIZE, build_tokenizer
from llada_export.synthetic.weights import random_checkpoint, random_state

SHARD = 300_000  # bytes: the tiny fp32 model (~2.5 MB) gets several shards


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=3, max_shard_bytes=SHARD)


@pytest.fixture
def copy_dir(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def tiny_cfg_and_tokenizer():
    cfg, tok = tiny_config(), build_tokenizer("tiny")
    cfg.text.vocab_size = len(tok)
    return cfg, tok


def index_of(d: Path) -> dict[str, str]:
    return json.loads((d / INDEX_NAME).read_text())["weight_map"]


def files_state(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, read independently of the loader."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index_of(d).values())):
        out.update(load_file(d / f))
    return out


# ---------------------------------------------------------------------- round trip
def test_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json"} <= names
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    state = files_state(tiny_dir)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    tok = build_tokenizer("tiny")
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_llada" and cfg["vocab_size"] == len(tok)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    n_vision = len({k[len(VISION_LAYER_PREFIX):].split(".")[0] for k in state if k.startswith(VISION_LAYER_PREFIX)})
    assert n_vision == tiny_config().vision.num_hidden_layers - 1
    # init rule: norm weights ones, everything else random
    assert torch.equal(state["model.norm.weight"], torch.ones_like(state["model.norm.weight"]))
    assert 0.015 < state["model.layers.0.mlp.up_proj.weight"].std() < 0.025


def test_round_trip(tiny_dir):
    model, tok, cfg = load_checkpoint(tiny_dir)
    state = files_state(tiny_dir)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, t in state.items():
        assert torch.equal(loaded[k], t), k
    assert not model.training and cfg.text.vocab_size == len(tok)
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    p, g = 7, 5
    prefix = model.embed(torch.tensor([[tok.bos_token_id] * p]))
    out = model.denoise(prefix, torch.full((1, g), tok.convert_tokens_to_ids("<|mdm_mask|>")), torch.arange(p + g)[None])
    assert out.shape == (1, g, cfg.text.vocab_size) and torch.isfinite(out).all()
    feats = model.encode_images(torch.zeros(1, 3, 384, 384))
    assert feats.shape == (1, cfg.vision.tokens_per_crop, cfg.text.hidden_size) and torch.isfinite(feats).all()


def test_load_dtype_conversion(tiny_dir):
    model, _, _ = load_checkpoint(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = files_state(tiny_dir)["lm_head.weight"].to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight, ref)


def test_weights_do_not_depend_on_sharding(tiny_dir, tmp_path):
    one = random_checkpoint("tiny", tmp_path / "one", seed=3)  # default shard size: one shard
    assert len(set(index_of(one).values())) == 1
    a, b = files_state(tiny_dir), files_state(one)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = files_state(random_checkpoint("tiny", tmp_path / "seed4", seed=4))
    assert not torch.equal(a["lm_head.weight"], other["lm_head.weight"])


def test_single_file_layout(tiny_dir, tmp_path):
    d = Path(shutil.copytree(tiny_dir, tmp_path / "single", ignore=shutil.ignore_patterns("model*")))
    save_file(files_state(tiny_dir), d / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load_checkpoint(d)
    assert torch.equal(model.lm_head.weight, files_state(tiny_dir)["lm_head.weight"])


def test_save_from_model_state_dict(tiny_dir, tmp_path):
    model, tok, cfg = load_checkpoint(tiny_dir)
    d = save_checkpoint(model.state_dict(), cfg, tok, tmp_path / "resaved", max_shard_bytes=SHARD)
    a, b = files_state(tiny_dir), files_state(d)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a loaded tokenizer carries how it was loaded; the re-saved config must not
    conf = json.loads((d / "tokenizer_config.json").read_text())
    assert "is_local" not in conf and "local_files_only" not in conf
    assert conf == json.loads((tiny_dir / "tokenizer_config.json").read_text())


def test_auto_bos_tokenizer_survives_save(tmp_path):
    d = random_checkpoint("tiny", tmp_path / "bos", add_bos=True)
    _, tok, _ = load_checkpoint(d)
    assert tok("hi").input_ids[0] == tok.bos_token_id
    assert tok.chat_template == build_tokenizer("tiny").chat_template


# ---------------------------------------------------------------------- vision layers
def test_full_vision_tower_drops_last_layer(tmp_path):
    cfg, tok = tiny_cfg_and_tokenizer()
    n = cfg.vision.num_hidden_layers
    d = save_checkpoint(random_state(cfg, seed=1, vision_layers=n), cfg, tok, tmp_path / "27of27")
    state = files_state(d)
    assert any(k.startswith(f"{VISION_LAYER_PREFIX}{n - 1}.") for k in state)
    model, _, _ = load_checkpoint(d)
    layers = model.model.vision_tower.vision_tower.vision_model.encoder.layers
    assert len(layers) == n - 1
    loaded = model.state_dict()
    assert not any(k.startswith(f"{VISION_LAYER_PREFIX}{n - 1}.") for k in loaded)
    for k, t in loaded.items():
        assert torch.equal(t, state[k]), k


def test_wrong_vision_layer_count(tmp_path):
    cfg, tok = tiny_cfg_and_tokenizer()
    n = cfg.vision.num_hidden_layers
    with pytest.raises(CheckpointError, match=f"hold {n - 2} vision encoder layers"):
        save_checkpoint(random_state(cfg, vision_layers=n - 2), cfg, tok, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- damaged checkpoints
def test_missing_shard(copy_dir):
    victim = sorted(set(index_of(copy_dir).values()))[1]
    (copy_dir / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint(copy_dir)


def test_renamed_key(copy_dir):
    key = "model.layers.1.mlp.up_proj.weight"
    fname = index_of(copy_dir)[key]
    tensors = load_file(copy_dir / fname)
    tensors["model.layers.1.mlp.upp_proj.weight"] = tensors.pop(key)
    save_file(tensors, copy_dir / fname, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(copy_dir)
    msg = str(e.value)
    assert f"missing tensor {key} (the index puts it in {fname})" in msg
    assert f"{fname}: unexpected tensor model.layers.1.mlp.upp_proj.weight" in msg


def test_wrong_shape(copy_dir):
    key = "model.mm_projector.0.weight"
    fname = index_of(copy_dir)[key]
    tensors = load_file(copy_dir / fname)
    good = list(tensors[key].shape)
    tensors[key] = torch.zeros(good[0], good[1] + 1)
    save_file(tensors, copy_dir / fname, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{fname}: {key} has shape \[{good[0]}, {good[1] + 1}\], "
                                              rf"expected \[{good[0]}, {good[1]}\]"):
        load_checkpoint(copy_dir)


def test_truncated_shard(copy_dir):
    fname = index_of(copy_dir)["lm_head.weight"]
    path = copy_dir / fname
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{fname}: truncated"):
        load_checkpoint(copy_dir)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=rf"{fname}: 5 bytes, too short"):
        load_checkpoint(copy_dir)


def test_garbage_header(copy_dir):
    fname = index_of(copy_dir)["lm_head.weight"]
    path = copy_dir / fname
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{x"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{fname}: unreadable safetensors header"):
        load_checkpoint(copy_dir)


def test_foreign_config(copy_dir):
    cfg = json.loads((copy_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (copy_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*model_type 'llama'.*llava_llada"):
        load_checkpoint(copy_dir)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------- writer safety
def test_refuses_to_overwrite_what_it_did_not_write(tmp_path):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not a checkpoint this tool wrote: never replaced
        with pytest.raises(OutputDirError, match="not a checkpoint directory written by this tool"):
            random_checkpoint("tiny", d, overwrite=overwrite)
        assert [p.name for p in d.iterdir()] == ["keep.txt"]
    ours = random_checkpoint("tiny", tmp_path / "ours")
    with pytest.raises(OutputDirError, match="pass overwrite=True"):
        random_checkpoint("tiny", ours, seed=1)
    random_checkpoint("tiny", ours, seed=1, overwrite=True)
    assert (ours / INDEX_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "ours"]  # no stray temporaries


def test_writing_into_the_source_checkpoint_is_refused(tiny_dir, tmp_path):
    """A checkpoint written from a loaded one must not land in, on or around its source."""
    model, tok, cfg = load_checkpoint(tiny_dir)
    for out in (tiny_dir, tiny_dir / "sub", tiny_dir.parent):
        with pytest.raises(OutputDirError, match="must not be modified"):
            save_checkpoint(model.state_dict(), cfg, tok, out, overwrite=True, protect=[tiny_dir])
    assert load_checkpoint(tiny_dir)[2].hash() == cfg.hash()


def test_failure_leaves_nothing(tmp_path):
    cfg, tok = tiny_cfg_and_tokenizer()
    good = random_state(cfg)
    calls = []

    def make(spec):
        calls.append(spec.name)
        if len(calls) == 20:
            raise RuntimeError("disk on fire")
        return good.make(spec)

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(LazyState(good.specs, make), cfg, tok, tmp_path / "out", max_shard_bytes=SHARD)
    assert list(tmp_path.iterdir()) == []


def test_full_preset_streams_without_materialising():
    cfg, n_vocab = full_config(), FULL_VOCAB_SIZE
    state = random_state(cfg, dtype=torch.bfloat16)  # specs come from a meta model: instant
    total = sum(s.nbytes for s in state.specs)
    assert 16.0e9 < total < 17.5e9  # ~8.4B parameters in bf16
    spec = {s.name: s for s in state.specs}
    assert spec["model.embed_tokens.weight"].shape == (n_vocab, 4096)
    assert spec["lm_head.weight"].shape == (n_vocab, 4096)
    assert not any(s.name.startswith(f"{VISION_LAYER_PREFIX}26.") for s in state.specs)
    assert any(s.name.startswith(f"{VISION_LAYER_PREFIX}25.") for s in state.specs)
    t = state.make(spec["model.layers.0.input_layernorm.weight"])  # one small tensor, made on demand
    assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones(4096, dtype=torch.bfloat16))


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize("seed", ["-1", str(2**63), "1e3"])
def test_cli_seed_is_in_the_range_every_tool_takes(tmp_path, capsys, seed):
    """-1 wrote the weights of 2**64 - 1; the other tools take 0 .. 2**63 - 1. Nothing is written."""
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "tiny", "-o", str(tmp_path / "c"), "--seed", seed])
    assert e.value.code == 2 and "argument --seed:" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_writes_and_refuses_overwrite(tmp_path, capsys):
    d = tmp_path / "cli"
    assert cli_main(["--preset", "tiny", "-o", str(d), "--max-shard-size", "500kB"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {d}" in out and "shards" in out
    assert (d / INDEX_NAME).is_file() and (d / "config.json").is_file()
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "tiny", "-o", str(d), "--seed", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llada-checkpoint: error: ") and "pass --overwrite" in err[0]
    assert "overwrite=True" not in err[0]
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before

    assert cli_main(["--preset", "tiny", "-o", str(d), "--seed", "1", "--overwrite", "--dtype", "bfloat16"]) == 0
    model, _, cfg = load_checkpoint(d)
    assert cfg.torch_dtype == "bfloat16" and model.dtype == torch.bfloat16


def test_cli_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "huge", "-o", "x"])
    assert e.value.code == 2


# ---------------------------------------------------------------------- loader: what the official layout allows
def test_loads_without_tokenizer_files(copy_dir, tiny_dir):
    """The model, the vision tower and the sampler need no tokenizer: a clear error only where
    text must be encoded."""
    from llada_export.reference import embed_prompt
    from llada_export.tokenizer import TokenizerError

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (copy_dir / f).unlink(missing_ok=True)
    model, tok, cfg = load_checkpoint(copy_dir)
    assert tok is None
    ref_model, _, _ = load_checkpoint(tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    with pytest.raises(TokenizerError, match="needs the tokenizer"):
        embed_prompt(model, tok, None, "hello")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_checkpoint(copy_dir, require_tokenizer=True)


def test_local_vision_tower_directory_supplies_the_dimensions(copy_dir):
    """Like the official loader: ``mm_vision_tower`` naming a local SigLIP directory with its own
    config.json gives the tower's dimensions (without it so400m is assumed, which this tiny tower
    is not)."""
    conf = json.loads((copy_dir / "config.json").read_text())
    vision = conf.pop("vision_config")
    conf["mm_vision_tower"] = "siglip-tower"
    (copy_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="does not match the vision tower width 1152"):
        load_checkpoint(copy_dir)
    tower = copy_dir / "siglip-tower"
    tower.mkdir()
    siglip = {"model_type": "siglip", "vision_config": {k: vision[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")}}
    (tower / "config.json").write_text(json.dumps(siglip))
    model, _, cfg = load_checkpoint(copy_dir)
    assert cfg.vision.hidden_size == vision["hidden_size"] and cfg.vision.patch_size == vision["patch_size"]
    assert len(model.model.vision_tower.vision_tower.vision_model.encoder.layers) == vision["num_hidden_layers"] - 1


# ---------------------------------------------------------------------- issue 20: one-line errors that say what is wrong
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
def test_cli_refuses_an_init_std_that_is_not_a_finite_positive_number(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "tiny", "-o", str(tmp_path / "ck"), "--init-std", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-std" in err[0] and "finite number > 0" in err[0], err
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="init_std must be a finite number > 0"):
        random_checkpoint("tiny", tmp_path / "api", init_std=float(value))
    assert not (tmp_path / "api").exists()


def test_missing_tokenizer_json_is_named(copy_dir):
    """tokenizer_config.json without tokenizer.json: the error names the file (transformers' own says
    it cannot convert a slow tokenizer without sentencepiece or tiktoken)."""
    from llada_export.exporter.build import ExportOptions, preflight

    (copy_dir / "tokenizer.json").unlink()
    for call in (lambda: load_checkpoint(copy_dir), lambda: preflight(ExportOptions(str(copy_dir), str(copy_dir) + "-e"))):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "no tokenizer.json" in msg and str(copy_dir) in msg
        assert "sentencepiece" not in msg and "tiktoken" not in msg


@pytest.mark.parametrize("delta", [2, -2])
def test_layer_count_that_does_not_match_the_weights_says_both_counts(copy_dir, delta):
    """A config whose num_hidden_layers is not the weights' printed every missing tensor (1,289
    characters): now both counts and the first few keys."""
    conf = json.loads((copy_dir / "config.json").read_text())
    n = conf["num_hidden_layers"]
    conf["num_hidden_layers"] = n + delta
    (copy_dir / "config.json").write_text(json.dumps(conf))
    per_layer = len([k for k in files_state(copy_dir) if k.startswith("model.layers.0.")])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(copy_dir)
    msg = str(e.value)
    assert f"config.json says {n + delta} decoder layers (num_hidden_layers) but the weights hold {n} " \
           f"(layers 0..{n - 1})" in msg
    first = n if delta > 0 else n + delta
    word = "missing" if delta > 0 else "unexpected"
    assert f"{word} model.layers.{first}." in msg and f"({abs(delta) * per_layer} in all)" in msg
    assert "\n" not in msg and len(msg) < 500 and msg.count(word) == 3
