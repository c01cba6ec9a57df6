"""The `protext` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .cache import to_json
from .errors import ProtextError
from .presets import PRESETS

PATHS_HELP = ("image files, folders (searched recursively), .csv files listing paths (a 'path' column, else the first; "
              "relative to the CSV), or URIs such as s3://bucket/key.jpg (read with pyarrow's filesystems)")


def _add_backbone_args(p: argparse.ArgumentParser, with_prompts: bool = True) -> None:
    from .backbone import DEFAULT_BACKBONE

    p.add_argument("--backbone", default=None,
                   help=f"Hub id or local folder of a CLIP, SigLIP or BERT-style model (default: the one --prompts were trained "
                        f"on, else {DEFAULT_BACKBONE}); with --prompts, checked against their weights' fingerprint"
                   if with_prompts else f"Hub id or local folder of a CLIP or SigLIP model (default: {DEFAULT_BACKBONE})")
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
    g = p.add_argument_group("baseline heads (clip, cupl and protext always run)")
    g.add_argument("--descriptors", nargs="+", default=[],
                   help="DCLIP descriptor files or sets (dclip:NAME) for the dclip head, each used for the description "
                        "sets of its dataset (known from the name, e.g. descriptors_dtd.json or dtd.json)")
    _add_waffle_args(g)
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
                      args.cache_dir, not args.no_progress, args.descriptors, _waffle(args))
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
    p.add_argument("--head", default=None, help="one head, or heads joined with '+' (default: protext with --prompts, "
                                                "else cupl with --descriptions, else clip)")
    p.add_argument("--dataset", default=None, help="the dataset the classes come from (e.g. oxford_pets): the clip "
                                                   "head uses its template")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per image (default: %(default)s)")
    p.add_argument("--scores", choices=["softmax", "sigmoid"], default="softmax",
                   help="softmax: probabilities over the label set, summing to 1; sigmoid: each label's own "
                        "probability with the model's learned bias, as SigLIP was trained (SigLIP backbones only). "
                        "The top label is the same (default: %(default)s)")
    _add_head_args(p)
    _add_backbone_args(p)
    p.set_defaults(run=_run_predict)


def _add_head_args(p: argparse.ArgumentParser) -> None:
    """What the heads read, the same flags wherever heads are built."""
    from .heads import HEADS

    g = p.add_argument_group(f"heads ({', '.join(HEADS)}; join any with '+', e.g. protext+cupl)")
    g.add_argument("--descriptions", default=None, help="CuPL-style description JSON or set name (cupl:NAME), for cupl")
    g.add_argument("--descriptors", default=None, help="DCLIP descriptor JSON or set name (dclip:NAME), for dclip")
    _add_waffle_args(g)
    g.add_argument("--cross-dataset", action="store_true",
                   help="the prompts were learned on another dataset: the protext head uses --dataset's inference "
                        "template ('a photo of a {}, a type of pet.'), as the cross-dataset benchmark does")


def _add_waffle_args(g) -> None:
    g.add_argument("--waffle-count", type=int, default=15, help="waffle: pairs of random descriptors (default: %(default)s)")
    g.add_argument("--waffle-seed", type=int, default=0, help="waffle: seed of the random descriptors (default: %(default)s)")
    g.add_argument("--waffle-concept", default=None,
                   help="waffle: a high-level concept, as in 'A photo of a {concept}: a {class}, which ...'")


def _waffle(args: argparse.Namespace):
    from .heads import Waffle

    return Waffle(args.waffle_count, args.waffle_seed, args.waffle_concept)


def _head_data(args: argparse.Namespace) -> dict:
    """Keyword arguments for Heads / ProTextClassifier from the head flags."""
    from .descriptions import load_descriptions
    from .sources import load_descriptors, resolve

    return {"descriptions": load_descriptions(resolve(args.descriptions, args.cache_dir)) if args.descriptions else None,
            "descriptors": load_descriptors(args.descriptors, args.cache_dir) if args.descriptors else None,
            "waffle": _waffle(args),
            "cross_dataset": args.cross_dataset}


def _run_predict(args: argparse.Namespace) -> None:
    from .classifier import ProTextClassifier
    from .descriptions import read_class_list

    if args.top_k < 1:
        raise ProtextError(f"--top-k must be at least 1, got {args.top_k}")
    classes = read_class_list(args.classes)
    heads = _head_data(args)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts is not None else _backbone(args)
    clf = ProTextClassifier(backbone, classes, prompts=prompts, head=args.head, dataset=args.dataset,
                            cache_dir=args.cache_dir, **heads)
    for note in clf.heads.fallback_notes():
        print(note, file=sys.stderr)
    pred = clf.predict(args.images, scores=args.scores)
    for name, top in zip(pred.inputs, pred.top(args.top_k)):
        print(to_json({"image": name, "label": top[0][0], "top": [[c, round(p, 4)] for c, p in top],
                       "scores": pred.scores}, indent=None))
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
    p.add_argument("--heads", default=None, help="comma-separated heads, or 'all' for every head the given data allows "
                                                 "(default: clip, plus cupl/protext when possible)")
    p.add_argument("--prompts", default=None, help="prompt folder or Hub id")
    _add_head_args(p)
    p.add_argument("--output", type=Path, default=None, help="also write the result row to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from .benchmark import evaluate
    from .cache import atomic_write_json
    from .datasets import base_novel, load_dataset
    from .heads import Heads, choose_heads

    dataset = base_novel(load_dataset(args.dataset, args.data_root, args.split), args.subset)
    data = _head_data(args)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    backbone = prompts.backbone if prompts else _backbone(args)
    heads = choose_heads(args.heads, prompts is not None, data["descriptions"] is not None,
                         data["descriptors"] is not None)
    built = Heads(backbone, prompts, cache_dir=args.cache_dir, **data)
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
    p.add_argument("--descriptors-dir", type=Path, default=None, help="text-only: <dataset>.json DCLIP descriptor "
                                                                      "files (default: the public DCLIP sets)")
    p.add_argument("--waffle-seeds", type=int, default=7, help="text-only: WaffleCLIP is the mean over this many seeds, "
                                                               "as in its paper (default: %(default)s)")
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
                           parse_assignments(args.set), args.cache_dir, not args.no_progress, args.descriptors_dir,
                           args.waffle_seeds)
    print(bm.markdown(result))
    print("wrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    if not result["rows"]:
        raise ProtextError("no dataset could be evaluated; see 'Not run' above for what was expected where")


def _add_classifier_args(p: argparse.ArgumentParser) -> None:
    """--prompts, --head, --dataset, the head flags and the backbone flags: what a classifier is built from."""
    p.add_argument("--prompts", default=None, help="prompt folder or Hub id (default: none: plain CLIP heads on --backbone)")
    p.add_argument("--head", default=None, help="one head, or heads joined with '+' (default: protext with --prompts, "
                                                "else cupl with --descriptions, else clip)")
    p.add_argument("--dataset", default=None, help="the dataset the classes come from (e.g. oxford_pets): the clip "
                                                   "head uses its template")
    _add_head_args(p)
    _add_backbone_args(p)


def _classifier_parts(args: argparse.Namespace) -> tuple:
    """(backbone, prompts or None, head data) from the flags of `_add_classifier_args`."""
    data = _head_data(args)
    prompts = _prompts(args.prompts, args) if args.prompts else None
    return (prompts.backbone if prompts is not None else _backbone(args)), prompts, data


def _classifier(args: argparse.Namespace, classes: list[str]):
    from .classifier import ProTextClassifier

    backbone, prompts, data = _classifier_parts(args)
    clf = ProTextClassifier(backbone, classes, prompts=prompts, head=args.head, dataset=args.dataset,
                            cache_dir=args.cache_dir, **data)
    for note in clf.heads.fallback_notes():
        print(note, file=sys.stderr)
    return clf


def _serve_parser(sub) -> None:
    from .serve import Limits

    p = sub.add_parser("serve", help="a JSON API and a web page classifying uploaded images",
                       description="Serve a classifier over HTTP: POST /v1/classify (multipart images, labels or a "
                                   "label set name, head, top_k), GET /v1/label-sets, GET /healthz, the OpenAPI schema "
                                   "at /openapi.json and a web page at /. Concurrent requests are batched into one "
                                   "forward pass; class embeddings are computed once per (label set, head). Bad "
                                   "requests get a 4xx JSON error.")
    p.add_argument("--classes", nargs="+", default=[], metavar="[NAME=]FILE|a,b,c",
                   help="label sets loaded at start, each a file (named after it) or NAME=FILE or NAME=a,b,c; the "
                        "first is the default of requests that send no labels")
    _add_classifier_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    limits = p.add_argument_group("limits (a request over one gets a 4xx or 503 JSON error)")
    for f in fields(Limits):
        limits.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default: %(default)s)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from .serve import Limits, Service, load_label_sets

    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    label_sets = load_label_sets(args.classes)
    from .api import run  # after the arguments are checked: says how to install fastapi when it is missing

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: other machines can reach this server", file=sys.stderr)
    backbone, prompts, data = _classifier_parts(args)
    service = Service(backbone, prompts, label_sets, args.head, args.dataset, limits, args.cache_dir, **data)
    print(f"protext serve: {backbone.name}, head {service.head}, label sets: {', '.join(label_sets) or 'none'}; "
          f"page at http://{args.host}:{args.port}/", file=sys.stderr)
    run(service, args.host, args.port)


def _label_parser(sub) -> None:
    from .label import FORMATS

    p = sub.add_parser("label", help="label many images into a JSONL, CSV or Parquet file",
                       description="Label every image of folders (recursive), files and CSV lists of paths. Decoding "
                                   "runs in threads beside the model; rows are saved in chunks, so a rerun of the same "
                                   "command after an interruption labels only the images not yet written. Unreadable "
                                   "files are rows with an error, listed at the end, never fatal.")
    p.add_argument("paths", nargs="*", metavar="PATH", help=PATHS_HELP)
    p.add_argument("--features", type=Path, default=None, metavar="DIR",
                   help="label the image features stored in this folder by 'protext features' instead of images "
                        "(no image is read; the backbone must be the one that made them)")
    p.add_argument("--classes", required=True, help="label set: a file (one per line) or a,b,c")
    p.add_argument("--output", type=Path, required=True,
                   help=f"the file to write, its format from its suffix: {', '.join(FORMATS)}; finished chunks are kept "
                        f"in <output>.parts/ until the end")
    p.add_argument("--top-k", type=int, default=3, help="labels and probabilities per image (default: %(default)s)")
    p.add_argument("--min-prob", type=float, default=None,
                   help="below this top probability the label is 'unknown' (the top-k columns keep the real labels)")
    p.add_argument("--scores", choices=["softmax", "sigmoid"], default="softmax",
                   help="softmax: probabilities over the label set; sigmoid: each label's own (SigLIP backbones only) "
                        "(default: %(default)s)")
    _add_image_job_args(p, 512, "images per saved chunk", "classify")
    _add_classifier_args(p)
    p.set_defaults(run=_run_label)


def _run_label(args: argparse.Namespace) -> None:
    from .descriptions import read_class_list
    from .label import collect, label, label_features, output_format

    output_format(args.output)
    classes = read_class_list(args.classes)
    if args.features is not None:
        if args.paths or args.engine != "local":
            raise ProtextError("--features labels stored features: give no image PATHs and no --engine ray")
        from .feature_folder import read_features

        stored = read_features(args.features)
        if args.backbone is None:
            args.backbone, args.revision = stored.info["backbone"], stored.info["revision"]
        report = label_features(_classifier(args, classes), stored, args.output, args.top_k, args.min_prob,
                                args.scores, not args.no_progress)
    elif not args.paths:
        raise ProtextError("give the images to label (PATH ...), or --features DIR")
    elif args.engine == "ray":
        from .distributed import label_on_ray, ray_module

        ray_module()  # before any model is loaded: says how to install Ray when it is missing
        workers = 2 if args.workers is None else args.workers
        report = label_on_ray(_classifier(args, classes), collect(args.paths), args.output, args.top_k, args.min_prob,
                              args.scores, args.address, workers, args.num_gpus_per_worker, args.batch_size,
                              not args.no_progress)
    else:
        report = label(_classifier(args, classes), collect(args.paths), args.output, args.top_k, args.min_prob,
                       args.scores, args.batch_size, args.workers, args.chunk, not args.no_progress)
    _print_report(report)


def _print_report(report) -> None:
    """A label or features report: unreadable files on stderr, the summary as one JSON line;
    an error (exit 2) when no image at all could be read."""
    for name, reason in report.unreadable:
        print(f"unreadable {name}: {reason}", file=sys.stderr)
    print(to_json(report.as_dict(), indent=None))
    if len(report.unreadable) == report.images:
        raise ProtextError(f"none of the {report.images} images could be read (see 'unreadable' above)")


def _add_image_job_args(p: argparse.ArgumentParser, chunk: int, chunk_help: str, what: str) -> None:
    """The flags `label` and `features` share: batching, decoding, saved chunks, progress, Ray."""
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: the CPU count, at most 8); "
                                                                 "with --engine ray, image-tower actors (default: 2)")
    p.add_argument("--chunk", type=int, default=chunk, help=f"{chunk_help}, the unit a rerun resumes from "
                                                            f"(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("on a Ray cluster (pip install 'protext[ray]')")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help=f"local: this process; ray: decode in Ray tasks and {what} in a pool of Ray actors, each "
                        f"loading the image tower once (default: %(default)s)")
    g.add_argument("--address", default=None,
                   help="ray: the cluster, 'auto' or ray://HOST:PORT (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--num-gpus-per-worker", type=float, default=0, help="ray: GPUs per actor (default: 0)")


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help="compute the image features of many images into a folder of Parquet parts",
                       description="Run the image tower once over folders (recursive), files, CSV lists of paths and "
                                   "URIs, into --out: part-NNNNNN.parquet files (path, feature, error; one per "
                                   "--chunk images, in input order) and _summary.json when finished. A rerun of the "
                                   "same command after an interruption computes only the missing parts. Label them "
                                   "later with 'protext label --features DIR', with any label set.")
    p.add_argument("paths", nargs="+", metavar="PATH", help=PATHS_HELP)
    p.add_argument("--out", required=True, help="local folder to write the parts into")
    _add_image_job_args(p, 1024, "images per part file", "run the image tower")
    _add_backbone_args(p, with_prompts=False)
    p.set_defaults(run=_run_features)


def _run_features(args: argparse.Namespace) -> None:
    from .feature_folder import pyarrow_modules, write_features
    from .label import collect

    pyarrow_modules()
    if "://" in args.out:
        raise ProtextError(f"--out {args.out}: write the features to a local folder (or a mounted one), then copy them")
    paths = collect(args.paths)
    if args.engine == "ray":
        from .distributed import features_on_ray, ray_module

        ray_module()
        workers = 2 if args.workers is None else args.workers
        report = features_on_ray(_backbone(args), paths, args.out, args.chunk, args.address, workers,
                                 args.num_gpus_per_worker, args.batch_size, not args.no_progress)
    else:
        report = write_features(_backbone(args), paths, args.out, args.batch_size, args.workers, args.chunk,
                                not args.no_progress)
    _print_report(report)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a classifier as plain files (safetensors + JSON, optionally ONNX)",
                       description="Write the classifier as files usable without protext: classifier.safetensors "
                                   "(class embeddings, logit scale), classifier.json (backbone, head, templates, label "
                                   "order, preprocessing) and, with --onnx, classifier.onnx (pixels to logits), "
                                   "checked against PyTorch with onnxruntime before it is written.")
    p.add_argument("--classes", required=True, help="label set: a file (one per line) or a,b,c")
    p.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    p.add_argument("--onnx", action="store_true", help="also write classifier.onnx: the image tower and the head, "
                                                       "from preprocessed pixels to logits")
    p.add_argument("--check-images", nargs="+", type=Path, default=[], metavar="PATH",
                   help="--onnx: images or folders to check the ONNX model on (default: seeded random images)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="--onnx: largest difference of logits allowed between ONNX and PyTorch (default: %(default)s)")
    _add_classifier_args(p)
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from .descriptions import read_class_list
    from .export import JSON_FILE, export

    if args.out.exists() and not args.out.is_dir():
        raise ProtextError(f"--out {args.out} is a file; --out names the folder the export is written into")
    meta = export(_classifier(args, read_class_list(args.classes)), args.out, args.onnx, args.check_images,
                  args.tolerance)
    check = meta.get("onnx", {}).get("check")
    print(to_json({"out": str(args.out), "files": sorted(meta["files"]) + [JSON_FILE], "labels": len(meta["labels"]),
                   "head": meta["head"], "onnx_check": check}))


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
    _serve_parser(sub)
    _label_parser(sub)
    _features_parser(sub)
    _export_parser(sub)
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
