"""The `protext` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .errors import ProtextError
from .presets import PRESETS

TRAIN_HELP = {
    "n_ctx": "number of context vectors (replacing 'a photo of a')",
    "depth": "number of layers that get prompts (1 = input only)",
    "init": "words to initialise the context from ('none': random with an 'X X ... X' template)",
    "template": "training input template, '{}' is the class name",
    "lr": "peak learning rate",
    "epochs": "training epochs",
    "batch_size": "pairs per batch",
    "weight_decay": "AdamW weight decay",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "warmup_epochs": "epochs at the constant warm-up learning rate",
    "warmup_lr": "warm-up learning rate",
    "loss": "mse or l1",
    "loss_scale": "loss multiplier",
    "seed": "random seed (init and shuffling)",
    "precision": "auto, fp32, fp16 or bf16 (half precision on CUDA only)",
}


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    from .backbone import DEFAULT_BACKBONE

    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="Hub id or local folder of a CLIP or BERT-style model (default: %(default)s)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the backbone")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache for downloads and features (default: $PROTEXT_CACHE or ~/.cache/protext)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="learn prompts from class descriptions",
                       description="Learn ProText prompts from LLM class descriptions (no images).")
    p.add_argument("--descriptions", default="cupl:imagenet",
                   help="description JSON file, or a public set name such as cupl:imagenet (default: %(default)s)")
    p.add_argument("--classes", default=None, help="train on these classes only: a file (one per line) or a,b,c")
    p.add_argument("--preset", default="cross-dataset", choices=sorted(PRESETS), help="the paper's settings (default: %(default)s)")
    p.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings, applied over the preset")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: prompts/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the prompts to this Hub repo")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_backbone_args(p)
    _add_settings_args(p)
    p.set_defaults(run=_run_train)


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    group = p.add_argument_group("training settings (override the preset and --config)")
    for f in fields(TrainConfig):
        kind = str if f.name in ("init", "template", "loss", "precision") else type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, help=TRAIN_HELP[f.name])


def _settings(args: argparse.Namespace, preset: str):
    from .train import TrainConfig, make_config

    return make_config(preset, args.config, {f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _run_train(args: argparse.Namespace) -> None:
    from .backbone import load_backbone
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve
    from .train import train

    cfg = _settings(args, args.preset)
    path = resolve(args.descriptions, args.cache_dir)
    classes = read_class_list(args.classes) if args.classes else None
    data = load_descriptions(path, classes)
    out = args.out or Path("prompts") / args.preset
    print(f"protext train: {len(data)} classes, {sum(map(len, data.values()))} descriptions from {path}", file=sys.stderr)
    print(f"loading backbone {args.backbone} ...", file=sys.stderr)
    backbone = load_backbone(args.backbone, args.revision, args.device)
    model, summary = train(backbone, data, cfg, out, cache_dir=args.cache_dir, resume=args.resume,
                           show_progress=not args.no_progress, source=args.descriptions)
    if args.push_to_hub:
        summary["hub_url"] = model.push_to_hub(args.push_to_hub)
    print(json.dumps(summary, indent=2))
    print(f"saved {summary['trainable_parameters']} prompt values to {out}/ "
          f"(load with ProText.from_pretrained('{out}'))", file=sys.stderr)


def _eval_text_parser(sub) -> None:
    p = sub.add_parser("eval-text", help="check prompts without images, on held-out masked descriptions",
                       description="Image-free check: classify held-out descriptions whose class name is masked, "
                                   "with the template head, ProText prompts and the description ensemble.")
    p.add_argument("--descriptions", nargs="+", required=True, help="description files or set names to test on")
    p.add_argument("--protocol", choices=["base2novel", "cross-dataset", "both"], default="both")
    p.add_argument("--source", default="cupl:imagenet", help="cross-dataset: the set prompts are trained on (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=0.2, help="base2novel: share of each base class's descriptions held out (default: %(default)s)")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the hold-out split (default: %(default)s)")
    p.add_argument("--mask-word", default="thing", help="word that replaces the class name (default: %(default)s)")
    p.add_argument("--eval-template", default="a photo of a {}.", help="template of the template and ProText heads")
    p.add_argument("--config", type=Path, default=None, help="JSON or TOML settings over the presets")
    p.add_argument("--out", type=Path, default=Path("eval-text"), help="folder for eval_text.json and eval_text.md")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    _add_settings_args(p)
    p.set_defaults(run=_run_eval_text)


def _run_eval_text(args: argparse.Namespace) -> None:
    from .backbone import load_backbone
    from .cache import atomic_write_bytes, atomic_write_json
    from .descriptions import load_descriptions
    from .sources import resolve
    from .text_eval import TextEvaluator, markdown_base_to_novel, markdown_cross

    if not 0 < args.holdout < 1:
        raise ProtextError(f"--holdout must be between 0 and 1, got {args.holdout}")
    sets = {}
    for spec in args.descriptions:
        path = resolve(spec, args.cache_dir)
        sets[path.stem] = load_descriptions(path)
    backbone = load_backbone(args.backbone, args.revision, args.device)
    report: dict = {"backbone": backbone.name, "holdout": args.holdout, "seed": args.eval_seed, "mask_word": args.mask_word}
    md = []
    work = args.out / "runs"
    if args.protocol in ("base2novel", "both"):
        ev = TextEvaluator(backbone, _settings(args, "base2novel"), args.cache_dir, args.eval_template, args.mask_word,
                           not args.no_progress, work)
        report["base2novel"] = {name: ev.base_to_novel(data, args.holdout, args.eval_seed) for name, data in sets.items()}
        md += ["## Base-to-novel (top-1 %, masked held-out descriptions)", "", markdown_base_to_novel(report["base2novel"]), ""]
    if args.protocol in ("cross-dataset", "both"):
        source = resolve(args.source, args.cache_dir)
        ev = TextEvaluator(backbone, _settings(args, "cross-dataset"), args.cache_dir, args.eval_template, args.mask_word,
                           not args.no_progress, work)
        targets = {n: d for n, d in sets.items() if n != source.stem}
        report["cross_dataset"] = ev.cross_dataset(load_descriptions(source), targets)
        md += [f"## Cross-dataset (prompts trained on {source.stem}; top-1 %)", "", markdown_cross(report["cross_dataset"]), ""]
    md += ["## Masked examples", ""]
    for name, r in report.get("base2novel", report.get("cross_dataset", {})).items():
        for e in r["examples"][:2]:
            md.append(f"- {name} / {e['class']}: {e['masked']}")
    text = "\n".join(md) + "\n"
    atomic_write_json(args.out / "eval_text.json", report)
    atomic_write_bytes(args.out / "eval_text.md", text.encode())
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protext", description="Learn CLIP text prompts from class descriptions alone (ProText).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_text_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ProtextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished epochs and cached features are kept (train: rerun with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
