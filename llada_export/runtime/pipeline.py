"""``Pipeline``: vision -> stage A (once) -> stage B (every later step) with the official sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..config import LLaDAVConfig
from ..engines.runners import RUNNERS, Runner
from ..exporter.bucket import Bucket
from ..exporter.manifest import ManifestError, read_manifest
from ..graphs.anyres import assemble, load_image, preprocess
from ..graphs.pruning import num_kept
from ..tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt
from .sampler import GenerationConfig, generate, preset as get_preset


class RequestError(ValueError):
    """A request that does not fit the engines' bucket."""


@dataclass
class GenerationResult:
    text: str
    ids: list[int]
    kept_visual: list[int] | None  # kept visual positions in the unpadded prompt (None: unpruned)
    n_visual: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_times: list[float] = field(default_factory=list)  # seconds per denoising forward

    def to_dict(self) -> dict:
        return dict(text=self.text, ids=self.ids, kept_visual=self.kept_visual, n_visual=self.n_visual,
                    timings=self.timings, step_times=self.step_times)


@dataclass
class BucketInputs:
    prefix_embeds: torch.Tensor  # [1, P, D] fp32
    position_ids: torch.Tensor  # [1, L]
    key_mask: torch.Tensor  # [1, L] bool
    visual_mask: torch.Tensor  # [1, L] bool
    n_visual: int
    gen_length: int


def layout_bucket(b: Bucket, before: torch.Tensor, visual: torch.Tensor, after: torch.Tensor,
                  gen_length: int) -> BucketInputs:
    """Place a request in the bucket: [before | visual + pad to V | after | pad to T | G response].

    before [nb, D], visual [nv, D], after [na, D], all on one device (the result's). Real
    tokens get the position ids they would have unpadded; padding slots are masked keys
    (position 0); response slots past ``gen_length`` are masked too.
    """
    nb, nv, na = before.shape[0], visual.shape[0], after.shape[0]
    p, v, g = b.prefix_len, b.max_visual_tokens, b.gen_length
    with torch.device(visual.device):  # every tensor below on the request's device
        emb = torch.zeros(1, p, before.shape[1])  # [1, P, D]
        emb[0, :nb] = before.float()
        emb[0, nb: nb + nv] = visual.float()
        emb[0, nb + v: nb + v + na] = after.float()
        key = torch.zeros(1, p + g, dtype=torch.bool)  # [1, L]
        key[0, : nb + nv] = True
        key[0, nb + v: nb + v + na] = True
        key[0, p: p + gen_length] = True
        n_real = nb + nv + na
        pos = torch.zeros(1, p + g, dtype=torch.long)  # [1, L]
        pos[0, : nb + nv] = torch.arange(nb + nv)
        pos[0, nb + v: nb + v + na] = torch.arange(nb + nv, n_real)
        pos[0, p:] = torch.arange(n_real, n_real + g)
        vmask = torch.zeros(1, p + g, dtype=torch.bool)  # [1, L]: the V visual slots, real or padding
        vmask[0, nb: nb + v] = True
        return BucketInputs(emb, pos, key, vmask, nv, gen_length)


class EngineDenoiser:
    """Sampler adapter: stage A at the first call, stage B after (or the unpruned graph always)."""

    def __init__(self, pipe: "Pipeline", x: BucketInputs, unpruned: bool):
        self.pipe, self.x, self.unpruned = pipe, x, unpruned
        self.stage_b: dict[str, torch.Tensor] | None = None
        self.kept_index: torch.Tensor | None = None
        self._resp: torch.Tensor | None = None
        self.step_times: list[float] = []

    def _response(self, ids: torch.Tensor) -> torch.Tensor:
        if self._resp is None:  # one buffer for all steps; slots past gen_length stay masked
            self._resp = torch.full((1, self.pipe.bucket.gen_length), self.pipe.tokens["mask"], dtype=torch.long,
                                    device=self.x.prefix_embeds.device)
        self._resp[0, : ids.shape[0]] = ids
        return self._resp

    def _masked_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.pipe.mask_embed.expand_as(prefix[0])[None].contiguous()

    @property
    def fused(self) -> bool:
        return self.pipe.fused

    def __call__(self, response_ids: torch.Tensor, *, uncond: bool = False) -> torch.Tensor:
        return self._forward(response_ids, uncond)["logits"][0, : self.x.gen_length].float()  # [g, V]

    def predict(self, response_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._forward(response_ids, False)
        g = self.x.gen_length
        return out["x0"][0, :g], out["confidence"][0, :g].float()  # [g], [g]

    def _forward(self, response_ids: torch.Tensor, uncond: bool) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        x, resp = self.x, self._response(response_ids)
        if self.unpruned:
            prefix = self._masked_prefix(x.prefix_embeds) if uncond else x.prefix_embeds
            out = self.pipe.run("full", prefix_embeds=prefix, response_ids=resp, position_ids=x.position_ids,
                                key_mask=x.key_mask)
        elif self.stage_b is None:
            if uncond:
                raise RuntimeError("the conditional forward of step 1 decides the pruning; call it first")
            n_keep = num_kept(self.pipe.keep, x.n_visual) if x.n_visual else 0
            out = self.pipe.run("stage_a", prefix_embeds=x.prefix_embeds, response_ids=resp,
                                position_ids=x.position_ids, key_mask=x.key_mask, visual_mask=x.visual_mask,
                                num_keep=torch.tensor([n_keep], device=x.prefix_embeds.device))
            dev = x.prefix_embeds.device
            idx, alive = out["kept_index"].to(dev), out["kept_alive"].to(dev).bool()
            p_red = idx.shape[1] - self.pipe.bucket.gen_length
            self.kept_index = idx[0]
            self.stage_b = dict(prefix_embeds=x.prefix_embeds[:, idx[0, :p_red]].contiguous(),
                                position_ids=x.position_ids[:, idx[0]].contiguous(), key_mask=alive)
        else:
            feeds = dict(self.stage_b)
            if uncond:
                feeds["prefix_embeds"] = self._masked_prefix(feeds["prefix_embeds"])
            out = self.pipe.run("stage_b", response_ids=resp, **feeds)
        if resp.is_cuda:
            torch.cuda.synchronize(resp.device)  # honest per-step times (the sampler syncs anyway)
        self.step_times.append(time.perf_counter() - t0)
        return out

    def kept_visual(self) -> list[int] | None:
        """Kept visual tokens as positions in the unpadded prompt (= their position ids)."""
        if self.kept_index is None:
            return None
        idx, alive = self.kept_index, self.stage_b["key_mask"][0]  # [L'], [L']
        keep = alive & self.x.visual_mask[0, idx]
        return sorted(self.x.position_ids[0, idx[keep]].tolist())


class Pipeline:
    """Load an engines directory and answer requests. See :meth:`generate`."""

    def __init__(self, root: Path, manifest: dict, backend: str, device: str, weights_from: str | None = None,
                 cuda_graphs: bool | None = None, weights: dict[str, torch.Tensor] | None = None):
        from transformers import AutoTokenizer

        self.root, self.manifest, self.backend, self.device = root, manifest, backend, device
        self.config = LLaDAVConfig.from_dict(manifest["config"])
        self.bucket = Bucket.from_dict(manifest["bucket"])
        self.tokens = manifest["tokens"]
        self.keep = manifest["pruning"]["keep"]
        self.pruned = manifest["pruning"]["enabled"]
        self.fused = manifest.get("fused_sampler", False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        emb = load_file(str(root / "text_embeddings.safetensors"), device=device)
        self.embed_table, self.image_newline = emb["embed_tokens"], emb["image_newline"]
        self.newline = self.image_newline.float()  # [D]
        self.mask_embed = self.embed_table[self.tokens["mask"]].float()[None]  # [1, D]
        self.runners: dict[str, Runner] = {}
        external = (manifest.get("constants_from_checkpoint") or {}).get(backend)
        if external and weights is None:
            weights = self._checkpoint_weights(weights_from, device)
        graphs = manifest["artifacts"][backend]
        # a progress bar only where loading takes long: the inductor graphs compile in warmup()
        for name, rel in tqdm(graphs.items(), desc=f"load {backend}", unit="graph", disable=backend != "inductor"):
            g = manifest["graphs"][name]
            kw = {"cuda_graph": cuda_graphs} if backend in ("aoti", "inductor") else {}
            if external:
                kw["constants"] = {fqn: weights[key] for fqn, key in external[name].items()}
                side = (root / rel).with_suffix(".constants.safetensors")
                if side.exists():
                    kw["constants"].update({k: v.to(device) for k, v in load_file(str(side)).items()})
            self.runners[name] = RUNNERS[backend](root / rel, g["inputs"], g["outputs"], device, **kw)

    def _checkpoint_weights(self, weights_from: str | None, device: str) -> dict[str, torch.Tensor]:
        """Compiled graphs (aoti, inductor) built without weights: load them once from the checkpoint."""
        from ..checkpoint import load_checkpoint
        from ..exporter.build import DTYPES

        src = Path(weights_from or self.manifest["source"]["checkpoint"])
        if not src.is_dir():
            raise ManifestError(f"{self.root}: the {self.backend} graphs load their weights from the checkpoint "
                                f"{src}, which is not there; pass weights_from= (llada-generate --weights DIR)")
        model, _, cfg = load_checkpoint(src, dtype=DTYPES[self.manifest["dtype"]], device=device)
        if cfg.hash() != self.manifest["source"]["config_hash"]:
            raise ManifestError(f"{src}: its config differs from the one these engines were exported from")
        self._weights_model = model  # keeps the tensors alive
        return dict(model.state_dict())

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, device: str | None = None,
             verify: bool = True, weights_from: str | None = None, cuda_graphs: bool | None = None,
             warmup: bool | None = None, weights: dict[str, torch.Tensor] | None = None) -> "Pipeline":
        """Validate the manifest (versions, SHA-256 of every artifact) and open the sessions.

        ``weights_from``: checkpoint directory for aoti / inductor graphs exported without
        their weights (default: the checkpoint recorded in the manifest), or ``weights``: those
        tensors already in memory, by checkpoint key, on ``device``. ``cuda_graphs`` (aoti and
        inductor on CUDA; default: on for inductor, off for the untested aoti path): replay each
        graph from a captured CUDA graph.
        ``warmup`` (default: on for the inductor backend, which compiles its graphs then, tens
        of seconds per graph at full size): run :meth:`warmup` before returning."""
        root = Path(path)
        m = read_manifest(root, verify=verify)
        built = list(m["artifacts"])
        if backend is None:
            order = (["tensorrt", "aoti", "inductor", "onnxruntime"] if torch.cuda.is_available()
                     else ["onnxruntime", "aoti", "inductor"])
            backend = next((b for b in order if b in built), None)
            if backend is None:
                raise ManifestError(f"{root}: none of the built backends ({', '.join(built)}) runs on this machine")
        elif backend not in built:
            raise ManifestError(f"{root}: backend {backend!r} was not built (built: {', '.join(built)}); "
                                f"re-export with --backend {backend}")
        if device is None:
            device = "cuda" if backend == "tensorrt" or (m.get("device", "cpu").startswith("cuda")) else "cpu"
        pipe = cls(root, m, backend, device, weights_from, cuda_graphs, weights)
        if warmup if warmup is not None else backend == "inductor":
            pipe.warmup()
        return pipe

    @torch.no_grad()
    def warmup(self) -> float:
        """Run every graph once on a blank request (two denoising steps: stage A and stage B,
        and the unpruned graph if there is one), so that compilation and CUDA-graph capture
        happen now, not in the first real request. Returns the seconds it took."""
        t0 = time.perf_counter()
        blank = np.full((64, 64, 3), 128, dtype=np.uint8)  # fits every bucket
        x, _ = self.build_inputs(blank, "<image>\n", self.bucket.gen_length, system="")
        resp = torch.full((self.bucket.gen_length,), self.tokens["mask"], dtype=torch.long, device=self.device)
        for unpruned in dict.fromkeys([not self.pruned, self.has_unpruned]):
            den = EngineDenoiser(self, x, unpruned=unpruned)
            for _ in range(2):
                den.predict(resp) if self.fused else den(resp)
        return time.perf_counter() - t0

    @property
    def has_unpruned(self) -> bool:
        return "full" in self.runners

    def run(self, graph: str, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[graph].run(feeds)

    # ------------------------------------------------------------------ request -> bucket
    def encode_image(self, image) -> tuple[torch.Tensor, float]:
        """Image -> visual embeddings [n_visual, D] fp32 on the engines' device (on a GPU,
        the features never leave it), and the seconds it took."""
        t0 = time.perf_counter()
        dev = torch.device(self.device)
        pixels, size = preprocess(load_image(image), self.config)  # [N, 3, S, S]
        pixels = pixels.to(dev)
        n, nb = pixels.shape[0], self.bucket.vision_batch
        feats = []
        for i in range(0, n, nb):
            chunk = pixels[i: i + nb]
            pad = torch.zeros(nb - chunk.shape[0], *chunk.shape[1:], device=dev)
            out = self.run("vision", pixel_values=torch.cat([chunk, pad]))["features"].float().to(dev)
            feats.append(out[: chunk.shape[0]])
        visual = assemble(torch.cat(feats), size, self.config, self.newline)  # [n_visual, D]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return visual, time.perf_counter() - t0

    def build_inputs(self, image, prompt: str, gen_length: int, system: str) -> tuple[BucketInputs, float]:
        b = self.bucket
        before, after = encode_prompt(self.tokenizer, prompt, has_image=image is not None, system=system)
        n_text = len(before) + len(after)
        if n_text > b.max_text_tokens:
            raise RequestError(f"the prompt has {n_text} text tokens (chat template included); these engines take "
                               f"at most {b.max_text_tokens}: re-export with a larger --max-prompt-tokens")
        if gen_length > b.gen_length:
            raise RequestError(f"gen_length {gen_length} exceeds the engines' {b.gen_length}: re-export with "
                               f"--gen-length {gen_length}")
        dev = torch.device(self.device)
        visual, t_vis = (self.encode_image(image) if image is not None
                         else (torch.zeros(0, self.embed_table.shape[1], device=dev), 0.0))
        nv = visual.shape[0]
        if nv > b.max_visual_tokens:
            raise RequestError(f"the image gives {nv} visual tokens; these engines take at most "
                               f"{b.max_visual_tokens}: re-export with a larger --image-size or --max-visual-tokens")
        ids = torch.tensor(before + after, dtype=torch.long, device=dev)
        text = self.embed_table[ids].float()  # [nb + na, D]
        return layout_bucket(b, text[: len(before)], visual, text[len(before):], gen_length), t_vis

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, image, prompt: str, *, gen_length: int | None = None, steps: int | None = None,
                 block_length: int | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
                 cfg_scale: float = 0.0, preset: str | None = None, seed: int = 0, unpruned: bool = False,
                 system: str = DEFAULT_SYSTEM_PROMPT) -> GenerationResult:
        """Answer ``prompt`` about ``image`` (path, PIL image or HxWx3 uint8 array; None for text only)."""
        t0 = time.perf_counter()
        defaults = self.manifest["generation"]
        if preset is not None:
            gen = get_preset(preset, gen_length=gen_length, steps=steps, block_length=block_length,
                             temperature=temperature, remasking=remasking, cfg_scale=cfg_scale)
        else:
            gl = gen_length or defaults["gen_length"]
            gen = GenerationConfig(gl, block_length or min(defaults["block_length"], gl),
                                   steps or min(defaults["steps"], gl), temperature, remasking, cfg_scale).validate()
        if unpruned and not self.has_unpruned:
            raise RequestError(f"{self.root} has no unpruned graph; export with --baseline or --no-prune")
        use_full = unpruned or not self.pruned
        x, t_vis = self.build_inputs(image, prompt, gen.gen_length, system)
        den = EngineDenoiser(self, x, unpruned=use_full)
        t1 = time.perf_counter()
        ids = generate(den, gen, mask_id=self.tokens["mask"], eot_id=self.tokens["eot"],
                       suppress_ids=self.tokens["suppressed"], device=self.device,
                       generator=torch.Generator(device=self.device).manual_seed(seed))
        t2 = time.perf_counter()
        st = den.step_times
        timings = {"vision": t_vis, "prepare": t1 - t0 - t_vis, "total": t2 - t0, "denoise": t2 - t1,
                   "sampler_overhead": (t2 - t1) - sum(st)}
        if use_full:
            timings["full_per_step"] = sum(st) / max(len(st), 1)
        else:
            timings["stage_a"] = st[0] if st else 0.0
            timings["stage_b_per_step"] = sum(st[1:]) / max(len(st) - 1, 1)
        ids_l = ids.tolist()
        return GenerationResult(self.tokenizer.decode(ids_l, skip_special_tokens=True), ids_l,
                                None if use_full else den.kept_visual(), x.n_visual, timings, st)
