"""The `protext` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .cache import to_json
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

    p.add_argument("--backbone", default=None,
                   help=f"Hub id or local folder of a CLIP or BERT-style model (default: the one --prompts were trained "
                        f"on, else {DEFAULT_BACKBONE}); with --prompts, checked against their weights' fingerprint")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the backbone")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache for downloads and features (default: $PROTEXT_CACHE or ~/.cache/protext)")


def _backbone(args: argparse.Namespace):
    """--backbone, or the default backbone when none is given."""
    from .backbone import DEFAULT_BACKBONE, load_backbone

    return load_backbone(args.backbone or DEFAULT_BACKBONE, args.revision, args.device)


def _prompts(spec: str, args: argparse.Namespace, backbone=None):
    """Prompts from a folder or Hub id, on --backbone when given (checked by fingerprint), else on their own."""
    from .model import ProText

    if backbone is None and args.backbone:
        backbone = _backbone(args)
    return ProText.from_pretrained(spec, backbone=backbone, device=args.device)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="learn prompts from class descriptions",
                       description="Learn ProText prompts from LLM class descriptions (no images).")
    p.add_argument("--descriptions", default="cupl:imagenet",
                   help="description JSON file, or a public set name such as cupl:imagenet (default: %(default)s)")
    p.add_argument("--classes", default=None, help="train on these classes only: a file (one per line) or a,b,c")
    p.add_argument("--preset", default="cross-dataset", choices=sorted(PRESETS), help="the paper's settings (default: %(default)s)")
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
    group.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings, applied over the preset")
    for f in fields(TrainConfig):
        kind = str if f.name in ("init", "template", "loss", "precision") else type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, help=TRAIN_HELP[f.name])


def _settings(args: argparse.Namespace, preset: str):
    from .train import TrainConfig, make_config

    return make_config(preset, args.config, {f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _run_train(args: argparse.Namespace) -> None:
    from .backbone import DEFAULT_BACKBONE
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve
    from .train import train

    cfg = _settings(args, args.preset)
    path = resolve(args.descriptions, args.cache_dir)
    classes = read_class_list(args.classes) if args.classes else None
    data = load_descriptions(path, classes)
    out = args.out or Path("prompts") / args.preset
    print(f"protext train: {len(data)} classes, {sum(map(len, data.values()))} descriptions from {path}", file=sys.stderr)
    print(f"loading backbone {args.backbone or DEFAULT_BACKBONE} ...", file=sys.stderr)
    backbone = _backbone(args)
    model, summary = train(backbone, data, cfg, out, cache_dir=args.cache_dir, resume=args.resume,
                           show_progress=not args.no_progress, source=args.descriptions)
    if args.push_to_hub:
        summary["hub_url"] = model.push_to_hub(args.push_to_hub)
    print(to_json(summary))
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
    p.add_argument("--eval-template", default=None,
                   help="template of both the template and ProText heads (default: as ProText's code, 'a photo of "
                        "a {}.' in base2novel and the target dataset's inference template in cross-dataset, the dataset "
                        "known from the set name, e.g. cupl:dtd or texture_prompts_full.json)")
    p.add_argument("--out", type=Path, default=Path("eval-text"), help="folder for eval_text.json and eval_text.md")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    _add_settings_args(p)
    p.set_defaults(run=_run_eval_text)


def _run_eval_text(args: argparse.Namespace) -> None:
    from .cache import atomic_write_bytes, atomic_write_json
    from .descriptions import load_descriptions
    from .sources import resolve
    from .text_eval import TextEvaluator, check_base_to_novel, markdown_base_to_novel, markdown_cross, set_names

    if not 0 < args.holdout < 1:
        raise ProtextError(f"--holdout must be between 0 and 1, got {args.holdout}")
    paths = [resolve(spec, args.cache_dir) for spec in args.descriptions]
    sets = {name: load_descriptions(path) for name, path in zip(set_names(paths), paths)}
    if args.protocol != "cross-dataset":
        for name, data in sets.items():
            check_base_to_novel(name, data)
    backbone = _backbone(args)
    report: dict = {"backbone": backbone.name, "holdout": args.holdout, "seed": args.eval_seed, "mask_word": args.mask_word}
    md = []
    work = args.out / "runs"
    if args.protocol in ("base2novel", "both"):
        ev = TextEvaluator(backbone, _settings(args, "base2novel"), args.cache_dir, args.eval_template, args.mask_word,
                           not args.no_progress, work)
        report["base2novel"] = {name: ev.base_to_novel(data, args.holdout, args.eval_seed, name)
                               for name, data in sets.items()}
        template = next(iter(report["base2novel"].values()))["template_text"]
        md += ["## Base-to-novel (top-1 %, masked held-out descriptions)", "",
               f"Template and ProText heads read \"{template}\".", "", markdown_base_to_novel(report["base2novel"]), ""]
    if args.protocol in ("cross-dataset", "both"):
        source = resolve(args.source, args.cache_dir)
        ev = TextEvaluator(backbone, _settings(args, "cross-dataset"), args.cache_dir, args.eval_template, args.mask_word,
                           not args.no_progress, work)
        targets = {n: d for n, d, p in zip(sets, sets.values(), paths) if p.resolve() != source.resolve()}
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


def _describe_parser(sub) -> None:
    from .describe import QUESTIONS

    p = sub.add_parser("describe", help="generate class descriptions with an LLM",
                       description="Ask an LLM to describe each class (CuPL-style). Each finished class is saved at "
                                   "once; answers received for classes that did not finish are kept in "
                                   "<out>.partial.json, so rerunning asks only for the answers still missing. A "
                                   "refused API key (HTTP 401/403) stops the run at once.")
    p.add_argument("--classes", required=True, help="a file (one class per line, or a JSON list) or a,b,c")
    p.add_argument("--dataset-kind", default="objects", choices=sorted(QUESTIONS), help="which question set to ask")
    p.add_argument("--out", type=Path, required=True, help="description JSON file to write (and resume)")
    p.add_argument("--samples", type=int, default=3, help="answers per question (default: %(default)s)")
    p.add_argument("--base-url", default=None, help="chat-completions server, e.g. http://localhost:11434/v1 "
                                                    "(default: $OPENAI_BASE_URL or https://api.openai.com/v1)")
    p.add_argument("--model", default=None, help="model name (default: $PROTEXT_LLM_MODEL or gpt-4o-mini)")
    p.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY)")
    p.add_argument("--local-model", default=None, help="use this local transformers causal LM instead of a server")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429, 5xx, time-outs, dropped connections and malformed answers")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for a whole request (waiting and reading the answer), not per socket read")
    p.add_argument("--temperature", type=float, default=0.99)
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--max-chars", type=int, default=300, help="drop answers longer than this")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_describe)


def _run_describe(args: argparse.Namespace) -> None:
    import os

    from .describe import ChatClient, LocalGenerator, Usage, describe
    from .descriptions import read_class_list

    if args.samples < 1 or args.concurrency < 1:
        raise ProtextError("--samples and --concurrency must be at least 1")
    usage = Usage()
    if args.local_model:
        generate = LocalGenerator(args.local_model, args.max_tokens, usage)
    else:
        base = args.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        generate = ChatClient(base, args.model or os.environ.get("PROTEXT_LLM_MODEL", "gpt-4o-mini"),
                              args.api_key or os.environ.get("OPENAI_API_KEY"), args.temperature, args.max_tokens,
                              args.timeout, args.max_retries, usage=usage)
    report = describe(read_class_list(args.classes), args.dataset_kind, args.out, generate, args.samples,
                      args.concurrency, args.max_chars, not args.no_progress)
    report["usage"] = usage.as_dict()
    print(to_json(report))
    if report["failed"]:
        raise ProtextError(f"{len(report['failed'])} classes got no descriptions (kept out of {args.out}); "
                           f"rerun the same command to ask for them again")


def _descriptions_parser(sub) -> None:
    from .formats import FORMATS

    p = sub.add_parser("descriptions", help="fetch, import and inspect description files")
    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download a public description set into the cache")
    f.add_argument("name", help="set name, e.g. cupl:imagenet (see 'protext descriptions list')")
    f.add_argument("--out", type=Path, default=None, help="also copy it here")
    f.add_argument("--cache-dir", type=Path, default=None)
    f.set_defaults(run=_run_fetch)
    ls = dsub.add_parser("list", help="list the public description sets")
    ls.set_defaults(run=_run_list)
    i = dsub.add_parser("import", help="convert DCLIP descriptors or a folder of .txt files to protext JSON")
    i.add_argument("source", help="file or folder to read")
    i.add_argument("--format", choices=FORMATS, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.set_defaults(run=_run_import)
    s = dsub.add_parser("stats", help="classes, sentences per class, duplicates, lengths, coverage")
    s.add_argument("file")
    s.add_argument("--classes", default=None, help="label set to check coverage of: a file or a,b,c")
    s.set_defaults(run=_run_stats)


def _run_list(args: argparse.Namespace) -> None:
    from .sources import SOURCES

    for name, url in SOURCES.items():
        print(f"{name}\t{url}")


def _run_fetch(args: argparse.Namespace) -> None:
    from .cache import atomic_write_bytes
    from .sources import fetch

    path = fetch(args.name, args.cache_dir)
    if args.out:
        atomic_write_bytes(args.out, path.read_bytes())
        path = args.out
    print(path)


def _run_import(args: argparse.Namespace) -> None:
    from .cache import atomic_write_json
    from .formats import import_descriptions

    data = import_descriptions(args.source, args.format)
    atomic_write_json(args.out, data)
    print(f"{args.out}: {len(data)} classes, {sum(map(len, data.values()))} sentences")


def _run_stats(args: argparse.Namespace) -> None:
    from .descriptions import load_descriptions, read_class_list, stats

    print(to_json(stats(load_descriptions(args.file), read_class_list(args.classes) if args.classes else None)))


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with any label set",
                       description="Zero-shot classification of image files with learned prompts (or plain CLIP).")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--classes", required=True, help="label set: a file (one per line) or a,b,c")
    p.add_argument("--prompts", default=None, help="prompt folder or Hub id (default: none, plain CLIP template)")
    p.add_argument("--descriptions", default=None, help="description JSON or set name (cupl:NAME), for the cupl and "
                                                        "protext+cupl heads")
    p.add_argument("--head", default=None, help="clip, clip80, cupl, protext or protext+cupl (default: protext with "
                                                "--prompts, else cupl with --descriptions, else clip)")
    p.add_argument("--dataset", default=None, help="dataset name whose templates to use (e.g. oxford_pets)")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per image (default: %(default)s)")
    _add_backbone_args(p)
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve
    from .classifier import ProTextClassifier

    if args.top_k < 1:
        raise ProtextError(f"--top-k must be at least 1, got {args.top_k}")
    classes = read_class_list(args.classes)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts is not None else _backbone(args)
    descriptions = load_descriptions(resolve(args.descriptions, args.cache_dir)) if args.descriptions else None
    clf = ProTextClassifier(backbone, classes, prompts=prompts, descriptions=descriptions, head=args.head,
                            dataset=args.dataset, cache_dir=args.cache_dir)
    for note in clf.heads.fallback_notes():
        print(note, file=sys.stderr)
    pred = clf.predict(args.images)
    for name, top in zip(pred.inputs, pred.top(args.top_k)):
        print(to_json({"image": name, "label": top[0][0], "top": [[c, round(p, 4)] for c, p in top]}, indent=None))
    for name, reason in pred.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if not pred.inputs:
        raise ProtextError(f"none of the {len(pred.skipped)} images could be read (see 'skipped' above)")


def _eval_parser(sub) -> None:
    from .datasets import DATASETS

    p = sub.add_parser("eval", help="accuracy of heads on one image dataset",
                       description="Top-1 accuracy of zero-shot heads on one dataset (CoOp layout, image folder or CSV).")
    p.add_argument("--dataset", required=True, help=f"folder, csv, or one of: {', '.join(DATASETS)}")
    p.add_argument("--data-root", type=Path, required=True, help="CoOp data root, image folder, or CSV file")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--subset", default="all", choices=["all", "base", "novel"], help="CoOp base/novel half")
    p.add_argument("--heads", default=None, help="comma-separated heads (default: clip, plus cupl/protext when possible)")
    p.add_argument("--prompts", default=None, help="prompt folder or Hub id")
    p.add_argument("--descriptions", default=None, help="description JSON or set name, for the cupl heads")
    p.add_argument("--cross-dataset", action="store_true",
                   help="the prompts were learned on another dataset: the protext head uses this dataset's inference "
                        "template ('a photo of a {}, a type of pet.'), as the cross-dataset benchmark does")
    p.add_argument("--out", type=Path, default=None, help="also write the result row as JSON here")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from .benchmark import evaluate
    from .cache import atomic_write_json
    from .datasets import base_novel, load_dataset
    from .descriptions import load_descriptions
    from .sources import resolve
    from .heads import Heads

    dataset = base_novel(load_dataset(args.dataset, args.data_root, args.split), args.subset)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts else _backbone(args)
    descriptions = load_descriptions(resolve(args.descriptions, args.cache_dir)) if args.descriptions else None
    heads = args.heads.split(",") if args.heads else (["clip"] + (["cupl"] if descriptions else [])
                                                      + (["protext"] if prompts else []))
    built = Heads(backbone, prompts, descriptions, args.cache_dir, args.cross_dataset)
    row = evaluate(backbone, dataset, built, heads, args.cache_dir, not args.no_progress)
    for note in built.fallback_notes():
        print(note, file=sys.stderr)
    if args.out:
        atomic_write_json(args.out, row)
    print(to_json({k: v for k, v in row.items() if k != "skipped_files"}))
    for name, reason in row["skipped_files"]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)


def _benchmark_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="one of the paper's four protocols, as a table",
                       description="Run one of the paper's protocols; writes <protocol>.json, .md and .png to --out.")
    p.add_argument("protocol", choices=["cross-dataset", "base2novel", "domain-generalization", "text-only"])
    p.add_argument("--data-root", type=Path, required=True, help="CoOp data root holding the dataset folders")
    p.add_argument("--prompts", default=None, help="cross-dataset / domain-generalization: ImageNet prompts "
                                                   "(default: train them with the matching preset into --out)")
    p.add_argument("--prompts-dir", type=Path, default=None, help="base2novel / text-only: per-dataset prompt folders "
                                                                  "(trained there when absent; default: <out>/prompts)")
    p.add_argument("--descriptions-dir", type=Path, default=None, help="<dataset>.json description files "
                                                                       "(default: the public CuPL sets)")
    p.add_argument("--datasets", default=None, help="comma-separated subset of datasets to run")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    _add_settings_args(p)
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> None:
    from . import benchmark as bm
    from .descriptions import load_descriptions
    from .model import ProText, is_complete
    from .sources import fetch
    from .train import train

    show = not args.no_progress
    backbone = _backbone(args)
    names = args.datasets.split(",") if args.datasets else None
    proto = args.protocol
    if proto in ("cross-dataset", "domain-generalization"):
        if args.prompts:
            prompts = _prompts(args.prompts, args, backbone)
        else:
            preset = "cross-dataset" if proto == "cross-dataset" else "imagenet-200ep"
            folder = args.out / f"prompts-{preset}"
            if is_complete(folder):
                prompts = ProText.from_pretrained(folder, backbone=backbone)
            else:
                data = load_descriptions(fetch("cupl:imagenet", args.cache_dir))
                prompts, _ = train(backbone, data, _settings(args, preset), folder, args.cache_dir, resume=True,
                                   show_progress=show, source="cupl:imagenet")
        if proto == "cross-dataset":
            kw = {"datasets": names} if names else {}
            result = bm.cross_dataset(backbone, prompts, args.data_root, args.cache_dir, show_progress=show, **kw)
        else:
            result = bm.domain_generalization(backbone, prompts, args.data_root, args.cache_dir, show_progress=show)
    else:
        preset = "base2novel" if proto == "base2novel" else "text-only"
        run = bm.base_to_novel if proto == "base2novel" else bm.text_only
        kw = {"datasets": names} if names else {}
        result = run(backbone, args.data_root, args.prompts_dir or args.out / "prompts", _settings(args, preset),
                     args.descriptions_dir, args.cache_dir, show_progress=show, **kw)
    files = bm.write_report(result, args.out)
    print(bm.markdown(result))
    print("wrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    if not result["rows"]:
        raise ProtextError("no dataset could be evaluated; see 'Not run' above for what was expected where")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protext", description="Learn CLIP text prompts from class descriptions alone (ProText).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_text_parser(sub)
    _describe_parser(sub)
    _predict_parser(sub)
    _eval_parser(sub)
    _benchmark_parser(sub)
    _descriptions_parser(sub)
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
