"""Manifests read a part at a time, carried columns, `label --out DIR`, `label --save-features`."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import SHARED

from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import QUIET, Context
from protext.errors import ProtextError
from protext.feature_folder import read_features, write_features
from protext.inputs import ListInputs, Manifest, collect, open_inputs
from protext.label import label, label_features

CLASSES = ["airplane", "cat", "frog", "ship"]
CIFAR = SHARED / "images" / "cifar10_test_sample"


@pytest.fixture(scope="module")
def clf(prompts_dir, tmp_path_factory):
    return ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path_factory.mktemp("c"), "cpu"))


@pytest.fixture
def images(tmp_path):
    """A folder of 23 images (CIFAR copies and one broken file), and their paths relative to it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = collect([CIFAR])
    names = []
    for i in range(22):
        names.append(f"{i:02d}.png")
        shutil.copy(sources[i % len(sources)], folder / names[-1])
    (folder / "zz.jpg").write_bytes(b"not an image")
    return folder, names + ["zz.jpg"]


def write_manifests(folder, names):
    """The same rows as a CSV, a JSONL and a Parquet file (row groups of 4), beside the images."""
    truth = [f"c{i % 3}" for i in range(len(names))]
    (folder / "m.csv").write_text("path,label,id\n" + "".join(f"{n},{t},{i}\n" for i, (n, t) in
                                                              enumerate(zip(names, truth))) + "\n\n")
    (folder / "m.jsonl").write_text("".join(json.dumps({"path": n, "label": t, "id": i}) + "\n"
                                            for i, (n, t) in enumerate(zip(names, truth))))
    pq.write_table(pa.table({"path": names, "label": truth, "id": list(range(len(names)))}), folder / "m.parquet",
                   row_group_size=4)
    return truth


def test_a_manifest_hands_out_the_parts_a_list_gives(images):
    folder, names = images
    write_manifests(folder, names)
    listed = ListInputs([folder / n for n in names])
    for kind in ("csv", "jsonl", "parquet"):
        m = Manifest([str(folder / f"m.{kind}")], 5)
        assert m.images == len(names) and list(m.columns) == ["label", "id"]
        for i in range(5):
            part = m.part(i)
            assert part.names == listed.part(i, 5).names, (kind, i)
            assert part.extras["label"] == [f"c{k % 3}" for k in range(5 * i, min(len(names), 5 * i + 5))]
        assert m.part(2).extras["id"] == ([10, 11, 12, 13, 14] if kind == "parquet" else ["10", "11", "12", "13", "14"])
    assert m.columns == {"label": "string", "id": "int64"}
    a, b = Manifest([str(folder / "m.csv")], 5).identity(), Manifest([str(folder / "m.csv")], 5).identity()
    assert a == b and a["images"] == len(names)
    (folder / "m.csv").write_text((folder / "m.csv").read_text().replace("c0", "c9"))
    assert Manifest([str(folder / "m.csv")], 5).identity() != a  # another manifest: never resumed against


def test_manifest_files_of_one_folder_are_one_job_and_bad_ones_are_named(tmp_path):
    (tmp_path / "ms").mkdir()
    for k in range(3):  # parts cross file boundaries
        (tmp_path / "ms" / f"{k}.jsonl").write_text("".join(json.dumps({"path": f"/x/{k}-{i}.jpg"}) + "\n"
                                                            for i in range(3)))
    m = open_inputs([tmp_path / "ms"], 4)
    assert isinstance(m, Manifest) and m.images == 9
    assert [m.part(i).names for i in range(3)] == [["/x/0-0.jpg", "/x/0-1.jpg", "/x/0-2.jpg", "/x/1-0.jpg"],
                                                    ["/x/1-1.jpg", "/x/1-2.jpg", "/x/2-0.jpg", "/x/2-1.jpg"],
                                                    ["/x/2-2.jpg"]]
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\nnot json\n')
    with pytest.raises(ProtextError, match="bad.jsonl: line 2 is not a JSON object"):
        Manifest([str(tmp_path / "bad.jsonl")], 4).part(0)
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "nopath.parquet")
    with pytest.raises(ProtextError, match="nopath.parquet: a manifest needs a 'path' column; it has file"):
        open_inputs([tmp_path / "nopath.parquet"], 4)
    (tmp_path / "other.jsonl").write_text('{"path": "a.jpg", "extra": 1}\n')
    with pytest.raises(ProtextError, match="every manifest file of one job needs the same columns"):
        open_inputs([tmp_path / "ms" / "0.jsonl", tmp_path / "other.jsonl"], 4)
    with pytest.raises(ProtextError, match="cannot be mixed with image files"):
        open_inputs([tmp_path / "other.jsonl", CIFAR], 4)
    assert isinstance(open_inputs([CIFAR], 4), ListInputs)


def test_label_from_a_manifest_carries_its_columns_into_every_format(clf, images, tmp_path):
    folder, names = images
    truth = write_manifests(folder, names)
    label(clf, [folder / n for n in names], tmp_path / "list.jsonl", part_size=5, ctx=QUIET)
    want = [json.loads(line) for line in (tmp_path / "list.jsonl").read_text().splitlines()]
    for kind in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"from-{kind}.jsonl"
        report = label(clf, open_inputs([folder / f"m.{kind}"], 5), out, part_size=5, ctx=QUIET)
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert report.unreadable == 1 and [r["path"] for r in got] == [r["path"] for r in want]
        assert [r["top_labels"] for r in got] == [r["top_labels"] for r in want]
        assert [r["input_label"] for r in got] == truth  # a manifest's 'label' does not hide the label column
        assert got[3]["id"] == (3 if kind == "parquet" else "3")
    m = open_inputs([folder / "m.parquet"], 5)
    label(clf, m, tmp_path / "o.parquet", part_size=5, ctx=QUIET)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names[-2:] == ["input_label", "id"] and table.schema.field("id").type == pa.int64()
    label(clf, m, tmp_path / "o.csv", part_size=5, ctx=QUIET)
    header = (tmp_path / "o.csv").read_text().splitlines()[0]
    assert header.endswith(",error,input_label,id")


def test_label_out_dir_is_a_table_of_parts_and_a_damaged_part_is_redone(clf, images, tmp_path):
    folder, names = images
    write_manifests(folder, names)
    m = open_inputs([folder / "m.parquet"], 5)
    out = tmp_path / "labels"
    report = label(clf, m, out=out, part_size=5, ctx=QUIET)
    assert report.images == len(names) and report.unreadable == 1
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:06d}.parquet" for i in range(5)]
    table = pq.read_table(out)  # the folder reads as one table
    assert table.column("path").to_pylist() == [str(folder / n) for n in names]
    assert json.loads((out / "_summary.json").read_text())["rows"] == len(names)
    label(clf, m, tmp_path / "one.jsonl", part_size=5, ctx=QUIET)
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert table.column("top_labels").to_pylist() == [r["top_labels"] for r in rows]
    damaged = out / "part-000002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    before = (out / "part-000001.parquet").stat().st_mtime_ns
    report = label(clf, m, out=out, part_size=5, ctx=QUIET)
    assert (report.processed, report.reused) == (5, len(names) - 5)  # only the damaged part again
    assert (out / "part-000001.parquet").stat().st_mtime_ns == before
    assert pq.read_table(out).column("top_labels").to_pylist() == [r["top_labels"] for r in rows]
    jsonl = tmp_path / "jl"
    label(clf, m, out=jsonl, part_format=".jsonl", part_size=5, ctx=QUIET)
    assert [json.loads(line)["path"] for p in sorted(jsonl.glob("part-*.jsonl"))
            for line in p.read_text().splitlines()] == [r["path"] for r in rows]


def test_save_features_keeps_the_features_of_the_same_forward_pass(clf, images, tmp_path):
    folder, names = images
    paths = [folder / n for n in names]
    report = label(clf, paths, tmp_path / "l.jsonl", part_size=8, save_features=tmp_path / "f", ctx=QUIET)
    assert report.processed == len(paths)
    write_features(clf.backbone, paths, tmp_path / "g", part_size=8, ctx=QUIET)
    a, b = read_features(tmp_path / "f"), read_features(tmp_path / "g")
    assert a.paths == b.paths and a.errors == b.errors and torch.allclose(a.feats, b.feats, atol=1e-6)
    # the stored features label to the same rows
    label_features(clf, tmp_path / "f", tmp_path / "x.jsonl", ctx=QUIET)
    top = lambda f: [json.loads(line)["top_labels"] for line in f.read_text().splitlines()]  # noqa: E731
    assert top(tmp_path / "x.jsonl") == top(tmp_path / "l.jsonl")
    shutil.rmtree(tmp_path / "f" / "_parts")  # records lost: the features parts are computed again, labels kept
    (tmp_path / "f" / "_summary.json").unlink()
    again = label(clf, paths, tmp_path / "l2.jsonl", part_size=8, save_features=tmp_path / "f", ctx=QUIET)
    assert again.processed == len(paths)
    assert torch.allclose(read_features(tmp_path / "f").feats, b.feats, atol=1e-6)


def test_label_command_takes_manifests_out_and_save_features(prompts_dir, images, tmp_path, capsys):
    folder, names = images
    write_manifests(folder, names)
    base = ["--classes", ",".join(CLASSES), "--prompts", str(prompts_dir), "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "--part-size", "10"]
    assert main(["label", str(folder / "m.jsonl"), "--out", str(tmp_path / "o"), "--save-features",
                 str(tmp_path / "f"), *base]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable"] == 1
    assert pq.read_table(tmp_path / "o").num_rows == len(names) == read_features(tmp_path / "f").feats.shape[0]
    assert pq.read_table(tmp_path / "f").column_names == ["path", "feature", "error", "label", "id"]  # carried too
    for args, message in ((["--output", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "y")], "one destination|"
                           "give where the labels go"),
                          ([], "give where the labels go: --output FILE")):
        assert main(["label", str(folder / "m.jsonl"), *args, *base]) == 2
        assert __import__("re").search(message, capsys.readouterr().err)


def write_shards(folder, count=11, per_shard=4):
    """WebDataset shards: samples KEY.png + KEY.cls (+ KEY.json), `per_shard` a tar; one sample's image broken."""
    import io
    import tarfile

    sources = collect([CIFAR])
    folder.mkdir()
    keys = []
    for s in range(0, count, per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(count, s + per_shard)):
                key = f"sample{i:06d}"
                keys.append(key)
                image = b"broken" if i == 5 else sources[i % len(sources)].read_bytes()
                for name, data in ((f"{key}.png", image), (f"{key}.cls", str(i % 3).encode()),
                                   (f"{key}.json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def test_webdataset_shards_are_inputs_with_their_keys_as_paths(clf, tmp_path):
    from protext.inputs import Shards, sample_key

    assert sample_key("a/b/000123.jpg") == ("a/b/000123", "jpg") and sample_key("x.seg.png") == ("x", "seg.png")
    keys = write_shards(tmp_path / "shards")
    shards = open_inputs([tmp_path / "shards"], 3)
    assert isinstance(shards, Shards) and shards.images == 11 and list(shards.columns) == ["cls", "json"]
    parts = [shards.part(i) for i in range(4)]
    assert [n for p in parts for n in p.names] == keys  # parts cross shard boundaries
    assert parts[1].extras["cls"] == ["0", "1", "2"] and json.loads(parts[0].extras["json"][2]) == {"i": 2}
    report = label(clf, shards, tmp_path / "l.jsonl", part_size=3, ctx=QUIET)
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == keys and report.unreadable == 1 and rows[5]["error"]
    assert [r["cls"] for r in rows] == [str(i % 3) for i in range(11)]
    # the same images as files give the same labels
    sources = collect([CIFAR])
    files = [sources[i % len(sources)] for i in range(11) if i != 5]
    label(clf, files, tmp_path / "f.jsonl", ctx=QUIET)
    want = [json.loads(line)["top_labels"] for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["top_labels"] for r in rows if not r["error"]] == want
