"""The `protext` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .cache import to_json
from .errors import ProtextError
from .presets import PRESETS


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
    """One flag per training setting, its help and type from TrainConfig."""
    from .train import TrainConfig

    group = p.add_argument_group("training settings (override the preset and --config)")
    group.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings, applied over the preset")
    kinds = {"int": int, "float": float, "str": str}
    for f in fields(TrainConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kinds[f.type], default=None,
                           help=f"{f.metadata['help']} (default: {f.default!r} or the preset's)")


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    """Commands that train on the way (eval-text, benchmark) take settings as a file or KEY=VALUE pairs."""
    group = p.add_argument_group("training settings (applied over the protocol's preset)")
    group.add_argument("--config", type=Path, default=None, help="JSON or TOML file of training settings")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="one training setting, e.g. --set lr=0.01 --set init=random (see 'protext train --help')")


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
    from .text_eval import PROTOCOLS

    p = sub.add_parser("eval-text", help="check prompts without images, on held-out masked descriptions",
                       description="Image-free check: classify held-out descriptions whose class name is masked, "
                                   "with the template head, ProText prompts and the description ensemble.")
    p.add_argument("--descriptions", nargs="+", required=True, help="description files or set names to test on")
    p.add_argument("--protocol", choices=PROTOCOLS, default="both")
    p.add_argument("--source", default="cupl:imagenet", help="cross-dataset: the set prompts are trained on (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=0.2, help="base2novel: share of each base class's descriptions held out (default: %(default)s)")
    p.add_argument("--holdout-seed", type=int, default=1, help="seed of the hold-out split (default: %(default)s)")
    p.add_argument("--mask-word", default="thing", help="word that replaces the class name (default: %(default)s)")
    p.add_argument("--inference-template", default=None,
                   help="template of both the clip and protext heads (default: as ProText's code, 'a photo of "
                        "a {}.' in base2novel and the target dataset's inference template in cross-dataset, the dataset "
                        "known from the set name, e.g. cupl:dtd or texture_prompts_full.json)")
    p.add_argument("--out", type=Path, default=Path("eval-text"),
                   help="folder for eval_text.json, eval_text.md and the trained prompts (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    _add_run_settings(p)
    p.set_defaults(run=_run_eval_text)


def _run_eval_text(args: argparse.Namespace) -> None:
    from .text_eval import load_sets, run
    from .train import parse_assignments

    sets = load_sets(args.descriptions, args.protocol, args.cache_dir)
    _, markdown = run(_backbone(args), sets, args.out, args.protocol, args.source, args.holdout, args.holdout_seed,
                      args.mask_word, args.inference_template, args.config, parse_assignments(args.set),
                      args.cache_dir, not args.no_progress)
    print(markdown)


def _describe_parser(sub) -> None:
    from .describe import QUESTIONS

    p = sub.add_parser("describe", help="generate class descriptions with an LLM",
                       description="Ask an LLM to describe each class (CuPL-style). Each finished class is saved at "
                                   "once; answers received for classes that did not finish are kept in "
                                   "<output>.partial.json, so rerunning asks only for the answers still missing. A "
                                   "refused API key (HTTP 401/403) stops the run at once.")
    p.add_argument("--classes", required=True, help="a file (one class per line, or a JSON list) or a,b,c")
    p.add_argument("--dataset-kind", default="objects", choices=sorted(QUESTIONS), help="which question set to ask")
    p.add_argument("--output", type=Path, required=True, help="description JSON file to write (and resume)")
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
    from .describe import LocalGenerator, Usage, chat_client, describe
    from .descriptions import read_class_list

    if args.samples < 1 or args.concurrency < 1:
        raise ProtextError("--samples and --concurrency must be at least 1")
    usage = Usage()
    if args.local_model:
        generate = LocalGenerator(args.local_model, args.max_tokens, usage)
    else:
        generate = chat_client(args.base_url, args.model, args.api_key, temperature=args.temperature,
                               max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                               usage=usage)
    report = describe(read_class_list(args.classes), args.dataset_kind, args.output, generate, args.samples,
                      args.concurrency, args.max_chars, not args.no_progress)
    report["usage"] = usage.as_dict()
    print(to_json(report))
    if report["failed"]:
        raise ProtextError(f"{len(report['failed'])} classes got no descriptions (kept out of {args.output}; answers "
                           f"already received are kept beside it); rerun the same command to ask for the rest")


def _descriptions_parser(sub) -> None:
    from .formats import FORMATS

    p = sub.add_parser("descriptions", help="fetch, import and inspect description files")
    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download a public description set into the cache")
    f.add_argument("name", help="set name, e.g. cupl:imagenet (see 'protext descriptions list')")
    f.add_argument("--output", type=Path, default=None, help="also copy it to this file")
    f.add_argument("--cache-dir", type=Path, default=None)
    f.set_defaults(run=_run_fetch)
    ls = dsub.add_parser("list", help="list the public description sets")
    ls.set_defaults(run=_run_list)
    i = dsub.add_parser("import", help="convert DCLIP descriptors or a folder of .txt files to protext JSON")
    i.add_argument("source", help="file or folder to read")
    i.add_argument("--format", choices=FORMATS, required=True)
    i.add_argument("--output", type=Path, required=True, help="protext description JSON file to write")
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
    if args.output:
        atomic_write_bytes(args.output, path.read_bytes())
        path = args.output
    print(path)


def _run_import(args: argparse.Namespace) -> None:
    from .cache import atomic_write_json
    from .formats import import_descriptions

    data = import_descriptions(args.source, args.format)
    atomic_write_json(args.output, data)
    print(f"{args.output}: {len(data)} classes, {sum(map(len, data.values()))} sentences")


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
    p.add_argument("--dataset", default=None, help="the dataset the classes come from (e.g. oxford_pets): the clip "
                                                   "head uses its template")
    p.add_argument("--cross-dataset", action="store_true",
                   help="the prompts were learned on another dataset: the protext head uses --dataset's inference "
                        "template ('a photo of a {}, a type of pet.'), as the cross-dataset benchmark does")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per image (default: %(default)s)")
    _add_backbone_args(p)
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from .classifier import ProTextClassifier
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve

    if args.top_k < 1:
        raise ProtextError(f"--top-k must be at least 1, got {args.top_k}")
    classes = read_class_list(args.classes)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts is not None else _backbone(args)
    descriptions = load_descriptions(resolve(args.descriptions, args.cache_dir)) if args.descriptions else None
    clf = ProTextClassifier(backbone, classes, prompts=prompts, descriptions=descriptions, head=args.head,
                            dataset=args.dataset, cross_dataset=args.cross_dataset, cache_dir=args.cache_dir)
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
    p.add_argument("--output", type=Path, default=None, help="also write the result row to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from .benchmark import evaluate
    from .cache import atomic_write_json
    from .datasets import base_novel, load_dataset
    from .descriptions import load_descriptions
    from .heads import Heads, default_heads
    from .sources import resolve

    dataset = base_novel(load_dataset(args.dataset, args.data_root, args.split), args.subset)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts else _backbone(args)
    descriptions = load_descriptions(resolve(args.descriptions, args.cache_dir)) if args.descriptions else None
    heads = args.heads.split(",") if args.heads else default_heads(prompts is not None, descriptions is not None)
    built = Heads(backbone, prompts, descriptions, args.cache_dir, args.cross_dataset)
    row = evaluate(backbone, dataset, built, heads, args.cache_dir, not args.no_progress)
    for note in built.fallback_notes():
        print(note, file=sys.stderr)
    if args.output:
        atomic_write_json(args.output, row)
    print(to_json({k: v for k, v in row.items() if k != "skipped_files"}))
    for name, reason in row["skipped_files"]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)


def _benchmark_parser(sub) -> None:
    from .benchmark import PRESETS

    p = sub.add_parser("benchmark", help="one of the paper's four protocols, as a table",
                       description="Run one of the paper's protocols; writes <protocol>.json, .md and .png to --out.")
    p.add_argument("protocol", choices=list(PRESETS), help="the protocol; each trains with the paper's preset for it")
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
    _add_run_settings(p)
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> None:
    from . import benchmark as bm
    from .train import parse_assignments

    backbone = _backbone(args)
    prompts = _prompts(args.prompts, args, backbone) if args.prompts else None
    result, files = bm.run(args.protocol, backbone, args.data_root, args.out, prompts, args.prompts_dir,
                           args.descriptions_dir, args.datasets.split(",") if args.datasets else None, args.config,
                           parse_assignments(args.set), args.cache_dir, not args.no_progress)
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
