import json
import math

import pytest
from support import SHARED, SPLIT_FILES, make_coop_tree, tiny_image

from protext.training.datasets import SPLIT_DATASETS, base_novel, csv_dataset, image_folder, load_dataset
from protext.errors import ProtextError


@pytest.mark.parametrize("name", sorted(SPLIT_FILES))
def test_coop_split_layouts(tmp_path, shared, name):
    raw, cut = make_coop_tree(tmp_path, name)
    ds = load_dataset(name, tmp_path, "test")
    names = {}
    for _, label, cname in raw["test"]:
        names.setdefault(label, cname.replace("_", " "))
    assert ds.classes == [" ".join(names[i].split()) for i in range(len(names))]
    assert len(ds.samples) == len(cut["test"]) and all(p.exists() for p, _ in ds.samples)
    assert load_dataset(name, tmp_path / SPLIT_DATASETS[name][0], "train").split == "train"  # the dataset folder itself
    novel = base_novel(ds, "novel")
    k = math.ceil(len(ds.classes) / 2)
    assert novel.classes == ds.classes[k:] and {l for _, l in novel.samples} == set(range(len(ds.classes) - k))


def test_base_novel_rule_on_odd_class_counts(tmp_path):
    root = tmp_path / "f"
    for c in "abcde":
        tiny_image(root / c / "0.png")
    ds = image_folder(root)
    assert base_novel(ds, "base").classes == ["a", "b", "c"]
    assert base_novel(ds, "novel").classes == ["d", "e"]
    assert [l for _, l in base_novel(ds, "novel").samples] == [0, 1]


def test_aircraft_and_imagenet_layouts(tmp_path):
    air = tmp_path / "fgvc_aircraft"
    (air).mkdir()
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    (air / "images_variant_test.txt").write_text("0001 A300B4\n0002 707-320\n")
    for i in ("0001", "0002"):
        tiny_image(air / "images" / f"{i}.jpg")
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classes == ["707-320", "A300B4"] and [l for _, l in ds.samples] == [1, 0]

    names = {"n01": "tench", "n02": "goldfish", "n03": "great white shark"}
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    for w in names:
        tiny_image(tmp_path / "imagenet" / "images" / "val" / w / "a.JPEG")
    assert load_dataset("imagenet", tmp_path).classes == ["tench", "goldfish", "great white shark"]
    for w in ("n01", "n03"):  # -A and -R hold a subset of the classes
        tiny_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "x.jpg")
    a = load_dataset("imagenet_a", tmp_path)
    assert a.classes == ["tench", "great white shark"] and [l for _, l in a.samples] == [0, 1]
    tiny_image(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "2" / "x.jpeg")
    v2 = load_dataset("imagenetv2", tmp_path)
    assert len(v2.classes) == 3 and v2.samples[0][1] == 2


def test_missing_and_malformed_datasets_say_what_was_expected_where(tmp_path):
    with pytest.raises(ProtextError, match=r"dtd/split_zhou_DescribableTextures\.json.*CoOp layout"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"test": [["a.jpg", "x", "banded"]]}')
    with pytest.raises(ProtextError, match=r"item 0 should be \[relative path, label, class name\]"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"test": [["a.jpg", 0, "banded"]]}')
    with pytest.raises(ProtextError, match="none of the first listed images exist.*dtd/images"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": []}')
    with pytest.raises(ProtextError, match="'test' list"):
        load_dataset("dtd", tmp_path)
    with pytest.raises(ProtextError, match="classnames.txt"):
        (tmp_path / "imagenet-sketch" / "images").mkdir(parents=True)
        load_dataset("imagenet_sketch", tmp_path)
    with pytest.raises(ProtextError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)


def test_image_folder_and_csv_on_real_images(tmp_path, shared):
    cifar = image_folder(SHARED / "images" / "cifar10_test_sample")
    assert cifar.classes[:3] == ["airplane", "automobile", "bird"] and len(cifar.samples) == 100
    rows = ["path,label"] + [f"{p},{p.name.split('_', 1)[1].rsplit('.', 1)[0]}"
                             for p in sorted((SHARED / "images" / "imagenet_sample").iterdir())]
    (tmp_path / "in.csv").write_text("\n".join(rows))
    ds = csv_dataset(tmp_path / "in.csv")
    assert len(ds.samples) == 100 and ds.classes[0] == "tench" and "water ouzel" in ds.classes
    (tmp_path / "bad.csv").write_text("a.jpg,cat,extra\n")
    with pytest.raises(ProtextError, match="bad.csv, line 1"):
        csv_dataset(tmp_path / "bad.csv")


def test_csv_errors_name_the_line_of_the_bad_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,cat\n\nb.jpg,dog,extra\n")
    with pytest.raises(ProtextError, match=r"bad\.csv, line 4: expected 'path,label'"):
        csv_dataset(bad)
    bad.write_text('path,label\n"a\nb.jpg",cat\n"c\nd.jpg",dog\ne.jpg\n')  # quoted fields span lines
    with pytest.raises(ProtextError, match=r"bad\.csv, line 6: expected 'path,label', got \['e\.jpg'\]"):
        csv_dataset(bad)
    bad.write_text('path,label\na.jpg,cat\n"b.jpg,dog,x\nc.jpg,dog\n', newline="")  # quoted field never closed
    with pytest.raises(ProtextError, match=r"bad\.csv, line 3"):
        csv_dataset(bad)


def test_csv_with_utf8_bom_parses_like_without(tmp_path):
    body = "path,label\nimgs/a.jpg,cat\nimgs/b.jpg,dog\n"
    (tmp_path / "plain.csv").write_text(body, encoding="utf-8")
    (tmp_path / "excel.csv").write_text(body, encoding="utf-8-sig")
    assert (tmp_path / "excel.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    plain, excel = csv_dataset(tmp_path / "plain.csv"), csv_dataset(tmp_path / "excel.csv")
    assert excel.classes == plain.classes == ["cat", "dog"] and excel.samples == plain.samples
    (tmp_path / "latin1.csv").write_bytes("path,label\nb\xe9b\xe9.jpg,cat\n".encode("latin-1"))
    with pytest.raises(ProtextError, match=r"latin1\.csv: not UTF-8 text"):
        csv_dataset(tmp_path / "latin1.csv")


def test_bom_in_split_and_class_name_files(tmp_path):
    items = [["a/1.jpg", 0, "apple_pie"], ["b/2.jpg", 1, "baby_back_ribs"]]
    (tmp_path / "food-101").mkdir()
    (tmp_path / "food-101" / "split_zhou_Food101.json").write_text(json.dumps({"test": items}), encoding="utf-8-sig")
    for rel, _, _ in items:
        tiny_image(tmp_path / "food-101" / "images" / rel)
    assert load_dataset("food101", tmp_path).classes == ["apple pie", "baby back ribs"]
    air = tmp_path / "fgvc_aircraft"
    air.mkdir()
    (air / "variants.txt").write_text("707-320\nA300B4\n", encoding="utf-8-sig")
    (air / "images_variant_test.txt").write_text("0001 707-320\n", encoding="utf-8-sig")
    tiny_image(air / "images" / "0001.jpg")
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classes == ["707-320", "A300B4"] and ds.samples[0][1] == 0
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n", encoding="utf-8-sig")
    for w in ("n01", "n02"):
        tiny_image(tmp_path / "imagenet" / "images" / "val" / w / "a.jpg")
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classes == ["tench", "goldfish"] and [l for _, l in ds.samples] == [0, 1]


def test_empty_class_folders_are_kept_and_reported(tmp_path):
    root = tmp_path / "pets"
    tiny_image(root / "cat" / "a.png")
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    tiny_image(root / "fish" / "b.png")
    ds = image_folder(root)
    assert ds.classes == ["cat", "dog", "fish"] and [l for _, l in ds.samples] == [0, 2]
    assert len(ds.notes) == 1 and str(root) in ds.notes[0] and ds.notes[0].endswith(": dog")
    assert base_novel(ds, "novel").notes == ds.notes  # the notes travel with the dataset
    full = tmp_path / "full"
    for c in "ab":
        tiny_image(full / c / "x.png")
    assert image_folder(full).notes == []
    for c in "xyz":
        (tmp_path / "empty" / c).mkdir(parents=True)
    with pytest.raises(ProtextError, match="no images found"):
        image_folder(tmp_path / "empty")


def test_missing_or_empty_wnid_folders_are_reported(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\nn03 shark\n")
    tiny_image(tmp_path / "imagenet" / "images" / "val" / "n01" / "a.jpg")
    (tmp_path / "imagenet" / "images" / "val" / "n03").mkdir()
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classes == ["tench", "goldfish", "shark"] and [l for _, l in ds.samples] == [0]
    assert len(ds.notes) == 1 and "2 of 3" in ds.notes[0] and ds.notes[0].endswith("n02, n03")
    sketch = tmp_path / "imagenet-sketch" / "images"
    tiny_image(sketch / "n02" / "a.jpg")
    (sketch / "n03").mkdir()
    ds = load_dataset("imagenet_sketch", tmp_path)
    assert ds.classes == ["goldfish", "shark"] and ds.notes and ds.notes[0].endswith(": n03")
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    tiny_image(v2 / "1" / "a.jpg")
    ds = load_dataset("imagenetv2", tmp_path)
    assert len(ds.classes) == 3 and ds.samples[0][1] == 1 and ds.notes[0].endswith("0, 2")
    tiny_image(v2 / "3" / "a.jpg")
    with pytest.raises(ProtextError, match=r"folders \['3'\] are not class numbers 0\.\.2"):
        load_dataset("imagenetv2", tmp_path)


@pytest.mark.parametrize("name", ["food101", "sun397"])
def test_split_layouts_without_shared_split_files(tmp_path, name):
    folder, image_dir, split_file = SPLIT_DATASETS[name]
    items = [["a/1.jpg", 0, "apple_pie"], ["b/2.jpg", 1, "baby_back_ribs"], ["a/3.jpg", 0, "apple_pie"]]
    (tmp_path / folder).mkdir()
    (tmp_path / folder / split_file).write_text(json.dumps({"train": items, "val": items, "test": items}))
    for rel, _, _ in items:
        tiny_image(tmp_path / folder / image_dir / rel)
    ds = load_dataset(name, tmp_path)
    assert ds.classes == ["apple pie", "baby back ribs"] and [l for _, l in ds.samples] == [0, 1, 0]


@pytest.mark.parametrize("name, folder, image_dir", [("imagenet_sketch", "imagenet-sketch", "images"),
                                                     ("imagenet_r", "imagenet-rendition", "imagenet-r")])
def test_sketch_and_rendition_layouts(tmp_path, name, folder, image_dir):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\nn03 shark\n")
    tiny_image(tmp_path / folder / image_dir / "n03" / "a.jpg")
    tiny_image(tmp_path / folder / image_dir / "n01" / "b.jpg")
    ds = load_dataset(name, tmp_path)
    if name == "imagenet_r":
        assert ds.classes == ["tench", "shark"]
    assert sorted(l for _, l in ds.samples) == sorted({ds.classes.index("tench"), ds.classes.index("shark")})
