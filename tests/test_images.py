import glob

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED
from protext.backbone import CLIP_MEAN, CLIP_STD
from protext.datasets import image_folder
from protext.features import extract
from protext.images import open_image, preprocess, to_rgb


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
    feats = extract(tiny, image_folder(root), tmp_path / "cache", show_progress=False)
    assert len(feats.labels) == 4
    assert sorted(p.split("/")[-1] for p, _ in feats.skipped) == ["not_an_image.jpg", "truncated.jpg"]
    assert all(reason for _, reason in feats.skipped)
    assert torch.allclose(feats.feats.norm(dim=1), torch.ones(4), atol=1e-5)
