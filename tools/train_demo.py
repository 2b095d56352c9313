"""Train the demo LLaDA-V model from scratch on the shapes-and-digits VQA task.

The model is the ``demo`` preset (official LLaDA-V structure: SigLIP tower, mlp2x_gelu
projector, anyres assembly, bidirectional LLaDA LM), randomly initialised with the
project's seeded init (normal(0, 0.02), norms at one), with its own small tokenizer
(:func:`llada_export.vqa_task.demo_tokenizer`: the stand-in byte-level BPE with the official special tokens and
chat template, trained on the task's words so that every answer is one token). Training
uses LLaDA's masked-diffusion SFT objective:

* prompt = the official chat template with ``<image>\\n{question}`` and the default
  system prompt, the visual tokens spliced at ``<image>`` (the same pieces as
  ``reference.embed_prompt``, batched and differentiable);
* response = the answer token + ``<|eot_id|>``, padded with more ``<|eot_id|>`` to the
  sample's response length G, drawn per sample from ``--train-gen-lengths`` (the pad
  tokens are part of the response, masked and predicted). The pad must be
  ``<|eot_id|>``, not ``<|endoftext|>``: the sampler sets ``<|endoftext|>`` to -inf at
  masked positions, so a model trained on EOS padding is forced at inference to put its
  (certain) padding mass on ``<|eot_id|>``, commits an early eot first and so fixes the
  answer length from the text alone;
* per sample t ~ U(0, 1), p = (1 - eps) t + eps; each response token is replaced by
  ``<|mdm_mask|>`` with probability p (prompt never masked); loss = cross-entropy on the
  masked tokens weighted by 1/p, summed per sample and divided by its response length,
  averaged over the batch, as the official LLaDA SFT code.

Every batch has one static layout ``[before | visual | after | response slots | pad]``
(the longest question, 16 response slots) with positions ``arange(L)`` and a key mask
over the unused response slots and the pad, so every sample sees exactly what the
sampler (and an engine bucket) will show it, and the compiled step never recompiles.

At the end the checkpoint is written in the official layout (``save_checkpoint``), read
back with ``load_checkpoint`` (fp32) and evaluated on the val split with the real sampler
path (``reference_generate``, gen = block = steps = ``--gen-length``), per question
type, next to the text-only baseline; a batched GPU re-implementation of the same
sampler gives a larger-sample estimate (and its agreement with the real path).

    python tools/train_demo.py --device cuda --out OUT/demo --time-budget 330
    python tools/train_demo.py --steps 20 --device cpu --out /tmp/demo_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llada_export import vqa_task
from llada_export.checkpoint.io import save_checkpoint
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.config import LLaDAVConfig, demo_config
from llada_export.graphs.anyres import assembly_index, crops_uint8, normalize_crops, select_best_resolution
from llada_export.graphs.llada import attention_mask
from llada_export.graphs.llava import LLaDAV
from llada_export.sampler import GenerationConfig, generate
from llada_export.synthetic.weights import random_state
from llada_export.tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt, special_tokens
from llada_export.vqa_task import demo_tokenizer, patch_labels

EPS = 1e-3  # LLaDA's minimum mask probability


class VisionAux(nn.Module):
    """Training-only heads on the tower's output tokens: shape / digit label and colour label of
    each patch (dense supervision for a tower trained from scratch, as the official model starts
    from a pretrained SigLIP). Not part of the checkpoint."""

    def __init__(self, width: int):
        super().__init__()
        self.shape = nn.Linear(width, len(vqa_task.SHAPE_LABELS))
        self.colour = nn.Linear(width, len(vqa_task.COLOUR_LABELS))

    def loss(self, tower_feats: torch.Tensor, labels: torch.Tensor, background_weight: float = 0.1):
        """tower_feats [B*N, T, C], labels [B, 2, N, T] -> (loss, shape accuracy on object patches)."""
        shape, colour = labels.long().transpose(0, 1).flatten(1)  # [B*N*T] each, in crop order
        feats = tower_feats.float().flatten(0, 1)  # [B*N*T, C]
        shape_logits, colour_logits = self.shape(feats), self.colour(feats)  # [B*N*T, labels]
        total = 0.0
        for logits, lab in ((shape_logits, shape), (colour_logits, colour)):
            w = torch.ones(logits.shape[-1], device=feats.device)
            w[0] = background_weight
            total = total + F.cross_entropy(logits, lab, weight=w)
        obj = shape > 0
        acc = ((shape_logits.argmax(-1) == shape) & obj).sum() / obj.sum().clamp(min=1)
        return total, acc


# ---------------------------------------------------------------------- data
def type_mix(long_weight: int, weights: str = "") -> tuple[str, ...] | None:
    """The cycle of question types a training run draws from: every short type once and every
    long type ``long_weight`` times, or as ``weights`` says ("list=4,number=4": those types that
    many times); None when every type is drawn once (the task's own uniform draw)."""
    w = {t: 1 for t in vqa_task.SHORT_TYPES} | {t: long_weight for t in vqa_task.LONG_TYPES}
    for item in filter(None, weights.split(",")):
        name, _, n = item.partition("=")
        if name not in w or not n.isdigit():
            raise ValueError(f"--type-weights: {item!r} is not TYPE=N with a type of {', '.join(w)}")
        w[name] = int(n)
    if set(w.values()) == {1}:
        return None
    return tuple(t for t in vqa_task.QTYPES for _ in range(w[t]))


class VQADataset(torch.utils.data.Dataset):
    """Sample ``i`` of a split -> (crops [N, S, S, 3] uint8, question, answer, qtype).
    ``easy_every=k``: every k-th sample is an easy scene (no distractors), a curriculum
    for training only (0: none). ``mix``: sample ``i`` is of type ``mix[i % len(mix)]``
    (training only; None: the task's uniform draw)."""

    def __init__(self, split: str, cfg: LLaDAVConfig, n: int, easy_every: int = 0, labels: bool = False,
                 mix: tuple[str, ...] | None = None):
        self.split, self.cfg, self.n, self.easy_every, self.labels = split, cfg, n, easy_every, labels
        self.mix = mix

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        s = vqa_task.sample(self.split, i, easy=bool(self.easy_every) and i % self.easy_every == 0,
                            qtype=self.mix[i % len(self.mix)] if self.mix else None)
        lab = patch_labels(s.scene, self.cfg) if self.labels else np.zeros(0, np.uint8)
        return crops_uint8(s.image(), self.cfg), s.question, s.answer, s.qtype, lab


def collate(items):
    crops, qs, ans, types, labels = zip(*items)
    return (torch.from_numpy(np.stack(crops)), list(qs), list(ans), list(types),
            torch.from_numpy(np.stack(labels)))


def _worker_init(_):
    torch.set_num_threads(1)


class Batcher:
    """Token-level layout of a batch: [before | visual | after_i | response slots | pad].

    Every batch has the same static length: the longest question plus ``gen_slots``
    response slots, rounded up to a multiple of 16. A sample with response length
    ``G_i <= gen_slots`` uses the first ``G_i`` slots; the other slots and the pad are
    masked keys, which is exactly how an engine bucket serves a shorter ``gen_length``."""

    def __init__(self, model: LLaDAV, tok, gen_slots: int, system: str = DEFAULT_SYSTEM_PROMPT):
        self.model, self.tok, self.cfg, self.g = model, tok, model.config, gen_slots
        self.sp = special_tokens(tok)
        self.system = system
        before, _ = encode_prompt(tok, "<image>\nX", has_image=True, system=system)
        self.before = before
        self.size_wh = (vqa_task.WIDTH, vqa_task.HEIGHT)
        s = self.cfg.vision.image_size
        best = select_best_resolution(self.size_wh, self.cfg.image_grid_pinpoints)
        self.n_crops = 1 + (best[0] // s) * (best[1] // s)
        device = model.lm_head.weight.device
        self.index = assembly_index(self.cfg, self.size_wh, self.n_crops).to(device)  # [n_visual]
        self.n_visual = len(self.index)
        self._after: dict[str, list[int]] = {}
        self._resp: dict[str, list[int]] = {}
        self.head = len(self.before) + self.n_visual
        self.max_after = max(len(self.after_ids(q)) for q in vqa_task.all_questions())
        self.length = -(-(self.head + self.max_after + self.g) // 16) * 16  # SDPA-friendly static length

    def after_ids(self, question: str) -> list[int]:
        if question not in self._after:
            b, a = encode_prompt(self.tok, "<image>\n" + question, has_image=True, system=self.system)
            assert b == self.before, "the text before <image> must not depend on the question"
            self._after[question] = a
        return self._after[question]

    def response_ids(self, answer: str) -> list[int]:
        if answer not in self._resp:
            ids = self.tok(answer, add_special_tokens=False).input_ids + [self.sp.eot]
            if len(ids) > self.g:
                raise ValueError(f"answer {answer!r} needs {len(ids)} tokens, more than {self.g} response slots")
            # pad with eot (never EOS: the sampler suppresses EOS at masked positions)
            self._resp[answer] = ids + [self.sp.eot] * (self.g - len(ids))
        return self._resp[answer]

    def layout(self, questions: list[str], gen_lengths: torch.Tensor, device) -> dict:
        """Ids and masks of the text tail [after | response slots | pad] for a batch;
        ``gen_lengths`` [B]: each sample's response length (<= gen_slots)."""
        afters = [self.after_ids(q) for q in questions]
        la = torch.tensor([len(a) for a in afters]).to(device, non_blocking=True)  # [B]
        tail = torch.full((len(afters), self.length - self.head), self.sp.eos, dtype=torch.long)  # [B, Lt]
        for b, a in enumerate(afters):
            tail[b, : len(a)] = torch.tensor(a)
        tail = tail.to(device, non_blocking=True)
        glen = gen_lengths.to(device)  # [B]
        resp_tail = la[:, None] + torch.arange(self.g, device=device)  # [B, G] slots in the tail
        ar = torch.arange(self.length, device=device)[None]  # [1, L]
        prompt_end = (self.head + la)[:, None]  # [B, 1]
        key_mask = (ar < prompt_end) | ((ar >= prompt_end) & (ar < prompt_end + glen[:, None]))  # [B, L]
        return dict(tail=tail, resp_tail=resp_tail, resp_pos=self.head + resp_tail, key_mask=key_mask,
                    real=torch.arange(self.g, device=device)[None] < glen[:, None], glen=glen)

    def tower(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [B, N, S, S, 3] uint8 -> tower output tokens [B*N, T, C] (before the projector)."""
        pixels = normalize_crops(crops, self.cfg).flatten(0, 1)  # [B*N, 3, S, S]
        return self.model.model.vision_tower(pixels.to(self.model.model.mm_projector[0].weight.dtype))

    def visual(self, crops: torch.Tensor, tower_feats: torch.Tensor | None = None) -> torch.Tensor:
        """crops [B, N, S, S, 3] uint8 -> visual embeddings [B, n_visual, D] (differentiable);
        the same as ``model.encode_images`` + assembly. ``tower_feats``: :meth:`tower` of them."""
        b, n = crops.shape[:2]
        t = self.tower(crops) if tower_feats is None else tower_feats  # [B*N, T, C]
        feats = self.model.model.mm_projector(t)  # [B*N, T, D]
        feats = feats.view(b, n * feats.shape[1], -1)  # [B, N*T, D]
        nl = self.model.model.image_newline.to(feats.dtype)[None, None].expand(b, 1, -1)  # [B, 1, D]
        return torch.cat([feats, nl], dim=1)[:, self.index]  # [B, n_visual, D]

    def forward(self, visual: torch.Tensor, lay: dict, response: torch.Tensor) -> torch.Tensor:
        """visual [B, V, D], response ids [B, G] (with masks) -> logits [B, G, vocab] fp32."""
        m = self.model
        lm = m.language
        b = visual.shape[0]
        tail = lay["tail"].scatter(1, lay["resp_tail"], response)  # [B, Lt]
        before = m.embed(torch.tensor(self.before, device=visual.device))[None].expand(b, -1, -1)  # [B, n0, D]
        x = torch.cat([before, visual.to(before.dtype), m.embed(tail)], dim=1)  # [B, L, D]
        pos = torch.arange(self.length, device=x.device)[None].expand(b, -1)  # [B, L]
        cos, sin = lm.rotary(pos)
        mask = attention_mask(lay["key_mask"])
        for layer in lm.layers:
            x = layer(x, cos, sin, mask)
        h = x.gather(1, lay["resp_pos"][..., None].expand(-1, -1, x.shape[-1]))  # [B, G, D]
        return lm.head(h)  # [B, G, vocab]

    def targets(self, answers: list[str], device) -> torch.Tensor:
        return torch.tensor([self.response_ids(a) for a in answers]).to(device, non_blocking=True)  # [B, G]

    def needed(self, answers: list[str]) -> torch.Tensor:
        """[B] the response slots each answer needs (its tokens + one eot)."""
        eot = self.sp.eot
        return torch.tensor([next(i for i, t in enumerate(self.response_ids(a)) if t == eot) + 1 for a in answers])


def diffusion_loss(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor,
                   glen: torch.Tensor, answer: torch.Tensor):
    """LLaDA SFT loss: per sample, the sum of CE / p over its masked response tokens divided
    by its response length ``glen``; mean over the batch. ``masked`` [B, G] only covers real
    response slots. Also returns the plain mean CE over masked tokens, and over masked
    answer tokens (``answer`` [B, G] bool: not eot padding), the part that needs the image."""
    b, g = target.shape
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(b, g)  # [B, G]
    loss = ((ce * masked / p_mask[:, None]).sum(1) / glen).mean()
    plain = (ce * masked).sum() / masked.sum().clamp(min=1)
    ma = masked & answer
    answer_ce = (ce * ma).sum() / ma.sum().clamp(min=1)
    return loss, plain, answer_ce


# ---------------------------------------------------------------------- batched sampler
class BatcherDenoiser:
    """The training layout as a denoiser of the package's batched sampler (one request per row)."""

    fused = False

    def __init__(self, bt: "Batcher", visual: torch.Tensor, lay: dict, autocast):
        self.bt, self.visual, self.lay, self.autocast = bt, visual, lay, autocast

    def __call__(self, ids: torch.Tensor, step, *, uncond: bool = False) -> torch.Tensor:
        resp = torch.full((ids.shape[0], self.bt.g), self.bt.sp.mask, dtype=torch.long, device=ids.device)
        resp[:, : ids.shape[1]] = ids  # slots past gen_length stay masked (masked keys)
        with self.autocast():
            return self.bt.forward(self.visual, self.lay, resp)[:, : ids.shape[1]].float()  # [B, g, V]


@torch.no_grad()
def batched_generate(bt: Batcher, crops: torch.Tensor, questions: list[str], autocast, gen_length: int) -> list[str]:
    """The official sampler (:func:`llada_export.sampler.generate`: one block, steps = gen_length,
    low-confidence remasking, temperature 0, stop at the first committed eot) on the training
    layout, every question one row."""
    sp, g, dev = bt.sp, gen_length, crops.device
    with autocast():
        vis = bt.visual(crops)
    b = len(questions)
    lay = bt.layout(questions, torch.full((b,), g), dev)
    rows = generate(BatcherDenoiser(bt, vis, lay, autocast), GenerationConfig(g, g, g), mask_id=sp.mask,
                    eot_id=sp.eot, suppress_ids=sp.suppressed(), batch_size=b, device=dev)
    return [bt.tok.decode(r.tolist(), skip_special_tokens=True) for r in rows]


_EVAL_CACHE: dict[tuple[str, int], tuple] = {}


def fast_eval(bt: Batcher, split: str, n: int, device, autocast, gen_length: int,
              batch: int = 128) -> tuple[dict, list[str]]:
    """Accuracy of :func:`batched_generate` on the first ``n`` samples of ``split``."""
    ds = VQADataset(split, bt.cfg, n)
    preds, types, hits, f1 = [], [], [], []
    for start in range(0, n, batch):
        key = (split, start, min(n, start + batch))
        if key not in _EVAL_CACHE:
            _EVAL_CACHE[key] = collate([ds[i] for i in range(*key[1:])])
        crops, qs, ans, ts, _ = _EVAL_CACHE[key]
        got = batched_generate(bt, crops.to(device), qs, autocast, gen_length)
        preds += got
        types += ts
        hits += [p.strip() == a for p, a in zip(got, ans)]
        f1 += [vqa_task.answer_f1(p, a) for p, a in zip(got, ans)]
    return vqa_task.accuracy_table(types, hits, f1), preds


# ---------------------------------------------------------------------- real-path eval
def _reference_eval_worker(args):
    ckpt, indices, gen_length, threads, device = args
    if threads:
        torch.set_num_threads(threads)
    from llada_export.reference import reference_generate

    model, tok, _ = load_checkpoint(ckpt, dtype=torch.float32, device=device)
    gen = GenerationConfig(gen_length, gen_length, gen_length)
    out = []
    for i in indices:
        s = vqa_task.sample("val", i)
        r = reference_generate(model, tok, s.image(), s.prompt, gen)
        out.append((i, r.text))
    return out


def reference_eval(ckpt: Path, n: int, gen_length: int, processes: int, device: str = "cpu") -> tuple[dict, list[str]]:
    """Val accuracy through ``load_checkpoint`` + ``reference_generate`` (fp32): in this
    process on a GPU, else split over ``processes`` CPU processes."""
    if torch.device(device).type != "cpu":
        processes = 1
    processes = max(1, min(processes, n))
    chunks = [list(range(k, n, processes)) for k in range(processes)]
    if processes == 1:
        results = _reference_eval_worker((str(ckpt), chunks[0], gen_length, 0, device))
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // processes)
        with mp.get_context("spawn").Pool(processes) as pool:
            results = [r for part in pool.map(_reference_eval_worker,
                                              [(str(ckpt), c, gen_length, threads, device) for c in chunks])
                       for r in part]
    texts = dict(results)
    samples = vqa_task.make_split("val", n)
    preds = [texts[s.index] for s in samples]
    return vqa_task.score(samples, preds), preds


# ---------------------------------------------------------------------- main
def build_model(seed: int) -> tuple[LLaDAV, object, LLaDAVConfig]:
    cfg = demo_config()
    tok = demo_tokenizer()
    cfg.text.vocab_size = len(tok)
    model = LLaDAV(cfg)
    model.load_state_dict(dict(random_state(cfg, seed=seed)), strict=True)
    return model, tok, cfg


def loader_sizes(workers: int, batch_bytes: int) -> tuple[int, int | None]:
    """(workers, prefetch factor) whose batches in flight fit in half of /dev/shm
    (worker batches travel through shared memory; containers often have little)."""
    if workers == 0:
        return 0, None
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        free = 2**30
    inflight = int(0.5 * free // batch_bytes)
    prefetch = max(1, min(4, inflight // workers))
    if inflight < workers:
        workers = max(0, inflight)
        print(f"/dev/shm has {free / 2**20:.0f} MiB free: {workers} data-loader workers", flush=True)
    return workers, (prefetch if workers else None)


def pretrain_vision(bt: Batcher, aux: VisionAux, batches, steps: int, lr: float, dev, autocast) -> None:
    """The tower (and the auxiliary heads) alone on the per-patch labels, before the
    masked-diffusion training: what a pretrained SigLIP brings to the official model."""
    params = list(bt.model.model.vision_tower.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    t0 = time.time()
    for step in range(steps):
        crops, _, _, _, labels = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, min(200, steps // 10)))
        with autocast():
            loss, acc = aux.loss(bt.tower(crops.to(dev, non_blocking=True)), labels.to(dev, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(json.dumps({"vision_pretrain_step": step, "aux_loss": round(loss.item(), 4),
                              "aux_patch_acc": round(acc.item(), 4), "elapsed_s": round(time.time() - t0, 1)}),
                  flush=True)


def lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (a checkpoint written by this project there is replaced; "
                   "anything else is refused)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 10000 as a cap, cut to fit --time-budget on CUDA)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: after 40 steps the step time is measured and the run (and its "
                        "cosine schedule) shortened to fit (default: 270 on CUDA when --steps is not given, else off)")
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 4 on CPU")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate of the LM and projector (default 6e-4)")
    p.add_argument("--vision-lr", type=float, default=3e-4,
                   help="peak learning rate of the SigLIP tower (default 3e-4: at 1e-3 and above the tower from "
                        "scratch barely learns shapes)")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary per-patch shape/digit/colour loss on the tower's tokens "
                        "(training-only heads, not saved; default 1.0, 0: off)")
    p.add_argument("--vision-pretrain-steps", type=int, default=0,
                   help="steps of the tower alone on the auxiliary loss before the masked-diffusion training "
                        "(default 0)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint's weights and tokenizer (fine-tuning) instead of random ones")
    p.add_argument("--easy-every", type=int, default=4,
                   help="every k-th training sample is an easy scene without distractors (default 4; 0: none)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=None, help="default: min(200, steps // 10)")
    p.add_argument("--gen-length", type=int, default=vqa_task.GEN_LENGTH,
                   help="response length of the evaluations (gen = block = steps; default 8)")
    p.add_argument("--train-gen-lengths", default="2,4,8,16,32",
                   help="response lengths drawn per training sample (answer + eot padding; a long answer takes "
                        "the shortest one that holds it when the drawn one does not; default 2,4,8,16,32: the "
                        "model then serves the mc preset, 8, the chartqa preset and the long answers at 32)")
    p.add_argument("--long-weight", type=int, default=3,
                   help="each long question type (list, describe, number) is drawn this many times as often as "
                        "each short one in training (default 3; 1: the task's uniform draw)")
    p.add_argument("--type-weights", default="",
                   help="per-type draw counts overriding --long-weight, e.g. 'list=4,number=5'")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on with CUDA; falls back to eager on error)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data-loader processes (default: 0 on CPU, up to 14 on GPU)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="val questions for the real-sampler eval (default: 300 with CUDA, 8 on CPU)")
    p.add_argument("--fast-eval-n", type=int, default=None,
                   help="val questions for the batched-sampler eval (default: 2000 with CUDA, 16 on CPU)")
    p.add_argument("--eval-every", type=int, default=1000, help="batched val accuracy (256 questions) every N steps (0: off)")
    p.add_argument("--ref-eval-device", default=None,
                   help="device of the real-sampler eval (default: the training device)")
    p.add_argument("--eval-processes", type=int, default=None,
                   help="CPU processes for the real-sampler eval on CPU (default: up to 8 when --eval-n >= 32)")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budget = args.time_budget if args.time_budget is not None else (270.0 if cuda and args.steps is None else None)
    cap = args.steps if args.steps is not None else 10000
    workers = args.workers if args.workers is not None else (min(14, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0)
    eval_n = args.eval_n if args.eval_n is not None else (300 if cuda else 8)
    fast_n = args.fast_eval_n if args.fast_eval_n is not None else (2000 if cuda else 16)
    if args.batch is None:
        args.batch = 128 if cuda else 4
    train_glens = torch.tensor([int(v) for v in args.train_gen_lengths.split(",")])
    use_compile = cuda if args.compile is None else args.compile
    warmup = args.warmup if args.warmup is not None else max(1, min(200, cap // 10))

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if args.init is not None:
        model, tok, cfg = load_checkpoint(args.init, dtype=torch.float32)
        model.requires_grad_(True)  # loaded for inference: frozen
    else:
        model, tok, cfg = build_model(args.seed)
    model.to(dev).train()
    aux = VisionAux(cfg.vision.hidden_size).to(dev) if args.aux_weight > 0 else None
    bt = Batcher(model, tok, max(int(train_glens.max()), args.gen_length))
    n_params = sum(p.numel() for p in model.parameters())
    seq_len = bt.length
    for a in vqa_task.all_answers():
        bt.response_ids(a)  # fails early if an answer does not fit
    print(f"demo model: {n_params / 1e6:.2f} M parameters ({n_params * 4 / 2**20:.1f} MiB fp32), vocab {len(tok)}; "
          f"{bt.n_visual} visual tokens, static sequence {seq_len} ({bt.g} response slots); device {dev}, "
          f"workers {workers}, steps {cap}{f' (cut to fit {budget:.0f} s)' if budget else ''}, batch {args.batch}, "
          f"compile {use_compile}", flush=True)

    def step_losses(crops, lay, noisy, target, masked, p_mask, labels):
        with autocast():
            tower = bt.tower(crops)  # [B*N, T, C]
            logits = bt.forward(bt.visual(crops, tower), lay, noisy)  # [B, G, vocab]
        loss, plain, answer_ce = diffusion_loss(logits.float(), target, masked, p_mask, lay["glen"],
                                                target != bt.sp.eot)
        if aux is None:
            return loss, plain, answer_ce, torch.zeros((), device=loss.device)
        aux_loss, aux_acc = aux.loss(tower, labels)
        return loss + args.aux_weight * aux_loss, plain, answer_ce, aux_acc

    compiled = torch.compile(step_losses) if use_compile else None

    groups = []
    named_params = list(model.named_parameters()) + ([("vision_tower_aux." + n_, q) for n_, q in aux.named_parameters()]
                                                     if aux is not None else [])
    for vision in (False, True):
        named = [(n_, q) for n_, q in named_params if ("vision_tower" in n_) == vision]
        for decayed in (True, False):
            params = [q for n_, q in named if (q.ndim >= 2 and "embed" not in n_) == decayed]
            groups.append({"params": params, "weight_decay": args.weight_decay if decayed else 0.0,
                           "peak_lr": args.vision_lr if vision else args.lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}))

    ds = VQADataset("train", cfg, (cap + args.vision_pretrain_steps) * args.batch, easy_every=args.easy_every,
                    labels=aux is not None, mix=type_mix(args.long_weight, args.type_weights))
    workers, prefetch = loader_sizes(workers, args.batch * bt.n_crops * cfg.vision.image_size**2 * 3)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch, shuffle=False, drop_last=True, num_workers=workers, collate_fn=collate,
        pin_memory=cuda, worker_init_fn=_worker_init if workers else None,
        persistent_workers=False, prefetch_factor=prefetch)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # response lengths, on the CPU

    history, evals = [], []
    total = cap
    t_eval = 0.0
    t_start = time.time()
    t_log, tokens = t_start, 0
    run, n_run = torch.zeros(5, device=dev), 0  # running sums of loss, masked CE, answer CE, aux acc, grad norm
    batches = iter(loader)
    if args.vision_pretrain_steps:
        pretrain_vision(bt, aux, batches, args.vision_pretrain_steps, args.vision_lr, dev, autocast)
    t_mark = eval_mark = 0.0
    replan_at = 0
    MEASURE_FROM, MEASURE_TO = 10, 40
    step = 0
    for step, (crops, qs, ans, _, labels) in enumerate(batches):
        if step >= total:
            break
        if budget and (step == MEASURE_FROM or step == MEASURE_TO or (replan_at and step == replan_at)):
            # fit the run into the time budget: measure the step time (periodic evals excluded),
            # then re-plan at every periodic eval (the cosine schedule follows the new end)
            sync()
            now = time.time()
            if step == MEASURE_FROM:
                t_mark, eval_mark = now, t_eval
            else:
                per_step = (now - t_mark - (t_eval - eval_mark)) / (step - MEASURE_FROM)
                evals_left = (total - step) // args.eval_every if args.eval_every else 0
                left = budget - (now - t_start) - evals_left * (t_eval / max(1, len(evals)))
                new_total = max(step + 1, min(cap, step + int(left / per_step)))
                if step == MEASURE_TO:
                    warmup = min(warmup, max(MEASURE_TO, new_total // 10))
                if new_total != total:
                    print(f"{per_step * 1e3:.1f} ms/step: running {new_total} steps to fit {budget:.0f} s", flush=True)
                total = new_total
            replan_at = 0
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, group["peak_lr"], warmup)
        crops = crops.to(dev, non_blocking=True)
        target = bt.targets(ans, dev)  # [B, G]
        b = target.shape[0]
        glens = train_glens[torch.randint(len(train_glens), (b,), generator=data_gen)]  # [B]
        need = bt.needed(ans)  # [B]: a long answer takes the shortest drawable length that holds it
        fits = train_glens[None, :] >= need[:, None]  # [B, n_lengths]
        glens = torch.maximum(glens, torch.where(fits, train_glens[None, :], bt.g).min(1).values)
        lay = bt.layout(qs, glens, dev)
        t = torch.rand(b, device=dev, generator=gen)
        p_mask = (1 - EPS) * t + EPS  # [B]
        masked = (torch.rand(b, bt.g, device=dev, generator=gen) < p_mask[:, None]) & lay["real"]  # [B, G]
        noisy = torch.where(masked | ~lay["real"], torch.full_like(target, bt.sp.mask), target)  # unused slots: mask
        labels = labels.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        if compiled is not None:
            try:
                loss, plain, answer_ce, aux_acc = compiled(crops, lay, noisy, target, masked, p_mask, labels)
                loss.backward()  # the backward graph compiles here, at its first use
            except Exception as e:  # a compiler failure must not cost the run
                print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly", flush=True)
                compiled = None
                opt.zero_grad(set_to_none=True)
        if compiled is None:
            loss, plain, answer_ce, aux_acc = step_losses(crops, lay, noisy, target, masked, p_mask, labels)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += b * bt.length
        run = torch.stack([loss.detach(), plain.detach(), answer_ce.detach(), aux_acc.detach(), gnorm.detach()]) + run
        n_run += 1
        if step % args.log_every == 0 or step == total - 1:
            now = time.time()
            avg = (run / n_run).tolist()  # means since the last log line
            rec = {"step": step, "loss": avg[0], "masked_ce": avg[1], "answer_ce": avg[2],
                   "aux_patch_acc": avg[3], "grad_norm": avg[4],
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(now - t_start, 2),
                   "samples_per_s": round(n_run * b / max(1e-9, now - t_log), 1),
                   "tokens_per_s": round(tokens / max(1e-9, now - t_log))}
            t_log, tokens, run, n_run = now, 0, torch.zeros(5, device=dev), 0
            history.append(rec)
            print(json.dumps(rec), flush=True)
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            te = time.time()
            model.eval()
            acc, _ = fast_eval(bt, "val", min(256, fast_n), dev, autocast, args.gen_length)
            model.train()
            evals.append({"step": step, **acc})
            t_eval += time.time() - te
            replan_at = step + 1 if step > MEASURE_TO else 0
            print(f"step {step}: batched-sampler val accuracy {acc['overall']:.3f} {acc['per_type']}", flush=True)
    steps_done = min(step + 1, total)
    sync()
    train_s = time.time() - t_start
    print(f"trained {steps_done} steps ({steps_done * args.batch} samples) in {train_s:.1f} s "
          f"({t_eval:.1f} s of it periodic eval)", flush=True)

    model.eval()
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    (args.out / "train_log.json").unlink(missing_ok=True)  # ours, written below: --overwrite refuses others' files
    save_checkpoint(state, cfg, tok, args.out, overwrite=True, protect=[args.init] if args.init else ())
    print(f"wrote {args.out}", flush=True)

    t1 = time.time()
    fast, fast_preds = fast_eval(bt, "val", fast_n, dev, autocast, args.gen_length)
    fast_s = time.time() - t1
    print(f"batched sampler, val[:{fast_n}]: {fast['overall']:.3f} {fast['per_type']} ({fast_s:.1f} s)", flush=True)

    samples = vqa_task.make_split("val", eval_n)
    log = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if cuda else ""),
        "torch": torch.__version__,
        "model": {"parameters": n_params, "fp32_mib": round(n_params * 4 / 2**20, 2), "n_visual": bt.n_visual,
                  "max_sequence": seq_len, "config": cfg.to_dict()},
        "task": {"image_size": [vqa_task.WIDTH, vqa_task.HEIGHT], "question_types": list(vqa_task.QTYPES),
                 "train_samples_seen": steps_done * args.batch},
        "train": {"steps": steps_done, "batch": args.batch, "seconds": round(train_s, 1),
                  "periodic_eval_seconds": round(t_eval, 1), "time_budget_s": budget,
                  "steps_per_s": round(steps_done / train_s, 2),
                  "samples_per_s": round(steps_done * args.batch / train_s, 1),
                  "final_loss": history[-1]["loss"] if history else None},
        "history": history,
        "periodic_eval": evals,
        "eval": {
            "reference_generate": None,
            "batched_sampler": {**fast, "split": "val", "seconds": round(fast_s, 1)},
            "text_only_baseline": {"val_2000": vqa_task.text_only_baseline("val", 2000),
                                   "eval_subset": vqa_task.text_only_baseline(samples)},
        },
    }
    log_path = args.out / "train_log.json"
    log_path.write_text(json.dumps(log, indent=2) + "\n")  # kept if the real-path eval fails

    t2 = time.time()
    procs = args.eval_processes or (max(1, min(8, (os.cpu_count() or 1) // 2)) if eval_n >= 32 else 1)
    if cuda:  # the real-path eval in true fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ref_device = args.ref_eval_device or str(dev)
    ref, ref_preds = reference_eval(args.out, eval_n, args.gen_length, procs, ref_device)
    ref_s = time.time() - t2
    agree = sum(a == b for a, b in zip(ref_preds, fast_preds[:eval_n])) / max(1, min(eval_n, len(fast_preds)))
    print(f"reference_generate (loaded checkpoint, fp32, {ref_device}), val[:{eval_n}]: {ref['overall']:.3f} {ref['per_type']} "
          f"({ref_s:.1f} s; agrees with the batched sampler on {agree:.1%})", flush=True)
    base = log["eval"]["text_only_baseline"]["eval_subset"]
    print(f"text-only baseline on the same questions: {base['overall']:.3f} {base['per_type']}", flush=True)
    log["eval"]["reference_generate"] = {**ref, "split": "val", "gen_length": args.gen_length,
                                         "block_length": args.gen_length, "steps": args.gen_length,
                                         "device": ref_device, "dtype": "float32",
                                         "processes": procs if ref_device == "cpu" else 1,
                                         "seconds": round(ref_s, 1)}
    log["eval"]["batched_sampler"]["agreement_with_reference"] = agree
    log["eval"]["examples"] = [{"question": s.question, "answer": s.answer, "predicted": p}
                               for s, p in zip(samples[:12], ref_preds[:12])]
    log["total_seconds"] = round(time.time() - t_start, 1)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {log_path} (total {log['total_seconds']:.0f} s since training started)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
