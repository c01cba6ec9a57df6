import csv
import json
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from support import SHARED

from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import QUIET, Context
from protext.errors import ProtextError
from protext.inputs import collect
from protext.label import label

CLASSES = ["airplane", "cat", "frog", "ship"]
CIFAR = SHARED / "images" / "cifar10_test_sample"


@pytest.fixture(scope="module")
def clf(prompts_dir, tmp_path_factory):
    return ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path_factory.mktemp("cache"), "cpu"))


def csv_rows(path):
    """Rows of a CSV output, read back into the JSONL shape."""
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    k = sum(1 for c in table[0] if c.startswith("label_"))
    rows = []
    for r in table:
        top = [(r[f"label_{j}"], float(r[f"prob_{j}"])) for j in range(1, k + 1) if r[f"label_{j}"]]
        rows.append({"path": r["path"], "label": r["label"] or None, "prob": float(r["prob"]) if r["prob"] else None,
                     "top_labels": [t for t, _ in top], "top_probs": [p for _, p in top], "error": r["error"] or None})
    return rows


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_writes_the_classifiers_top_k_for_every_image_in_three_formats(clf, tmp_path):
    imagenet = sorted((SHARED / "images" / "imagenet_sample").iterdir())[:2]
    (tmp_path / "imgs").mkdir()
    for f in imagenet:
        shutil.copy(f, tmp_path / "imgs" / f.name)
    (tmp_path / "list.csv").write_text("id,path\n" + "".join(f"{i},imgs/{f.name}\n" for i, f in enumerate(imagenet)))
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    first_cat = sorted((CIFAR / "cat").iterdir())[0]
    paths = collect([CIFAR / "cat", CIFAR / "frog", tmp_path / "list.csv", tmp_path / "broken.jpg",
                     tmp_path / "missing.png", first_cat])
    readable = sorted((CIFAR / "cat").iterdir()) + sorted((CIFAR / "frog").iterdir()) + [tmp_path / "imgs" / f.name
                                                                                           for f in imagenet]
    assert paths == readable + [tmp_path / "broken.jpg", tmp_path / "missing.png"]  # folders recursive, CSV, once each

    want = clf.predict(readable)
    outputs = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        out = tmp_path / f"labels{suffix}"
        report = label(clf, paths, out, top_k=2, batch_size=8, part_size=7, ctx=QUIET)
        assert (report.images, report.processed, report.reused) == (len(paths), len(paths), 0)
        assert [p for p, _ in report.unreadable_files] == [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")]
        assert report.unreadable_files[1][1].startswith("FileNotFoundError")
        assert not (tmp_path / f"labels{suffix}.parts").exists()  # the chunks are gone once the file is whole
        outputs[suffix] = (jsonl_rows(out) if suffix == ".jsonl" else csv_rows(out) if suffix == ".csv"
                           else pq.read_table(out).to_pylist())
    rows = outputs[".jsonl"]
    assert outputs[".csv"] == rows and outputs[".parquet"] == rows
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, top in zip(rows, want.top(2)):
        assert row["label"] == top[0][0] == row["top_labels"][0] and row["error"] is None
        assert row["top_labels"] == [c for c, _ in top]
        assert row["top_probs"] == pytest.approx([p for _, p in top], abs=2e-6)
    assert rows[-2]["label"] is None and rows[-2]["error"].startswith("UnsupportedFormat: not an image in a format protext reads")


def test_min_prob_marks_uncertain_images_unknown_and_keeps_the_top_labels(clf, tmp_path):
    paths = sorted((CIFAR / "ship").iterdir())
    plain = jsonl_rows(label(clf, paths, tmp_path / "a.jsonl", ctx=QUIET).output)
    threshold = sorted(r["prob"] for r in plain)[len(plain) // 2]
    marked = jsonl_rows(label(clf, paths, tmp_path / "b.jsonl", min_prob=threshold, ctx=QUIET).output)
    unknown = [m for m in marked if m["label"] == "unknown"]
    assert 0 < len(unknown) < len(marked)
    for p, m in zip(plain, marked):
        assert m["label"] == ("unknown" if p["prob"] < threshold else p["label"])
        assert m["top_labels"] == p["top_labels"] and m["prob"] == p["prob"]
    clf_unknown = ProTextClassifier(clf.backbone, ["cat", "Unknown"], head="clip")
    with pytest.raises(ProtextError, match="class is named 'unknown'"):
        label(clf_unknown, paths, tmp_path / "c.jsonl", min_prob=0.5, ctx=QUIET)


SLOW_WRITER = """
import sys, time
import protext.parts as parts
write = parts.PartFolder.write
def slow(self, *args):
    write(self, *args)
    time.sleep(0.5)
parts.PartFolder.write = slow
from protext.cli import main
from protext.context import QUIET, Context
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_with_sigkill_resumes_with_only_the_images_not_yet_written(prompts_dir, tmp_path, capsys):
    paths = [str(CIFAR / c) for c in ("airplane", "cat", "frog")]  # 30 images, chunks of 4
    common = ["--classes", ",".join(CLASSES), "--prompts", str(prompts_dir), "--cache-dir", str(tmp_path / "cache"),
              "--no-progress", "--part-size", "4", "--batch-size", "2", "--top-k", "2"]
    out = tmp_path / "run.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "label", *paths, "--output", str(out), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_part = tmp_path / "run.jsonl.parts" / "part-000001.jsonl"
    deadline = time.monotonic() + 300
    while not second_part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert second_part.exists() and not out.exists(), "the run should have been killed between its chunks"
    # a part counts once its record is written beside it (a part without one is computed again)
    written = len(list((tmp_path / "run.jsonl.parts" / "_parts").glob("*.json")))
    assert written >= 1

    assert main(["label", *paths, "--output", str(out), *common[:-1], "3"]) == 2  # other settings: refused
    err = capsys.readouterr().err
    assert "run.jsonl.parts holds parts made with other settings (top_k differ" in err

    assert main(["label", *paths, "--output", str(out), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reused"] == 4 * written and report["processed"] == 30 - 4 * written and report["images"] == 30
    assert main(["label", *paths, "--output", str(tmp_path / "clean.jsonl"), *common]) == 0
    resumed, clean = jsonl_rows(out), jsonl_rows(tmp_path / "clean.jsonl")
    assert [r["path"] for r in resumed] == [r["path"] for r in clean] and len(clean) == 30
    for r, c in zip(resumed, clean):
        assert r["top_labels"] == c["top_labels"] and r["top_probs"] == pytest.approx(c["top_probs"], abs=2e-6)
    assert not (tmp_path / "run.jsonl.parts").exists()


def test_label_command_writes_csv_lists_unreadable_files_and_refuses_bad_arguments(prompts_dir, tmp_path, capsys):
    base = ["--classes", "cat,ship", "--prompts", str(prompts_dir), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["label", str(CIFAR / "ship"), str(tmp_path / "bad.png"), "--output", str(tmp_path / "o.csv"), *base]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unreadable"] == 1 and f"unreadable {tmp_path / 'bad.png'}: " in captured.err
    header = (tmp_path / "o.csv").read_text().splitlines()[0]
    assert header == "path,label,prob,label_1,prob_1,label_2,prob_2,label_3,prob_3,error"
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--output", str(tmp_path / "o.txt")], "--output .*o.txt: unknown format '.txt'; end the file name with .jsonl"),
        (["--output", str(tmp_path / "o.jsonl"), "--min-prob", "2"], "--min-prob must be between 0 and 1"),
        (["--output", str(tmp_path / "o.jsonl"), "--activation", "sigmoid"], "sigmoid probabilities need"),
        (["--output", str(tmp_path / "o.jsonl"), "--top-k", "0"], "--top-k must be at least 1"),
    ):
        assert main(["label", str(CIFAR / "ship"), *args, *base]) == 2
        assert __import__("re").search(message, capsys.readouterr().err), message
    assert main(["label", str(tmp_path / "empty"), "--output", str(tmp_path / "o.jsonl"), *base]) == 2
    assert "empty: no image files in this folder or below" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o.jsonl"), *base]) == 2
    assert "nope.csv: no such CSV file" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "bad.png"), "--output", str(tmp_path / "o.jsonl"), *base]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
