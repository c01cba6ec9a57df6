"""`label --engine ray` and `features --engine ray` on a local Ray instance the tests start (2 CPUs, loopback only)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import ROOT, SHARED

from protext.context import QUIET, Context
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.distributed import PRELOAD, PartWorker, connect, features_on_ray, label_on_ray
from protext.feature_folder import read_features, write_features
from protext.inputs import collect
from protext.errors import ProtextError
from protext.label import label
from protext.parts import PartFolder

ray = pytest.importorskip("ray")

CLASSES = ["airplane", "cat", "frog", "ship"]
CIFAR = SHARED / "images" / "cifar10_test_sample"


@pytest.fixture(scope="module")
def cluster():
    connect(None, num_cpus=2, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_a_local_instance_runs_its_workers_at_the_callers_priority(cluster):
    # Ray's default (nice 15) lets any busy program on the machine slow a job down ten times
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(ray.remote(num_cpus=0)(niceness).remote()) == os.nice(0)


def test_a_local_instances_workers_have_imported_the_model_code_before_their_first_task(cluster):
    # an actor placed in such a worker starts in under a second instead of the several the imports take
    def preloaded() -> list[bool]:
        import sys
        return [m in sys.modules for m in PRELOAD]

    assert ray.get(ray.remote(num_cpus=0)(preloaded).remote()) == [True] * len(PRELOAD)


@pytest.fixture(scope="module")
def clf(prompts_dir, tmp_path_factory):
    return ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path_factory.mktemp("c"), "cpu"))


def rows(path):
    return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}


def images(tmp_path, n=None):
    paths = collect([CIFAR])[:n]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    return paths + [broken]


def same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path in a:
        x, y = a[path], b[path]
        assert (x["label"], x["top_labels"], x["error"]) == (y["label"], y["top_labels"], y["error"]), path
        assert x["top_probs"] == pytest.approx(y["top_probs"], abs=2e-6)


def test_ray_gives_the_rows_of_the_single_machine_path(cluster, clf, tmp_path, monkeypatch):
    paths = images(tmp_path)
    label(clf, paths, tmp_path / "one.jsonl", ctx=QUIET)
    report = label_on_ray(clf, paths, tmp_path / "ray.jsonl", workers=2, batch_size=8, part_size=32,  # several parts
                          ctx=QUIET)
    assert report.processed == len(paths) and report.reused == 0 and report.unreadable == 1
    same_rows(rows(tmp_path / "one.jsonl"), rows(tmp_path / "ray.jsonl"))
    assert not (tmp_path / "ray.jsonl.parts").exists()


class Flaky(PartWorker):
    """Dies (the whole worker process) on its first part, once per test, as a crashed machine would."""

    def compute(self, *args):
        marker = os.environ["PROTEXT_TEST_MARKER"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().compute(*args)


def test_an_actor_that_dies_is_retried_and_every_image_is_labelled_once(cluster, clf, tmp_path, monkeypatch):
    import protext.distributed as distributed

    marker = tmp_path / "died"
    monkeypatch.setenv("PROTEXT_TEST_MARKER", str(marker))
    monkeypatch.setattr(distributed, "PartWorker", Flaky)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    paths = images(tmp_path, 40)
    report = label_on_ray(clf, paths, tmp_path / "out.jsonl", workers=1, batch_size=8, part_size=16, ctx=QUIET,
                          runtime_env={"env_vars": {"PROTEXT_TEST_MARKER": str(marker)}})
    assert marker.exists()  # an actor really died
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(paths) == report.images
    assert sorted(json.loads(line)["path"] for line in lines) == sorted(map(str, paths))


def _label_cmd(prompts, out, paths):
    return [sys.executable, "-m", "protext", "label", *map(str, paths), "--prompts", str(prompts), "--classes",
            ",".join(CLASSES), "--output", str(out), "--engine", "ray", "--workers", "1", "--batch-size", "4",
            "--part-size", "100", "--no-progress"]


def test_a_rerun_after_an_interrupted_job_labels_only_what_is_missing(tiny_folder, clf, tmp_path):
    prompts = clf.inputs.prompts.save_pretrained(tmp_path / "p")
    paths = [tmp_path / "imgs" / f"{i:04d}.jpg" for i in range(1500)]  # 15 parts
    paths[0].parent.mkdir()
    sources = collect([CIFAR])
    for i, p in enumerate(paths):
        shutil.copy(sources[i % len(sources)], p)
    out = tmp_path / "labels.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(_label_cmd(prompts, out, [paths[0].parent]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(parts.glob("part-*.jsonl")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    proc.wait()
    count, quiet = -1, time.time()
    while time.time() - quiet < 3:  # workers write their own parts: wait until none is left writing
        if len(list(parts.glob("part-*.jsonl"))) != count:
            count, quiet = len(list(parts.glob("part-*.jsonl"))), time.time()
        time.sleep(0.2)
    written = {json.loads(line)["path"] for f in parts.glob("part-*.jsonl") for line in f.read_text().splitlines()}
    assert written and not out.exists(), "the job finished before it could be interrupted"
    done = subprocess.run(_label_cmd(prompts, out, [paths[0].parent]), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["reused"] == len(written) and report["processed"] == len(paths) - len(written) > 0
    assert len(rows(out)) == len(paths)


def test_ray_features_are_the_single_machine_parts(cluster, clf, tmp_path):
    paths = images(tmp_path)
    backbone = clf.backbone
    write_features(backbone, paths, tmp_path / "one", batch_size=8, part_size=32, ctx=QUIET)
    report = features_on_ray(backbone, paths, tmp_path / "ray", part_size=32, workers=2, batch_size=8, ctx=QUIET)
    assert (report.processed, report.reused, report.unreadable) == (len(paths), 0, 1)
    a, b = read_features(tmp_path / "one"), read_features(tmp_path / "ray")
    assert a.paths == b.paths == [str(p) for p in paths] and a.errors == b.errors
    assert torch.allclose(a.feats, b.feats, atol=1e-5) and b.feats[:-1].norm(dim=-1).min() > 0.999
    assert sorted(f.name for f in (tmp_path / "ray").iterdir()) == sorted(f.name for f in (tmp_path / "one").iterdir())


def test_ray_finishes_a_folder_an_interrupted_run_left_computing_only_the_missing_parts(cluster, clf, tmp_path,
                                                                                      monkeypatch):
    paths = images(tmp_path, 50)
    real_write, written = PartFolder.write, []

    def dies_after_two_parts(self, part, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(part)
        real_write(self, part, *args)

    monkeypatch.setattr(PartFolder, "write", dies_after_two_parts)
    cmd = ["features", *map(str, paths), "--out", str(tmp_path / "f"), "--backbone", clf.backbone.name, "--part-size", "8",
           "--no-progress"]
    assert main(cmd) == 130  # interrupted
    monkeypatch.setattr(PartFolder, "write", real_write)
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "f").glob("part-*.parquet")}
    assert len(before) == 2
    assert main(cmd + ["--engine", "ray", "--workers", "1", "--batch-size", "4"]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "f").glob("part-*.parquet")}
    assert len(after) == 7 and all(after[n] == t for n, t in before.items())  # the finished parts were kept
    write_features(clf.backbone, paths, tmp_path / "g", part_size=8, ctx=QUIET)
    a, b = read_features(tmp_path / "f"), read_features(tmp_path / "g")
    assert a.paths == b.paths and a.errors == b.errors and torch.allclose(a.feats, b.feats, atol=1e-5)


def test_a_batch_of_only_unreadable_images_and_relative_paths_work_on_ray(cluster, clf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # after the workers started elsewhere: relative paths must not reach them as such
    (tmp_path / "imgs").mkdir()
    for f in collect([CIFAR])[:8]:
        shutil.copy(f, tmp_path / "imgs" / f.name)
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"not an image")
    paths = [f"imgs/{f.name}" for f in sorted((tmp_path / "imgs").iterdir())]  # 8 images, then one broken: alone in
    report = features_on_ray(clf.backbone, paths, "f", part_size=16, workers=1, batch_size=8,  # the second batch
                             ctx=QUIET)
    assert [p for p, _ in report.unreadable_files] == ["imgs/zz-broken.jpg"]
    stored = read_features("f")
    assert stored.paths == paths and stored.feats[:8].norm(dim=-1).min() > 0.999
    label_on_ray(clf, paths, tmp_path / "ray.jsonl", workers=1, batch_size=8, ctx=QUIET)
    label(clf, paths, tmp_path / "one.jsonl", ctx=QUIET)
    same_rows(rows(tmp_path / "one.jsonl"), rows(tmp_path / "ray.jsonl"))


def test_parts_written_for_another_list_of_images_are_refused_on_either_engine(cluster, clf, tmp_path):
    from protext.label import open_parts

    paths = [str(p) for p in collect([CIFAR])[:10]]
    out = tmp_path / "labels.jsonl"
    other = [str(q) for q in collect([CIFAR])[20:24]]
    folder = open_parts(clf, other, out, 3, None, "softmax", 4)  # part 0 of a run over other images
    folder.write(0, b'{"path": "x"}\n', 1, 0)
    for run in (lambda: label_on_ray(clf, paths, out, workers=1, batch_size=4, part_size=4, ctx=QUIET),
                lambda: label(clf, paths, out, part_size=4, ctx=QUIET)):
        with pytest.raises(ProtextError, match="labels.jsonl.parts holds parts of another list of images "
                                               "\\(4 images then, 10 now"):
            run()
    assert folder.done(0) and not out.exists()  # nothing was changed by the refusals


def test_workers_read_a_manifest_and_write_the_parts_themselves(cluster, clf, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from protext.inputs import open_inputs

    paths = images(tmp_path, 30)
    pq.write_table(pa.table({"path": [str(p) for p in paths], "label": ["truth"] * len(paths)}),
                   tmp_path / "m.parquet", row_group_size=7)
    manifest = open_inputs([tmp_path / "m.parquet"], 8)
    label(clf, manifest, out=tmp_path / "one", part_size=8, ctx=QUIET)

    def not_here(*args):
        raise AssertionError("the driver wrote a part")

    monkeypatch.setattr(PartFolder, "write", not_here)  # in this process only: the workers write
    report = label_on_ray(clf, manifest, out=tmp_path / "ray", part_size=8, workers=2, batch_size=4, ctx=QUIET,
                          save_features=tmp_path / "f")
    monkeypatch.undo()
    assert (report.processed, report.unreadable) == (len(paths), 1)
    a, b = pq.read_table(tmp_path / "one"), pq.read_table(tmp_path / "ray")
    assert a.column_names == b.column_names and a.column("path").to_pylist() == b.column("path").to_pylist()
    assert a.column("top_labels").to_pylist() == b.column("top_labels").to_pylist()
    assert b.column("input_label").to_pylist() == ["truth"] * len(paths)
    write_features(clf.backbone, manifest, tmp_path / "g", part_size=8, ctx=QUIET)
    f, g = read_features(tmp_path / "f"), read_features(tmp_path / "g")
    assert f.paths == g.paths and f.errors == g.errors and torch.allclose(f.feats, g.feats, atol=1e-5)


def test_workers_read_webdataset_shards_themselves(cluster, clf, tmp_path):
    import pyarrow.parquet as pq
    from test_manifests import write_shards

    from protext.inputs import open_inputs

    keys = write_shards(tmp_path / "shards")
    shards = open_inputs([tmp_path / "shards"], 4)
    label(clf, shards, out=tmp_path / "one", part_size=4, ctx=QUIET)
    label_on_ray(clf, shards, out=tmp_path / "ray", part_size=4, workers=1, ctx=QUIET)
    a, b = pq.read_table(tmp_path / "one"), pq.read_table(tmp_path / "ray")
    assert b.column("path").to_pylist() == keys and a.column("top_labels").equals(b.column("top_labels"))
    assert b.column("cls").to_pylist() == a.column("cls").to_pylist()


def test_a_bad_manifest_row_a_worker_reads_is_the_same_clear_error_as_on_one_machine(cluster, clf, tmp_path):
    from protext.inputs import open_inputs

    paths = images(tmp_path, 6)
    rows = [{"path": str(p)} for p in paths] + [{"path": ""}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = open_inputs([tmp_path / "m.jsonl"], 4)
    for run in (lambda: label(clf, manifest, out=tmp_path / "one", part_size=4, ctx=QUIET),
                lambda: label_on_ray(clf, manifest, out=tmp_path / "ray", part_size=4, workers=1, ctx=QUIET)):
        with pytest.raises(ProtextError) as caught:
            run()
        assert str(caught.value) == f"{tmp_path / 'm.jsonl'}: row 8 has no path"


def _tree(root, sources):
    """Images at three depths, names whose order is easy to get wrong ("a.jpg" < "a/..." < "a-b/..."
    component by component, not as strings), files that are not images and a dangling link."""
    names = ["top.jpg", "a.jpg", "a/x.jpg", "a/deep/1.png", "a/deep/2.png", "a-b/y.jpg", "a0.png", "b/c/d/e/z.jpg",
             "b/c/k.jpeg", "b/w.webp", "c/only.jpg"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[i % len(sources)], root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    os.symlink(root / "gone.jpg", root / "b" / "dangling.jpg")
    return names


@pytest.mark.parametrize("units", [1, 3, 64])
def test_folders_listed_by_ray_tasks_are_the_single_machine_listing(cluster, tmp_path, monkeypatch, units):
    from protext.inputs import ListInputs
    from protext.listing import FolderListing, list_on_ray

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "more").mkdir()
    _tree(tmp_path / "photos", collect([CIFAR]))
    shutil.copy(collect([CIFAR])[0], tmp_path / "more" / "m.jpg")
    given = [Path("photos"), Path("more")]  # relative, as a user types them
    local_notes, ray_notes = [], []
    local = ListInputs(collect(given, local_notes))
    listed = list_on_ray(given, tmp_path / "out" / "_listing", part_size=4, units=units, notes=ray_notes)
    assert isinstance(listed, FolderListing) and listed.identity() == local.identity()
    parts = [listed.part(i) for i in range(3)]
    assert [n for p in parts for n in p.names] == local.names == [str(p) for p in collect(given)]
    assert [i for p in parts for i in p.items] == [str(tmp_path / n) for n in local.names]  # absolute for the workers
    assert sorted(ray_notes) == sorted(local_notes) and "dangling" in ray_notes[0]
    if units > 1:  # subfolders were handed out, and the files above them written by the driver
        assert len(listed.files) > 2


def test_a_link_to_a_folder_or_nested_folders_are_listed_on_the_driver(cluster, tmp_path):
    from protext.distributed import open_ray_inputs
    from protext.inputs import ListInputs
    from protext.listing import list_on_ray, listable

    root = tmp_path / "photos"
    root.mkdir()
    _tree(root, collect([CIFAR]))
    assert listable([root, root / "a"]) is None and listable([root, tmp_path / "missing"]) is None
    os.symlink(root / "a", root / "b" / "c" / "again")  # the single-machine listing follows it once
    assert list_on_ray([root], tmp_path / "_listing", part_size=4, units=64) is None
    opened = open_ray_inputs([root], 4, tmp_path / "_listing")
    assert isinstance(opened, ListInputs) and opened.names == [str(p) for p in collect([root])]
    assert str(root / "b" / "c" / "again" / "x.jpg") in opened.names


def test_an_empty_folder_is_the_same_clear_error_on_ray(cluster, tmp_path):
    from protext.listing import list_on_ray

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ProtextError, match="no image files in this folder or below"):
        collect([tmp_path / "empty"])
    with pytest.raises(ProtextError, match=f"{tmp_path / 'empty'}: no image files in this folder or below"):
        list_on_ray([tmp_path / "empty"], tmp_path / "_listing", part_size=4)


def test_features_of_a_folder_on_ray_are_the_single_machine_parts_and_the_listing_is_removed(cluster, clf,
                                                                                              tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    _tree(tmp_path / "photos", collect([CIFAR]))
    common = ["--backbone", str(clf.backbone.name), "--part-size", "4", "--no-progress", "--batch-size", "4"]
    assert main(["features", "photos", "--out", "one", *common]) == 0
    assert main(["features", "photos", "--out", "ray", "--engine", "ray", "--workers", "1", *common]) == 0
    one, two = read_features(tmp_path / "one"), read_features(tmp_path / "ray")
    assert one.paths == two.paths and len(one.paths) == 11
    assert torch.allclose(one.feats, two.feats, atol=1e-5)
    assert not (tmp_path / "ray" / "_listing").exists()
    settings = [json.loads((tmp_path / f / "_settings.json").read_text()) for f in ("one", "ray")]
    assert settings[0]["paths_sha1"] == settings[1]["paths_sha1"] and settings[0]["images"] == 11
