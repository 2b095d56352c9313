"""GPU probe: what limits a full-size LLaDA-V denoising step on this GPU, measured part by part.

Runs in a minute or two on one GPU and writes ``<out>/gpu_probe.json`` + ``.md``:

* the machine (GPU, driver, kernel, torch) and the measured bf16 matmul peak (8192^3);
* cuBLAS GEMM throughput at the shapes of one decoder layer for a stage-B bucket
  (L' tokens) and an unpruned bucket (L tokens): q/k/v/o, gate/up, down, and the fused
  q|k|v and gate|up shapes;
* SDPA at those lengths (32 heads, head_dim 128, bf16) per backend: flash (no mask
  allowed), memory-efficient and cuDNN with the engines' boolean key mask;
* one full-size decoder layer (``graphs.llada.DecoderLayer``, bf16, fp32 norms/RoPE):
  eager, eager inside a CUDA graph, and ``torch.compile``;
* AOTInductor in a child process (a crash there must not end the probe): compile, load
  and run a small model's package with constants inside the .so and without them
  (``load_constants``, user-managed), capture the loaded package in a CUDA graph, and
  time one full-size decoder layer compiled by AOTInductor.

    python tools/gpu_probe.py --out OUT/probe [--lengths 1461,3816]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llada_export.config import TextConfig
from llada_export.graphs.llada import DecoderLayer, RotaryEmbedding, attention_mask
from llada_export.timing import matmul_peak, median_seconds


def bench(fn, warmup: int = 3, repeat: int = 10) -> float:
    return median_seconds(fn, repeat=repeat, warmup=warmup)


def machine() -> dict:
    def cmd(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:  # noqa: BLE001 - informational only
            return f"unavailable ({e})"

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "nvidia_smi": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def gemms(lengths: list[int], cfg: TextConfig) -> list[dict]:
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q/k/v/o": (d, d), "q|k|v fused": (3 * d, d), "gate/up": (i, d), "gate|up fused": (2 * i, d),
              "down": (d, i)}
    rows = []
    for m in lengths:
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            t = bench(lambda: F.linear(x, w))
            rows.append({"M": m, "op": name, "N": n, "K": k, "ms": t * 1e3, "tflops": 2 * m * n * k / t / 1e12})
    return rows


def attention(lengths: list[int], cfg: TextConfig) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, hd = cfg.num_attention_heads, cfg.head_dim
    rows = []
    for L in lengths:
        q, k, v = (torch.randn(1, h, L, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(1, L, dtype=torch.bool, device="cuda")
        mask[0, -3:] = False  # a few padded keys, as in a bucket
        m4 = attention_mask(mask)
        flops = 4 * h * L * L * hd
        for name, backend, use_mask in (("flash, no mask", SDPBackend.FLASH_ATTENTION, False),
                                        ("efficient, key mask", SDPBackend.EFFICIENT_ATTENTION, True),
                                        ("cudnn, key mask", SDPBackend.CUDNN_ATTENTION, True),
                                        ("cudnn, no mask", SDPBackend.CUDNN_ATTENTION, False),
                                        ("default choice, key mask", None, True)):
            def run():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m4 if use_mask else None)
            try:
                if backend is None:
                    t = bench(run)
                else:
                    with sdpa_kernel([backend]):
                        t = bench(run)
                rows.append({"L": L, "kernel": name, "ms": t * 1e3, "tflops": flops / t / 1e12})
            except Exception as e:  # noqa: BLE001 - a backend that does not take these inputs
                rows.append({"L": L, "kernel": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def random_layer(cfg: TextConfig) -> DecoderLayer:
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = DecoderLayer(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return layer.eval().requires_grad_(False)


def layer_inputs(cfg: TextConfig, L: int):
    x = torch.randn(1, L, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).cuda()(torch.arange(L, device="cuda")[None])
    key = torch.ones(1, L, dtype=torch.bool, device="cuda")
    key[0, -3:] = False
    return x, cos, sin, attention_mask(key)


def layer_flops(cfg: TextConfig, L: int) -> float:
    d, i = cfg.hidden_size, cfg.intermediate_size
    return 2 * L * (4 * d * d + 3 * d * i) + 4 * L * L * d


@torch.no_grad()
def decoder_layer(lengths: list[int], cfg: TextConfig, peak: float) -> list[dict]:
    layer = random_layer(cfg)
    rows = []
    for L in lengths:
        x, cos, sin, mask = layer_inputs(cfg, L)
        fl = layer_flops(cfg, L)

        def add(name, t):
            rows.append({"L": L, "variant": name, "ms": t * 1e3, "tflops": fl / t / 1e12, "share_of_peak": fl / t / peak,
                         "x32_layers_ms": 32 * t * 1e3})

        add("eager", bench(lambda: layer(x, cos, sin, mask)))
        add("eager, no key mask", bench(lambda: layer(x, cos, sin, None)))
        try:
            g = graph_of(lambda: layer(x, cos, sin, mask))
            add("eager in a CUDA graph", bench(g.replay))
        except Exception as e:  # noqa: BLE001
            rows.append({"L": L, "variant": "eager in a CUDA graph", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if L != lengths[0]:
            continue  # compile once (stage-B length): it costs tens of seconds
        try:
            t0 = time.perf_counter()
            comp = torch.compile(layer, dynamic=False)
            comp(x, cos, sin, mask)
            torch.cuda.synchronize()
            ct = time.perf_counter() - t0
            add("torch.compile", bench(lambda: comp(x, cos, sin, mask)))
            rows[-1]["compile_s"] = ct
        except Exception as e:  # noqa: BLE001
            rows.append({"L": L, "variant": "torch.compile", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """Capture ``fn`` (static inputs) in a CUDA graph after two warm-up runs on a side stream."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        graph_of.last_output = fn()
    return g


# ---------------------------------------------------------------------- AOTInductor (child process)
def aoti_child(out: Path, L: int) -> None:
    """Runs in a child process: every step prints one JSON line, so a crash shows where."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    def say(**kw):
        print("AOTI " + json.dumps(kw), flush=True)

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="aoti_probe_"))  # packages stay out of the report folder
    small = TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4)
    for name, cfg, length in (("small layer", small, 64), ("full-size layer", TextConfig(), L)):
        layer = random_layer(cfg)
        args = layer_inputs(cfg, length)
        with torch.no_grad():
            want = layer(*args)
            ep = torch.export.export(layer, args)
        for in_so in ((True, False) if name == "small layer" else (False,)):
            tag = f"{name}, constants {'in .so' if in_so else 'loaded at run time'}"
            try:
                t0 = time.perf_counter()
                path = work / f"{name.replace(' ', '_')}_{int(in_so)}.pt2"
                aoti_compile_and_package(ep, package_path=str(path),
                                         inductor_configs={"aot_inductor.package_constants_in_so": in_so})
                say(step="compiled", what=tag, seconds=time.perf_counter() - t0)
                runner = aoti_load_package(str(path))
                say(step="loaded", what=tag)
                if not in_so:
                    consts = dict(layer.state_dict())
                    runner.load_constants({k: consts[k] for k in runner.get_constant_fqns()},
                                          check_full_update=True, user_managed=True)
                    say(step="constants loaded", what=tag)
                got = runner(*args)
                got = got[0] if isinstance(got, (list, tuple)) else got
                err = (got.float() - want.float()).abs().max().item()
                say(step="ran", what=tag, max_abs_err=err, scale=want.float().abs().max().item())
                t = bench(lambda: runner(*args))
                say(step="timed", what=tag, ms=t * 1e3, tflops=layer_flops(cfg, length) / t / 1e12)
                # a CUDA graph around the loaded package (static inputs, as stage B would use it)
                g = graph_of(lambda: runner(*args))
                g.replay()
                torch.cuda.synchronize()
                so = graph_of.last_output
                so = so[0] if isinstance(so, (list, tuple)) else so
                say(step="cuda graph", what=tag, max_abs_err=(so.float() - want.float()).abs().max().item(),
                    ms=bench(g.replay) * 1e3)
            except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                say(step="error", what=tag, error=f"{type(e).__name__}: {str(e)[:400]}")


def run_aoti(out: Path, L: int, timeout: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--aoti-child", "--out", str(out), "--aoti-length", str(L)],
                           capture_output=True, text=True, timeout=timeout, env=env)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), ""
    steps = [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("AOTI ")]
    return {"returncode": rc, "seconds": time.perf_counter() - t0, "steps": steps,
            "stderr_tail": (stderr or "")[-3000:]}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# GPU probe: the parts of a full-size LLaDA-V denoising step", "",
             f"{m['gpu']} ({m['nvidia_smi']}), kernel {m['kernel']}, torch {m['torch']} (CUDA {m['cuda']}), "
             f"{m['date']}. Measured bf16 matmul peak (8192^3): **{res['peak_tflops']:.0f} TFLOP/s**.", "",
             "## GEMMs (cuBLAS, bf16)", "", "| M | op | N x K | ms | TFLOP/s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['M']} | {r['op']} | {r['N']} x {r['K']} | {r['ms']:.3f} | {r['tflops']:.0f} |" for r in res["gemm"]]
    lines += ["", "## Attention (SDPA, 32 heads x 128, bf16)", "", "| L | kernel | ms | TFLOP/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['L']} | {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.0f} |" if "ms" in r else
              f"| {r['L']} | {r['kernel']} | {r['error']} | |" for r in res["attention"]]
    lines += ["", "## One decoder layer (4096 / 12288, bf16, fp32 norms and RoPE)", "",
              "| L | variant | ms | TFLOP/s | % of peak | x 32 layers ms |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["layer"]:
        if "ms" in r:
            lines.append(f"| {r['L']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{100 * r['share_of_peak']:.0f} | {r['x32_layers_ms']:.1f} |")
        else:
            lines.append(f"| {r['L']} | {r['variant']} | {r['error']} | | | |")
    a = res.get("aoti")
    if a:
        lines += ["", f"## AOTInductor (child process: return code {a['returncode']}, {a['seconds']:.0f} s)", ""]
        lines += [f"- {json.dumps(s)}" for s in a["steps"]]
        if a["returncode"] != 0:
            lines += ["", "stderr tail:", "", "```", a["stderr_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", default="1461,3816", help="sequence lengths (default: stage B and unpruned, 1024x768)")
    p.add_argument("--aoti-length", type=int, default=1461)
    p.add_argument("--aoti-timeout", type=int, default=240)
    p.add_argument("--no-aoti", action="store_true")
    p.add_argument("--aoti-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replot", action="store_true", help="only rewrite gpu_probe.md from gpu_probe.json in --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        (args.out / "gpu_probe.md").write_text(markdown(json.loads((args.out / "gpu_probe.json").read_text())))
        return 0
    if args.aoti_child:
        aoti_child(args.out, args.aoti_length)
        return 0
    lengths = [int(v) for v in args.lengths.split(",")]
    cfg = TextConfig()
    res: dict = {"machine": machine()}
    print(json.dumps(res["machine"]), flush=True)
    res["peak_tflops"] = matmul_peak() / 1e12
    res["gemm"] = gemms(lengths, cfg)
    res["attention"] = attention(lengths, cfg)
    res["layer"] = decoder_layer(lengths, cfg, res["peak_tflops"] * 1e12)
    (args.out / "gpu_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_aoti:
        res["aoti"] = run_aoti(args.out, args.aoti_length, args.aoti_timeout)
    (args.out / "gpu_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / "gpu_probe.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
