"""Load a frozen backbone: a CLIP or SigLIP (text and image towers) or a BERT-style text encoder.

`load_backbone(name)` takes a Hugging Face Hub id or a local folder saved by
`transformers`. CLIP (model_type "clip") and SigLIP checkpoints give both towers: SigLIP
(model_type "siglip", google/siglip-*), SigLIP 2 at fixed resolution (also "siglip", with
a Gemma tokenizer: google/siglip2-*-224 …) and SigLIP 2 NaFlex ("siglip2",
google/siglip2-*-naflex). BERT-style sentence encoders (model_type "bert", e.g.
sentence-transformers/all-MiniLM-L6-v2) give the text tower only, which is enough to learn
and check prompts without images.

What differs between families is data here and in the towers: the text tower class, the
image size rule and normalisation, and how image-text scores are made (`logit_bias`: SigLIP's
sigmoid loss has a learned bias, CLIP's softmax none).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import ProtextError
from .images import NaFlex, Size
from .text_encoder import BertText, ClipText, Siglip2Text, SiglipText, TextTower

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"

# Image normalisation when a checkpoint ships no preprocessor config: CLIP's, and SigLIP's 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

MODEL_TYPES = ("clip", "siglip", "siglip2", "bert")

# The image tower's arithmetic. fp32 is the default and the reference; int8 quantizes the vision
# model's linear layers (dynamic int8 on the CPU: weights stored in int8, activations quantized
# per batch); bf16 and fp16 cast the whole vision model (fp16 only on CUDA, where it has kernels).
PRECISIONS = ("fp32", "int8", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ProtextError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")


@dataclass
class ImageTower:
    """A frozen image encoder, its projection (identity for SigLIP, whose pooled output is the
    embedding) and the preprocessing facts that go with it (`images.Size`)."""

    model: nn.Module
    projection: nn.Module
    image_size: Size
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    precision: str = "fp32"  # see PRECISIONS; `at_precision` makes the others
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model(**self._inputs(pixels)).pooler_output
        return torch.nn.functional.normalize(self.projection(pooled).float(), dim=-1)

    @property
    def device(self) -> torch.device:
        return next(self.projection.parameters(), next(self.model.parameters())).device

    def at_precision(self, precision: str) -> "ImageTower":
        """This tower computing in `precision` (one of `PRECISIONS`): a new tower on a copy of the
        weights (this one is left as it is), or this one for its own precision. The fingerprint
        says the precision, so caches and feature folders never mix features of two precisions."""
        check_precision(precision)
        if precision == self.precision:
            return self
        if self.precision != "fp32":
            raise ProtextError(f"this image tower already runs in {self.precision}; load the backbone again for "
                               f"{precision}")
        device = self.device
        if precision == "int8" and device.type != "cpu":
            raise ProtextError("--precision int8 runs on the CPU (PyTorch's int8 kernels); on a GPU use bf16 or fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ProtextError("--precision fp16 needs a CUDA device; on the CPU use int8 (fastest) or bf16")
        base = self.fingerprint()
        if precision == "int8":
            with warnings.catch_warnings():  # torch.ao's dynamic quantization warns that torchao will replace it
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(self.model, {nn.Linear}, dtype=torch.qint8)
            projection = self.projection
        else:
            model = copy.deepcopy(self.model).to(_DTYPES[precision])
            projection = copy.deepcopy(self.projection).to(_DTYPES[precision])
        tower = replace(self, model=model, projection=projection, precision=precision)
        tower._fingerprint = f"{base}-{precision}"
        return tower

    def _inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vision model's arguments, pixels in the tower's dtype; NaFlex patches carry their grid
        positions (see `images.NaFlex`)."""
        dtype = _DTYPES.get(self.precision, torch.float32)
        if not isinstance(self.image_size, NaFlex):
            return {"pixel_values": pixels.to(dtype)}
        grid = pixels[..., -2:]
        return {"pixel_values": pixels[..., :-2].to(dtype), "pixel_attention_mask": (grid[..., 0] >= 0).long(),
                "spatial_shapes": (grid.amax(dim=1) + 1).long()}

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A short hash of everything that decides the image features: the vision weights, the
        projection and the preprocessing (see `digest_tensors`). Image-feature caches are keyed
        by it, so a fine-tuned vision tower saved under the same name gets new features."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.image_size, tuple(self.mean), tuple(self.std))).encode())
            digest_tensors(h, "model", self.model)
            digest_tensors(h, "projection", self.projection)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def digest_tensors(h, prefix: str, module: nn.Module, per_tensor: int = 4096) -> None:
    """Feed `h` every tensor of `module`: its name, shape and dtype, and up to `per_tensor` values
    spread evenly over it. A change anywhere in any layer shows (a whole row or block changes
    many sampled values), and a ViT-L hashes in well under a second."""
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        h.update(f"{prefix}.{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float().cpu().numpy().tobytes())


@dataclass
class Backbone:
    """A named, frozen backbone. `revision` is the Hub commit when known."""

    name: str
    revision: str | None
    text: TextTower
    image: ImageTower | None = None
    logit_scale: float = 100.0
    logit_bias: float | None = None  # SigLIP's learned bias of its sigmoid loss; CLIP has none
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.text.device

    def at_precision(self, precision: str) -> "Backbone":
        """This backbone with its image tower in `precision` (see `ImageTower.at_precision`); the
        text tower, which runs once per label set, stays in fp32."""
        if self.image is None:
            if precision != "fp32":
                raise ProtextError(f"--precision {precision}: backbone '{self.name}' has no image tower")
            return self
        image = self.image.at_precision(precision)
        return self if image is self.image else replace(self, image=image, _fingerprint=self._fingerprint)

    def to(self, device: torch.device | str) -> "Backbone":
        self.text.to(device)
        if self.image is not None:
            self.image.model.to(device)
            self.image.projection.to(device)
        return self

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A short hash of every tensor of the text tower (`digest_tensors`): the same weights under
        another name match, and prompts, text-feature caches and training targets are keyed by it.
        It starts with "t2-"; prompt files written before (`legacy_fingerprint`) are still read."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.text.kind.encode())
            digest_tensors(h, "text", self.text)
            self._fingerprint = "t2-" + h.hexdigest()[:16]
        return self._fingerprint

    @torch.no_grad()
    def legacy_fingerprint(self) -> str:
        """The fingerprint protext 0.2 recorded: the token embedding's first values and the last
        block's first tensor only (a changed projection or early layer went unseen)."""
        h = hashlib.sha256()
        emb = self.text.token_embedding.weight.detach().float().cpu()
        h.update(str(tuple(emb.shape)).encode())
        h.update(emb.flatten()[:65536].numpy().tobytes())
        last = list(self.text.blocks[-1].parameters())[0].detach().float().cpu()
        h.update(last.flatten()[:65536].numpy().tobytes())
        return h.hexdigest()[:16]

    def has_weights(self, recorded: str) -> bool:
        """Whether a fingerprint recorded in a file (either rule) names this backbone's text weights."""
        return recorded == (self.fingerprint() if recorded.startswith("t2-") else self.legacy_fingerprint())


SUPPORTED = ("protext supports CLIP ('clip'), SigLIP and SigLIP 2 ('siglip', 'siglip2') and BERT-style text "
             "encoders ('bert')")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def _hub_error(name: str, revision: str | None, err: Exception) -> ProtextError:
    rev = f" (revision {revision})" if revision else ""
    return ProtextError(
        f"could not load backbone '{name}'{rev}: {err.__class__.__name__}: {_first_line(err)}\n"
        f"If this machine is offline, download the model where there is internet, e.g.\n"
        f"  hf download {name} --local-dir ./{Path(name).name}   (huggingface_hub's CLI)\n"
        f"copy that folder here and pass its path as --backbone, or point HF_HOME at a cache that holds it."
    )


def looks_like_folder(name: str) -> bool:
    """A backbone name meant as a folder: a path prefix, more than one '/', or a backslash (Hub ids are 'org/name')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_backbone(name: str = DEFAULT_BACKBONE, revision: str | None = None, device: str | None = None,
                  progress: bool = True, precision: str = "fp32") -> Backbone:
    """Load `name` (Hub id or local folder) as a frozen backbone on `device` (default: CUDA if present),
    its image tower in `precision` (`PRECISIONS`); `progress` False keeps `transformers`' loading
    bars quiet too."""
    check_precision(precision)  # before minutes of downloading
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel
    from transformers.utils import logging as transformers_logging

    if not progress:
        transformers_logging.disable_progress_bar()
    local = Path(name).expanduser()
    if not local.exists() and looks_like_folder(name):
        raise ProtextError(f"--backbone {name}: no such folder (a Hub id looks like 'openai/clip-vit-base-patch16')")
    if local.exists() and not (local / "config.json").is_file():
        raise ProtextError(f"{local}: no config.json there; a backbone folder is one saved by transformers' save_pretrained")
    source = str(local) if local.exists() else name
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except ValueError as e:  # transformers' word for an unknown model_type
        raise ProtextError(f"backbone '{name}': {_first_line(e)}\n{SUPPORTED}") from e
    except OSError as e:
        if local.exists():
            raise ProtextError(f"{local / 'config.json'}: not a readable model config ({_first_line(e)})") from e
        raise _hub_error(name, revision, e) from e
    if config.model_type not in MODEL_TYPES:
        raise ProtextError(f"backbone '{name}' has model_type '{config.model_type}'. {SUPPORTED}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model_class = CLIPModel if config.model_type == "clip" else AutoModel
        model = model_class.from_pretrained(source, revision=revision, attn_implementation="sdpa")
    except Exception as e:  # safetensors, OSError, size mismatches: many classes, one meaning
        if not local.exists() and isinstance(e, OSError):
            raise _hub_error(name, revision, e) from e
        if isinstance(e, ImportError):  # e.g. SigLIP's SentencePiece tokenizer without the sentencepiece package
            raise ProtextError(f"backbone '{name}': its tokenizer needs a package that is not installed "
                               f"({_first_line(e)}); install it, e.g. pip install sentencepiece") from e
        raise ProtextError(
            f"backbone '{name}': could not read its tokenizer or weights ({e.__class__.__name__}: {_first_line(e)}); "
            f"the files may be truncated or damaged: download them again"
        ) from e
    commit = revision or getattr(config, "_commit_hash", None)
    backbone = from_model(model, tokenizer, name=name if not local.exists() else str(local.resolve()), revision=commit, folder=local if local.exists() else None)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return backbone.to(dev).at_precision(precision)


def from_model(model: nn.Module, tokenizer, name: str, revision: str | None = None, folder: Path | None = None) -> Backbone:
    """Wrap an already loaded `transformers` model (CLIPModel, SiglipModel, Siglip2Model or a BERT-style model)."""
    model.eval().requires_grad_(False)
    model_type = model.config.model_type
    if model_type == "clip":
        text = ClipText(tokenizer, model.text_model, model.text_projection)
        mean, std = _preprocessor_stats(folder, CLIP_MEAN, CLIP_STD)
        image = ImageTower(model.vision_model, model.visual_projection, model.config.vision_config.image_size, mean, std)
        return Backbone(name, revision, text, image, float(model.logit_scale.exp()))
    if model_type in ("siglip", "siglip2"):
        return _siglip(model, tokenizer, name, revision, folder)
    return Backbone(name, revision, BertText(tokenizer, model))


def _siglip(model: nn.Module, tokenizer, name: str, revision: str | None, folder: Path | None) -> Backbone:
    """SigLIP or SigLIP 2. The tokenizer tells the text rules apart: SigLIP's SentencePiece one pads
    with EOS, SigLIP 2's Gemma one (in its fixed-resolution checkpoints too, whose model_type is
    'siglip') has a pad token of its own. NaFlex checkpoints (model_type 'siglip2') take patches."""
    gemma = model.config.model_type == "siglip2" or tokenizer.pad_token_id != tokenizer.eos_token_id
    text = (Siglip2Text if gemma else SiglipText)(tokenizer, model.text_model)
    vision = model.config.vision_config
    mean, std = _preprocessor_stats(folder, SIGLIP_MEAN, SIGLIP_STD)
    if model.config.model_type == "siglip2":
        size: Size = NaFlex(vision.patch_size, _preprocessor_config(folder).get("max_num_patches", vision.num_patches))
    else:
        size = (vision.image_size, vision.image_size)
    image = ImageTower(model.vision_model, nn.Identity(), size, mean, std)
    return Backbone(name, revision, text, image, float(model.logit_scale.exp()), float(model.logit_bias))


def _preprocessor_config(folder: Path | None) -> dict:
    """The folder's preprocessor_config.json, or {} (Hub models and folders without one)."""
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text())
    return {}


def _preprocessor_stats(folder: Path | None, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    """The checkpoint's image mean and std, else the family's (`mean`, `std`)."""
    cfg = _preprocessor_config(folder)
    if "image_mean" in cfg and "image_std" in cfg:
        return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return mean, std
