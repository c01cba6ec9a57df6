"""`protext features`: a folder of Parquet parts, resumed after a failure, labelled later with `label --features`."""

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support import SHARED

from protext.backbone import load_backbone
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import QUIET, Context
from protext.errors import ProtextError
from protext.feature_folder import read_features, write_features
from protext.images import load_pixels
from protext.parts import PartFolder
from protext.inputs import collect
from protext.label import label

CLASSES = ["airplane", "cat", "frog", "ship"]
CIFAR = SHARED / "images" / "cifar10_test_sample"


@pytest.fixture(scope="module")
def backbone(tiny_folder):
    return load_backbone(str(tiny_folder), device="cpu")


@pytest.fixture
def paths(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    found = collect([CIFAR])[:37]
    return found[:10] + [broken] + found[10:] + [tmp_path / "missing.png"]


def tower_features(backbone, paths):
    tower = backbone.image
    return tower(torch.stack([load_pixels(p, tower.image_size, tower.mean, tower.std) for p in paths]))


def test_features_are_the_image_towers_in_parquet_parts_of_chunk_images(backbone, paths, tmp_path):
    report = write_features(backbone, paths, tmp_path / "f", batch_size=8, part_size=16, ctx=QUIET)
    assert (report.images, report.processed, report.reused) == (len(paths), len(paths), 0)
    assert [p for p, _ in report.unreadable_files] == [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")]
    parts = sorted((tmp_path / "f").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    table = pq.read_table(parts[0])
    assert table.column_names == ["path", "feature", "error"] and table.num_rows == 16
    assert table.schema.field("feature").type.list_size == backbone.text.feature_dim

    stored = read_features(tmp_path / "f")
    assert stored.paths == [str(p) for p in paths]
    good = [i for i, e in enumerate(stored.errors) if e is None]
    assert len(good) == len(paths) - 2 and stored.errors[10].startswith("UnsupportedFormat: not an image in a format protext reads")
    want = tower_features(backbone, [paths[i] for i in good])
    assert torch.allclose(stored.feats[good], want, atol=1e-5)
    assert stored.feats[10].abs().sum() == 0 and stored.feats[good].norm(dim=-1).sub(1).abs().max() < 1e-5
    assert json.loads((tmp_path / "f" / "_summary.json").read_text())["unreadable"] == 2
    whole = pq.read_table(tmp_path / "f")  # the folder reads as one table: its JSON files are skipped
    assert whole.column("path").to_pylist() == stored.paths


def test_a_rerun_after_a_failure_computes_only_the_missing_parts(backbone, paths, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = PartFolder.write

    def dies_after_two_parts(self, *args):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the machine went away mid-run
        calls["n"] += 1
        real_write(self, *args)

    monkeypatch.setattr(PartFolder, "write", dies_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        write_features(backbone, paths, tmp_path / "f", part_size=10, ctx=QUIET)
    assert len(list((tmp_path / "f").glob("part-*.parquet"))) == 2 and not (tmp_path / "f" / "_summary.json").exists()
    with pytest.raises(ProtextError, match="unfinished"):
        read_features(tmp_path / "f")
    monkeypatch.setattr(PartFolder, "write", real_write)
    report = write_features(backbone, paths, tmp_path / "f", part_size=10, ctx=QUIET)
    assert (report.processed, report.reused) == (len(paths) - 20, 20)
    whole = write_features(backbone, paths, tmp_path / "g", part_size=10, ctx=QUIET)
    assert whole.processed == len(paths)
    a, b = read_features(tmp_path / "f"), read_features(tmp_path / "g")
    assert a.paths == b.paths and a.errors == b.errors and torch.equal(a.feats, b.feats)


def test_other_settings_or_inputs_are_refused_before_any_image_is_read(backbone, paths, tmp_path):
    write_features(backbone, paths[:5], tmp_path / "f", part_size=4, ctx=QUIET)
    with pytest.raises(ProtextError, match="part_size differ"):
        write_features(backbone, paths[:5], tmp_path / "f", part_size=8, ctx=QUIET)
    with pytest.raises(ProtextError, match="another list of images \\(5 images then, 6 now"):
        write_features(backbone, paths[:6], tmp_path / "f", part_size=4, ctx=QUIET)
    with pytest.raises(ProtextError, match="--workers must be at least 1"):
        write_features(backbone, paths[:5], tmp_path / "f", part_size=4, workers=0, ctx=QUIET)
    (tmp_path / "f" / ".part-000001.parquet.x1.tmp").write_bytes(b"half a part")  # a writer killed mid-part
    write_features(backbone, paths[:5], tmp_path / "f", part_size=4, ctx=QUIET)
    assert not list((tmp_path / "f").glob(".*.tmp"))
    (tmp_path / "early").mkdir()  # settings written, then the first run died before any part
    (tmp_path / "early" / "_settings.json").write_text('{"part_size": 99}')
    write_features(backbone, paths[:5], tmp_path / "early", part_size=4, ctx=QUIET)
    assert read_features(tmp_path / "early").info["part_size"] == 4
    with pytest.raises(ProtextError, match="--part-size must be at least 1"):
        write_features(backbone, paths, tmp_path / "g", part_size=0, ctx=QUIET)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProtextError, match="is a file"):
        write_features(backbone, paths, tmp_path / "file", ctx=QUIET)
    with pytest.raises(ProtextError, match="not a feature folder"):
        read_features(tmp_path)
    (tmp_path / "spark").mkdir()
    (tmp_path / "spark" / "part-00000-1a2b.snappy.parquet").write_bytes(b"someone else's data")
    with pytest.raises(ProtextError, match="did not write"):
        write_features(backbone, paths, tmp_path / "spark", ctx=QUIET)
    assert (tmp_path / "spark" / "part-00000-1a2b.snappy.parquet").read_bytes() == b"someone else's data"


def test_file_uris_are_read_through_pyarrow_like_local_paths(backbone, paths, tmp_path, capsys):
    local = [p for p in paths[:6] if p.name != "broken.jpg"]
    uris = [p.resolve().as_uri() for p in local]
    (tmp_path / "list.csv").write_text("path\n" + "".join(u + "\n" for u in uris))
    assert collect([tmp_path / "list.csv", uris[0]]) == uris  # kept as URIs, once each
    # a CSV given as a URI: relative rows relative to it, absolute rows on its filesystem
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(local[0].read_bytes())
    (tmp_path / "remote.csv").write_text(f"sub/a.jpg\n{local[1].resolve()}\n")
    base = tmp_path.resolve().as_uri()
    assert collect([f"{base}/remote.csv"]) == [f"{base}/sub/a.jpg", local[1].resolve().as_uri()]
    # a folder given as a URI is searched recursively for images
    assert collect([f"{base}/sub/"]) == [f"{base}/sub/a.jpg"] == collect([f"{base}/sub"])
    (tmp_path / "sub" / "empty").mkdir()
    with pytest.raises(ProtextError, match="no image files below"):
        collect([f"{base}/sub/empty"])
    assert main(["features", uris[0], "--out", "s3://bucket/feats"]) == 2
    assert "--out s3://bucket/feats" in capsys.readouterr().err
    write_features(backbone, uris + ["file:///no/such/image.jpg"], tmp_path / "f", ctx=QUIET)
    stored = read_features(tmp_path / "f")
    assert stored.errors[:-1] == [None] * len(uris) and "FileNotFoundError" in stored.errors[-1]
    assert torch.allclose(stored.feats[:-1], tower_features(backbone, local), atol=1e-5)


def test_label_from_stored_features_gives_the_rows_of_label_from_images(prompts_dir, tiny_folder, paths, tmp_path):
    assert main(["features", *map(str, paths), "--out", str(tmp_path / "f"), "--backbone", str(tiny_folder),
                 "--part-size", "16", "--no-progress"]) == 0
    args = ["--prompts", str(prompts_dir), "--classes", ",".join(CLASSES), "--top-k", "2", "--no-progress"]
    assert main(["label", "--features", str(tmp_path / "f"), "--output", str(tmp_path / "a.jsonl"), *args]) == 0
    assert main(["label", *map(str, paths), "--output", str(tmp_path / "b.jsonl"), *args]) == 0
    a, b = ([json.loads(line) for line in (tmp_path / n).read_text().splitlines()] for n in ("a.jsonl", "b.jsonl"))
    assert [r["path"] for r in a] == [r["path"] for r in b] == [str(p) for p in paths]
    for x, y in zip(a, b):
        assert (x["label"], x["top_labels"], x["error"]) == (y["label"], y["top_labels"], y["error"])
        assert np.allclose(x["top_probs"] or [0], y["top_probs"] or [0], atol=2e-6)


def test_label_features_refuses_another_image_tower_and_mixed_inputs(prompts_dir, backbone, paths, tmp_path, capsys):
    write_features(backbone, paths[:4], tmp_path / "f", ctx=QUIET)
    clf = ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path / "c", "cpu"))
    summary = json.loads((tmp_path / "f" / "_summary.json").read_text())
    (tmp_path / "f" / "_summary.json").write_text(json.dumps({**summary, "image_tower": "0" * 16}))  # another model's
    from protext.label import label_features

    with pytest.raises(ProtextError, match="other image weights"):
        label_features(clf, tmp_path / "f", tmp_path / "x.jsonl")
    code = main(["label", str(paths[0]), "--features", str(tmp_path / "f"), "--classes", "a,b", "--output",
                 str(tmp_path / "y.jsonl")])
    assert code == 2 and "give no image PATHs" in capsys.readouterr().err
    assert main(["label", "--classes", "a,b", "--output", str(tmp_path / "y.jsonl")]) == 2
    assert "--features DIR" in capsys.readouterr().err
    label(clf, paths[:2], tmp_path / "z.jsonl", ctx=QUIET)  # the image path still works beside it


def test_without_ray_or_pyarrow_the_commands_say_what_to_install(monkeypatch, tmp_path, capsys):
    image = str(collect([CIFAR])[0])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["label", image, "--classes", "a,b", "--output", str(tmp_path / "x.jsonl"), "--engine", "ray"]) == 2
    assert "pip install 'protext[ray]'" in capsys.readouterr().err
    assert main(["features", image, "--out", str(tmp_path / "f"), "--engine", "ray"]) == 2
    assert "pip install 'protext[ray]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["features", image, "--out", str(tmp_path / "f")]) == 2
    assert "pip install 'protext[parquet]'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()  # refused before anything was written or loaded


def test_damaged_parts_are_computed_again_copies_refused_and_labelling_stops_on_them(backbone, paths, tmp_path,
                                                                                     prompts_dir, capsys):
    out = tmp_path / "f"
    write_features(backbone, paths, out, part_size=10, ctx=QUIET)
    clean = read_features(out)
    part = lambda i: out / f"part-{i:06d}.parquet"  # noqa: E731
    part(1).write_bytes(part(1).read_bytes()[:100])  # truncated
    part(2).write_bytes(b"garbage, not parquet")
    (out / "_summary.json").write_text("{not json")
    args = ["label", "--features", str(out), "--classes", ",".join(CLASSES), "--prompts", str(prompts_dir),
            "--output", str(tmp_path / "l.jsonl"), "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 2 and "an unfinished folder" in capsys.readouterr().err  # nothing written from it
    report = write_features(backbone, paths, out, part_size=10, ctx=QUIET)
    assert (report.processed, report.reused) == (20, len(paths) - 20)  # exactly the two damaged parts
    again = read_features(out)
    assert again.paths == clean.paths and torch.equal(again.feats, clean.feats)

    part(1).unlink()  # a part of a finished folder deleted
    assert main(args) == 2 and "part-000001.parquet: missing" in capsys.readouterr().err
    assert write_features(backbone, paths, out, part_size=10, ctx=QUIET).processed == 10

    part(0).write_bytes(b"x")  # damaged after it was finished: labelling refuses it, never skips rows
    assert main(args) == 2 and "its digest differs" in capsys.readouterr().err
    write_features(backbone, paths, out, part_size=10, ctx=QUIET)
    part(2).write_bytes(part(1).read_bytes())  # a copy of another part: its rows belong elsewhere
    with pytest.raises(ProtextError, match="part-000002.parquet is a copy of part 1"):
        write_features(backbone, paths, out, part_size=10, ctx=QUIET)


def test_a_damaged_label_part_is_labelled_again(prompts_dir, paths, tmp_path):
    from protext.label import open_parts

    clf = ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path / "c", "cpu"))
    names = [str(p) for p in paths]
    out = tmp_path / "l.jsonl"
    label(clf, paths, tmp_path / "clean.jsonl", part_size=8, ctx=QUIET)
    folder = open_parts(clf, names, out, 3, None, "softmax", 8)
    folder.write(0, b'{"path": "truncat', 8, 0)  # a part whose file was cut after its record was written
    (folder.folder / "part-000000.jsonl").write_bytes(b'{"path": "trunc')
    report = label(clf, paths, out, part_size=8, ctx=QUIET)
    assert report.processed == len(paths)
    assert out.read_text() == (tmp_path / "clean.jsonl").read_text()
