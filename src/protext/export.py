"""`protext export`: a classifier as plain files, usable without protext.

`--out DIR` receives:

- `classifier.safetensors`: `class_embeddings` (classes x dim, L2-normalised, in label
  order), `logit_scale` (a scalar) and, for SigLIP, `logit_bias`: with any copy of the
  backbone, the logits of an image are `logit_scale * normalize(image_features) @
  class_embeddings.T (+ logit_bias)`, so `transformers`' `CLIPModel` alone is enough (the
  README shows it);
- `classifier.json`: the backbone (name, revision, fingerprints), the head and the text its
  parts read (templates; descriptions or descriptors by count), the labels in order, the
  image preprocessing facts, and each file's SHA-256;
- with `onnx=True`, `classifier.onnx`: one model from preprocessed pixels (N, 3, H, W) to
  logits (N, classes), the image tower and the head together. It is checked against the
  PyTorch classifier with onnxruntime before it is written, on the images given (else on
  seeded random pixels), and the largest difference is recorded in the JSON. With `int8=True`
  its matrix products are quantized by onnxruntime's dynamic quantization (int8 weights,
  activations quantized per batch); int8 cannot meet an fp32 tolerance, so it is checked by
  the cosine of each image's logits with fp32 PyTorch's (at least `INT8_MIN_COSINE`), and
  that cosine, the largest difference and the top-1 agreement are recorded.

Each file is written atomically and the JSON last, so a folder whose JSON names other
digests than its files hold was interrupted.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .backbone import ImageTower
from .cache import atomic_save_tensors, atomic_write_bytes, atomic_write_json, file_sha256
from .classifier import ProTextClassifier
from .errors import ProtextError
from .images import UnreadableImage, list_images, load_pixels

EMBEDDINGS_FILE = "classifier.safetensors"
JSON_FILE = "classifier.json"
ONNX_FILE = "classifier.onnx"
FORMAT_VERSION = 1
INPUT, OUTPUT = "pixel_values", "logits"
INT8_MIN_COSINE = 0.99


class PixelsToLogits(nn.Module):
    """The image tower and the head as one module: what the ONNX file computes.

    The same arithmetic as `ProTextClassifier.logits` on `ImageTower` features (the export
    checks it against them): scale times cosine, plus the learned bias of SigLIP backbones.
    """

    def __init__(self, clf: ProTextClassifier):
        super().__init__()
        self.tower = clf.backbone.image
        self.vision, self.projection = self.tower.model, self.tower.projection  # registered, so exported
        self.logit_scale, self.logit_bias = clf.backbone.logit_scale, clf.backbone.logit_bias
        self.register_buffer("class_embeddings", clf.weights.detach().float().clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale * self.tower(pixel_values) @ self.class_embeddings.T
        return logits if self.logit_bias is None else logits + self.logit_bias


def preprocessing(tower: ImageTower) -> dict:
    """The facts needed to turn an image into the pixels the tower (and the ONNX model) takes."""
    size = tower.image_size
    facts = {"channels": "RGB", "dtype": "float32", "rescale": 1 / 255, "mean": list(tower.mean),
             "std": list(tower.std)}
    if isinstance(size, int):  # CLIP
        return {"image_size": size, "resize": "shortest side to image_size, bicubic",
                "crop": "centre, image_size x image_size", "layout": "NCHW", **facts}
    if isinstance(size, tuple):  # SigLIP
        return {"image_size": list(size), "resize": "to image_size (height, width), bicubic, aspect ratio not kept",
                "crop": None, "layout": "NCHW", **facts}
    return {"patches": {"rule": type(size).__name__, **asdict(size)}, **facts}  # SigLIP 2 NaFlex: see protext.images


def check_pixels(clf: ProTextClassifier, images: Sequence[str | Path], n_random: int = 4) -> tuple[torch.Tensor, str]:
    """Pixels to compare ONNX and PyTorch on: the readable `images` (files or folders), else seeded random pixels."""
    tower = clf.backbone.image
    pixels = []
    for path in [p for item in images for p in (list_images(Path(item)) if Path(item).is_dir() else [item])]:
        try:
            pixels.append(load_pixels(path, tower.image_size, tower.mean, tower.std))
        except UnreadableImage:
            continue
    if pixels:
        return torch.stack(pixels), f"{len(pixels)} images"
    if images:
        raise ProtextError(f"none of the {len(images)} --check-images could be read")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n_random)]
    return (torch.stack([load_pixels(im, tower.image_size, tower.mean, tower.std) for im in noise]),
            f"{n_random} seeded random-noise images")


def onnx_model(module: PixelsToLogits, example: torch.Tensor) -> bytes:
    """One ONNX file (weights inside), batch size dynamic, exported with torch's exporter."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ProtextError(f"--onnx needs onnx, onnxscript and onnxruntime ({e}): pip install -e '.[export]' "
                           f"(protext's 'export' extra)") from e
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > 1.8e9:
        raise ProtextError(f"the image tower holds {size / 1e9:.1f} GB of weights, more than one ONNX file can (2 GB)")
    batch = torch.export.Dim("batch", min=1, max=4096)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about every torchvision operator it cannot register
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # the exporter fails in many classes; say which tower it could not take
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ProtextError(f"torch.onnx.export could not export this image tower "
                           f"({e.__class__.__name__}: {first})") from e
    finally:
        exporter_log.setLevel(level)
    return program.model_proto.SerializeToString()


def onnxruntime_module():
    """onnxruntime, or an error that says how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ProtextError(f"--onnx needs onnxruntime to check the model ({e}): pip install -e '.[export]' "
                           f"(protext's 'export' extra)") from e
    return onnxruntime


def quantize_onnx(model: bytes) -> bytes:
    """`model` with its matrix products in int8: onnxruntime's dynamic quantization (weights int8 per
    channel, activations uint8 quantized per batch, reduced range so AVX2 CPUs without VNNI cannot
    saturate)."""
    import tempfile

    onnxruntime_module()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        except Exception as e:  # onnxruntime's quantizer raises many classes; say that this step failed
            raise ProtextError(f"onnxruntime could not quantize the ONNX model ({e.__class__.__name__}: {e})") from e
        return target.read_bytes()


def check_onnx(model: bytes, clf: ProTextClassifier, pixels: torch.Tensor, tolerance: float,
               int8: bool = False) -> dict:
    """Run the ONNX model with onnxruntime (CPU) on `pixels`, one at a time and all together, against
    the classifier's own logits: within `tolerance`, or for an int8 model each image's logits at a
    cosine of at least `INT8_MIN_COSINE` from them."""
    onnxruntime = onnxruntime_module()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    want = clf.logits(clf.backbone.image(pixels.to(clf.backbone.device)).cpu())
    together = torch.from_numpy(session.run([OUTPUT], {INPUT: pixels.numpy()})[0])
    alone = torch.cat([torch.from_numpy(session.run([OUTPUT], {INPUT: p[None].numpy()})[0]) for p in pixels])
    diff = max(float((together - want).abs().max()), float((alone - want).abs().max()))
    found = {"max_abs_diff": diff, "runtime": f"onnxruntime {onnxruntime.__version__}",
             "provider": "CPUExecutionProvider", "batch_sizes": [1, len(pixels)]}
    if int8:
        cosine = min(float(torch.nn.functional.cosine_similarity(got, want, dim=1).min()) for got in (together, alone))
        agree = float((together.argmax(1) == want.argmax(1)).float().mean())
        if cosine < INT8_MIN_COSINE:
            raise ProtextError(f"the int8 ONNX model's logits reach a cosine of only {cosine:.4f} with fp32 PyTorch's "
                               f"(at least {INT8_MIN_COSINE} needed); nothing was written")
        return {**found, "precision": "int8", "min_cosine": cosine, "min_cosine_needed": INT8_MIN_COSINE,
                "top1_agreement": agree}
    if diff > tolerance:
        raise ProtextError(f"the ONNX model's logits differ from PyTorch's by up to {diff:.2e}, more than "
                           f"--tolerance {tolerance:g}; nothing was written")
    return {**found, "tolerance": tolerance}


def export(clf: ProTextClassifier, out: Path, onnx: bool = False, check_images: Sequence[str | Path] = (),
           tolerance: float = 1e-4, int8: bool = False) -> dict:
    """Write the classifier's files to `out`; returns what `classifier.json` says. `int8` quantizes the
    ONNX model (see the module's docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProtextError(f"--out {out} is a file; --out names the folder the export is written into")
    if clf.views or clf.weights.dim() != 2:
        raise ProtextError(f"head '{clf.head}' scores augmented views by its own rule; it has no class-embedding "
                           f"matrix to export (export a cosine head such as protext or cupl)")
    backbone, tower = clf.backbone, clf.backbone.image
    if int8 and not onnx:
        raise ProtextError("int8 quantizes the ONNX model: export with onnx=True (--onnx) too")
    if tower.precision != "fp32":
        raise ProtextError(f"this classifier's image tower runs in {tower.precision}; export from the fp32 tower "
                           f"(the ONNX model can be made int8 with --int8)")
    weights = clf.weights.detach().float().cpu().contiguous()
    tensors = {"class_embeddings": weights, "logit_scale": torch.tensor(backbone.logit_scale, dtype=torch.float32)}
    if backbone.logit_bias is not None:
        tensors["logit_bias"] = torch.tensor(backbone.logit_bias, dtype=torch.float32)
    meta = {"format": "protext-classifier", "format_version": FORMAT_VERSION, "protext_version": __version__,
            "backbone": {"name": backbone.name, "revision": backbone.revision,
                         "text_fingerprint": backbone.fingerprint(), "image_fingerprint": tower.fingerprint()},
            "head": clf.head, "head_text": clf.heads.export(clf.head, clf.classes), "dataset": clf.dataset, "labels": list(clf.classes),
            "logit_scale": backbone.logit_scale, "logit_bias": backbone.logit_bias,
            "logits": "logit_scale * normalize(image_features) @ class_embeddings.T"
                      + (" + logit_bias" if backbone.logit_bias is not None else ""),
            "preprocessing": preprocessing(tower), "files": {}}
    onnx_bytes = None
    if onnx:
        pixels, what = check_pixels(clf, check_images)
        example = pixels[:1].repeat(2, *[1] * (pixels.dim() - 1)).to(backbone.device)  # 2: the batch stays dynamic
        onnx_bytes = onnx_model(PixelsToLogits(clf), example)
        if int8:
            onnx_bytes = quantize_onnx(onnx_bytes)
        meta["onnx"] = {"file": ONNX_FILE, "input": INPUT, "output": OUTPUT, "precision": "int8" if int8 else "fp32",
                        "check": {"on": what, **check_onnx(onnx_bytes, clf, pixels, tolerance, int8)}}
    atomic_save_tensors(out / EMBEDDINGS_FILE, tensors,
                        {"format": "protext-classifier", "labels": str(len(clf.classes))})
    meta["files"][EMBEDDINGS_FILE] = file_sha256(out / EMBEDDINGS_FILE)
    if onnx_bytes is not None:
        atomic_write_bytes(out / ONNX_FILE, onnx_bytes)
        meta["files"][ONNX_FILE] = file_sha256(out / ONNX_FILE)
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)  # an earlier export's model, for other labels
    atomic_write_json(out / JSON_FILE, meta)
    return meta
