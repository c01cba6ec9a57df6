"""Load a frozen backbone: a CLIP (text and image towers) or a BERT-style text encoder.

`load_backbone(name)` takes a Hugging Face Hub id or a local folder saved by
`transformers`. CLIP checkpoints (model_type "clip") give both towers; BERT-style
sentence encoders (model_type "bert", e.g. sentence-transformers/all-MiniLM-L6-v2) give the
text tower only, which is enough to learn and check prompts without images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ProtextError
from .text_encoder import BertText, ClipText, TextTower

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"

# CLIP's image normalisation, used when a checkpoint ships no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageTower:
    """The frozen CLIP image encoder and the preprocessing facts that go with it."""

    model: nn.Module
    projection: nn.Linear
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A short hash of everything that decides the image features: the vision weights, the
        projection and the preprocessing. Image-feature caches are keyed by it, so a fine-tuned
        vision tower saved under the same name (the text tower unchanged) gets new features.
        Every tensor's name and shape count, and up to 4096 values spread evenly over it: a
        change anywhere in a layer shows, and a ViT-L hashes in well under a second."""
        if self._fingerprint is None:
            per_tensor = 4096
            h = hashlib.sha256(repr((self.image_size, tuple(self.mean), tuple(self.std))).encode())
            for prefix, module in (("model", self.model), ("projection", self.projection)):
                for name, tensor in module.state_dict().items():
                    flat = tensor.detach().flatten()
                    h.update(f"{prefix}.{name}{tuple(tensor.shape)}".encode())
                    h.update(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


@dataclass
class Backbone:
    """A named, frozen backbone. `revision` is the Hub commit when known."""

    name: str
    revision: str | None
    text: TextTower
    image: ImageTower | None = None
    logit_scale: float = 100.0
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device: torch.device | str) -> "Backbone":
        self.text.to(device)
        if self.image is not None:
            self.image.model.to(device)
            self.image.projection.to(device)
        return self

    def fingerprint(self) -> str:
        """A short hash of the text tower's weights: the same weights under another name match."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            emb = self.text.token_embedding.weight.detach().float().cpu()
            h.update(str(tuple(emb.shape)).encode())
            h.update(emb.flatten()[:65536].numpy().tobytes())
            last = list(self.text.blocks[-1].parameters())[0].detach().float().cpu()
            h.update(last.flatten()[:65536].numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


SUPPORTED = "protext supports CLIP ('clip') and BERT-style text encoders ('bert')"


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


def load_backbone(name: str = DEFAULT_BACKBONE, revision: str | None = None, device: str | None = None) -> Backbone:
    """Load `name` (Hub id or local folder) as a frozen backbone on `device` (default: CUDA if present)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel

    local = Path(name).expanduser()
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
    if config.model_type not in ("clip", "bert"):
        raise ProtextError(f"backbone '{name}' has model_type '{config.model_type}'. {SUPPORTED}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model_class = CLIPModel if config.model_type == "clip" else AutoModel
        model = model_class.from_pretrained(source, revision=revision, attn_implementation="sdpa")
    except Exception as e:  # safetensors, OSError, size mismatches: many classes, one meaning
        if not local.exists() and isinstance(e, OSError):
            raise _hub_error(name, revision, e) from e
        raise ProtextError(
            f"backbone '{name}': could not read its tokenizer or weights ({e.__class__.__name__}: {_first_line(e)}); "
            f"the files may be truncated or damaged: download them again"
        ) from e
    commit = revision or getattr(config, "_commit_hash", None)
    backbone = from_model(model, tokenizer, name=name if not local.exists() else str(local.resolve()), revision=commit, folder=local if local.exists() else None)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return backbone.to(dev)


def from_model(model: nn.Module, tokenizer, name: str, revision: str | None = None, folder: Path | None = None) -> Backbone:
    """Wrap an already loaded `transformers` model (CLIPModel or a BERT-style model)."""
    model.eval().requires_grad_(False)
    if hasattr(model, "text_model"):
        text = ClipText(tokenizer, model.text_model, model.text_projection)
        mean, std = _preprocessor_stats(folder)
        image = ImageTower(model.vision_model, model.visual_projection, model.config.vision_config.image_size, mean, std)
        return Backbone(name, revision, text, image, float(model.logit_scale.exp()))
    return Backbone(name, revision, BertText(tokenizer, model))


def _preprocessor_stats(folder: Path | None) -> tuple[tuple, tuple]:
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return CLIP_MEAN, CLIP_STD
