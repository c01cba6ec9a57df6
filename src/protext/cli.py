"""The `protext` command: parses arguments, calls the library, prints. Nothing else lives here.

Flags come from the library's settings dataclasses (`flags.add_flags`): `Context` (cache, device,
progress), `ClassifierOptions` (what a classifier is built from), `TrainConfig`, `Limits`, the
protocol settings. Each sub-command's flags are built only when that command runs (or its help
is asked for), so `protext --help` answers without importing torch. Flags are never abbreviated:
a flag means only what it says.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .context import Context
from .errors import ProtextError
from .flags import add_flags, from_flags, values

PATHS_HELP = ("image files, folders (searched recursively), URIs such as s3://bucket/key.jpg (read with pyarrow's "
              "filesystems), or manifests: .parquet, .jsonl or .csv files (or folders of them, local or s3://...) "
              "with a 'path' column (a CSV without a header: its first column; relative paths are relative to the "
              "manifest) whose other columns are carried to the output; manifests given alone are read a part at a "
              "time, never listed whole")
CLASSES_HELP = "label set: a file (one class per line, or a JSON list of names) or a,b,c"
RESUME_HINT = "finished parts are kept: rerun the same command to continue where it stopped"
CACHED_HINT = "image features and prompts finished so far are cached: rerun the same command to continue"


# -- shared groups of flags ------------------------------------------------------------------

def _context(args: argparse.Namespace) -> Context:
    """The run's context; its cache folder is checked writable before any work."""
    from .cache import check_writable

    ctx = from_flags(Context, args)
    check_writable(ctx.cache, "the cache folder (--cache-dir, or $PROTEXT_CACHE)", folder=True)
    return ctx


def _writable(path, flag: str, folder: bool = False) -> None:
    from .cache import check_writable

    if path is not None:
        check_writable(path, flag, folder)


def _inputs(paths: list[str], part_size: int):
    """`inputs.open_inputs`: manifests read in place, or the listed inputs; notes said on stderr."""
    from .inputs import open_inputs

    notes: list[str] = []
    found = open_inputs(paths, part_size, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return found


@contextlib.contextmanager
def _ray_inputs(args: argparse.Namespace, parts: Path):
    """`distributed.open_ray_inputs`: image folders listed by Ray tasks into <parts>/_listing, removed
    when the job ends; notes said on stderr."""
    from .distributed import open_ray_inputs

    notes: list[str] = []
    listing = parts / "_listing"
    try:
        found = open_ray_inputs(args.paths, args.part_size, listing, args.address,
                                2 if args.workers is None else args.workers, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        yield found
    finally:
        shutil.rmtree(listing, ignore_errors=True)


def _add_context(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    add_flags(p, Context, only=["cache_dir", "device", "progress"] if device else ["cache_dir", "progress"])


def _add_classifier(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--prompts, --head, --dataset, what the heads read, and the backbone: `ClassifierOptions`."""
    from .classifier import ClassifierOptions
    from .heads import HEADS

    add_flags(p, ClassifierOptions, only=["prompts", "backbone", "revision", "precision", "head", "dataset"], skip=skip)
    g = p.add_argument_group("what the heads read ("
                             + "; ".join(f"{h.name}: {h.given_by or 'nothing'}" for h in HEADS.values())
                             + "; join any heads with '+', e.g. protext+cupl)")
    add_flags(g, ClassifierOptions, only=["descriptions", "descriptors", "differential", "waffle_count", "waffle_seed",
                                          "waffle_concept", "cross_dataset"], skip=skip)


def _options(args: argparse.Namespace, **changes):
    from .classifier import ClassifierOptions

    return ClassifierOptions(**{**values(ClassifierOptions, args), **changes})


def _classifier(args: argparse.Namespace, classes: list[str]):
    from .classifier import build_classifier

    clf = build_classifier(_options(args), classes, _context(args))
    for note in clf.heads.fallback_notes():
        print(note, file=sys.stderr)
    return clf


def _add_backbone(p: argparse.ArgumentParser, with_prompts: bool = True, precision: bool = False) -> None:
    """--backbone and --revision; with `precision`, --precision of the image tower (commands that read images)."""
    from .backbone import DEFAULT_BACKBONE
    from .classifier import ClassifierOptions

    text = None if with_prompts else {"backbone": f"Hub id or local folder of a CLIP or SigLIP model (default: "
                                                  f"{DEFAULT_BACKBONE})"}
    add_flags(p, ClassifierOptions, only=["backbone", "revision"] + (["precision"] if precision else []), help=text)


def _backbone(args: argparse.Namespace, precision: str = "fp32"):
    """The backbone --backbone names, its image tower in `precision` (train's --precision is the training step's)."""
    from .backbone import DEFAULT_BACKBONE, load_backbone

    return load_backbone(args.backbone or DEFAULT_BACKBONE, args.revision, args.device, args.progress, precision)


def _add_training_overrides(p: argparse.ArgumentParser) -> None:
    """Commands that train on the way (eval-text, benchmark) take settings as a file or KEY=VALUE pairs."""
    g = p.add_argument_group("training settings (applied over the protocol's preset)")
    g.add_argument("--config", type=Path, default=None, help="JSON or TOML file of training settings")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one training setting, e.g. --set lr=0.01 --set init=random (see 'protext train --help')")


def _print_report(report) -> None:
    """A label or features report: unreadable files on stderr, the summary as one JSON line; an error
    (exit 2) when no image at all could be read."""
    from .cache import to_json

    for name, reason in report.unreadable_files:
        print(f"unreadable {name}: {reason}", file=sys.stderr)
    if report.unreadable > len(report.unreadable_files):
        print(f"... and {report.unreadable - len(report.unreadable_files)} more unreadable", file=sys.stderr)
    print(to_json(report.as_dict(), indent=None))
    if report.unreadable == report.images:
        raise ProtextError(f"none of the {report.images} images could be read (see 'unreadable' above)")


def _add_job(p: argparse.ArgumentParser, part_size: int, what: str) -> None:
    """The flags `label` and `features` share: batching, decoding, parts, Ray."""
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: 32 on the CPU, 256 on a GPU)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: the CPU count, at most 8); "
                                                                 "with --engine ray, image-tower actors (default: 2)")
    p.add_argument("--part-size", type=int, default=part_size,
                   help="images per saved part, the unit a rerun resumes from (default: %(default)s)")
    _add_max_pixels(p)
    g = p.add_argument_group("on a Ray cluster (pip install 'protext[ray]')")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help=f"local: this process; ray: a pool of Ray actors, each loading the image tower once and "
                        f"computing whole parts ({what}: decoding in threads, the forward pass, the part file "
                        f"written into the output folder, which every machine must reach) (default: %(default)s)")
    g.add_argument("--address", default=None,
                   help="ray: the cluster, 'auto' or ray://HOST:PORT (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--num-gpus-per-worker", type=float, default=0, help="ray: GPUs per actor (default: 0)")
    g.add_argument("--cpus-per-worker", type=float, default=1,
                   help="ray: CPUs each actor reserves, and the torch threads it runs (default: %(default)s)")


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    from .images import MAX_PIXELS

    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="most pixels of one image, read from its header before decoding (larger ones are listed as "
                        "unreadable); decoding holds at most workers x 4 bytes x this (default: %(default)s)")


def _ray_job(args: argparse.Namespace) -> dict:
    from .distributed import connect

    connect(args.address)  # before any model is loaded: says how to install Ray when it is missing, and
    # a new local instance's workers import torch and transformers while the driver loads its model
    return {"address": args.address, "workers": 2 if args.workers is None else args.workers,
            "num_gpus_per_worker": args.num_gpus_per_worker, "cpus_per_worker": args.cpus_per_worker,
            "batch_size": args.batch_size,
            "part_size": args.part_size, "max_pixels": args.max_pixels}


# -- train -----------------------------------------------------------------------------------

def _train_flags(p: argparse.ArgumentParser) -> None:
    from .training.train import PRESETS, TrainConfig

    p.add_argument("--descriptions", default="cupl:imagenet",
                   help="description JSON file, or a public set name such as cupl:imagenet (default: %(default)s)")
    p.add_argument("--classes", default=None, help="train on these classes only: a file (one per line, or a JSON "
                                                   "list) or a,b,c")
    p.add_argument("--preset", default="cross-dataset", choices=sorted(PRESETS), help="the paper's settings (docs/training.md) (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: prompts/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the prompts to this Hub repo")
    _add_backbone(p)
    _add_context(p)
    g = p.add_argument_group("training settings (override the preset and --config)")
    g.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings, applied over the preset")
    add_flags(g, TrainConfig, defaults_unset=True)


def _train(args: argparse.Namespace) -> None:
    from .backbone import DEFAULT_BACKBONE
    from .cache import to_json
    from .descriptions import load_descriptions, read_class_list
    from .sources import resolve
    from .training.train import TrainConfig, make_config, train

    ctx = _context(args)
    cfg = make_config(args.preset, args.config, values(TrainConfig, args))
    _writable(args.out or Path("prompts") / args.preset, "--out", folder=True)
    path = resolve(args.descriptions, ctx, "cupl:")
    data = load_descriptions(path, read_class_list(args.classes) if args.classes else None)
    out = args.out or Path("prompts") / args.preset
    print(f"protext train: {len(data)} classes, {sum(map(len, data.values()))} descriptions from {path}", file=sys.stderr)
    print(f"loading backbone {args.backbone or DEFAULT_BACKBONE} ...", file=sys.stderr)
    model, summary = train(_backbone(args), data, cfg, out, ctx, resume=args.resume, source=args.descriptions)
    if args.push_to_hub:
        summary["hub_url"] = model.push_to_hub(args.push_to_hub)
    print(to_json(summary))
    print(f"saved {summary['trainable_parameters']} prompt values to {out}/ "
          f"(load with ProText.from_pretrained('{out}'))", file=sys.stderr)


# -- eval-text -------------------------------------------------------------------------------

def _eval_text_flags(p: argparse.ArgumentParser) -> None:
    from .classifier import ClassifierOptions
    from .training.text_eval import TextCheckSettings

    p.add_argument("--descriptions", nargs="+", required=True, help="description files or set names to test on")
    add_flags(p, TextCheckSettings)
    p.add_argument("--out", type=Path, default=Path("eval-text"),
                   help="folder for eval_text.json, .csv, .md and the trained prompts (default: %(default)s)")
    g = p.add_argument_group("baseline heads (every head the inputs allow runs)")
    g.add_argument("--descriptors", nargs="+", default=[],
                   help="DCLIP descriptor files or sets (dclip:NAME) for the dclip head, each used for the description "
                        "sets of its dataset (known from the name, e.g. descriptors_dtd.json or dtd.json)")
    add_flags(g, ClassifierOptions, only=["waffle_count", "waffle_seed", "waffle_concept"])
    _add_backbone(p)
    _add_context(p)
    _add_training_overrides(p)


def _eval_text(args: argparse.Namespace) -> None:
    from .heads import Waffle
    from .training.text_eval import TextCheckSettings, load_sets, run
    from .training.train import parse_assignments

    ctx = _context(args)
    settings = from_flags(TextCheckSettings, args)
    sets = load_sets(args.descriptions, settings.protocol, ctx)
    _, markdown = run(_backbone(args), sets, args.out, settings, args.descriptors,
                      Waffle(args.waffle_count, args.waffle_seed, args.waffle_concept), args.config,
                      parse_assignments(args.set), ctx)
    print(markdown)


# -- describe and descriptions ---------------------------------------------------------------

def _describe_flags(p: argparse.ArgumentParser) -> None:
    from .training.describe import QUESTIONS

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
    g = p.add_argument_group("beyond CuPL's questions")
    g.add_argument("--meta-prompt", default=None, metavar="TASK",
                   help="MPVR: a one-line description of the images (e.g. 'satellite photos of land use'); the LLM "
                        "first writes the questions for it (kept in <output>.templates.json), then answers them")
    g.add_argument("--templates", type=int, default=30, help="--meta-prompt: questions to ask for (default: %(default)s)")
    g.add_argument("--differential", action="store_true",
                   help="FuDD: ask, for each pair of classes the backbone's text features find confusable, how they "
                        "differ; writes {class: {other: [captions]}} for the fudd head")
    g.add_argument("--neighbours", type=int, default=3,
                   help="--differential: each class is paired with this many nearest classes (default: %(default)s)")
    g.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="--differential: find the confusable classes by a first pass over these images (files, "
                        "folders, lists) instead: every pair within an image's --neighbours + 1 likeliest classes")
    g.add_argument("--backbone", default=None, help="--differential: the model whose text features find the "
                                                    "confusable classes (default: openai/clip-vit-base-patch16)")
    add_flags(p, Context, only=["cache_dir", "progress"])


def _describe(args: argparse.Namespace) -> None:
    from .cache import to_json
    from .descriptions import read_class_list
    from .training.describe import LocalGenerator, Usage, chat_client, describe

    if args.samples < 1 or args.concurrency < 1:
        raise ProtextError("--samples and --concurrency must be at least 1")
    _writable(args.output, "--output")
    usage = Usage()

    def generator(max_tokens: int):
        if args.local_model:
            return LocalGenerator(args.local_model, max_tokens, usage)
        return chat_client(args.base_url, args.model, args.api_key, temperature=args.temperature, max_tokens=max_tokens,
                           timeout=args.timeout, max_retries=args.max_retries, usage=usage)

    # a list of differences or of questions is longer than one description
    generate = generator(max(args.max_tokens, 300) if args.differential else args.max_tokens)
    ctx, classes = _context(args), read_class_list(args.classes)
    if args.differential:
        from .backbone import DEFAULT_BACKBONE, load_backbone
        from .feature_cache import encode_texts
        from .fudd import first_pass_text
        from .training.describe import confusable_pairs, describe_differential

        backbone = load_backbone(args.backbone or DEFAULT_BACKBONE, progress=args.progress)
        first = encode_texts(backbone, [first_pass_text(c) for c in classes], ctx)
        if args.images:
            from .classifier import ProTextClassifier
            from .inputs import collect
            from .training.describe import pairs_in_top

            sample, _, unreadable = ProTextClassifier.from_weights(backbone, classes, first).image_features(
                collect(args.images))
            for name, reason in unreadable:
                print(f"warning: {name}: {reason} (left out of the first pass)", file=sys.stderr)
            if not len(sample):
                raise ProtextError("--images: no readable image to find the confusable classes with")
            pairs = pairs_in_top(sample @ first.T, classes, args.neighbours + 1)
        else:
            pairs = confusable_pairs(first, classes, args.neighbours)
        report = describe_differential(pairs, args.output, generate, args.concurrency, args.max_chars, ctx)
        report["usage"] = usage.as_dict()
        print(to_json(report))
        if report["failed"]:
            raise ProtextError(f"{len(report['failed'])} pairs got no differences (left out of {args.output}); rerun "
                               f"the same command to ask for them")
        return
    questions = None
    if args.meta_prompt:
        from .training.describe import meta_templates

        questions = meta_templates(args.meta_prompt, generator(max(args.max_tokens, 40 * args.templates)),
                                   args.output.with_name(args.output.stem + ".templates.json"), args.templates)
    report = describe(classes, args.dataset_kind, args.output, generate, samples=args.samples,
                      concurrency=args.concurrency, max_chars=args.max_chars, ctx=ctx, questions=questions)
    report["usage"] = usage.as_dict()
    if questions is not None:
        report["templates"] = len(questions)
    print(to_json(report))
    if report["failed"]:
        raise ProtextError(f"{len(report['failed'])} classes got no descriptions (kept out of {args.output}; answers "
                           f"already received are kept beside it); rerun the same command to ask for the rest")


def _descriptions_flags(p: argparse.ArgumentParser) -> None:
    from .formats import FORMATS

    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download a public description set into the cache", allow_abbrev=False)
    f.add_argument("name", help="set name, e.g. cupl:imagenet (see 'protext descriptions list')")
    f.add_argument("--output", type=Path, default=None, help="also copy it to this file")
    add_flags(f, Context, only=["cache_dir"])
    f.set_defaults(run=_fetch)
    ls = dsub.add_parser("list", help="list the public description sets", allow_abbrev=False)
    ls.set_defaults(run=_list)
    i = dsub.add_parser("import", help="convert DCLIP descriptors or a folder of .txt files to protext JSON",
                        allow_abbrev=False)
    i.add_argument("source", help="file or folder to read")
    i.add_argument("--format", choices=FORMATS, required=True)
    i.add_argument("--output", type=Path, required=True, help="protext description JSON file to write")
    i.set_defaults(run=_import)
    s = dsub.add_parser("stats", help="classes, sentences per class, duplicates, lengths, coverage", allow_abbrev=False)
    s.add_argument("file")
    s.add_argument("--classes", default=None, help="label set to check coverage of: a file or a,b,c")
    s.set_defaults(run=_stats)


def _list(args: argparse.Namespace) -> None:
    from .sources import SOURCES

    for name, url in SOURCES.items():
        print(f"{name}\t{url}")


def _fetch(args: argparse.Namespace) -> None:
    from .cache import atomic_write_bytes
    from .sources import fetch

    path = fetch(args.name, Context(cache_dir=args.cache_dir))
    if args.output:
        atomic_write_bytes(args.output, path.read_bytes())
        path = args.output
    print(path)


def _import(args: argparse.Namespace) -> None:
    from .cache import atomic_write_json
    from .formats import import_descriptions

    data = import_descriptions(args.source, args.format)
    atomic_write_json(args.output, data)
    print(f"{args.output}: {len(data)} classes, {sum(map(len, data.values()))} sentences")


def _stats(args: argparse.Namespace) -> None:
    from .cache import to_json
    from .descriptions import load_descriptions, read_class_list, stats

    print(to_json(stats(load_descriptions(args.file), read_class_list(args.classes) if args.classes else None)))


# -- predict and eval ------------------------------------------------------------------------

def _add_activation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activation", choices=["softmax", "sigmoid"], default="softmax",
                   help="softmax: probabilities over the label set, summing to 1; sigmoid: each label's own "
                        "probability with the model's learned bias, as SigLIP was trained (SigLIP backbones only). "
                        "The top label is the same (default: %(default)s)")


def _predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", required=True, help=CLASSES_HELP)
    p.add_argument("--top-k", type=int, default=3, help="labels printed per image (default: %(default)s)")
    p.add_argument("--explain", type=int, nargs="?", const=3, default=0, metavar="K",
                   help="also print the K (default 3) descriptions that weighed most for each label (heads built "
                        "from texts: cupl, dclip, awt, fudd, clip80, waffle)")
    _add_activation(p)
    _add_max_pixels(p)
    _add_classifier(p)
    _add_context(p)


def _predict(args: argparse.Namespace) -> None:
    from .cache import to_json
    from .descriptions import read_class_list

    if args.top_k < 1:
        raise ProtextError(f"--top-k must be at least 1, got {args.top_k}")
    if args.explain < 0:
        raise ProtextError(f"--explain must be at least 1, got {args.explain}")
    clf = _classifier(args, read_class_list(args.classes))
    if args.explain:
        clf.check_explains()  # before any image is read
    pred = clf.predict(args.images, activation=args.activation, max_pixels=args.max_pixels, explain=args.explain)
    for i, (name, top) in enumerate(zip(pred.inputs, pred.top(args.top_k))):
        line = {"image": name, "label": top[0][0], "top": [[c, round(p, 4)] for c, p in top], "head": clf.head,
                "activation": pred.activation}
        if pred.explanations is not None:
            line["explain"] = [[t, v] for t, v in pred.explanations[i]]
        print(to_json(line, indent=None))
    for name, reason in pred.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if not pred.inputs:
        raise ProtextError(f"none of the {len(pred.skipped)} images could be read (see 'skipped' above)")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    from .training.datasets import DATASETS

    p.add_argument("--dataset", required=True, help=f"folder, csv, hf:OWNER/NAME[:SPLIT] or hf:FOLDER (a Hugging Face "
                                                    f"dataset, a save_to_disk folder or an image folder), or one of: "
                                                    f"{', '.join(DATASETS)} (its loader, and its templates for the "
                                                    f"clip and protext heads)")
    p.add_argument("--data-root", type=Path, default=None, help="CoOp data root, image folder, or CSV file (not for "
                                                                 "hf: datasets)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split (an hf: dataset's own ':SPLIT' wins; its default: test, else validation, else train)")
    p.add_argument("--subset", default="all", choices=["all", "base", "novel"], help="CoOp base/novel half")
    p.add_argument("--heads", default=None, help="comma-separated heads, or 'all' for every head the given data allows "
                                                 "(default: clip, plus cupl/protext when possible)")
    p.add_argument("--output", type=Path, default=None, help="also write the result row to this JSON file")
    _add_max_pixels(p)
    _add_classifier(p, skip=("head", "dataset"))
    _add_context(p)


def _eval(args: argparse.Namespace) -> None:
    from .cache import atomic_write_json, to_json
    from .classifier import load_inputs
    from .heads import Heads, choose_heads
    from .training.datasets import base_novel, load_dataset
    from .training.evaluate import evaluate

    ctx = _context(args)
    _writable(args.output, "--output")
    if args.data_root is None and not args.dataset.startswith("hf:"):
        raise ProtextError(f"--data-root is needed for --dataset {args.dataset} (the folder or file it is read from)")
    dataset = base_novel(load_dataset(args.dataset, args.data_root or ".", args.split), args.subset)
    backbone, inputs = load_inputs(_options(args, dataset=dataset.name), ctx)
    heads = Heads(backbone, inputs, ctx)
    row = evaluate(backbone, dataset, heads, choose_heads(args.heads, inputs), ctx, args.max_pixels)
    for note in heads.fallback_notes():
        print(note, file=sys.stderr)
    if args.output:
        atomic_write_json(args.output, row)
    print(to_json({k: v for k, v in row.items() if k != "skipped_files"}))
    for name, reason in row["skipped_files"]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    if row["images"] == 0:
        raise ProtextError(f"none of the {row['skipped']} images of {dataset.name} could be read (see 'skipped' above)")


# -- benchmark -------------------------------------------------------------------------------

def _benchmark_flags(p: argparse.ArgumentParser) -> None:
    from .training.benchmark import PROTOCOL_PRESET, BenchmarkSettings

    p.add_argument("protocol", choices=list(PROTOCOL_PRESET), help="the protocol; each trains with the paper's "
                                                                   "preset for it")
    p.add_argument("--data-root", type=Path, required=True, help="CoOp data root holding the dataset folders")
    p.add_argument("--prompts", default=None, help="cross-dataset / domain-generalization: ImageNet prompts "
                                                   "(default: train them with the matching preset into --out)")
    add_flags(p, BenchmarkSettings)
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: %(default)s)")
    _add_backbone(p)
    _add_context(p)
    _add_training_overrides(p)


def _benchmark(args: argparse.Namespace) -> None:
    from .classifier import ClassifierOptions, load_backbone_of
    from .training import benchmark as bm
    from .training.train import parse_assignments

    ctx = _context(args)
    backbone, prompts = load_backbone_of(ClassifierOptions(prompts=args.prompts, backbone=args.backbone,
                                                           revision=args.revision), ctx)
    result, files = bm.run(args.protocol, backbone, args.data_root, args.out, prompts,
                           from_flags(bm.BenchmarkSettings, args), args.config, parse_assignments(args.set), ctx)
    print(bm.markdown(result))
    print("wrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    if not any(r["source"] == "measured" for r in result["rows"]):
        raise ProtextError("no dataset could be evaluated; see 'Not run' above for what was expected where")


# -- serve -----------------------------------------------------------------------------------

def _serve_flags(p: argparse.ArgumentParser) -> None:
    from .serve import Limits

    p.add_argument("--classes", nargs="+", default=[], metavar="[NAME=]FILE|a,b,c",
                   help="label sets loaded at start, each a file (named after it) or NAME=FILE or NAME=a,b,c; the "
                        "first is the default of requests that send no labels")
    _add_classifier(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    g = p.add_argument_group("access")
    g.add_argument("--api-key", default=None,
                   help="require this key on /v1/ and /metrics ('Authorization: Bearer KEY' or 'X-API-Key: KEY'; the "
                        "page asks for it) (default: $PROTEXT_API_KEY, else no key)")
    g.add_argument("--allowed-hosts", default=None, metavar="NAME,NAME",
                   help="host names requests may address this server by, e.g. classify.example.com (default: "
                        "127.0.0.1, localhost and ::1 when listening on loopback, else any); other names get 421, "
                        "so a DNS-rebinding page cannot reach the server")
    add_flags(p.add_argument_group("limits (a request over one gets a 4xx or 503 JSON error)"), Limits)
    _add_context(p)


def _serve(args: argparse.Namespace) -> None:
    import os

    from .classifier import load_inputs
    from .serve import Limits, Service, load_label_sets

    limits = from_flags(Limits, args)
    label_sets = load_label_sets(args.classes)
    from .api import Access, run  # after the arguments are checked: says how to install fastapi when it is missing

    key = args.api_key or os.environ.get("PROTEXT_API_KEY") or None
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) if args.allowed_hosts else None
    access = Access(key, hosts)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: other machines can reach this server"
              + ("" if key else "; anyone who can reach it can use it (give --api-key)"), file=sys.stderr)
    ctx = _context(args)
    backbone, inputs = load_inputs(_options(args), ctx)
    service = Service(backbone, inputs, label_sets, args.head, limits, ctx)
    print(f"protext serve: {backbone.name}, head {service.head}, label sets: {', '.join(label_sets) or 'none'}; "
          f"page at http://{args.host}:{args.port}/", file=sys.stderr)
    run(service, args.host, args.port, access)


# -- label, features, export -----------------------------------------------------------------

def _label_flags(p: argparse.ArgumentParser) -> None:
    from .label import FORMATS

    p.add_argument("paths", nargs="*", metavar="PATH", help=PATHS_HELP)
    p.add_argument("--features", type=Path, default=None, metavar="DIR",
                   help="label the image features stored in this folder by 'protext features' instead of images "
                        "(no image is read; the backbone must be the one that made them)")
    p.add_argument("--classes", default=None, help=CLASSES_HELP + " (default, with --dataset hf:...: the dataset's "
                                                                  "class names)")
    where = p.add_argument_group("where the labels go (one of)")
    where.add_argument("--output", type=Path, default=None,
                       help=f"one file, its format from its suffix: {', '.join(FORMATS)}; finished parts are kept in "
                            f"<output>.parts/ and streamed into it at the end")
    where.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="a folder of parts that reads as one table (pandas.read_parquet(DIR), DuckDB, Spark), "
                            "written as they finish (on Ray, by the workers), with _settings.json and _summary.json "
                            "as in 'protext features'")
    where.add_argument("--part-format", choices=["parquet", "jsonl"], default="parquet",
                       help="--out: the parts' format (default: %(default)s)")
    p.add_argument("--save-features", type=Path, default=None, metavar="DIR",
                   help="also keep the image features, from the same forward pass, in this folder (the parts of "
                        "'protext features', resumable alike)")
    p.add_argument("--top-k", type=int, default=3, help="labels and probabilities per image (default: %(default)s)")
    p.add_argument("--min-prob", type=float, default=None,
                   help="below this top probability the label is 'unknown' (the top-k columns keep the real labels)")
    p.add_argument("--transductive", action="store_true",
                   help="refine the head's predictions over the whole collection with TransCLIP's procedure (the "
                        "images' features first go to <output>.features/, resumable; or give --features DIR); rows "
                        "say transductive: true")
    _add_activation(p)
    _add_job(p, 512, "classify")
    _add_classifier(p)
    _add_context(p)


def _label(args: argparse.Namespace) -> None:
    from .descriptions import read_class_list
    from .label import label, label_features, output_format

    if (args.output is None) == (args.out is None):
        raise ProtextError("give where the labels go: --output FILE (one file) or --out DIR (a folder of parts)")
    if args.output is not None:
        output_format(args.output)
        _writable(args.output, "--output")
    else:
        if args.transductive or args.features is not None:
            raise ProtextError("--out DIR writes parts of a job over images; with --features or --transductive give "
                               "--output FILE")
        _writable(args.out, "--out", folder=True)
    if args.save_features is not None:
        if args.transductive or args.features is not None:
            raise ProtextError("--save-features keeps the features of images being labelled; with --features or "
                               "--transductive they are there already")
        _writable(args.save_features, "--save-features", folder=True)
    destination = {"out": args.out, "part_format": "." + args.part_format, "save_features": args.save_features}
    hub = _hub_inputs(args)
    if args.classes is None and (hub is None or hub.classes is None):
        raise ProtextError("give the label set: --classes FILE or a,b,c")
    classes = read_class_list(args.classes) if args.classes else hub.classes
    ctx = _context(args)
    common = {"top_k": args.top_k, "min_prob": args.min_prob, "activation": args.activation, "ctx": ctx}
    if args.transductive:
        _label_transductive(args, classes, hub, ctx)
        return
    if args.features is not None:
        if args.paths or args.engine != "local":
            raise ProtextError("--features labels stored features: give no image PATHs and no --engine ray")
        from .feature_folder import open_features

        stored = open_features(args.features)
        if args.backbone is None:
            args.backbone, args.revision = stored.info["backbone"], stored.info["revision"]
        report = label_features(_classifier(args, classes), args.features, args.output, **common)
    elif hub is not None:
        report = label(_classifier(args, classes), [hub.image(i) for i in range(len(hub))], args.output, **common,
                       batch_size=args.batch_size, workers=args.workers, part_size=args.part_size,
                       max_pixels=args.max_pixels, **destination)
    elif not args.paths:
        raise ProtextError("give the images to label (PATH ...), --dataset hf:..., or --features DIR")
    elif args.engine == "ray":
        from .distributed import label_on_ray

        job = _ray_job(args)
        parts = Path(args.out) if args.out else Path(args.output).with_name(Path(args.output).name + ".parts")
        with _ray_inputs(args, parts) as inputs:
            report = label_on_ray(_classifier(args, classes), inputs, args.output, **common, **job, **destination)
    else:
        inputs = _inputs(args.paths, args.part_size)
        report = label(_classifier(args, classes), inputs, args.output, **common,
                       batch_size=args.batch_size, workers=args.workers, part_size=args.part_size,
                       max_pixels=args.max_pixels, **destination)
    _print_report(report)


def _label_transductive(args: argparse.Namespace, classes: list[str], hub, ctx: Context) -> None:
    """`label --transductive`: features of every image first (kept in <output>.features/ until the end,
    so a killed run resumes there), then the refinement over them all."""
    import shutil

    from .feature_folder import open_features, write_features
    from .label import label_transductive

    if args.activation != "softmax":
        raise ProtextError("--transductive gives soft labels over the label set: use --activation softmax")
    if args.engine != "local":
        raise ProtextError("--transductive runs on one machine: make the features with 'protext features ... "
                           "--engine ray', then run 'protext label --features DIR --transductive'")
    made = None
    if args.features is not None:
        if args.paths:
            raise ProtextError("--features labels stored features: give no image PATHs")
        stored = open_features(args.features)
        if args.backbone is None:
            args.backbone, args.revision = stored.info["backbone"], stored.info["revision"]
        folder, clf = args.features, _classifier(args, classes)
    else:
        if hub is None and not args.paths:
            raise ProtextError("give the images to label (PATH ...), --dataset hf:..., or --features DIR")
        clf = _classifier(args, classes)
        items = [hub.image(i) for i in range(len(hub))] if hub is not None else _inputs(args.paths, args.part_size)
        made = folder = args.output.with_name(args.output.name + ".features")
        write_features(clf.backbone, items, folder, batch_size=args.batch_size, workers=args.workers,
                       part_size=args.part_size, ctx=ctx, max_pixels=args.max_pixels)
    report = label_transductive(clf, folder, args.output, top_k=args.top_k, min_prob=args.min_prob, ctx=ctx)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    _print_report(report)


def _hub_inputs(args: argparse.Namespace):
    """The Hugging Face dataset `--dataset hf:...` names as the images to read (then no PATHs), or None;
    `--dataset` becomes its short name, which picks the templates."""
    from .hub_datasets import is_hub_dataset, open_dataset

    if not is_hub_dataset(getattr(args, "dataset", None)):
        return None
    if args.paths or getattr(args, "features", None) is not None or args.engine != "local":
        raise ProtextError(f"--dataset {args.dataset} gives the images: give no PATHs, no --features and no "
                           f"--engine ray")
    hub = open_dataset(args.dataset)
    args.dataset = hub.name
    return hub


def _features_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help=PATHS_HELP)
    p.add_argument("--dataset", default=None, metavar="hf:OWNER/NAME[:SPLIT]",
                   help="read the images from this Hugging Face dataset (or save_to_disk / image folder) instead "
                        "of PATHs")
    p.add_argument("--out", required=True, help="local folder to write the parts into")
    _add_job(p, 1024, "run the image tower")
    _add_backbone(p, with_prompts=False, precision=True)
    _add_context(p)


def _features(args: argparse.Namespace) -> None:
    from .feature_folder import pyarrow_modules, write_features

    pyarrow_modules()
    if "://" in args.out:
        raise ProtextError(f"--out {args.out}: write the features to a local folder (or a mounted one), then copy them")
    _writable(args.out, "--out", folder=True)
    ctx = _context(args)
    hub = _hub_inputs(args)
    if hub is None and not args.paths:
        raise ProtextError("give the images (PATH ...) or --dataset hf:...")
    if args.engine == "ray":
        from .distributed import features_on_ray

        job = _ray_job(args)
        listed = _ray_inputs(args, Path(args.out)) if hub is None else contextlib.nullcontext(
            [hub.image(i) for i in range(len(hub))])
        with listed as paths:
            report = features_on_ray(_backbone(args, args.precision), paths, args.out, ctx=ctx, **job)
    else:
        paths = [hub.image(i) for i in range(len(hub))] if hub is not None else _inputs(args.paths, args.part_size)
        report = write_features(_backbone(args, args.precision), paths, args.out, args.batch_size, args.workers, args.part_size, ctx,
                                args.max_pixels)
    _print_report(report)


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", required=True, help=CLASSES_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    p.add_argument("--onnx", action="store_true", help="also write classifier.onnx: the image tower and the head, "
                                                       "from preprocessed pixels to logits")
    p.add_argument("--check-images", nargs="+", type=Path, default=[], metavar="PATH",
                   help="--onnx: images or folders to check the ONNX model on (default: seeded random images)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="--onnx: largest difference of logits allowed between ONNX and PyTorch (default: %(default)s)")
    p.add_argument("--int8", action="store_true",
                   help="--onnx: quantize the model's matrix products to int8 (onnxruntime's dynamic quantization; "
                        "a quarter of the size, faster on CPUs); checked against fp32 PyTorch by the cosine of each "
                        "image's logits (at least 0.99) instead of --tolerance")
    _add_classifier(p, skip=("precision",))  # the ONNX model is made from the fp32 tower; --int8 quantizes it
    _add_context(p)


def _export(args: argparse.Namespace) -> None:
    from .cache import to_json
    from .descriptions import read_class_list
    from .export import JSON_FILE, export

    if args.out.exists() and not args.out.is_dir():
        raise ProtextError(f"--out {args.out} is a file; --out names the folder the export is written into")
    _writable(args.out, "--out", folder=True)
    if args.int8 and not args.onnx:
        raise ProtextError("--int8 quantizes the ONNX model: give --onnx too")
    meta = export(_classifier(args, read_class_list(args.classes)), args.out, args.onnx, args.check_images,
                  args.tolerance, int8=args.int8)
    check = meta.get("onnx", {}).get("check")
    print(to_json({"out": str(args.out), "files": sorted(meta["files"]) + [JSON_FILE], "labels": len(meta["labels"]),
                   "head": meta["head"], "onnx_check": check}))


def _completion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash"], help="the shell to complete in")


def _completion(args: argparse.Namespace) -> None:
    """A bash completion script made from the parser: commands, then each command's flags."""
    parser = build_parser("*")
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sub in action.choices.items():
        flags = sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--"))
        cases.append(f"    {name}) words=\"{' '.join(flags)}\" ;;")
    print("\n".join([
        "# protext completion: eval \"$(protext completion bash)\" (in ~/.bashrc to keep it)",
        "_protext() {",
        "  local cur=${COMP_WORDS[COMP_CWORD]} words",
        "  if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f"    COMPREPLY=($(compgen -W \"{' '.join(action.choices)} --help --version\" -- \"$cur\")); return",
        "  fi",
        "  case ${COMP_WORDS[1]} in", *cases, "    *) words=\"\" ;;", "  esac",
        "  if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W \"$words\" -- \"$cur\")); "
        "else COMPREPLY=($(compgen -f -- \"$cur\")); fi",
        "}",
        "complete -F _protext protext",
    ]))


# -- the command -----------------------------------------------------------------------------

# name: (one-line help, longer description, flags, run, what Ctrl-C leaves behind)
COMMANDS: dict[str, tuple[str, str, Callable, Callable, str]] = {
    "train": ("learn prompts from class descriptions", "Learn ProText prompts from LLM class descriptions (no images).",
              _train_flags, _train, "finished epochs are kept in the checkpoint: rerun with --resume to continue"),
    "eval-text": ("check prompts without images, on held-out masked descriptions",
                  "Image-free check: classify held-out descriptions whose class name is masked, with every head the "
                  "inputs allow (template, ProText prompts, description ensembles, ...).",
                  _eval_text_flags, _eval_text, CACHED_HINT),
    "describe": ("generate class descriptions with an LLM",
                 "Ask an LLM to describe each class (CuPL-style). Each finished class is saved at once; answers "
                 "received for classes that did not finish are kept in <output>.partial.json, so rerunning asks only "
                 "for the answers still missing. A refused API key (HTTP 401/403) stops the run at once.",
                 _describe_flags, _describe,
                 "finished classes and received answers are kept: rerun the same command to ask only for the rest"),
    "predict": ("classify a few images", "Classify image files with any head; one JSON line per image.",
                _predict_flags, _predict, "interrupted"),
    "eval": ("accuracy of heads on one image dataset",
             "Top-1 accuracy of zero-shot heads on one dataset (CoOp layout, image folder or CSV).",
             _eval_flags, _eval, CACHED_HINT),
    "benchmark": ("one of the paper's four protocols, as a table",
                  "Run one of the paper's protocols; writes <protocol>.json, .csv, .md and .png to --out.",
                  _benchmark_flags, _benchmark, CACHED_HINT),
    "descriptions": ("fetch, import and inspect description files", "Fetch, import and inspect description files.",
                     _descriptions_flags, None, "interrupted"),
    "serve": ("a JSON API and a web page classifying uploaded images",
              "Serve a classifier over HTTP: POST /v1/classify (multipart images, labels or a label set name, head, "
              "top_k), GET /v1/label-sets, GET /healthz, the OpenAPI schema at /openapi.json and a web page at /. "
              "Concurrent requests are batched into one forward pass; class embeddings are computed once per (label "
              "set, head). Bad requests get a 4xx JSON error.", _serve_flags, _serve, "stopped"),
    "label": ("label many images into a JSONL, CSV or Parquet file",
              "Label every image of folders (recursive), files and CSV lists of paths. Decoding runs in threads "
              "beside the model; rows are saved in parts, so a rerun of the same command after an interruption "
              "labels only the images not yet written. Unreadable files are rows with an error, listed at the end, "
              "never fatal.", _label_flags, _label, RESUME_HINT),
    "features": ("compute the image features of many images into a folder of Parquet parts",
                 "Run the image tower once over folders (recursive), files, CSV lists of paths and URIs, into --out: "
                 "part-NNNNNN.parquet files (path, feature, error; one per --part-size images, in input order) and "
                 "_summary.json when finished. A rerun of the same command after an interruption computes only the "
                 "missing parts. Label them later with 'protext label --features DIR', with any label set.",
                 _features_flags, _features, RESUME_HINT),
    "export": ("write a classifier as plain files (safetensors + JSON, optionally ONNX)",
               "Write the classifier as files usable without protext: classifier.safetensors (class embeddings, logit "
               "scale), classifier.json (backbone, head, templates, label order, preprocessing) and, with --onnx, "
               "classifier.onnx (pixels to logits), checked against PyTorch with onnxruntime before it is written.",
               _export_flags, _export, "interrupted"),
    "completion": ("print a shell completion script", "Print a bash completion script: eval \"$(protext completion "
                   "bash)\".", _completion_flags, _completion, "interrupted"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser; the flags of `command` only ("*": of every command; None: none, for `protext --help`)."""
    parser = argparse.ArgumentParser(prog="protext", allow_abbrev=False,
                                     description="Learn CLIP text prompts from class descriptions alone (ProText), "
                                                 "and use them as zero-shot classifiers.")
    parser.add_argument("--version", action="version", version=f"protext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (short, description, flags, run, hint) in COMMANDS.items():
        p = sub.add_parser(name, help=short, description=description, allow_abbrev=False)
        if command in ("*", name):
            flags(p)
        p.set_defaults(interrupted=hint, **({"run": run} if run else {}))
    return parser


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, without the source line Python prints by default."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    with warnings.catch_warnings():  # restored on return: main() may run inside another program
        warnings.simplefilter("default")
        warnings.showwarning = _warn
        return _main(sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        args.run(args)
    except ProtextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.interrupted}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
