"""Hugging Face datasets as inputs, offline: a dataset the test writes with `datasets` itself."""

import json

import pytest
from PIL import Image
from support import SHARED

from protext.cli import main
from protext.errors import ProtextError
from protext.hub_datasets import open_dataset

datasets = pytest.importorskip("datasets")
CIFAR = SHARED / "images" / "cifar10_test_sample"
NAMES = ["cat", "frog", "ship"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (train, test) of real CIFAR images with a ClassLabel, written by save_to_disk."""
    rows = {"image": [], "label": []}
    for label, name in enumerate(NAMES):
        for f in sorted((CIFAR / name).iterdir())[:4]:
            with Image.open(f) as im:
                rows["image"].append(im.convert("RGB"))
            rows["label"].append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    table = datasets.Dataset.from_dict(rows, features=features)
    folder = tmp_path_factory.mktemp("hub") / "mini_cifar"
    datasets.DatasetDict({"train": table.select(range(6)), "test": table}).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_opens_with_its_classes_splits_and_rows(saved):
    test = open_dataset(f"hf:{saved}")
    assert (test.split, len(test), test.classes, test.name) == ("test", 12, NAMES, "mini_cifar")
    train = open_dataset(f"hf:{saved}:train")
    assert train.split == "train" and len(train) == 6 and train.labels() == [0, 0, 0, 0, 1, 1]
    assert test.image(5).open().size == (32, 32) and str(test.image(5)) == f"hf:{saved}:test#5"
    assert test.image(0).key != test.image(1).key
    with pytest.raises(ProtextError, match="no split 'valid'; it has train, test"):
        open_dataset(f"hf:{saved}:valid")


def test_eval_label_and_features_read_a_hub_dataset(saved, tiny_folder, tmp_path, capsys):
    common = ["--backbone", str(tiny_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(["eval", "--dataset", f"hf:{saved}", "--heads", "clip,clip80", *common]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["dataset"], row["split"], row["images"], row["classes"]) == ("mini_cifar", "test", 12, 3)
    assert main(["eval", "--dataset", f"hf:{saved}", "--split", "train", "--heads", "clip", *common]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    assert main(["label", "--dataset", f"hf:{saved}:test", "--output", str(tmp_path / "l.jsonl"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[3]["path"] == f"hf:{saved}:test#3" and {r["label"] for r in rows} <= set(NAMES)
    assert main(["features", "--dataset", f"hf:{saved}", "--out", str(tmp_path / "f"), *common]) == 0
    capsys.readouterr()
    assert main(["label", "--features", str(tmp_path / "f"), "--classes", ",".join(NAMES), "--output",
                 str(tmp_path / "lf.jsonl"), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    again = [json.loads(line) for line in (tmp_path / "lf.jsonl").read_text().splitlines()]
    assert [r["top_labels"] for r in again] == [r["top_labels"] for r in rows]
    assert main(["label", str(CIFAR), "--dataset", f"hf:{saved}", "--output", str(tmp_path / "x.jsonl"), *common]) == 2
    assert "gives the images: give no PATHs" in capsys.readouterr().err


def test_an_unreachable_hub_dataset_says_how_to_supply_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ProtextError, match="could not load it .*save_to_disk, then give --dataset hf:FOLDER"):
        open_dataset("hf:someone/not-a-dataset")


def test_benchmark_runs_a_hub_dataset_beside_coop_ones(saved, tiny_folder, tmp_path):
    descs = tmp_path / "descs"
    descs.mkdir()
    cifar = json.loads((SHARED / "descriptions" / "cupl" / "cifar10_prompts_full.json").read_text())
    (descs / "mini_cifar.json").write_text(json.dumps({n: cifar[n] for n in NAMES}))
    assert main(["benchmark", "base2novel", "--data-root", str(tmp_path), "--datasets", f"hf:{saved}",
                 "--descriptions-dir", str(descs), "--backbone", str(tiny_folder), "--set", "depth=2", "--set",
                 "epochs=1", "--set", "warmup_epochs=0", "--cache-dir", str(tmp_path / "c"), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "base2novel.json").read_text())["rows"]
    assert {(r["dataset"], r["split"]) for r in rows if r["source"] == "measured"} == {
        ("mini_cifar", "base"), ("mini_cifar", "novel"), ("mini_cifar", "all")}
