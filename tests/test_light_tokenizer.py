"""The runtime's tokenizer without transformers (light_tokenizer.py) against transformers' own,
and the export's check that decides which one an engines directory loads."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llada_export.contract.manifest import Manifest
from llada_export.demo import DEMO_MODEL
from llada_export.light_tokenizer import (EXPORT_KEY, LightTokenizer, differences, export_record,
                                                  open_tokenizer, probe_conversations)
from llada_export.synthetic.tokenizer import build_tokenizer
from llada_export.tokenizer import decode_answer, encode_prompt, load_tokenizer, special_tokens

PROMPTS = [("What is in the picture? Answer briefly.", True, ()), ("Grüße, naïve café 日本 🙂", False, ()),
           ("And then?", True, (("user", "How many?"), ("assistant", "Three."))), ("  padded  \n", False, ())]


def stand_in(tmp_path, kind, add_bos):
    out = tmp_path / f"{kind}_{add_bos}"
    build_tokenizer(kind, add_bos=add_bos).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind,add_bos", [("tiny", False), ("tiny", True), ("full", False), ("demo", False)])
def test_same_ids_and_text_as_transformers(tmp_path, kind, add_bos):
    path = DEMO_MODEL if kind == "demo" else stand_in(tmp_path, kind, add_bos)
    hf, light = load_tokenizer(path), LightTokenizer(path)
    assert special_tokens(light) == special_tokens(hf)
    assert light.bos_token_id == hf.bos_token_id and light.eos_token_id == hf.eos_token_id
    for text, image, history in PROMPTS:
        for system in ("", "You are terse."):
            want = encode_prompt(hf, text, has_image=image, system=system, history=history)
            assert encode_prompt(light, text, has_image=image, system=system, history=history) == want
            assert len(want[0]) > 3
    ids = hf("Grüße 日本 🙂 done").input_ids + [hf.eos_token_id, hf.bos_token_id] + hf("tail").input_ids
    for k in range(1, len(ids) + 1):  # every prefix: the cut ones end inside a UTF-8 character
        assert decode_answer(light, ids[:k]) == decode_answer(hf, ids[:k])
    assert decode_answer(hf, ids).startswith("Grüße 日本 🙂 done")
    assert light.get_added_vocab() == hf.get_added_vocab() and light.get_vocab() == hf.get_vocab()
    assert light.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)


def test_the_check_finds_a_difference(tmp_path):
    path = stand_in(tmp_path, "tiny", False)
    hf, light = load_tokenizer(path), LightTokenizer(path)
    assert differences(hf, light) == []
    assert len(probe_conversations()) >= 20
    light.clean_up_tokenization_spaces = True  # a decode rule transformers does not apply to this BPE tokenizer
    found = differences(hf, light)
    assert found and "answer" in found[0] and "Isn 't" in found[0]
    # a tokenizer the light one cannot read at all (no tokenizer.json): the record says why, with a note
    (tmp_path / "slow").mkdir()
    shutil.copy(path / "tokenizer_config.json", tmp_path / "slow")
    record, note = export_record(hf, tmp_path / "slow")
    assert isinstance(record, str) and "tokenizer.json" in record and "transformers" in note
    assert export_record(hf, path) == (True, None)


def test_the_choice(tmp_path, monkeypatch):
    path = stand_in(tmp_path, "tiny", False)
    monkeypatch.delenv("LLADA_TOKENIZER", raising=False)
    assert type(open_tokenizer(path, {EXPORT_KEY: True})[0]) is LightTokenizer
    assert open_tokenizer(path, {})[1] == "transformers"  # an older export: no record
    assert open_tokenizer(path, {EXPORT_KEY: "prompt differs"})[1] == "transformers"
    monkeypatch.setenv("LLADA_TOKENIZER", "transformers")
    assert open_tokenizer(path, {EXPORT_KEY: True})[1] == "transformers"
    monkeypatch.setenv("LLADA_TOKENIZER", "fast")
    with pytest.raises(ValueError, match="LLADA_TOKENIZER='fast': expected one of auto, transformers"):
        open_tokenizer(path, {EXPORT_KEY: True})


LOAD = """
import json, sys
from llada_export.runtime.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[1], warmup=False)
r = pipe.generate(sys.argv[2], "What is shown?", seed=3)
print(json.dumps({"kind": pipe.tokenizer_kind, "transformers": "transformers" in sys.modules, "ids": r.ids,
                  "text": r.text}))
"""


def test_engines_load_without_transformers(cache_engines, tmp_path):
    """The export recorded the check; a fresh process loads the engines and answers without importing
    transformers, with the same ids and text as with transformers' tokenizer."""
    assert Manifest.read(cache_engines, verify=False).export[EXPORT_KEY] is True
    from PIL import Image

    Image.new("RGB", (300, 200), (200, 30, 90)).save(tmp_path / "red.png")
    runs = {}
    for choice in ("auto", "transformers"):
        env = {**os.environ, "LLADA_TOKENIZER": choice}
        r = subprocess.run([sys.executable, "-c", LOAD, str(cache_engines), str(tmp_path / "red.png")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[choice] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["auto"]["kind"] == "light" and runs["auto"]["transformers"] is False
    assert runs["transformers"]["kind"] == "transformers" and runs["transformers"]["transformers"] is True
    assert runs["auto"]["ids"] == runs["transformers"]["ids"] and runs["auto"]["text"] == runs["transformers"]["text"]
    assert len(runs["auto"]["ids"]) > 0
