import json

import pytest
import torch
from support import CUPL, DCLIP

from protext.cli import main
from protext.context import Context
from protext.training.datasets import split_base_novel
from protext.heads import ensemble
from protext.metrics import harmonic_mean
from protext.metrics import top1 as accuracy
from protext.training.text_eval import TextEvaluator, hold_out, make_queries, markdown_base_to_novel, result_rows, mask_class_name
from protext.training.train import TrainConfig


@pytest.mark.parametrize("sentence, name, want", [
    ("A tench is a freshwater fish. Tenches are green.", "tench", "A thing is a freshwater fish. thing are green."),
    ("Great white sharks have a great white shark's teeth.", "great white shark", "thing have a thing teeth."),
    ("A satellite photo of Annual Crop Land shows crop rows.", "annual crop land", "A satellite photo of thing shows thing rows."),
    ("The Abyssinian cat is slim.", "abyssinian", "The thing cat is slim."),
    ("Sea or lake water looks blue.", "sea or lake", "thing water looks blue."),
])
def test_masking_hides_the_class_name(sentence, name, want):
    assert mask_class_name(sentence, name) == want


def test_masking_all_real_eurosat_descriptions_removes_every_name_word(eurosat):
    for name, sentences in eurosat.items():
        for s in sentences:
            masked = mask_class_name(s, name, "thing").lower()
            assert name not in masked


def test_base_novel_split_and_hold_out_follow_the_rules():
    assert split_base_novel(list("abcde")) == (list("abc"), list("de"))
    data = {"a": [f"s{i}" for i in range(10)], "b": ["only"], "c": ["x", "y"]}
    tr, held = hold_out(data, 0.2, seed=3)
    assert len(held["a"]) == 2 and len(tr["a"]) == 8 and set(tr["a"]) | set(held["a"]) == set(data["a"])
    assert tr["b"] == ["only"] and held["b"] == []
    assert len(held["c"]) == 1 and len(tr["c"]) == 1
    assert hold_out(data, 0.2, seed=3) == (tr, held)
    assert hold_out(data, 0.2, seed=4)[1]["a"] != held["a"] or hold_out(data, 0.2, seed=5)[1]["a"] != held["a"]


def test_head_arithmetic_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert accuracy(q, torch.tensor([0, 1, 0]), w) == pytest.approx(200 / 3)
    e = ensemble(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(e, torch.tensor([2 ** -0.5, 2 ** -0.5]))
    assert harmonic_mean(60, 40) == pytest.approx(48.0) and harmonic_mean(0, 0) == 0


def test_queries_carry_labels_in_class_order():
    q = make_queries({"cat": ["A cat naps."], "dog": ["A dog runs.", "Dogs bark."]}, ["dog", "cat"], "thing")
    assert q.texts == ["A thing runs.", "thing bark.", "A thing naps."]
    assert q.labels.tolist() == [0, 0, 1]


def test_both_protocols_run_end_to_end_on_a_tiny_encoder(tiny, tmp_path, shared):
    from protext.descriptions import load_descriptions

    ev = TextEvaluator(tiny, TrainConfig(depth=2, epochs=2, warmup_epochs=1, lr=0.005), Context(tmp_path, progress=False))
    r = ev.base_to_novel(load_descriptions(CUPL / "eurosat_prompts_full.json"), holdout=0.2, seed=1)
    assert r["classes"] == {"base": 5, "novel": 5}
    assert r["queries"] == {"base": 25, "novel": 125}
    for split in ("base", "novel", "hm"):
        # no DCLIP descriptors given: no dclip
        assert set(r[split]) == {"clip", "clip80", "protext", "cupl", "awt", "waffle", "protext+cupl"}
        assert all(0 <= v <= 100 for v in r[split].values())
    assert r["novel"]["cupl"] == r["novel"]["clip"]
    assert all("thing" in e["masked"] for e in r["examples"])
    assert r["template_text"] == "a photo of a {}."
    x = ev.cross_dataset(load_descriptions(CUPL / "eurosat_prompts_full.json"),
                         {"pets": load_descriptions(CUPL / "pets_prompts_full.json"),
                          "cupl-dtd": load_descriptions(CUPL / "texture_prompts_full.json")})
    assert set(x["pets"]["scores"]) == {"clip", "clip80", "waffle", "protext"}  # no descriptions of pets: no cupl
    assert x["pets"]["classes"] == 37 and x["pets"]["queries"] == 740
    # cross-dataset heads read the target dataset's inference template, as ProText's code does
    assert x["pets"]["template_text"] == "a photo of a {}, a type of pet."
    assert x["cupl-dtd"]["template_text"] == "a photo of a {}, a type of a texture."
    # every score is the mean of the per-query hits the evaluator keeps (what an interval is drawn from)
    for key, split, scores in (("base2novel/descriptions/base", "base", r["base"]),
                               ("base2novel/descriptions/novel", "novel", r["novel"]),
                               ("cross-dataset/pets/test", "test", x["pets"]["scores"])):
        kept = {h: v for h, v in ev.hits[key].items() if h != "labels"}
        assert ev.hits[key]["labels"].max() < (37 if split == "test" else 5)
        assert set(kept) == set(scores) and len(kept["protext"]) == (740 if split == "test" else r["queries"][split])
        for head, right in kept.items():
            assert 100 * float(right.double().mean()) == pytest.approx(scores[head])


def test_template_heads_score_the_given_template(tiny, tmp_path):
    """Both heads read the same text; changing it changes the template head's class embeddings."""
    data = {c: [f"A {c} is a thing with {w} parts." for w in ("red", "blue", "small", "round")]
            for c in ("cat", "dog", "car", "ship")}
    cfg = TrainConfig(depth=2, epochs=1, warmup_epochs=0, lr=0.001)
    ev = TextEvaluator(tiny, cfg, Context(tmp_path, progress=False), template="{} texture.")
    model = ev.train_prompts(data)
    q = make_queries(data, list(data), "thing")
    got = ev.score(q, list(data), model, None, "{} texture.", None, "check")
    want = accuracy(ev.encode(q.texts), q.labels, ev.encode([f"{c} texture." for c in data]))
    assert got["clip"] == pytest.approx(want)
    assert ev.cross_dataset(data, {"pets": data})["pets"]["template_text"] == "{} texture."


def test_description_sets_map_to_their_datasets():
    from protext.sources import dataset_of

    assert dataset_of("airplane_prompts_full") == "fgvc_aircraft"
    assert dataset_of("cupl:dtd") == dataset_of("cupl-dtd") == dataset_of("texture") == "dtd"
    assert dataset_of("EuroSAT") == "eurosat"
    assert dataset_of("imagenet_prompts_base") == "imagenet"
    assert dataset_of("my_labels") is None


def test_eval_text_command_writes_report(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval-text", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 str(CUPL / "pets_prompts_full.json"), "--source", str(CUPL / "cifar10_prompts_full.json"),
                 "--set", "depth=2", "--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "lr=0.001", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "eval_text.json").read_text())
    assert set(report["sets"]["base2novel"]) == {"eurosat_prompts_full", "pets_prompts_full"}
    assert set(report["sets"]["cross-dataset"]) == {"eurosat_prompts_full", "pets_prompts_full"}
    rows = report["rows"]
    assert {(r["protocol"], r["split"], r["metric"]) for r in rows} == {
        ("base2novel", "base", "top1"), ("base2novel", "novel", "top1"), ("base2novel", "all", "hm"),
        ("cross-dataset", "test", "top1")}
    assert all(r["prompts"] for r in rows if r["head"] == "protext")
    assert (out / "eval_text.csv").read_text().count("\n") == len(rows) + 1
    md = (out / "eval_text.md").read_text()
    assert "| **mean** |" in md and "thing" in md
    assert 'read "a photo of a {}."' in md and "a photo of a {}, a type of pet." in md
    assert "eurosat_prompts_full" in capsys.readouterr().out


def test_eval_text_keeps_sets_whose_files_share_a_name(tiny_folder, tmp_path, capsys):
    import shutil

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    shutil.copy(CUPL / "eurosat_prompts_full.json", tmp_path / "a" / "set.json")
    shutil.copy(CUPL / "pets_prompts_full.json", tmp_path / "b" / "set.json")
    code = main(["eval-text", "--backbone", str(tiny_folder), "--protocol", "base2novel", "--descriptions",
                 str(tmp_path / "a" / "set.json"), str(tmp_path / "b" / "set.json"), "--set", "depth=2", "--set", "epochs=1",
                 "--set", "warmup_epochs=0", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "r" / "eval_text.json").read_text())
    assert set(report["sets"]["base2novel"]) == {"a/set", "b/set"}
    assert report["sets"]["base2novel"]["a/set"]["classes"] == {"base": 5, "novel": 5}


def test_eval_text_refuses_a_one_class_set_before_any_work(tiny_folder, tmp_path, capsys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"cat": ["A cat is a small furry animal.", "A cat purrs."]}))
    code = main(["eval-text", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 str(one), "--protocol", "base2novel", "--set", "depth=2", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    assert "one: base-to-novel needs at least 2 classes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_dclip_and_waffle_heads_in_the_image_free_check(tiny, tmp_path):
    from protext.descriptions import load_descriptions
    from protext.heads import Waffle

    dtd = load_descriptions(CUPL / "texture_prompts_full.json")
    descriptors = load_descriptions(DCLIP / "descriptors_dtd.json", item="descriptor")
    ev = TextEvaluator(tiny, TrainConfig(depth=2, epochs=1, warmup_epochs=0), Context(tmp_path, progress=False),
                       waffle=Waffle(count=3, seed=1), descriptors={"dtd": descriptors})
    r = ev.base_to_novel(dtd, name="texture_prompts_full")
    assert {"dclip", "waffle"} <= set(r["hm"])  # dtd's descriptors cover every class: dclip runs
    other = ev.base_to_novel(load_descriptions(CUPL / "eurosat_prompts_full.json"), name="eurosat_prompts_full")
    assert "dclip" not in other["hm"] and "waffle" in other["hm"]  # no EuroSAT descriptors were given
    report = {"backbone": tiny.name, "sets": {"base2novel": {"dtd": r, "eurosat": other}}}
    md = markdown_base_to_novel(result_rows(report))
    assert "dclip base / novel / HM" in md and "| eurosat |" in md and " – |" in md


def _text_proxy():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "text_proxy.py"
    spec = importlib.util.spec_from_file_location("text_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_interval_of_a_head_difference():
    """text_proxy's bootstrap over classes: exact where the answer is forced, around the measured
    difference otherwise, and wider than the queries alone would make it."""
    intervals = _text_proxy().intervals
    labels = torch.arange(8).repeat_interleave(5)  # 8 classes, 5 queries each
    ones, zeros = torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    same = {"a": [{"base": {"new": ones, "protext": ones, "labels": labels},
                   "novel": {"new": zeros, "protext": zeros, "labels": labels}}]}
    got = intervals(same, [{"t": {"new": ones, "protext": ones, "labels": labels}}], "new")
    assert got == {"base": (0.0, 0.0), "novel": (0.0, 0.0), "hm": (0.0, 0.0), "cross": (0.0, 0.0)}
    better = {"a": [{"base": {"new": ones, "protext": zeros, "labels": labels},
                     "novel": {"new": ones, "protext": zeros, "labels": labels}}]}
    assert intervals(better, [], "new") == {"base": (100.0, 100.0), "novel": (100.0, 100.0), "hm": (100.0, 100.0)}
    # the new head is right on every query of 2 of 8 classes the old one misses: +25 points, and where
    # those classes are drawn 0 to 5 times the difference ranges accordingly
    new, old = zeros.clone(), zeros.clone()
    new[:10] = True
    one = {"a": [{"base": {"new": new, "protext": old, "labels": labels},
                  "novel": {"new": new, "protext": old, "labels": labels}}]}
    lo, hi = intervals(one, [], "new")["novel"]
    assert 0 <= lo < 25 < hi <= 75
    # the same 10 right queries spread over all 8 classes: a class draw moves the mean far less
    spread = torch.zeros(40, dtype=torch.bool)
    spread[torch.tensor([0, 5, 10, 15, 20, 25, 30, 35, 1, 21])] = True
    even = {"a": [{"base": {"new": new, "protext": old, "labels": labels},
                   "novel": {"new": spread, "protext": old, "labels": labels}}]}
    lo2, hi2 = intervals(even, [], "new")["novel"]
    assert lo2 < 25 < hi2 and hi2 - lo2 < hi - lo
    assert intervals(one, [], "new") == intervals(one, [], "new")  # seeded: the same table twice


def test_a_setting_added_later_keeps_the_runs_kept_before_it(tiny, tmp_path, monkeypatch):
    """Runs are kept under a hash of their training settings: a setting added since (deep_init) stays
    out of it at its default, so the folder of a run kept before it existed is found again."""
    from dataclasses import asdict

    import protext.training.text_eval as te
    from protext.cache import sha1
    from protext.model import INFERENCE

    folders = []
    monkeypatch.setattr(te, "load_or_train", lambda backbone, data, cfg, folder, ctx: folders.append(folder))
    data = {"tench": ["a fish."], "goldfish": ["an orange fish."]}
    for deep_init in ("random", "frozen"):
        cfg = TrainConfig(depth=2, deep_init=deep_init)
        TextEvaluator(tiny, cfg, Context(tmp_path, progress=False), work_dir=tmp_path).train_prompts(data)
    before = {k: v for k, v in asdict(TrainConfig(depth=2)).items() if k not in INFERENCE and k != "deep_init"}
    key = sha1(tiny.fingerprint(), tiny.text.text_rule, json.dumps(data), json.dumps(before))[:16]
    assert folders[0] == tmp_path / key and folders[1] != folders[0]
