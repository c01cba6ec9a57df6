"""ProText: deep text prompts on a frozen backbone, saved as a few tensors plus a config.

The trained state is one tensor, `prompts`, of shape (depth, n_ctx, width): row 0 replaces
the token embeddings of "a photo of a" (or of the "X X … X" placeholder), rows 1..depth-1
replace the hidden states at the same positions before the matching transformer block.
Those positions are wherever the tower's tokenizer puts the placeholder words
(`TextTower.prompt_start`: after CLIP's start token, first for SigLIP).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .backbone import Backbone, load_backbone
from .cache import atomic_save_tensors, atomic_write_json, file_sha256, load_tensors, remove_stale_temporaries
from .errors import ProtextError
from .flags import option
from .templates import check_template
from .text_encoder import Tokens

PROMPTS_FILE = "prompts.safetensors"
CONFIG_FILE = "protext_config.json"
INIT_PHRASE = "a photo of a"
DEFAULT_TEMPLATE = "a photo of a {}."
INITS = ("words", "random")
TEMPLATE_SETS = ("one", "ensemble")
INFERENCE = ("templates", "blend")  # fields of PromptShape used at inference only: training ignores them
FORMAT_VERSION = 2  # of protext_config.json; readers ignore keys they do not know (1: init held the words)


@dataclass
class PromptShape:
    """The shape of a prompt set and how it is used at inference, declared once: part of `PromptConfig`
    (what a prompt file is) and of `TrainConfig` (where each field is a flag of `protext train`).
    The `INFERENCE` fields change no training step, so a finished run can be used with others."""

    n_ctx: int = option(4, "number of context vectors (they take the place of 'a photo of a')")
    depth: int = option(9, "number of layers that get prompts (1 = input only)")
    init: str = option("words", "how the context starts: 'words' (the embeddings of init_words) or 'random' (normal, "
                                "std 0.02, with the placeholder 'X X ... X' in the template)", choices=INITS)
    init_words: str = option(INIT_PHRASE, "with init 'words': the words the context starts from (exactly n_ctx "
                                          "tokens)")
    template: str = option(DEFAULT_TEMPLATE, "training and inference template; '{}' is the class name")
    templates: str = option("one", "inference: 'one' (the inference template alone, as the paper) or 'ensemble' (it "
                                   "and CLIP's 7 ensemble templates, each with the learned context; the class "
                                   "embedding is their renormalised mean)", choices=TEMPLATE_SETS)
    blend: float = option(0.0, "inference: share of the frozen encoder's class embedding over the same templates "
                               "in the class embedding (0: the learned prompts alone, as the paper; 0.5: the mean "
                               "of both)")

    @property
    def placeholder(self) -> str:
        """The words whose positions the context vectors take."""
        return " ".join(["X"] * self.n_ctx) if self.init == "random" else self.init_words


def upgrade_init(values: dict) -> dict:
    """Settings written when `init` held the words themselves (or "random", or null) in today's words."""
    init = values.get("init")
    if init is None and "init" in values:
        return {**values, "init": "random"}
    if isinstance(init, str) and init not in INITS:
        return {**values, "init": "words", "init_words": init}
    return values


@dataclass
class PromptConfig(PromptShape):
    """What a prompt file needs to be used again: the backbone and the prompt shape."""

    backbone: str = ""
    revision: str | None = None
    width: int = 0
    fingerprint: str = ""
    tower: str = ""  # the kind of text tower: clip, bert, siglip, siglip2 ("" in older files: not checked)
    training: dict[str, Any] = field(default_factory=dict)
    prompts_sha256: str = ""  # digest of the prompts file this config was written with
    format_version: int = FORMAT_VERSION


def check_inference(templates: str, blend: float) -> None:
    """Refuse inference settings (`PromptShape.templates`, `.blend`) outside their range."""
    if templates not in TEMPLATE_SETS:
        raise ProtextError(f"templates (--templates) must be one of {', '.join(TEMPLATE_SETS)}, got {templates!r}")
    if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0 <= blend <= 1:
        raise ProtextError(f"blend (--blend) must be a number from 0 to 1, got {blend!r}")


def prompted_text(template: str, name: str, placeholder: str) -> str:
    """`template` with its leading "a photo of a" (if any) replaced by the placeholder words."""
    check_template(template)
    rest = template[len(INIT_PHRASE):].lstrip() if template.lower().startswith(INIT_PHRASE) else template
    return f"{placeholder} {rest.format(name)}"


class ProText(nn.Module):
    """A frozen backbone plus trainable deep text prompts."""

    def __init__(self, backbone: Backbone, config: PromptConfig, prompts: torch.Tensor | None = None):
        super().__init__()
        text = backbone.text
        if config.init not in INITS:
            raise ProtextError(f"init must be one of {', '.join(INITS)}, got {config.init!r} (the words go in init_words)")
        if not 1 <= config.depth <= text.num_layers:
            raise ProtextError(f"depth must be between 1 and {text.num_layers} for '{backbone.name}', got {config.depth}")
        if config.n_ctx < 1:
            raise ProtextError(f"n_ctx must be at least 1, got {config.n_ctx}")
        fixed = text.count_words(prompted_text(config.template, "", config.placeholder)) + text.num_special_tokens
        if fixed > text.max_length:
            raise ProtextError(
                f"n_ctx {config.n_ctx} with template {config.template!r} takes {fixed} tokens, more than the "
                f"{text.max_length}-token context of '{backbone.name}'; use a smaller n_ctx"
            )
        got = text.count_words(config.placeholder)
        if got != config.n_ctx:
            raise ProtextError(
                f"the context words {config.placeholder!r} are {got} tokens for this tokenizer, but n_ctx is "
                f"{config.n_ctx}; use n_ctx={got}, or init='random'"
            )
        self.backbone = backbone
        self.config = config
        config.width = text.width
        config.fingerprint = backbone.fingerprint()
        config.tower = text.kind
        if prompts is None:
            prompts = self._initial_prompts()
        expected = (config.depth, config.n_ctx, text.width)
        if tuple(prompts.shape) != expected:
            raise ProtextError(f"prompt tensor has shape {tuple(prompts.shape)}, expected {expected} from the config")
        self.prompts = nn.Parameter(prompts.float().to(backbone.device))

    @classmethod
    def create(cls, backbone: Backbone, seed: int = 0, **shape) -> "ProText":
        """New prompts on `backbone`; `shape` holds `PromptShape` fields (n_ctx=4, depth=9, ...)."""
        torch.manual_seed(seed)
        return cls(backbone, PromptConfig(backbone=backbone.name, revision=backbone.revision, **shape))

    def _initial_prompts(self) -> torch.Tensor:
        cfg, text = self.config, self.backbone.text
        prompts = torch.randn(cfg.depth, cfg.n_ctx, text.width) * 0.02
        if cfg.init == "words":
            start = text.prompt_start
            ids = text.tokenize([cfg.init_words]).ids[0, start : start + cfg.n_ctx].to(text.device)
            prompts[0] = text.token_embedding(ids).detach().float().cpu()
        return prompts

    # -- encoding ----------------------------------------------------------------------
    def class_token_lists(self, names: Sequence[str], template: str | None = None) -> list[list[int]]:
        """Token ids of the prompted text for each class name (context positions hold placeholders).

        The context vectors replace the tokens at `prompt_start`..+n_ctx, so those must be the
        placeholder's own tokens in every text: a tokenizer that merged them with the class name
        would silently have the prompts replace other words."""
        template = template or self.config.template
        text, placeholder = self.backbone.text, self.config.placeholder
        texts = [prompted_text(template, n, placeholder) for n in names]
        lists = text.token_lists(texts)
        start, stop = text.prompt_start, text.prompt_start + self.config.n_ctx
        words = text.token_lists([placeholder])[0][start:stop]
        for prompt, ids in zip(texts, lists):
            if ids[start:stop] != words:
                raise ProtextError(f"the tokenizer of '{self.backbone.name}' joins the context words {placeholder!r} "
                                   f"to what follows them in {prompt!r}; use init='random' or another template")
        return lists

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.backbone.text(tokens.to(self.backbone.device), self.prompts)

    @torch.no_grad()
    def encode_classes(self, names: Sequence[str], template: str | None = None, batch_size: int = 256,
                       show_progress: bool | None = None) -> torch.Tensor:
        """Normalised prompted features of "template.format(name)" for each name, on the CPU.

        Batched by token length (see `TextTower.encode_lists`); a progress bar shows for large
        label sets (over 5,000 names, unless `show_progress` says otherwise)."""
        from tqdm.auto import tqdm

        lists = self.class_token_lists(names, template)
        show = len(lists) > 5000 if show_progress is None else show_progress
        with tqdm(total=len(lists), desc="protext head", unit="class", disable=not show) as bar:
            return self.backbone.text.encode_lists(lists, self.prompts, batch_size, progress=bar.update)

    def used_with(self, **inference: Any) -> "ProText":
        """These prompts (the same tensor) with other inference settings, the `INFERENCE` fields:
        what lets one trained run be scored with and without an ensemble."""
        unknown = sorted(set(inference) - set(INFERENCE))
        if unknown:
            raise ProtextError(f"not inference settings: {', '.join(unknown)} (they are {', '.join(INFERENCE)})")
        check_inference(inference.get("templates", self.config.templates), inference.get("blend", self.config.blend))
        other = copy.copy(self)
        other.config = replace(self.config, **inference)
        return other

    # -- files -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `prompts.safetensors`, then `protext_config.json` naming its digest.

        Each file is written atomically and the config last, so a folder whose config is
        missing, or names other prompt bytes, was interrupted mid-save (see `is_complete`).
        """
        folder = Path(folder)
        atomic_save_tensors(folder / PROMPTS_FILE, {"prompts": self.prompts.detach().float()},
                            {"format": "protext", "backbone": self.config.backbone})
        self.config.prompts_sha256 = file_sha256(folder / PROMPTS_FILE)
        atomic_write_json(folder / CONFIG_FILE, asdict(self.config))
        remove_stale_temporaries(folder, (PROMPTS_FILE, CONFIG_FILE))
        return folder

    @classmethod
    def from_pretrained(cls, source: str | Path, backbone: Backbone | None = None, device: str | None = None,
                        revision: str | None = None, progress: bool = True) -> "ProText":
        """Load prompts from a folder or a Hub repo id; load their backbone unless one is given."""
        folder = _prompt_folder(source, revision)
        config = read_config(folder / CONFIG_FILE)
        if not is_complete(folder):
            raise ProtextError(f"{folder}: {PROMPTS_FILE} is not the file {CONFIG_FILE} was written for; the save "
                               f"was interrupted; train again (a training run continues with --resume)")
        tensors = load_tensors(folder / PROMPTS_FILE)
        if "prompts" not in tensors:
            raise ProtextError(f"{folder / PROMPTS_FILE}: no tensor named 'prompts' (found {sorted(tensors)})")
        if backbone is None:
            backbone = _trained_backbone(config, folder, device, progress)
        check_backbone(config, backbone, folder)
        return cls(backbone, config, tensors["prompts"])

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the prompt file and config to a Hub model repo; returns its URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="Upload protext prompts")
        return f"https://huggingface.co/{repo_id}"


def read_config(path: Path) -> PromptConfig:
    """Read a prompt config; keys a newer protext added are ignored with a warning."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError as e:
        raise ProtextError(f"{path}: missing; a prompt folder holds {CONFIG_FILE} and {PROMPTS_FILE}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtextError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(raw, dict):
        raise ProtextError(f"{path}: expected a JSON object")
    for key in ("backbone", "n_ctx", "depth"):
        if key not in raw:
            raise ProtextError(f"{path}: missing key '{key}'")
    known = set(PromptConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown or raw.get("format_version", 1) > FORMAT_VERSION:
        warnings.warn(f"{path}: written by a newer protext (format {raw.get('format_version', 1)}, this one reads "
                      f"{FORMAT_VERSION}); ignoring keys {unknown}", stacklevel=2)
    for key, kind in (("n_ctx", int), ("depth", int), ("backbone", str)):
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ProtextError(f"{path}: '{key}' should be {kind.__name__}, got {raw[key]!r}")
    raw = {**upgrade_init(raw), "format_version": FORMAT_VERSION}  # read in this version's words
    if raw.get("init", "words") not in INITS:
        raise ProtextError(f"{path}: 'init' should be one of {', '.join(INITS)}, got {raw['init']!r}")
    try:
        check_inference(raw.get("templates", "one"), raw.get("blend", 0.0))
    except ProtextError as e:
        raise ProtextError(f"{path}: {e}") from None
    return PromptConfig(**{k: v for k, v in raw.items() if k in known})


def is_complete(folder: str | Path) -> bool:
    """Both files are there and the config was written for these prompt bytes."""
    folder = Path(folder)
    if not (folder / PROMPTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        return False
    try:
        digest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("prompts_sha256", "")
    except (ValueError, AttributeError):
        return False
    return not digest or digest == file_sha256(folder / PROMPTS_FILE)  # no digest: written before it was recorded


def _trained_backbone(config: PromptConfig, folder: Path, device: str | None, progress: bool = True) -> Backbone:
    """The backbone the prompts name: a Hub id (at its revision) or an absolute folder."""
    if Path(config.backbone).is_absolute() and not Path(config.backbone).is_dir():
        raise ProtextError(
            f"{folder}: the prompts were trained on the backbone folder {config.backbone}, which is not on this "
            f"machine; pass the folder (or Hub id) of the same weights as --backbone (backbone= in Python): it is "
            f"checked against the weights' fingerprint {config.fingerprint}"
        )
    return load_backbone(config.backbone, config.revision, device, progress)


def check_backbone(config: PromptConfig, backbone: Backbone, where: Path | str) -> None:
    """Refuse prompts trained on other weights: the same shape is not enough to be meaningful."""
    if config.tower and config.tower != backbone.text.kind:
        raise ProtextError(
            f"{where}: prompts were trained on the {config.tower} text tower of '{config.backbone}', but backbone "
            f"'{backbone.name}' has a {backbone.text.kind} text tower; load them with the backbone they were trained on"
        )
    if config.width and config.width != backbone.text.width:
        raise ProtextError(
            f"{where}: prompts were trained on '{config.backbone}' (width {config.width}), "
            f"but backbone '{backbone.name}' has width {backbone.text.width}"
        )
    if config.fingerprint and not backbone.has_weights(config.fingerprint):
        raise ProtextError(
            f"{where}: prompts were trained on '{config.backbone}' (revision {config.revision}), "
            f"whose weights differ from backbone '{backbone.name}' (fingerprint {backbone.fingerprint()} != "
            f"{config.fingerprint}); load them with the backbone they were trained on"
        )


def _prompt_folder(source: str | Path, revision: str | None) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise ProtextError(f"{source}: no such prompt folder (nor a Hub repo id of the form 'user/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=[PROMPTS_FILE, CONFIG_FILE]))
    except Exception as e:  # network and Hub errors come in many classes
        raise ProtextError(
            f"could not download prompts '{source}' from the Hugging Face Hub ({e.__class__.__name__}). "
            f"Offline? Copy the folder holding {PROMPTS_FILE} and {CONFIG_FILE} here and pass its path."
        ) from e
