"""Any-resolution preprocessing and visual-token assembly (llada_export.graphs.anyres)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llada_export import visual_token_count
from llada_export.config import full_config, tiny_config
from llada_export.graphs.anyres import (
    ImageError,
    assemble,
    grid_shape,
    load_image,
    max_visual_token_count,
    normalize_crop,
    preprocess,
    select_best_resolution,
    unpad,
)

CONFIGS = {"full": full_config(), "tiny": tiny_config()}


def random_features(size_wh, cfg, d=8, dtype=torch.float32, seed=0):
    cols, rows = grid_shape(size_wh, cfg)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1 + rows * cols, cfg.vision.tokens_per_crop, d, generator=g).to(dtype)  # [N, T, d]
    return feats, torch.randn(d, generator=g).to(dtype)  # newline [d]


def random_sizes(n=300, seed=1234):
    rng = random.Random(seed)
    sizes = [(1, 2000), (2000, 1), (1, 1), (3, 1999), (1999, 3), (383, 385), (385, 383), (384, 384), (7, 5)]
    sizes += [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]
    while len(sizes) < n:
        kind = rng.random()
        if kind < 0.6:
            sizes.append((rng.randint(1, 4000), rng.randint(1, 4000)))
        elif kind < 0.8:  # extreme aspect ratios
            a, b = rng.randint(1, 40), rng.randint(500, 5000)
            sizes.append((a, b) if rng.random() < 0.5 else (b, a))
        else:  # odd sizes near crop multiples
            sizes.append((384 * rng.randint(1, 6) + rng.choice([-1, 1]), 384 * rng.randint(1, 6) + rng.choice([-1, 1])))
    return sizes


# ---------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    "size, expected", [((384, 384), 1485), ((640, 480), 2929), ((1024, 768), 3627), ((1920, 1080), 3649)]
)
def test_visual_token_count_official_oracles(size, expected):
    assert visual_token_count(*size, full_config()) == expected


@pytest.mark.parametrize("name", ["full", "tiny"])
def test_count_matches_assemble(name):
    cfg = CONFIGS[name]
    for i, size in enumerate(random_sizes()):
        feats, newline = random_features(size, cfg, seed=i)
        out = assemble(feats, size, cfg, newline)  # [n_visual, 8]
        assert out.shape == (visual_token_count(*size, cfg), 8), size


def test_select_best_resolution_prefers_less_waste_on_ties():
    # 384x384 fits (384,384) and every larger grid with full effective resolution: least waste wins.
    assert select_best_resolution((384, 384), full_config().image_grid_pinpoints) == (384, 384)
    # small images: every pinpoint keeps all pixels, so the least waste (1x1) wins
    assert select_best_resolution((100, 200), [(384, 768), (768, 768), (384, 384)]) == (384, 384)
    # 400x800: both keep 384x768 pixels; the less wasteful one wins regardless of order
    assert select_best_resolution((400, 800), [(768, 768), (384, 768)]) == (384, 768)
    assert select_best_resolution((400, 800), [(768, 768), (384, 768), (768, 1536)]) == (768, 1536)
    assert grid_shape((1, 2000), full_config()) == (1, 6)
    assert grid_shape((2000, 1), full_config()) == (6, 1)


# ---------------------------------------------------------------------- assemble layout
def test_assemble_layout_row_major_with_newlines():
    cfg = tiny_config()  # p = 8
    p, size = 8, (768, 384)  # 2 cols x 1 row, no padding, no downsample
    assert grid_shape(size, cfg) == (2, 1)
    n, t = 3, p * p
    feats = torch.arange(n * t, dtype=torch.float32).reshape(n, t, 1)  # value = crop * T + token
    newline = torch.tensor([-1.0])
    out = assemble(feats, size, cfg, newline)[:, 0]  # [T + p * (2p + 1)]
    assert out[:t].tolist() == list(range(t))  # base crop first, no newline
    rows = out[t:].reshape(p, 2 * p + 1)
    for r in range(p):
        left = [1 * t + r * p + c for c in range(p)]
        right = [2 * t + r * p + c for c in range(p)]
        assert rows[r].tolist() == left + right + [-1.0]


def test_unpad_odd_difference_keeps_extra_column():
    cfg = full_config()
    p, (width, height) = cfg.vision.patches_per_side, (500, 300)
    cols, rows = grid_shape((width, height), cfg)
    assert (cols, rows) == (2, 1)
    cur_h, cur_w = rows * p, cols * p  # 27, 54
    # Official unpad_image: width/height (1.667) <= cur_w/cur_h (2.0) -> padding on the width.
    new_w = int(width * (cur_h / height))  # int(45.0) = 45
    padding = (cur_w - new_w) // 2  # 9 // 2 = 4
    kept_w = cur_w - 2 * padding  # 46: one more than new_w
    assert (new_w, padding, kept_w) == (45, 4, 46)
    # grid column index encoded in the features: crop c, token (r, x) -> column c*p + x
    col = torch.arange(p).repeat(p)  # [T]
    grid = torch.stack([c * p + col for c in range(cols)]).float()  # [cols, T]
    feats = torch.cat([torch.zeros(1, p * p), grid])[..., None]  # [1 + cols, T, 1]
    out = assemble(feats, (width, height), cfg, torch.tensor([-1.0]))[:, 0]
    assert out.shape[0] == p * p + cur_h * (kept_w + 1) == visual_token_count(width, height, cfg)
    first_row = out[p * p : p * p + kept_w + 1].tolist()
    assert first_row == [float(c) for c in range(padding, padding + kept_w)] + [-1.0]


def test_unpad_odd_difference_keeps_extra_row():
    fmap = torch.arange(16 * 24, dtype=torch.float32).reshape(1, 16, 24)  # [D, H, W]
    # width/height 300/90 = 3.33 > 24/16: padding on the height
    new_h = int(90 * (24 / 300))  # int(7.2) = 7
    padding = (16 - new_h) // 2  # 4
    out = unpad(fmap, (300, 90))
    assert out.shape == (1, 16 - 2 * padding, 24) == (1, new_h + 1, 24)
    assert torch.equal(out, fmap[:, 4:12])


def hand_built(feats, size, cfg, newline):
    """The official merge built independently, crop by crop (unpad_image, the 1.1 downsample rule)."""
    p, d = cfg.vision.patches_per_side, feats.shape[-1]
    cols, rows = grid_shape(size, cfg)
    fmap = torch.empty(d, rows * p, cols * p, dtype=feats.dtype)
    for r in range(rows):
        for c in range(cols):
            fmap[:, r * p : (r + 1) * p, c * p : (c + 1) * p] = feats[1 + r * cols + c].T.reshape(d, p, p)
    (width, height), (cur_h, cur_w) = size, fmap.shape[1:]
    if width / height > cur_w / cur_h:  # official unpad_image
        pad = (cur_h - int(height * (cur_w / width))) // 2
        fmap = fmap[:, pad : cur_h - pad]
    else:
        pad = (cur_w - int(width * (cur_h / height))) // 2
        fmap = fmap[:, :, pad : cur_w - pad]
    h, w = fmap.shape[1:]
    times = math.sqrt(h * w / (4 * p * p))
    if times > 1.1:
        fmap = torch.nn.functional.interpolate(fmap[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    fmap = torch.cat([fmap, newline[:, None, None].expand(d, fmap.shape[1], 1)], dim=-1)  # [d, h', w' + 1]
    return torch.cat([feats[0], fmap.reshape(d, -1).T])  # [T + h' * (w' + 1), d]


@pytest.mark.parametrize("size", [(1920, 1080), (663, 4017), (4017, 663)])
def test_assemble_bit_exact_vs_hand_built_map(size):
    """Independent build of the official merge (all three sizes are downsampled; the
    single-column grid once exposed a stride-dependent interpolate result)."""
    cfg = full_config()
    feats, newline = random_features(size, cfg, d=4)
    expected = hand_built(feats, size, cfg, newline)
    assert torch.equal(assemble(feats, size, cfg, newline), expected)
    if size == (1920, 1080):
        assert expected.shape[0] == 3649


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_assemble_dtypes_with_downsample(dtype):
    """In the model's dtype, against the hand-built merge in that dtype (the interpolation runs in it)."""
    cfg, size = full_config(), (1920, 1080)  # downsampled (times > 1.1)
    feats, newline = random_features(size, cfg, dtype=dtype)
    out = assemble(feats, size, cfg, newline)
    assert out.dtype == dtype and out.shape == (3649, 8)
    assert torch.equal(out, hand_built(feats, size, cfg, newline))


@pytest.mark.parametrize("name", ["full", "tiny"])
def test_max_visual_token_count_bounds_every_image(name):
    """The default bucket takes every image: no size gives more tokens than the bound, and the bound
    is tight (within 3% of the largest count found over many sizes)."""
    cfg = CONFIGS[name]
    bound = max_visual_token_count(cfg)
    rng = random.Random(7)  # log-uniform sizes from 8 to 8192 px: every grid and aspect ratio
    sizes = random_sizes(300) + [(int(2 ** rng.uniform(3, 13)), int(2 ** rng.uniform(3, 13))) for _ in range(10000)]
    counts = [visual_token_count(*size, cfg) for size in sizes]
    assert max(counts) <= bound < 1.03 * max(counts)
    if name == "full":
        assert bound > visual_token_count(1920, 1080, cfg)


def test_assemble_rejects_wrong_crop_count():
    cfg = tiny_config()
    feats, newline = random_features((640, 480), cfg)
    with pytest.raises(ValueError, match="grid"):
        assemble(feats[:-1], (640, 480), cfg, newline)


# ---------------------------------------------------------------------- preprocess
def noise_image(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(640, 480), (333, 777), (384, 384), (1, 50)])
def test_preprocess_shapes_and_base_crop(size):
    cfg = tiny_config()
    arr = noise_image(*size)
    pixels, size_wh = preprocess(arr, cfg)
    cols, rows = grid_shape(size, cfg)
    assert size_wh == size
    assert pixels.dtype == torch.float32 and pixels.shape == (1 + rows * cols, 3, 384, 384)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # independent base crop: PIL default resize, then numpy normalise (mean = std = 0.5)
    base = np.asarray(Image.fromarray(arr).resize((384, 384)), dtype=np.float32) / np.float32(255)
    base = ((base - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels[0].numpy(), base, rtol=0, atol=1e-6)


def test_preprocess_padding_is_black():
    cfg = full_config()
    w, h = 1000, 300
    img = Image.new("RGB", (w, h), (200, 100, 50))
    pixels, _ = preprocess(img, cfg)
    assert select_best_resolution((w, h), cfg.image_grid_pinpoints) == (1152, 384)  # 3 x 1 crops
    assert pixels.shape[0] == 4
    # official resize_and_pad_image: width fills (1152/1000 < 384/300), height = ceil(300 * 1.152)
    new_h = min(math.ceil(300 * (1152 / 1000)), 384)  # 346
    top = (384 - new_h) // 2  # 19
    grid = torch.cat(list(pixels[1:]), dim=-1)  # [3, 384, 1152]
    assert torch.all(grid[:, :top] == -1.0)
    assert torch.all(grid[:, top + new_h :] == -1.0)
    inside = grid[:, top + 2 : top + new_h - 2]  # away from the resampled border rows
    expected = (torch.tensor([200, 100, 50]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(inside, expected[:, None, None].expand_as(inside), atol=1e-6, rtol=0)


def test_normalize_crop_bit_identical_to_transformers():
    from functools import reduce

    from transformers.image_transforms import normalize, rescale, resize, to_channel_dimension_format
    from transformers.image_utils import ChannelDimension, PILImageResampling

    cfg, first = tiny_config(), ChannelDimension.FIRST
    steps = [
        np.asarray,
        lambda x: resize(x, size=(384, 384), resample=PILImageResampling.BICUBIC, data_format=first),
        lambda x: rescale(x, scale=1 / 255, data_format=first),
        lambda x: normalize(x, mean=cfg.image_mean, std=cfg.image_std, data_format=first),
        lambda x: to_channel_dimension_format(x, first, first),
    ]
    for size in [(384, 384), (500, 300)]:  # a grid crop, and one that needs the resize
        crop = Image.fromarray(noise_image(*size, seed=3))
        ref = reduce(lambda x, f: f(x), steps, crop)
        ours = normalize_crop(crop, cfg)
        assert ours.dtype == ref.dtype == np.float32
        assert np.array_equal(ours, ref)


def test_preprocess_normalises_as_the_processor_bit_for_bit():
    """preprocess (crops cut by PIL, normalised by torch where the engines run) gives, bit for bit, the
    numpy normalisation checked against transformers' processor steps above, crop by crop."""
    from llada_export.graphs.anyres import _crops, resize_and_pad, select_best_resolution, split_tiles

    cfg = tiny_config()
    s = cfg.vision.image_size
    for w, h in [(384, 384), (1024, 768), (333, 901)]:
        img = Image.fromarray(noise_image(w, h, seed=w))
        best = select_best_resolution(img.size, cfg.image_grid_pinpoints)
        crops = [img.resize((s, s))] + split_tiles(resize_and_pad(img, best), s)
        want = np.stack([normalize_crop(c, cfg) for c in crops])  # [N, 3, S, S]
        got, size = preprocess(img, cfg)
        assert size == (w, h) and got.dtype == torch.float32
        assert np.array_equal(got.numpy(), want)
        assert _crops(img, cfg)[0].dtype == np.uint8


# ---------------------------------------------------------------------- loading
def test_load_image_forms(tmp_path):
    arr = noise_image(20, 10)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path), Image.open(path).convert("L"), arr):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (20, 10)
    assert np.array_equal(np.asarray(load_image(path)), arr)
    with pytest.raises(ImageError, match="uint8"):
        load_image(arr.astype(np.float32))


def test_load_image_errors_name_the_path(tmp_path):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello, I am text")
    with pytest.raises(ImageError, match="not_an_image.jpg"):
        load_image(bad)
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="missing.png"):
        load_image(str(missing))


def test_image_size_reads_no_pixels_and_refuses_what_load_image_refuses(tmp_path):
    from PIL import Image

    from llada_export.graphs.anyres import ImageError, image_size

    img = Image.new("RGB", (37, 21))
    img.save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert image_size(img) == image_size(tmp_path / "a.png") == image_size(str(tmp_path / "a.png")) == (37, 21)
    assert image_size(np.zeros((21, 37, 3), np.uint8)) == (37, 21)
    for bad in (tmp_path / "bad.png", tmp_path / "missing.png", np.zeros((21, 37), np.uint8), 3):
        with pytest.raises(ImageError):
            image_size(bad)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_an_image_without_pixels_is_an_image_error(shape):
    """A 0-pixel array or PIL image: an ImageError from both entry points (it divided by zero in the grid choice)."""
    from PIL import Image

    from llada_export.graphs.anyres import ImageError, image_size

    h, w = shape
    for image in (np.zeros((h, w, 3), np.uint8), Image.new("RGB", (w, h))):
        for read in (image_size, load_image):
            with pytest.raises(ImageError, match="has none to encode"):
                read(image)


def test_a_url_is_named_as_a_url():
    """llada-generate --image https://... said 'https:/example.com/x.png: image file not found'."""
    from llada_export.graphs.anyres import ImageError, image_size

    for read in (image_size, load_image):
        with pytest.raises(ImageError, match=r"^https://example.com/x.png: a URL; images are read from local files"):
            read("https://example.com/x.png")
