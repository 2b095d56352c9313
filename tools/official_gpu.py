"""Anchor: the OFFICIAL LLaDA-V inference code, full size, random bf16 weights, timed on a GPU.

Time it on the same machine, back to back with our engines (tools/bench_gpu.py engines
--official OUT.json), and report ratios against these figures.

What to bring (none of it is part of this project; nothing of the official code is committed):
- your own checkout of the official LLaDA-V code, passed as --official PATH: the repository
  root (holding train/llava), its train folder, or the llava package folder itself. The
  measured run used train/llava of github.com/vukrosic/LLaDA-V at commit f8b02ce, a fork whose
  train/llava is ML-GSAI/LLaDA-V's plus the Fast-dLLM hook (llava/hooks/fast_dllm_hook.py,
  needed by --modes fast_dllm only); for example, outside this repository:
      git -C LLaDA-V archive f8b02ce train/llava | tar -x -C ~/official
- transformers 4.39.1, tokenizers 0.15.2 and huggingface_hub 0.36.2 (the official code does not
  import under transformers 5), installed into a folder of their own that only this process puts
  first on its path, and einops (torch, numpy, pillow and safetensors are used as installed):
      python3 -m pip install -q --no-deps --target /tmp/site transformers==4.39.1 \\
          tokenizers==0.15.2 huggingface_hub==0.36.2 einops
      PYTHONPATH=/tmp/site python3 tools/official_gpu.py --official ~/official --out official_gpu.json

What is timed is what a user of the official repo runs: LlavaLLaDAModelLM.generate(input_ids,
images=[crops], image_sizes=[(W, H)], steps, gen_length, block_length, temperature 0,
low_confidence): anyres splicing + vision tower + the sampler (under its own fp16 autocast), no
stopping criteria (random weights), no dLLM-Cache. Mode fast_dllm registers the repo's Fast-dLLM
hook the way its generate_demo.py does (prefix cache refreshed every 32 steps, threshold 1).
Only patch: the SigLIP tower is a random SigLipVisionConfig() model instead of a hub download
(the official load_model then deletes its last layer and head, as for so400m). Measured on one
H200 (2026-12-01, benchmarks/official_gpu.json; 1024x768, 61 text tokens, median of 2): vanilla
mc 0.393 s, chartqa 3.30 s, demo 22.8 s; fast_dllm mc 0.201 s, chartqa 1.11 s, demo 7.04 s.
--tiny runs a 2-layer model with a tiny tower on the CPU to try the script (it still needs the
official package and the pinned transformers; about 3 minutes on 2 cores for --presets mc).

Standalone on purpose: it runs under the official code's pinned transformers, where this
project's package need not be importable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

PRESETS = {"mc": (2, 2, 2), "chartqa": (16, 16, 16), "demo": (128, 128, 128)}  # gen, block, steps
MODES = ("vanilla", "fast_dllm")
PROG = "official_gpu.py"
LANGUAGE_MODEL = Path("llava/model/language_model/llava_llada.py")  # how the official package is recognised
HOOK = Path("llava/hooks/fast_dllm_hook.py")


class UsageError(ValueError):
    """Bad input: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def official_root(path: str, modes: list[str]) -> Path:
    """The folder to put first on ``sys.path`` so that ``import llava`` finds the official package:
    PATH itself, PATH/train (a repository root), or the parent of PATH (the ``llava`` folder)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"--official {path}: no such directory (pass your checkout of the official LLaDA-V code; "
                         "see --help for what to bring)")
    for root in (p, p / "train", p.parent):
        if (root / LANGUAGE_MODEL).is_file():
            if "fast_dllm" in modes and not (root / HOOK).is_file():
                raise UsageError(f"--official {path}: {root / HOOK} is missing, which --modes fast_dllm needs (use a "
                                 "checkout with the Fast-dLLM hook, or --modes vanilla)")
            return root.resolve()
    raise UsageError(f"--official {path}: no official llava package there (looked for {LANGUAGE_MODEL} in it, in its "
                     "train/ folder and beside it; see --help for what to bring)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="your checkout of the official LLaDA-V code (see above)")
    p.add_argument("--image", default="1024x768", help="image size WxH (default 1024x768)")
    p.add_argument("--text-tokens", type=int, default=61, help="text tokens around <image> (ours: 61)")
    p.add_argument("--presets", default="mc,chartqa,demo", help=f"comma-separated, of {', '.join(PRESETS)}")
    p.add_argument("--modes", default="vanilla,fast_dllm",
                   help="vanilla: the official sampler; fast_dllm: the official repo's Fast-dLLM hook as its "
                        "generate_demo.py sets it (prefix cache refreshed every 32 steps, threshold 1)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", required=True, help="the JSON to write (bench_gpu.py engines --official reads it)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide LM on the CPU: smoke test of this script")
    a = p.parse_args(argv)
    try:
        a.size = tuple(int(v) for v in a.image.lower().split("x"))
        if len(a.size) != 2 or min(a.size) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--image: expected WIDTHxHEIGHT like 1024x768, got {a.image!r}")
    for flag, given, known in (("--presets", a.presets, PRESETS), ("--modes", a.modes, MODES)):
        bad = [v for v in given.split(",") if v not in known]
        if bad:
            p.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    if a.text_tokens < 10 or a.repeat < 1:
        p.error("--text-tokens must be at least 10 and --repeat at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        root = official_root(a.official, a.modes.split(","))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    try:
        import transformers
        from llava.mm_utils import process_images
        from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAModelLM
        from llava.model.multimodal_encoder import siglip_encoder as se
    except ImportError as e:
        print(f"{PROG}: error: the official code in {root} does not import ({e}): install what it names (it needs "
              "transformers 4.39.1, tokenizers 0.15.2, huggingface_hub 0.36.2 and einops; see --help)", file=sys.stderr)
        return 2
    return run(a, transformers, process_images, LlavaLLaDAConfig, LlavaLLaDAModelLM, se)


def run(a, transformers, process_images, LlavaLLaDAConfig, LlavaLLaDAModelLM, se) -> int:
    import numpy as np
    import torch
    from PIL import Image

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: --tiny smoke runs only

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2) if a.tiny else {}
    se.SigLipVisionModel.from_pretrained = classmethod(lambda cls, name, **kw: cls(se.SigLipVisionConfig(**tower)))
    res: dict = {"what": __doc__.split("\n\n")[0], "versions": {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "cuda": torch.version.cuda}, "presets": {}}
    pins = [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]
    dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2) if a.tiny else \
        dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32)
    cfg = LlavaLLaDAConfig(
        vocab_size=126464, **dims,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False, tie_word_embeddings=False, use_cache=False,
        mm_vision_tower="google/siglip2-so400m-patch14-384", mm_hidden_size=32 if a.tiny else 1152,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=pins,
        mm_newline_position="grid", tokenizer_model_max_length=8192, mm_use_im_start_end=False,
        mm_use_im_patch_token=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlavaLLaDAModelLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    with torch.no_grad():
        model.get_model().image_newline.normal_()
    sync()
    res["build"] = {"seconds": time.perf_counter() - t0,
                    "params": sum(p.numel() for p in model.parameters()),
                    "attention_class": type(model.model.layers[0].self_attn).__name__
                    if hasattr(model.model, "layers") else "?",
                    "vision_layers": len(model.get_vision_tower().vision_tower.vision_model.encoder.layers),
                    "allocated_gib": torch.cuda.memory_allocated() / 2**30 if dev == "cuda" else 0.0}
    print(json.dumps(res["build"]), flush=True)

    w, h = a.size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    pix = process_images([img], model.get_vision_tower().image_processor, model.config)
    pix = [pix[0].to(dev, torch.bfloat16)]
    n_before = 10
    rng = np.random.default_rng(1)
    ids = [126080] + rng.integers(0, 126000, n_before - 1).tolist() + [-200] + \
        rng.integers(0, 126000, a.text_tokens - n_before).tolist()
    input_ids = torch.tensor([ids], device=dev)
    res["prompt"] = {"image": a.image, "crops": int(pix[0].shape[0]), "text_tokens": a.text_tokens}

    extra: dict = {}

    def request(gen, block, steps):
        return model.generate(input_ids, images=pix, image_sizes=[(w, h)], modalities=["image"], steps=steps,
                              gen_length=gen, block_length=block, temperature=0.0, remasking="low_confidence",
                              mask_id=126336, **extra)

    forwards = {"n": 0}
    model.model.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    for mode in a.modes.split(","):
        if mode == "fast_dllm":
            from llava.hooks.fast_dllm_hook import register_fast_dllm_hook
            register_fast_dllm_hook(model)
            extra.update(prefix_refresh_interval=32, threshold=1)
        res["presets"][mode] = run_mode(a, request, forwards, res, mode, sync, dev)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def run_mode(a, request, forwards, res, mode, sync, dev) -> dict:
    import torch

    rows = res["presets"].setdefault(mode, {})
    with torch.no_grad():
        request(*PRESETS["mc"])  # warm-up: CUDA / cuBLAS initialisation
        sync()
        for name in a.presets.split(","):
            ts = []
            for _ in range(a.repeat):
                forwards["n"] = 0
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                out = request(*PRESETS[name])
                sync()
                ts.append(time.perf_counter() - t0)
            rows[name] = {"median_s": statistics.median(ts), "all_s": ts, "forwards": forwards["n"],
                          "out_len": int(out.shape[-1]),
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0}
            print(mode, name, json.dumps(rows[name]), flush=True)
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
