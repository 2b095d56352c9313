"""Any-resolution image handling of LLaDA-V (``anyres_max_N`` + ``spatial_unpad``).

Two halves, both reproducing the official arithmetic exactly (integer division, float
ratios, ``math.ceil``/``int`` truncation, as written there):

* ``preprocess``: image -> crops [1 + rows*cols, 3, S, S]: the whole image resized to
  SxS (the "base" crop), then the image resized-and-padded onto the best grid of SxS
  tiles and cut into tiles in row-major order; every crop normalised like SigLIP.
* ``assemble``: per-crop features [1 + rows*cols, T, D] -> visual tokens [n_visual, D]:
  base tokens, then the grid as one (D, p*rows, p*cols) map, unpadded against the
  original size, optionally bilinear-downsampled, with ``image_newline`` after each row.

``visual_token_count`` gives the number of rows ``assemble`` returns without tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..config import LLaDAVConfig
from ..pixels import to_rgb, upright_size
from ..rules import is_url, shorten, shorten_path

ImageLike = Union[str, Path, Image.Image, np.ndarray]
SizeWH = tuple[int, int]

#: Downsample the unpadded grid map when it is this many times larger (in side length)
#: than ``anyres_max_crops`` crops' worth of tokens (official constant).
DOWNSAMPLE_THRESHOLD = 1.1


class ImageError(ValueError):
    """An input image is missing, unreadable or of an unsupported form."""


# ---------------------------------------------------------------------- loading
def load_image(image: ImageLike) -> Image.Image:
    """Path, PIL image or HxWx3 uint8 array -> RGB PIL image (one with pixels)."""
    img = _load(image)
    _has_pixels(img.size)
    return img


def _load(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image))  # [H, W, 3] uint8 -> RGB
    # os.path.isfile: False for a name too long to be a file (Path.is_file raises there before Python 3.12)
    if is_url(image) and not os.path.isfile(image):
        fix = "decode it to a file first, or pass a PIL image" if image.startswith("data:") else "download it first"
        raise ImageError(f"{shorten(image)}: a URL; images are read from local files ({fix})")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not os.path.isfile(path):
            raise ImageError(f"{shorten_path(path)}: image file not found")
        try:
            with _no_bomb_warning(), Image.open(path) as im:
                return to_rgb(im)  # convert() decodes fully, so the file can be closed
        except Image.DecompressionBombError as e:
            raise ImageError(f"{shorten_path(path)}: refused, too many pixels to decode safely ({e}); downscale it "
                             "first (anyres resizes it to a few crops anyway)") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{shorten_path(path)}: cannot decode image ({e})") from e
    raise ImageError(f"unsupported image type {type(image).__name__} (expected a path, PIL image or uint8 array)")


def image_size(image: ImageLike) -> SizeWH:
    """(width, height) of an image without decoding or copying it (a file's header only); the same
    checks as :func:`load_image`, and an image without pixels is refused."""
    return _has_pixels(_image_size(image))


def _image_size(image: ImageLike) -> SizeWH:
    if isinstance(image, Image.Image):
        return upright_size(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image.shape[1], image.shape[0]  # [H, W, 3]
    if isinstance(image, (str, Path)) and os.path.isfile(image):
        try:
            with _no_bomb_warning(), Image.open(image) as im:
                return upright_size(im)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError):
            pass  # load_image says why
    return load_image(image).size


@contextlib.contextmanager
def _no_bomb_warning():
    """Pillow warns (a Python warning with its source line) about an image between its pixel limit and twice
    it, then decodes it: the visual token check and anyres's resize handle any size. Above twice the limit
    Pillow refuses the image (said as such in :func:`_load`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _has_pixels(size: SizeWH) -> SizeWH:
    if min(size) < 1:
        raise ImageError(f"the image is {size[0]}x{size[1]} pixels: it has none to encode")
    return size


# ---------------------------------------------------------------------- grid choice
def select_best_resolution(size_wh: SizeWH, resolutions: Sequence[SizeWH]) -> SizeWH:
    """The (width, height) pinpoint keeping the most original pixels after an
    aspect-preserving fit; ties go to the one wasting the least area (first wins)."""
    orig_w, orig_h = size_wh
    best, best_effective, best_wasted = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / orig_w, h / orig_h)
        fit_w, fit_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(fit_w * fit_h, orig_w * orig_h)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def grid_shape(size_wh: SizeWH, cfg: LLaDAVConfig) -> tuple[int, int]:
    """(cols, rows) of SxS grid crops for an image of ``size_wh`` = (width, height)."""
    s = cfg.vision.image_size
    w, h = select_best_resolution(size_wh, cfg.image_grid_pinpoints)
    return w // s, h // s


# ---------------------------------------------------------------------- pixels
def resize_and_pad(image: Image.Image, target_wh: SizeWH, resample: int | None = None) -> Image.Image:
    """Fit ``image`` inside ``target_wh`` keeping its aspect (the short side rounded up),
    centred on a black canvas (zeros). ``resample``: PIL's default unless given (label maps
    use nearest)."""
    orig_w, orig_h = image.size
    tw, th = target_wh
    scale_w, scale_h = tw / orig_w, th / orig_h
    if scale_w < scale_h:
        new_w, new_h = tw, min(math.ceil(orig_h * scale_w), th)
    else:
        new_w, new_h = min(math.ceil(orig_w * scale_h), tw), th
    canvas = Image.new(image.mode, (tw, th), 0)
    resized = image.resize((new_w, new_h)) if resample is None else image.resize((new_w, new_h), resample=resample)
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def split_tiles(image: Image.Image, tile: int) -> list[Image.Image]:
    """Cut into ``tile`` x ``tile`` crops, row-major (left to right, then top to bottom)."""
    w, h = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, h, tile) for x in range(0, w, tile)]


def normalize_crop(crop: Image.Image, cfg: LLaDAVConfig) -> np.ndarray:
    """SigLIP processor semantics: bicubic resize to SxS, x/255, (x-mean)/std, CHW float32.

    The rounding follows transformers' ``rescale`` (uint8 -> float64 * (1/255) -> float32)
    and ``normalize`` (float32 subtract and divide), so the result is bit-identical."""
    s = cfg.vision.image_size
    if crop.size != (s, s):
        crop = crop.resize((s, s), resample=Image.Resampling.BICUBIC)
    x = np.asarray(crop.convert("RGB"))  # [S, S, 3] uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # [S, S, 3]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = (x - mean) / std  # [S, S, 3] float32
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, S, S]


def preprocess(image: ImageLike, cfg: LLaDAVConfig, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, SizeWH]:
    """Image -> (pixel_values [1 + rows*cols, 3, S, S] float32 on ``device``, original (width, height)).
    The crops are cut and resized by PIL on the CPU (:func:`_crops`); their normalisation runs on
    ``device`` (:func:`normalize_crops`, the bits of :func:`normalize_crop`): a GPU receives uint8
    pixels, a quarter of the float32 bytes, and the CPU skips the float arithmetic."""
    crops, size = _crops(image, cfg)  # [N, S, S, 3] uint8
    return normalize_crops(torch.from_numpy(crops).to(device), cfg), size


def _crops(image: ImageLike, cfg: LLaDAVConfig) -> tuple[np.ndarray, SizeWH]:
    """The base image and the grid crops, resized to S x S: ([1 + rows*cols, S, S, 3] uint8, (width, height))."""
    img = load_image(image)
    s = cfg.vision.image_size
    best_wh = select_best_resolution(img.size, cfg.image_grid_pinpoints)
    if best_wh[0] % s or best_wh[1] % s:
        raise ValueError(f"grid pinpoint {best_wh} is not a multiple of the crop size {s}")
    base = img.resize((s, s))  # PIL default resample, as the official code
    crops = [base] + split_tiles(resize_and_pad(img, best_wh), s)
    out = [np.asarray(c if c.size == (s, s) else c.resize((s, s), resample=Image.Resampling.BICUBIC))
           for c in crops]  # as normalize_crop resizes (load_image made the image RGB)
    return np.stack(out), img.size


# ---------------------------------------------------------------------- features
def unpad(feature_map: torch.Tensor, size_wh: SizeWH) -> torch.Tensor:
    """[D, H, W] grid map -> [D, h, w] with the letterbox padding removed.

    The padding per side is rounded down, so an odd difference keeps one extra row/col."""
    orig_w, orig_h = size_wh
    cur_h, cur_w = feature_map.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:  # padded top and bottom
        new_h = int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return feature_map[:, pad : cur_h - pad, :]  # [D, h, W]
    new_w = int(orig_w * (cur_h / orig_h))  # padded left and right
    pad = (cur_w - new_w) // 2
    return feature_map[:, :, pad : cur_w - pad]  # [D, H, w]


def assemble(
    features: torch.Tensor, size_wh: SizeWH, cfg: LLaDAVConfig, image_newline: torch.Tensor
) -> torch.Tensor:
    """Crop features [1 + rows*cols, T, D] -> visual tokens [n_visual, D] (official order)."""
    p = cfg.vision.patches_per_side
    cols, rows = grid_shape(size_wh, cfg)
    n, t, d = features.shape
    if t != p * p or n != 1 + rows * cols:
        raise ValueError(f"features {tuple(features.shape)} do not fit a {cols}x{rows} grid of {p}x{p} tokens")
    base = features[0]  # [T, D]
    grid = features[1:].reshape(rows, cols, p, p, d)  # [rows, cols, p, p, D]
    # contiguous (channels-first) layout, as the official code: interpolate's CPU kernel
    # picks a different, not bit-identical path for channels-last-looking strides
    fmap = grid.permute(4, 0, 2, 1, 3).contiguous().view(d, rows * p, cols * p)  # [D, rows*p, cols*p]
    fmap = unpad(fmap, size_wh)  # [D, h, w]
    _, h, w = fmap.shape
    times = math.sqrt(h * w / (cfg.anyres_max_crops * p**2))
    if times > DOWNSAMPLE_THRESHOLD:
        out_hw = [int(h // times), int(w // times)]
        fmap = F.interpolate(fmap[None], out_hw, mode="bilinear")[0]  # [D, h', w']
    newline = image_newline.to(fmap.dtype)[:, None, None].expand(d, fmap.shape[1], 1)  # [D, h', 1]
    fmap = torch.cat([fmap, newline], dim=-1)  # [D, h', w' + 1]
    tokens = fmap.flatten(1, 2).transpose(0, 1)  # [h' * (w' + 1), D]
    return torch.cat([base, tokens], dim=0)  # [T + h' * (w' + 1), D]


def visual_token_count(width: int, height: int, cfg: LLaDAVConfig) -> int:
    """Rows of ``assemble`` for a width x height image, by plain arithmetic."""
    p = cfg.vision.patches_per_side
    cols, rows = grid_shape((width, height), cfg)
    h, w = rows * p, cols * p
    if width / height > w / h:
        h -= 2 * ((h - int(height * (w / width))) // 2)
    else:
        w -= 2 * ((w - int(width * (h / height))) // 2)
    return _tokens_after_unpad(h, w, p, cfg.anyres_max_crops)


def _tokens_after_unpad(h: int, w: int, p: int, max_crops: int) -> int:
    times = math.sqrt(h * w / (max_crops * p**2))
    if times > DOWNSAMPLE_THRESHOLD:
        h, w = int(h // times), int(w // times)
    return p * p + h * (w + 1)


def max_visual_token_count(cfg: LLaDAVConfig) -> int:
    """An upper bound of :func:`visual_token_count` over EVERY image size: anyres_max_N bounds it.

    For a grid of rows x cols crops the unpadded map keeps one side whole and the other
    shortened by an even number of rows or columns (the padding is removed symmetrically),
    so trying every such shape of every grid covers every image (shapes no image reaches
    included, so this may exceed the true maximum by a little)."""
    p, s = cfg.vision.patches_per_side, cfg.vision.image_size
    best = 0
    for gw, gh in cfg.image_grid_pinpoints:
        h, w = (gh // s) * p, (gw // s) * p
        shapes = [(h - 2 * k, w) for k in range(h // 2 + 1)] + [(h, w - 2 * k) for k in range(w // 2 + 1)]
        best = max(best, max(_tokens_after_unpad(a, b, p, cfg.anyres_max_crops) for a, b in shapes if a * b > 0))
    return best


# ---------------------------------------------------------------------- batched (training)
def crops_uint8(image: ImageLike, cfg: LLaDAVConfig) -> np.ndarray:
    """The anyres crops of :func:`preprocess` before normalisation: [N, S, S, 3] uint8.
    ``normalize_crops(crops_uint8(img))`` is ``preprocess(img)[0]``."""
    return _crops(image, cfg)[0]


def normalize_crops(crops: torch.Tensor, cfg: LLaDAVConfig) -> torch.Tensor:
    """[..., S, S, 3] uint8 -> [..., 3, S, S] float32, the same arithmetic as :func:`normalize_crop`
    (on any device, batched)."""
    x = (crops.double() * (1 / 255)).float()  # [..., S, S, 3]
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device)
    return ((x - mean) / std).movedim(-1, -3).contiguous()  # [..., 3, S, S]


def assembly_index(cfg: LLaDAVConfig, size_wh: SizeWH, n_crops: int) -> torch.Tensor:
    """:func:`assemble` as a gather: index [n_visual] into cat(crop features [N*T], newline), the
    newline being index N*T. Valid when assembly does not downsample (checked)."""
    t = cfg.vision.tokens_per_crop
    feats = torch.arange(n_crops * t, dtype=torch.float64).view(n_crops, t, 1)  # [N, T, 1]
    out = assemble(feats, size_wh, cfg, torch.tensor([-1.0], dtype=torch.float64))[:, 0]  # [n_visual]
    if not torch.equal(out, out.round()):
        raise ValueError(f"assembly of a {size_wh} image downsamples: not a pure gather")
    return torch.where(out < 0, torch.full_like(out, n_crops * t), out).long()
