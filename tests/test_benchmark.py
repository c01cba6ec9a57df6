import csv
import json
import shutil

import pytest
import torch
from PIL import Image
from support import CUPL, DCLIP, SHARED, make_coop_tree

from protext.training import benchmark as bm
from protext.cli import main
from protext.context import Context
from protext.training.datasets import image_folder
from protext.training.evaluate import extract
from protext.model import ProText
from protext.training.report import value


def test_features_are_cached_and_an_interrupted_extraction_resumes(tiny, tmp_path, shared, monkeypatch):
    ds = image_folder(SHARED / "images" / "cifar10_test_sample")
    calls = []
    real = type(tiny.image).__call__

    def flaky(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return real(self, pixels)

    monkeypatch.setattr(type(tiny.image), "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny, ds, Context(tmp_path, progress=False), batch_size=8, part_size=16)
    assert sum(calls[:2]) == 16  # the first chunk was stored before the kill
    calls.clear()
    monkeypatch.setattr(type(tiny.image), "__call__", lambda self, p: calls.append(len(p)) or real(self, p))
    resumed = extract(tiny, ds, Context(tmp_path, progress=False), batch_size=8, part_size=16)
    assert sum(calls) == 100 - 16
    calls.clear()
    again = extract(tiny, ds, Context(tmp_path, progress=False), batch_size=8, part_size=16)
    assert calls == [] and torch.equal(again.feats, resumed.feats)
    fresh = extract(tiny, ds, Context(tmp_path / "other", progress=False), batch_size=100)
    assert torch.allclose(fresh.feats, resumed.feats, atol=1e-5)
    assert resumed.labels.tolist() == [l for _, l in ds.samples]


def test_eval_command_on_real_cifar_images(tiny_folder, tmp_path, capsys, shared):
    from protext.backbone import load_backbone

    ProText.create(load_backbone(str(tiny_folder), device="cpu"), depth=2).save_pretrained(tmp_path / "p")
    code = main(["eval", "--dataset", "folder", "--data-root", str(SHARED / "images" / "cifar10_test_sample"),
                 "--prompts", str(tmp_path / "p"), "--descriptions", str(CUPL / "cifar10_prompts_full.json"),
                 "--heads", "clip,clip80,cupl,protext,protext+cupl", "--cache-dir", str(tmp_path / "c"),
                 "--output", str(tmp_path / "row.json"), "--no-progress"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["images"] == 100 and row["classes"] == 10 and row["skipped"] == 0
    assert all(0 <= row[h] <= 100 for h in ("clip", "clip80", "cupl", "protext", "protext+cupl"))
    assert json.loads((tmp_path / "row.json").read_text())["protext"] == row["protext"]


def test_accuracy_counts_correct_predictions():
    from protext.training.evaluate import LabelledFeatures as Features

    f = Features(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 1, 0]), ["a", "b", "c", "d"])
    assert bm.accuracy(f, torch.eye(3)) == 75.0


@pytest.fixture()
def coop_root(tmp_path, shared):
    root = tmp_path / "data"
    for name in ("eurosat", "dtd"):
        make_coop_tree(root, name, per_class=1)
    descs = tmp_path / "descs"
    descs.mkdir()
    shutil.copy(CUPL / "eurosat_prompts_full.json", descs / "eurosat.json")
    shutil.copy(CUPL / "texture_prompts_full.json", descs / "dtd.json")
    descriptors = tmp_path / "descriptors"  # DCLIP's: DTD's names match CoOp's, EuroSAT's do not
    descriptors.mkdir()
    shutil.copy(DCLIP / "descriptors_dtd.json", descriptors / "dtd.json")
    shutil.copy(DCLIP / "descriptors_eurosat.json", descriptors / "eurosat.json")
    return root, descs


def test_base2novel_and_text_only_protocols_end_to_end(tiny_folder, tmp_path, coop_root):
    root, descs = coop_root
    out = tmp_path / "out"
    args = ["--data-root", str(root), "--descriptions-dir", str(descs), "--datasets", "eurosat,dtd,ucf101",
            "--backbone", str(tiny_folder), "--set", "depth=2", "--set", "epochs=2", "--set", "warmup_epochs=1",
            "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--no-progress"]
    assert main(["benchmark", "base2novel", *args]) == 0
    result = json.loads((out / "base2novel.json").read_text())
    rows = [r for r in result["rows"] if r["source"] == "measured"]
    assert list(dict.fromkeys(r["dataset"] for r in rows)) == ["eurosat", "dtd"]
    assert "ucf101" in result["missing"] and "split_zhou_UCF101.json" in result["missing"]["ucf101"]
    assert set(rows[0]) >= {"protocol", "dataset", "split", "head", "metric", "value", "backbone", "prompts"}
    for d in ("eurosat", "dtd"):
        b, n, hm = (value(rows, dataset=d, split=s, head="protext") for s in ("base", "novel", "all"))
        assert hm == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
        # novel classes have no descriptions: CuPL = CLIP
        assert value(rows, dataset=d, split="novel", head="cupl") == value(rows, dataset=d, split="novel", head="clip")
        assert next(r for r in rows if r["dataset"] == d and r["head"] == "protext")["prompts"] is not None
    with open(out / "base2novel.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result["rows"])
    assert (out / "prompts" / "eurosat" / "prompts.safetensors").is_file()
    md = (out / "base2novel.md").read_text()
    assert "paper mean" in md and "72.95 / 76.98 / 74.91" in md and "ucf101" in md
    with Image.open(out / "base2novel.png") as png:
        assert png.size[0] > 300
    assert main(["benchmark", "text-only", *args, "--descriptors-dir", str(tmp_path / "descriptors"),
                 "--waffle-seeds", "2", "--awt-dir", str(SHARED / "descriptions" / "awt")]) == 0
    text_only = json.loads((out / "text-only.json").read_text())
    heads = {d: {r["head"] for r in text_only["rows"] if r["dataset"] == d and r["source"] == "measured"}
             for d in ("eurosat", "dtd")}
    assert heads["dtd"] == {"clip", "clip80", "dclip", "waffle", "cupl", "protext", "awt", "protext+cupl"}
    # AWT's EuroSAT file names four classes otherwise ("brushland or shrubland"): not run, and said why
    assert "awt" not in heads["eurosat"] and "'Sea or Lake'" in text_only["not_run"]["eurosat/awt"]
    assert "dclip" not in heads["eurosat"]
    assert "no descriptors for 4 requested classes" in text_only["not_run"]["eurosat/dclip"]
    assert "'Herbaceous Vegetation Land'" in text_only["not_run"]["eurosat/dclip"]  # names the classes it lacks
    md = (out / "text-only.md").read_text()
    for method, published in (("CLIP", 66.72), ("CLIP-80", 68.32), ("DCLIP", 68.03), ("WaffleCLIP", 68.34),
                              ("CuPL", 69.62), ("ProText", 70.22), ("AWT", 71.32)):
        assert f"| {method} | not run | {published} |" in md  # no ImageNet here, the paper's figure beside it
    assert "| ProText+CuPL | not run | – |" in md and "mean of 2 seeds" in md
    assert "eurosat / dclip:" in md


def test_cross_dataset_and_domain_generalization_protocols(tiny_folder, tmp_path, coop_root):
    root, _ = coop_root
    from protext.backbone import load_backbone
    from protext.descriptions import load_descriptions
    from protext.training.train import TrainConfig, train

    backbone = load_backbone(str(tiny_folder), device="cpu")
    prompts, _ = train(backbone, load_descriptions(CUPL / "cifar10_prompts_full.json"),
                       TrainConfig(depth=2, epochs=1, warmup_epochs=0), tmp_path / "p",
                       Context(tmp_path / "c", progress=False), source=str(CUPL / "cifar10_prompts_full.json"))
    ctx = Context(tmp_path / "c", progress=False)
    result = bm.cross_dataset(backbone, prompts, root, ctx=ctx).as_dict()
    rows = [r for r in result["rows"] if r["source"] == "measured"]
    assert list(dict.fromkeys(r["dataset"] for r in rows)) == ["dtd", "eurosat"]
    assert set(result["missing"]) == {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                                      "food101", "fgvc_aircraft", "sun397", "ucf101"}
    assert {r["head"] for r in rows} == {"clip", "cupl", "protext"}  # the prompts' own descriptions give cupl
    files = bm.write_report(result, tmp_path / "r")
    assert set(files) == {"json", "csv", "markdown", "png"}
    md = files["markdown"].read_text()
    mean = (value(rows, dataset="dtd", head="protext") + value(rows, dataset="eurosat", head="protext")) / 2
    assert "| dtd |" in md and "47.93" in md and "| **mean** |  | " in md and f"{mean:.2f} | 67.23 |" in md
    dg = bm.domain_generalization(backbone, prompts, root, ctx).as_dict()
    assert not [r for r in dg["rows"] if r["source"] == "measured"]
    assert set(dg["missing"]) == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert main(["benchmark", "domain-generalization", "--data-root", str(root), "--prompts", str(tmp_path / "p"),
                 "--backbone", str(tiny_folder), "--out", str(tmp_path / "dg"), "--no-progress"]) == 2
