"""Text-only ProText training: map "a photo of a {class}." onto each LLM description.

What makes it fast, each exact (tests compare against a plain re-implementation):
- targets (descriptions through the frozen, unprompted encoder) never change, so they are
  encoded once and cached on disk, keyed by backbone, revision and text;
- a batch of 256 pairs holds far fewer distinct classes; each is encoded once;
- sequences are cut to the longest in the batch instead of CLIP's 77 tokens (not for SigLIP,
  whose bidirectional attention over padding makes the cut change its features).

What makes it safe: a checkpoint (prompts, optimiser state, epochs done) is written
atomically after every epoch and each epoch's shuffle depends only on (seed, epoch), so a
resumed run ends with the same prompts as one never stopped.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..cache import atomic_save_tensors, load_tensors, sha1
from ..descriptions import pairs, read_json, read_text
from ..errors import ProtextError
from ..context import Context
from ..feature_cache import encode_texts
from ..flags import option
from ..model import (DEFAULT_TEMPLATE, INFERENCE, INIT_PHRASE, INITS, TEMPLATE_SETS, ProText, PromptShape,
                     check_inference, is_complete, upgrade_init)
from ..templates import check_template, ensemble_templates

CHECKPOINT = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"
DEEP_INITS = ("random", "frozen")


# The paper's training settings, by name; any value can be overridden by a flag or a config file.
# All share: batch 256 pairs, AdamW (weight decay 0.1, betas 0.9/0.98), cosine schedule, 5 warm-up
# epochs at a constant 1e-5, MSE x 1000, depth 9.
PRESETS: dict[str, dict] = {
    # Train once on ImageNet descriptions, test on other datasets.
    "cross-dataset": dict(n_ctx=4, depth=9, lr=0.03, epochs=10, init="words", init_words=INIT_PHRASE),
    # Domain generalisation and text-only supervised ImageNet: 16 random context vectors.
    "imagenet-200ep": dict(n_ctx=16, depth=9, lr=0.0025, epochs=200, init="random"),
    # Per dataset, base classes only (the official configs range 30-200 epochs; 30 here).
    "base2novel": dict(n_ctx=4, depth=9, lr=0.03, epochs=30, init="words", init_words=INIT_PHRASE),
    # Per dataset, all classes, evaluated on the same label set.
    "text-only": dict(n_ctx=4, depth=9, lr=0.03, epochs=30, init="words", init_words=INIT_PHRASE),
}


@dataclass
class TrainConfig(PromptShape):
    """Every setting of a run; each field's `help` is its documentation and its --flag's help.
    Defaults are the cross-dataset preset. The prompt shape comes from `PromptShape`."""

    lr: float = option(0.03, "peak learning rate")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(256, "(class, description) pairs per batch")
    weight_decay: float = option(0.1, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    warmup_epochs: int = option(5, "epochs at the constant warm-up learning rate")
    warmup_lr: float = option(1e-5, "warm-up learning rate")
    loss: str = option("mse", "mse or l1", choices=("mse", "l1"))
    loss_scale: float = option(1000.0, "loss multiplier")
    seed: int = option(1, "random seed (initialisation and shuffling)")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (any device)",
                              choices=("auto", "fp32", "bf16", "fp16"))
    batching: str = option("paper", "paper: each batch a random draw of pairs, as the paper; grouped: each batch "
                                      "drawn from about classes_per_batch classes, so a step encodes far fewer "
                                      "distinct inputs (every pair is still seen once per epoch)",
                              choices=("paper", "grouped"))
    classes_per_batch: int = option(8, "grouped batching: classes whose pairs fill a batch together")
    anchor: float = option(0.0, "weight of a second loss keeping each class's prompted feature near the frozen "
                                "feature of its plain template, 'a photo of a {class}.' (as KgCoOp); 0: the paper's "
                                "loss alone")
    contrast: float = option(0.0, "weight of a contrastive term: each description in a batch is classified among the "
                                  "batch's classes by cosine similarity to their prompted features (cross-entropy, as "
                                  "a CLIP classifier scores an image); 0: the paper's loss alone")
    contrast_temperature: float = option(0.05, "temperature of the contrastive term (CLIP's own is 0.01)")
    train_templates: str = option("one", "training input: 'one' (the template, as the paper) or 'ensemble' (each "
                                         "class of a batch through one template drawn from it and CLIP's 7 ensemble "
                                         "templates, with the learned context, at the paper's cost per step: the "
                                         "context then fits every template --templates ensemble averages)",
                                  choices=TEMPLATE_SETS)
    deep_init: str = option("random", "start of the deep prompts (layers 1 to depth-1): 'random' (std 0.02, as the "
                                      "paper) or 'frozen' (the frozen encoder's hidden states at the context "
                                      "positions, averaged over the training classes, so training starts from the "
                                      "plain template's features: exactly so for CLIP's causal tower)",
                            choices=DEEP_INITS)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.init not in INITS:
            raise ProtextError(f"init must be 'words' or 'random', got {self.init!r}; the words themselves go in "
                               f"init_words (--init-words)")
        if self.init == "words" and not self.init_words.strip():
            raise ProtextError("init_words (--init-words) must be the words to initialise the context from, got ''")
        for name in ("loss", "batching", "precision", "train_templates", "deep_init"):
            choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ProtextError(f"{_named(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "n_ctx", "depth", "classes_per_batch"):
            if getattr(self, name) < 1:
                raise ProtextError(f"{_named(name)} must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ProtextError(f"{_named('warmup_epochs')} must be 0 or more, got {self.warmup_epochs}")
        for name in ("lr", "warmup_lr"):
            if getattr(self, name) <= 0:
                raise ProtextError(f"{_named(name)} must be above 0, got {getattr(self, name)}")
        for name in ("anchor", "contrast"):
            if getattr(self, name) < 0:
                raise ProtextError(f"{_named(name)} must be 0 or more, got {getattr(self, name)}")
        if self.contrast_temperature <= 0:
            raise ProtextError(f"{_named('contrast_temperature')} must be above 0, got {self.contrast_temperature}")
        check_template(self.template)
        check_inference(self.templates, self.blend)
        if self.contrast > 0 and self.train_templates != "one":
            raise ProtextError("contrast (--contrast) counts each input of a batch as a class of its own, so it needs "
                               "train_templates (--train-templates) 'one'")


def _named(name: str) -> str:
    """A setting as the messages name it: its name, and its flag."""
    return f"{name} (--{name.replace('_', '-')})"


# What each setting accepts; a float setting takes an int too ("lr = 1" in a config file).
_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "str": (str,)}


def check_setting(name: str, value: Any, where: str = "") -> Any:
    """`value` if it has the setting's type (and is finite), else an error naming the setting."""
    kind = TrainConfig.__dataclass_fields__[name].type
    allowed = _KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, allowed):
        expected = {"int": "a whole number", "float": "a number", "str": "a string"}[kind]
        raise ProtextError(f"{where}setting '{name}' must be {expected}, got {value!r} ({type(value).__name__}; "
                           f"flag --{name.replace('_', '-')})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtextError(f"{where}setting '{name}' must be a finite number, got {value!r} (flag "
                           f"--{name.replace('_', '-')})")
    return float(value) if kind == "float" else value


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """Settings given as KEY=VALUE (`--set lr=0.01 --set init=random`); values are JSON where they
    parse as JSON (numbers, true, null), else strings. Types are checked by `TrainConfig`."""
    out: dict[str, Any] = {}
    known = {f.name for f in fields(TrainConfig)}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ProtextError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def make_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Preset, then config file (JSON or TOML), then explicit overrides; unknown keys are errors."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ProtextError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    known = {f.name for f in fields(TrainConfig)}
    if config_file is not None:
        path = Path(config_file)
        if path.suffix == ".toml":
            import tomllib

            try:
                loaded = tomllib.loads(read_text(path, "config file"))
            except tomllib.TOMLDecodeError as e:
                raise ProtextError(f"{path}: not valid TOML ({e})") from e
        else:
            loaded = read_json(path, "config file")
        if not isinstance(loaded, dict):
            raise ProtextError(f"{path}: expected a table of settings")
        bad = sorted(set(loaded) - known)
        if bad:
            raise ProtextError(f"{path}: unknown keys {bad}; known: {sorted(known)}")
        values.update({k: check_setting(k, v, f"{path}: ") for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    bad = sorted(set(values) - known)
    if bad:
        raise ProtextError(f"unknown settings {bad}")
    return TrainConfig(**values)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Constant warm-up, then cosine from `lr` over `epochs` (per epoch, as the official code)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def loss_fn(cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(pred.device, pred.dtype)
    loss = F.mse_loss(pred, target) if cfg.loss == "mse" else F.l1_loss(pred, target)
    return loss * cfg.loss_scale


def epoch_order(classes: torch.Tensor, cfg: TrainConfig, epoch: int) -> torch.Tensor:
    """The order pairs are visited in this epoch, a function of (seed, epoch) only, so a resumed
    run repeats it. "paper": a uniform shuffle. "grouped": classes in a shuffled order, taken
    `classes_per_batch` at a time, their pairs shuffled within the group; consecutive batches
    then hold few classes, and every pair is still visited once."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    if cfg.batching == "paper":
        return torch.randperm(len(classes), generator=gen)
    shuffled = torch.randperm(int(classes.max()) + 1, generator=gen)
    rank = torch.empty_like(shuffled)
    rank[shuffled] = torch.arange(len(shuffled))
    group = (rank[classes] // cfg.classes_per_batch).double()
    return torch.argsort(group + torch.rand(len(classes), generator=gen, dtype=torch.double))


def training_templates(cfg: TrainConfig) -> list[str]:
    """The templates a class is trained through: the template, and with `train_templates` "ensemble"
    CLIP's 7 ensemble templates after it (the inference ensemble's own list and order)."""
    return ensemble_templates(cfg.template) if cfg.train_templates == "ensemble" else [cfg.template]


def epoch_inputs(order: torch.Tensor, classes: torch.Tensor, n_classes: int, n_templates: int, cfg: TrainConfig,
                 epoch: int) -> torch.Tensor:
    """Each pair's input this epoch, `template * n_classes + class`. With one template, the class itself
    (the paper). With several, each class of a batch goes through one template drawn for that batch
    (from seed, epoch and step alone, so a resumed run draws the same): a batch then encodes no more
    inputs than it has classes, and over the epochs a class meets every template."""
    if n_templates == 1:
        return classes
    steps = math.ceil(len(order) / cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 7_777_777)
    drawn = torch.randint(n_templates, (steps, n_classes), generator=gen)
    step = torch.empty_like(order)
    step[order] = torch.arange(len(order)) // cfg.batch_size  # the batch each pair falls in
    return classes + n_classes * drawn[step, classes]


def batch_loss(model: ProText, class_tokens: Sequence[Sequence[int]], classes: torch.Tensor,
               targets: torch.Tensor, cfg: TrainConfig, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of one batch: `classes` holds each pair's input, an index into `class_tokens` (the class,
    or with several templates `template * n_classes + class`, see `epoch_inputs`); each distinct input is
    encoded once, in groups of similar token length where cutting padding is exact
    (`TextTower.forward_lists`: CLIP and BERT, not SigLIP). With `anchors` (each input's frozen
    feature), `cfg.anchor` times their distance is added. With
    `cfg.contrast`, each target must also be nearer its own class than the batch's other classes:
    the regression alone never sees another class, and a classifier is judged by exactly that."""
    uniq, inverse = torch.unique(classes, return_inverse=True)
    feats = model.backbone.text.forward_lists([class_tokens[i] for i in uniq.tolist()], model.prompts)
    inverse = inverse.to(feats.device)
    loss = loss_fn(cfg, feats[inverse], targets)
    if anchors is not None and cfg.anchor > 0:
        loss = loss + cfg.anchor * loss_fn(cfg, feats, anchors[uniq.to(anchors.device)])
    if cfg.contrast > 0 and len(uniq) > 1:
        logits = targets.to(feats) @ feats.T / cfg.contrast_temperature
        loss = loss + cfg.contrast * F.cross_entropy(logits.float(), inverse)
    return loss


def anchor_texts(cfg: TrainConfig, classes: Sequence[str]) -> list[str]:
    """The plain text of each training input (template, class), what the anchor loss keeps the prompted
    features near; with init 'random' the paper's template stands in for the context's words."""
    templates = training_templates(cfg)
    if cfg.init != "words":
        templates[0] = DEFAULT_TEMPLATE
    return [t.format(c) for t in templates for c in classes]


def _autocast(cfg: TrainConfig, device: torch.device):
    """Autocast and, for fp16, a gradient scaler: the same code on CUDA and CPU.

    "auto" is bf16 (fp16 where bf16 is missing) on CUDA and fp32 elsewhere; "bf16" and
    "fp16" are honoured on any device. Prompts and checkpoints stay fp32 either way: autocast
    only lowers the precision of the matrix products inside the forward pass.
    """
    precision = cfg.precision
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


@torch.no_grad()
def frozen_context(model: ProText, class_tokens: Sequence[Sequence[int]], batch_size: int = 256) -> torch.Tensor:
    """(depth, n_ctx, width): what enters each layer of the frozen encoder at the context positions
    when only the first-layer prompts are in place, averaged over the texts (row 0 is the prompts'
    own first row).

    Why: a deep prompt replaces a hidden state, and the paper starts it at random with std 0.02 while
    the hidden states it replaces are far larger (norm about 11 in all-MiniLM-L6-v2, against 0.4), so
    training starts from features far from the plain template's (mean cosine 0.73 to 0.81 there) and
    spends its steps getting back. Starting at the hidden states themselves starts at the plain
    template (0.994 to 0.997 there). CLIP's mask is causal and the context comes before the class
    name, so there every text gives the same states and the start is the plain template exactly; a
    bidirectional tower (BERT, SigLIP) sees the class name, and the mean over the training classes is
    the nearest one start."""
    text = model.backbone.text
    start, n, depth = text.prompt_start, model.config.n_ctx, model.config.depth
    sums = torch.zeros(depth, n, text.width)
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        return lambda module, args: seen.__setitem__(layer, args[0][:, start:start + n].float().sum(0).cpu())
    hooks = [text.blocks[i].register_forward_pre_hook(keep(i)) for i in range(1, depth)]
    try:
        for k in range(0, len(class_tokens), batch_size):
            seen.clear()
            text(text.batch(class_tokens[k:k + batch_size]).to(text.device), model.prompts[:1])
            for i, states in seen.items():
                sums[i] += states
    finally:
        for hook in hooks:
            hook.remove()
    out = sums / max(len(class_tokens), 1)
    out[0] = model.prompts[0].detach().float().cpu()
    return out


def _data_hash(data: Mapping[str, Sequence[str]]) -> str:
    return sha1(json.dumps(data, sort_keys=False))


def train(backbone: Backbone, descriptions: Mapping[str, Sequence[str]], cfg: TrainConfig, out_dir: str | Path,
          ctx: Context = Context(), resume: bool = False,
          log_every: int = 20, on_epoch: Callable[[int, float], None] | None = None,
          source: str | None = None) -> tuple[ProText, dict]:
    """Train prompts on `descriptions` and save them in `out_dir`; returns the model and a summary."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ProtextError(f"{out}: --out must be a folder (it will hold the prompt files), but a file is there")
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ProtextError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, or choose another --out")
    if cfg.epochs <= cfg.warmup_epochs:
        warnings.warn(f"epochs ({cfg.epochs}) is not more than warmup_epochs ({cfg.warmup_epochs}): every epoch runs "
                      f"at the constant warm-up learning rate {cfg.warmup_lr:g}, so the prompts will barely move; "
                      f"lower --warmup-epochs or train longer", stacklevel=2)
    classes, texts, cls_idx, txt_idx = pairs(descriptions)
    data_hash = _data_hash(descriptions)
    t0 = time.time()
    # Settings are checked against the backbone before the long one-time encoding starts.
    model = ProText.create(backbone, seed=cfg.seed, **{f.name: getattr(cfg, f.name) for f in fields(PromptShape)})
    templates = training_templates(cfg)
    class_tokens = [ids for t in templates for ids in model.class_token_lists(classes, t)]  # input t*C + c
    if cfg.deep_init == "frozen":  # a resumed run's checkpoint then replaces them, as it does the random ones
        with torch.no_grad():
            model.prompts[1:] = frozen_context(model, class_tokens[: len(classes)])[1:].to(model.prompts.device)
    targets_all = encode_texts(backbone, texts, ctx)
    device = backbone.device
    targets = targets_all.to(device)[torch.tensor(txt_idx, device=device)]
    anchors = encode_texts(backbone, anchor_texts(cfg, classes), ctx).to(device) if cfg.anchor > 0 else None
    cls_t = torch.tensor(cls_idx, dtype=torch.long)
    opt = torch.optim.AdamW([model.prompts], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    autocast, scaler = _autocast(cfg, device)
    start_epoch, epoch_loss = 0, float("nan")
    if resume and ckpt_path.exists():
        start_epoch, epoch_loss = _load_checkpoint(ckpt_path, model, opt, scaler, cfg, data_hash)

    n_pairs = len(cls_idx)
    steps_per_epoch = math.ceil(n_pairs / cfg.batch_size)
    log_path = out / LOG_FILE
    out.mkdir(parents=True, exist_ok=True)
    bar = ctx.bar(steps_per_epoch * cfg.epochs, "training", "step", initial=steps_per_epoch * start_epoch)
    with bar, open(log_path, "a") as log:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            order = epoch_order(cls_t, cfg, epoch)
            inputs = epoch_inputs(order, cls_t, len(classes), len(templates), cfg, epoch)
            total, seen, t_epoch = 0.0, 0, time.time()
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                with autocast:
                    loss = batch_loss(model, class_tokens, inputs[idx], targets[idx.to(device)], cfg, anchors)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise _diverged(out, epoch, step, value, cfg)
                total += value * len(idx)
                seen += len(idx)
                rate = seen / max(time.time() - t_epoch, 1e-9)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", pairs_s=f"{rate:.0f}")
                if (step + 1) % log_every == 0:
                    log.write(json.dumps({"epoch": epoch + 1, "step": step + 1, "loss": value, "lr": lr,
                                          "pairs_per_s": rate}) + "\n")
                    log.flush()
            epoch_loss = total / max(seen, 1)
            if not torch.isfinite(model.prompts).all():
                raise _diverged(out, epoch, steps_per_epoch - 1, float("nan"), cfg)
            _save_checkpoint(ckpt_path, model, opt, scaler, cfg, epoch + 1, data_hash, epoch_loss)
            log.write(json.dumps({"epoch": epoch + 1, "epoch_loss": epoch_loss, "lr": lr,
                                  "seconds": time.time() - t_epoch}) + "\n")
            log.flush()
            if on_epoch:
                on_epoch(epoch + 1, epoch_loss)

    summary = {"classes": len(classes), "descriptions": n_pairs, "unique_descriptions": len(texts),
               "epochs": cfg.epochs, "resumed_from_epoch": start_epoch, "final_epoch_loss": epoch_loss,
               "seconds": round(time.time() - t0, 2), "trainable_parameters": model.prompts.numel(),
               "source": source, "out": str(out)}
    model.config.training = {**asdict(cfg), "data_sha1": data_hash, "source": source, "classes": len(classes),
                             "descriptions": n_pairs}
    model.save_pretrained(out)
    return model, summary


def load_or_train(backbone: Backbone, descriptions: Mapping[str, Sequence[str]] | Callable[[], Mapping],
                  cfg: TrainConfig, folder: str | Path, ctx: Context = Context(),
                  source: str | None = None) -> ProText:
    """The prompts in `folder` when a finished run is there, else train them there (resuming
    an interrupted run). Benchmarks and the image-free check use this, so a rerun reuses work.
    `descriptions` may be a function, called only when training is needed (a download, say)."""
    if is_complete(folder):  # trained with these settings, maybe used with other inference settings
        model = ProText.from_pretrained(folder, backbone=backbone)
        _check_same_training(folder, model.config.training, cfg)
        return model.used_with(**{k: getattr(cfg, k) for k in INFERENCE})
    data = descriptions() if callable(descriptions) else descriptions
    model, _ = train(backbone, data, cfg, folder, ctx, resume=True, source=source)
    return model


def _check_same_training(folder: str | Path, saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Refuse to reuse prompts trained with other settings (a setting the file predates counts as its
    default); inference settings may differ."""
    if not saved:  # a prompt file written without its training record: nothing to compare
        return
    diff = [f"{k}: there {a!r}, now {b!r}" for k, (a, b) in _training_differences(saved, cfg).items()]
    if diff:
        raise ProtextError(f"{folder} holds prompts trained with other settings ({'; '.join(diff)}); give another "
                           f"folder, or remove it to train again")


def _training_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Training settings recorded with a run that differ from `cfg`, as {name: (recorded, now)}. A setting
    the record predates counts as its default, words in `init` as today's init_words; the inference
    settings change no step, so they never differ."""
    saved = upgrade_init(dict(saved))
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {k: (saved.get(k, defaults[k]), v) for k, v in asdict(cfg).items()
            if k not in INFERENCE and saved.get(k, defaults[k]) != v}


def _diverged(out: Path, epoch: int, step: int, value: float, cfg: TrainConfig) -> ProtextError:
    kept = (f"the checkpoint of the last finished epoch is kept in {out / CHECKPOINT}"
            if (out / CHECKPOINT).exists() else "no epoch had finished, so nothing was saved")
    return ProtextError(f"training diverged: the loss became {value} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {cfg.lr}); {kept}. Lower --lr (the presets use 0.03 or less) and train again "
                        f"into a new --out")


def _save_checkpoint(path: Path, model: ProText, opt: torch.optim.Optimizer, scaler, cfg: TrainConfig,
                     epochs_done: int, data_hash: str, epoch_loss: float) -> None:
    """Prompts and the optimiser's whole state (its tensors as tensors, the rest as JSON), atomically."""
    opt_tensors, opt_meta = _split_state(opt.state_dict())
    meta = {"epochs_done": epochs_done, "epoch_loss": epoch_loss, "config": asdict(cfg), "data_sha1": data_hash,
            "optimizer": opt_meta, "scaler": scaler.state_dict() if scaler is not None else None,
            "backbone": model.config.backbone, "fingerprint": model.config.fingerprint}
    atomic_save_tensors(path, {"prompts": model.prompts.detach(), **opt_tensors},
                        {"protext_checkpoint": json.dumps(meta)})


def _split_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state_dict as safetensors tensors ("optimizer.<param>.<key>") plus JSON for the rest."""
    tensors, values = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                values[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _join_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `_split_state`."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = tensor
    for name, value in meta["values"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _load_checkpoint(path: Path, model: ProText, opt: torch.optim.Optimizer, scaler, cfg: TrainConfig,
                     data_hash: str) -> tuple[int, float]:
    """Restore prompts and optimiser state; returns (epochs done, last epoch's mean loss)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("protext_checkpoint", "null") or "null")
    if not meta or "prompts" not in tensors or "optimizer" not in meta:
        raise ProtextError(f"{path}: not a checkpoint this protext can resume; train again into a new --out")
    diff = _training_differences(meta["config"], cfg)
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ProtextError(f"{path}: cannot resume, settings differ ({shown})")
    if meta["data_sha1"] != data_hash:
        raise ProtextError(f"{path}: cannot resume, the descriptions differ from the ones this run started with")
    if not model.backbone.has_weights(meta["fingerprint"]):
        raise ProtextError(f"{path}: cannot resume, the checkpoint was made with backbone '{meta['backbone']}' (other weights)")
    with torch.no_grad():
        model.prompts.copy_(tensors["prompts"].to(model.prompts.device))
    opt.load_state_dict(_join_state(tensors, meta["optimizer"]))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(meta["epochs_done"]), float(meta["epoch_loss"])
