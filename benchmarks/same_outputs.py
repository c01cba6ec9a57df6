"""Do `label`, `features`, `predict`, `eval`, `eval-text`, `benchmark`, `train` and `export` give the
same outputs as another commit of protext? Run before merging any change meant to keep behaviour.

Both versions run the same jobs as a user runs them (`python -m protext ...`, each version in its
own process, its own cache folder and its own output folder) on a tiny random CLIP saved to a
folder and on the shared data: real ImageNet and CIFAR-10 JPEGs (plus one corrupt file), CuPL
descriptions, DCLIP descriptors and CoOp split files. Then every output is read back and compared:
labels, paths and errors exactly, probabilities and features within `--atol`, report numbers
within `--atol` (accuracies are percentages of a few hundred queries or images).

Where a command's words changed between the two versions (a renamed flag or key), the job
states both spellings; the report formats of both versions are read into the same flat rows.

    python benchmarks/same_outputs.py --ref 4c60aa0 [--keep DIR] [--atol 2e-6]

The other version is checked out with `git worktree` into a temporary folder and run from its
`src/` (the installed packages are shared); the last line says whether everything matched.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CUPL = SHARED / "descriptions" / "cupl"
DCLIP = SHARED / "descriptions" / "dclip"
CIFAR = SHARED / "images" / "cifar10_test_sample"
IMAGENET = SHARED / "images" / "imagenet_sample"
CIFAR_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def has(src: Path, text: str, module: str) -> bool:
    """Whether the version at `src` has `text` in `module` (to pick the words it understands)."""
    path = src / "protext" / module
    return any(text in p.read_text() for p in ([path] if path.suffix else path.rglob("*.py")) if p.is_file())


def jobs(src: Path, work: Path, out: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every job, in the words of the version at `src`."""
    tiny, data = str(work / "tiny"), work / "data"
    new = has(src, "activation", "classifier.py") or has(src, "activation", "heads.py")
    act = (lambda kind: ["--activation", kind]) if new else (lambda kind: ["--scores", kind])
    part = "--part-size" if has(src, "part-size", "cli.py") else "--chunk"
    images = [str(IMAGENET), str(work / "broken.jpg")]
    common = ["--backbone", tiny, "--cache-dir", str(out / "cache")]
    prompts = ["--prompts", str(out / "prompts")]
    train_args = ["--depth", "2", "--epochs", "2", "--warmup-epochs", "1"]
    settings = ["--set", "depth=2", "--set", "epochs=2", "--set", "warmup_epochs=1"]
    label = ["label", *images, "--classes", CIFAR_CLASSES, "--no-progress", "--batch-size", "8", part, "24"]
    run = [
        ("train", ["train", "--descriptions", str(CUPL / "cifar10_prompts_full.json"), *train_args,
                   "--out", str(out / "prompts"), "--no-progress", *common]),
        ("predict", ["predict", *prompts, "--classes", CIFAR_CLASSES, "--top-k", "3", *common,
                     *sorted(str(p) for p in (CIFAR / "cat").iterdir()), str(work / "broken.jpg")]),
        ("predict_cupl", ["predict", "--head", "cupl", "--descriptions", str(CUPL / "cifar10_prompts_full.json"),
                          "--classes", CIFAR_CLASSES, *common, *sorted(str(p) for p in (CIFAR / "dog").iterdir())]),
        ("label_jsonl", [*label, *prompts, *common, "--output", str(out / "labels.jsonl"), "--min-prob", "0.3"]),
        ("label_csv", [*label, *prompts, *common, "--output", str(out / "labels.csv"), "--head", "protext+clip80"]),
        ("label_parquet", [*label, *common, "--output", str(out / "labels.parquet"), "--head", "cupl",
                           "--descriptions", str(CUPL / "cifar10_prompts_full.json"), "--top-k", "2"]),
        ("features", ["features", *images, "--out", str(out / "feats"), "--no-progress", "--batch-size", "8",
                      part, "32", *common]),
        ("label_features", ["label", "--features", str(out / "feats"), "--classes", CIFAR_CLASSES, *prompts,
                            "--cache-dir", str(out / "cache"), "--output", str(out / "labels_features.jsonl"),
                            "--no-progress"]),
        ("eval", ["eval", "--dataset", "folder", "--data-root", str(CIFAR), *prompts, "--heads", "all",
                  "--descriptions", str(CUPL / "cifar10_prompts_full.json"), "--output", str(out / "eval.json"),
                  "--no-progress", *common]),
        ("eval_waffle", ["eval", "--dataset", "folder", "--data-root", str(CIFAR), "--heads", "waffle,clip80+clip",
                         "--waffle-seed", "3", "--output", str(out / "eval_waffle.json"), "--no-progress", *common]),
        ("eval_text", ["eval-text", "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                       str(CUPL / "texture_prompts_full.json"), "--source", str(CUPL / "cifar10_prompts_full.json"),
                       "--descriptors", str(DCLIP / "descriptors_dtd.json"), *settings, "--out",
                       str(out / "eval-text"), "--no-progress", *common]),
        ("benchmark_text_only", ["benchmark", "text-only", "--data-root", str(data), "--descriptions-dir",
                                 str(work / "descs"), "--descriptors-dir", str(work / "descriptors"),
                                 "--datasets", "eurosat,dtd", "--waffle-seeds", "2", *settings,
                                 "--out", str(out / "bench"), "--no-progress", *common]),
        ("benchmark_base2novel", ["benchmark", "base2novel", "--data-root", str(data), "--descriptions-dir",
                                  str(work / "descs"), "--datasets", "eurosat,dtd", *settings,
                                  "--out", str(out / "bench"), "--no-progress", *common]),
        ("benchmark_cross_dataset", ["benchmark", "cross-dataset", "--data-root", str(data), *prompts,
                                     "--datasets", "eurosat,dtd", "--out", str(out / "bench"), "--no-progress",
                                     *common]),
        ("export", ["export", *prompts, "--classes", CIFAR_CLASSES, "--head", "protext+cupl", "--descriptions",
                    str(CUPL / "cifar10_prompts_full.json"), "--out", str(out / "export"), *common]),
    ]
    return run + [("label_sigmoid_refused", [*label, *common, "--output", str(out / "s.jsonl"), *act("sigmoid")])]


def prepare(work: Path) -> None:
    """The tiny CLIP folder, a corrupt image, and a small CoOp tree with real split files."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "src"))
    from support import make_coop_tree

    from protext.tiny import save_tiny_clip

    save_tiny_clip(work / "tiny", seed=0)
    (work / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in ("eurosat", "dtd"):
        make_coop_tree(work / "data", name, per_class=2)
    (work / "descs").mkdir()
    (work / "descriptors").mkdir()
    shutil.copy(CUPL / "eurosat_prompts_full.json", work / "descs" / "eurosat.json")
    shutil.copy(CUPL / "texture_prompts_full.json", work / "descs" / "dtd.json")
    shutil.copy(DCLIP / "descriptors_dtd.json", work / "descriptors" / "dtd.json")


def run_side(src: Path, work: Path, out: Path) -> dict[str, dict]:
    """Run every job with the protext at `src`; returns each job's exit status, stdout and stderr."""
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(src), "PROTEXT_CACHE": str(out / "cache"), "TQDM_DISABLE": "1"}
    done = {}
    for name, argv in jobs(src, work, out):
        proc = subprocess.run([sys.executable, "-m", "protext", *argv], env=env, capture_output=True, text=True,
                              cwd=out)
        done[name] = {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        print(f"  {name}: exit {proc.returncode}", file=sys.stderr)
    return done


# -- reading outputs into comparable data --------------------------------------------------

def label_rows(path: Path) -> list[dict]:
    """Rows of a label output, whatever its format, as {path, label, prob, top_labels, top_probs, error}."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            k = sum(1 for c in r if c.startswith("label_"))
            tops = [(r[f"label_{j}"], r[f"prob_{j}"]) for j in range(1, k + 1) if r[f"label_{j}"]]
            rows.append({"path": r["path"], "label": r["label"] or None, "prob": float(r["prob"]) if r["prob"] else None,
                         "top_labels": [t[0] for t in tops], "top_probs": [float(t[1]) for t in tops],
                         "error": r["error"] or None})
    return rows


def feature_table(folder: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(folder.glob("part-*.parquet"))).to_pydict()
    return {"path": table["path"], "error": table["error"], "feature": table["feature"]}


def flat_report(report: dict) -> dict[str, float]:
    """Every number of a benchmark or eval-text report as {protocol/dataset/split/head/metric: value},
    from either report format: flat rows, or the earlier nested results."""
    if "rows" in report and report["rows"] and "metric" in report["rows"][0]:
        return {"/".join(str(r[k]) for k in ("protocol", "dataset", "split", "head", "metric")): r["value"]
                for r in report["rows"] if r.get("source", "measured") == "measured"}
    out = {}
    if "protocol" in report:  # benchmark
        p = report["protocol"]
        for r in report["rows"]:
            for head, value in r.items():
                if head in ("dataset", "images", "skipped", "skipped_files", "notes", "not_run", "split", "classes"):
                    continue
                if p == "base2novel":
                    for split, v in zip(("base", "novel"), value):
                        out[f"{p}/{r['dataset']}/{split}/{head}/top1"] = v
                    out[f"{p}/{r['dataset']}/all/{head}/hm"] = value[2]
                else:
                    out[f"{p}/{r['dataset']}/test/{head}/top1"] = value
        return out
    for name, r in report.get("base2novel", {}).items():  # eval-text
        for split in ("base", "novel"):
            out.update({f"base2novel/{name}/{split}/{h}/top1": v for h, v in r[split].items()})
        out.update({f"base2novel/{name}/all/{h}/hm": v for h, v in r["hm"].items()})
    for name, r in report.get("cross_dataset", {}).items():
        out.update({f"cross-dataset/{name}/test/{h}/top1": v for h, v in r.items() if isinstance(v, float)})
    return out


def read_outputs(out: Path, runs: dict[str, dict]) -> dict[str, object]:
    from safetensors.torch import load_file

    got: dict[str, object] = {name: {"code": r["code"]} for name, r in runs.items()}
    prompts = load_file(str(out / "prompts" / "prompts.safetensors"))["prompts"]
    got["train"]["prompts"] = prompts.flatten().tolist()
    for name in ("predict", "predict_cupl"):
        got[name]["rows"] = [json.loads(line) for line in runs[name]["stdout"].splitlines() if line.strip()]
        got[name]["skipped"] = sorted(line.split(":")[0] for line in runs[name]["stderr"].splitlines()
                                      if line.startswith("skipped "))
    for name, file in (("label_jsonl", "labels.jsonl"), ("label_csv", "labels.csv"), ("label_parquet", "labels.parquet"),
                       ("label_features", "labels_features.jsonl")):
        got[name]["rows"] = label_rows(out / file)
    got["features"]["table"] = feature_table(out / "feats")
    for name, file in (("eval", "eval.json"), ("eval_waffle", "eval_waffle.json")):
        row = json.loads((out / file).read_text())
        got[name]["numbers"] = {k: v for k, v in row.items() if isinstance(v, float)}
        got[name]["images"] = row["images"]
    got["eval_text"]["numbers"] = flat_report(json.loads((out / "eval-text" / "eval_text.json").read_text()))
    for protocol in ("text-only", "base2novel", "cross-dataset"):
        key = "benchmark_" + protocol.replace("-", "_")
        got[key]["numbers"] = flat_report(json.loads((out / "bench" / f"{protocol}.json").read_text()))
    export = load_file(str(out / "export" / "classifier.safetensors"))
    got["export"]["tensors"] = {k: v.flatten().tolist() for k, v in export.items()}
    got["export"]["labels"] = json.loads((out / "export" / "classifier.json").read_text())["labels"]
    return got


# -- comparing -----------------------------------------------------------------------------

def differences(a: object, b: object, atol: float, where: str = "") -> list[str]:
    """Where `a` and `b` differ: numbers beyond `atol`, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k!r} only in {'the other version' if k in a else 'this version'}"
               for k in sorted(set(a) ^ set(b), key=str)]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], atol, f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, atol, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def renamed(got: dict) -> dict:
    """Words that changed on purpose, spelled the newer way (the comparison is about values)."""
    for name in ("predict", "predict_cupl"):
        for row in got[name]["rows"]:
            if "scores" in row:
                row["activation"] = row.pop("scores")
            row.pop("head", None)  # predict names the head it ran since 0.3
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the commit (or branch) to compare this checkout against")
    ap.add_argument("--atol", type=float, default=2e-6, help="largest difference of numbers that counts as equal")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs of both versions in this folder")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="protext-same-"))
    work.mkdir(parents=True, exist_ok=True)
    other = work / "ref-checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(other), args.ref], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        prepare(work)
        print(f"running {args.ref} ...", file=sys.stderr)
        ref_runs = run_side(other / "src", work, work / "ref")
        print("running this checkout ...", file=sys.stderr)
        new_runs = run_side(ROOT / "src", work, work / "new")
        failed = [f"{side} {n}: exit {r['code']}\n{r['stderr'][-2000:]}" for side, runs in (("ref", ref_runs),
                  ("new", new_runs)) for n, r in runs.items() if r["code"] not in (0, 2)]
        if failed:
            print("\n".join(failed))
            sys.exit(1)
        ref, new = renamed(read_outputs(work / "ref", ref_runs)), renamed(read_outputs(work / "new", new_runs))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    found = differences(ref, new, args.atol)
    added = [d for d in found if d.endswith("only in this version")]  # new numbers (a new head), nothing lost
    diffs = [d for d in found if d not in added]
    counts = {name: sum(len(v) if isinstance(v, (list, dict)) else 1 for v in job.values()) for name, job in new.items()}
    print("| job | exit status | compared items | differences | new numbers |\n|---|---|---|---|---|")
    for name in new:
        n = sum(1 for d in diffs if d.startswith(f"/{name}/"))
        a = sum(1 for d in added if d.startswith(f"/{name}/"))
        print(f"| {name} | {new[name]['code']} | {counts[name]} | {n} | {a} |")
    for d in diffs[:40]:
        print("  " + d)
    if added:
        print(f"{len(added)} numbers only this checkout gives (every number both give is compared above):")
        for d in added:
            print("  + " + d.split("key ", 1)[1].split(" only")[0])
    print(f"same outputs as {args.ref}: {'yes' if not diffs else f'no, {len(diffs)} differences'}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
