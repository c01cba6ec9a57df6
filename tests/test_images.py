import glob

import numpy as np
import pytest
import torch
from PIL import Image
from support import SHARED

from protext.context import Context
from protext.backbone import CLIP_MEAN, CLIP_STD
from protext.training.datasets import image_folder
from protext.training.evaluate import extract
from protext.images import UnreadableImage, load_pixels, open_image, preprocess, to_rgb


@pytest.mark.parametrize("size", [224, 32])
def test_preprocessing_matches_transformers_clip_processor(shared, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    files = sorted(glob.glob(str(SHARED / "images" / "imagenet_sample" / "*")))[:12]
    files += sorted(glob.glob(str(SHARED / "images" / "cifar10_test_sample" / "*" / "0000.jpg")))[:3]
    sizes = set()
    for f in files:
        img = open_image(f)
        sizes.add(img.size)
        ours = preprocess(img, size, CLIP_MEAN, CLIP_STD)
        ref = torch.as_tensor(np.asarray(proc(images=to_rgb(img), return_tensors="np")["pixel_values"][0]))
        assert ours.shape == (3, size, size)
        assert torch.allclose(ours, ref, atol=1e-4), f
    assert len(sizes) > 5  # portrait, landscape, square and tiny images were all covered


def _rgb(arr):
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_every_mode_becomes_rgb():
    rng = np.random.default_rng(0)
    base = _rgb(rng.integers(0, 256, (40, 30, 3)))
    grey = base.convert("L")
    cases = {
        "L": grey, "1": base.convert("1"), "P": base.convert("P"), "RGBA": base.convert("RGBA"),
        "CMYK": base.convert("CMYK"), "LA": grey.convert("LA"),
    }
    for mode, img in cases.items():
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (30, 40), mode
    assert np.array_equal(np.asarray(to_rgb(grey))[..., 0], np.asarray(grey))
    # 16-bit greyscale is scaled, not clipped: 65535 is white and 32896 mid-grey
    deep = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[..., 0].tolist() == [[255, 128], [0, 1]]
    wide = Image.fromarray(np.array([[65535, 0]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == [[255, 0]]


def test_palette_with_transparency_and_rgba_are_preprocessed(tmp_path):
    img = Image.new("P", (20, 10))
    img.putpalette([255, 0, 0] * 256)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png")
    t = preprocess(open_image(tmp_path / "p.png"), 8, CLIP_MEAN, CLIP_STD)
    assert t.shape == (3, 8, 8) and torch.isfinite(t).all()


def test_corrupt_and_truncated_files_are_skipped_and_listed(tiny, tmp_path, shared):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    src = sorted((SHARED / "images" / "imagenet_sample").iterdir())
    (root / "cat" / "good.jpg").write_bytes(src[0].read_bytes())
    (root / "dog" / "good.jpg").write_bytes(src[1].read_bytes())
    data = src[2].read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "cat" / "not_an_image.jpg").write_text("hello")
    Image.fromarray(np.zeros((9, 9), np.uint16)).save(root / "cat" / "deep.png")
    Image.new("CMYK", (50, 40)).save(root / "dog" / "cmyk.jpg")
    feats = extract(tiny, image_folder(root), Context(tmp_path / "cache", progress=False))
    assert len(feats.labels) == 4
    assert sorted(p.split("/")[-1] for p, _ in feats.skipped) == ["not_an_image.jpg", "truncated.jpg"]
    assert all(reason for _, reason in feats.skipped)
    assert torch.allclose(feats.feats.norm(dim=1), torch.ones(4), atol=1e-5)


def _bomb_folder(root, monkeypatch):
    """Two small images and one 64x64 'decompression bomb' (PIL's limit is lowered so it counts as one)."""
    for name, side in (("cat/small.png", 8), ("cat/bomb.png", 64), ("dog/small.png", 12)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), (side, 0, 0)).save(root / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000: PIL raises, not warns
    return root


def test_decompression_bomb_is_skipped_and_listed_by_extract(tiny, tmp_path, monkeypatch):
    root = _bomb_folder(tmp_path / "imgs", monkeypatch)
    feats = extract(tiny, image_folder(root), Context(tmp_path / "cache", progress=False), workers=2)
    assert len(feats.labels) == 2 and feats.labels.tolist() == [0, 1]
    assert [p.split("/")[-1] for p, _ in feats.skipped] == ["bomb.png"]
    assert feats.skipped[0][1].startswith("DecompressionBombError: ")


def test_load_pixels_turns_any_failure_into_one_error(tmp_path, monkeypatch):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    assert load_pixels(tmp_path / "a.png", 8, CLIP_MEAN, CLIP_STD).shape == (3, 8, 8)
    assert load_pixels(Image.new("L", (9, 7)), 8, CLIP_MEAN, CLIP_STD).shape == (3, 8, 8)
    with pytest.raises(UnreadableImage, match="FileNotFoundError"):
        load_pixels(tmp_path / "missing.png", 8, CLIP_MEAN, CLIP_STD)

    def out_of_memory(*args):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr("protext.images.preprocess", out_of_memory)
    with pytest.raises(UnreadableImage, match="^MemoryError: cannot allocate$"):
        load_pixels(tmp_path / "a.png", 8, CLIP_MEAN, CLIP_STD)


def test_image_cache_is_keyed_by_the_vision_weights(tmp_path):
    from protext.tiny import tiny_clip

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for name in ("cat/a.png", "dog/b.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _rgb(rng.integers(0, 256, (20, 20, 3))).save(root / name)
    ds = image_folder(root)
    old, new = tiny_clip(seed=0), tiny_clip(seed=0)
    assert old.image.fingerprint() == tiny_clip(seed=0).image.fingerprint()
    with torch.no_grad():  # new vision weights, same text weights and name, e.g. a fine-tune saved in the same folder
        gen = torch.Generator().manual_seed(1)
        for p in new.image.model.parameters():
            p.normal_(0, 0.02, generator=gen)
    assert new.name == old.name and new.fingerprint() == old.fingerprint()
    assert new.image.fingerprint() != old.image.fingerprint()
    first = extract(old, ds, Context(tmp_path / "cache", progress=False))
    second = extract(new, ds, Context(tmp_path / "cache", progress=False))
    assert not torch.allclose(first.feats, second.feats, atol=1e-3)
    tower = new.image
    pixels = torch.stack([load_pixels(p, tower.image_size, tower.mean, tower.std) for p, _ in ds.samples])
    assert torch.allclose(second.feats, tower(pixels), atol=1e-5)


def test_image_fingerprint_covers_projection_and_preprocessing():
    from dataclasses import replace

    from protext.tiny import tiny_clip

    tower = tiny_clip(seed=0).image
    prints = {tower.fingerprint(), replace(tower, image_size=64).fingerprint(),
              replace(tower, mean=(0.5, 0.5, 0.5)).fingerprint(),
              replace(tower, std=(0.5, 0.5, 0.5)).fingerprint()}
    other = tiny_clip(seed=0).image
    with torch.no_grad():
        other.projection.weight.mul_(2)
    prints.add(other.fingerprint())
    assert len(prints) == 5
    with torch.no_grad():
        other.projection.weight.mul_(3)
    assert other.fingerprint() in prints  # computed once: the weights of a backbone are frozen
