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
    from .train import TrainConfig

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
    group = p.add_argument_group("training settings (override preset and --config)")
    for f in fields(TrainConfig):
        kind = str if f.name in ("init", "template", "loss", "precision") else type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, help=TRAIN_HELP[f.name])
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from .backbone import load_backbone
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve
    from .train import TrainConfig, make_config, train

    cfg = make_config(args.preset, args.config, {f.name: getattr(args, f.name) for f in fields(TrainConfig)})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protext", description="Learn CLIP text prompts from class descriptions alone (ProText).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
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
