"""DCLIP and WaffleCLIP heads: their own sentence rules, their scoring, and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from support import CUPL, DCLIP, SHARED

from protext.baselines import dclip_clause, dclip_sentence, waffle_descriptors, word_vocabulary
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.descriptions import load_descriptions
from protext.descriptions import normalize_name as normalize
from protext.errors import ProtextError
from protext.context import Context
from protext.heads import HeadInputs, Heads, Waffle
from protext.sources import load_descriptors

IMAGENET = load_descriptions(DCLIP / "descriptors_imagenet.json", item="descriptor")


@pytest.mark.parametrize("name, descriptor, sentence", [
    ("tench", "a freshwater fish", "tench, which is a freshwater fish"),
    ("trilobite", "an extinct marine arthropod", "trilobite, which is an extinct marine arthropod"),
    ("academic gown", "has long sleeves and a hood", "academic gown, which has long sleeves and a hood"),
    ("jay", "often seen in pairs or small flocks", "jay, which often seen in pairs or small flocks"),
    ("eft", "typically orange or red with black spots", "eft, which typically orange or red with black spots"),
    ("abaya", "may have a hood or headscarf", "abaya, which may have a hood or headscarf"),
    ("electric ray", "can emit an electric shock", "electric ray, which can emit an electric shock"),
    ("abacus", "used for counting or doing simple arithmetic calculations",
     "abacus, which is used for counting or doing simple arithmetic calculations"),
    ("trilobite", "antennae", "trilobite, which is antennae"),  # DCLIP tests the first letter only
    ("tench", "olive green or brown in color", "tench, which has olive green or brown in color"),
])
def test_dclip_sentence_rules_on_real_descriptors(name, descriptor, sentence):
    assert descriptor in IMAGENET[name]
    assert dclip_sentence(name, descriptor) == sentence
    assert dclip_sentence(name, descriptor, after=".") == sentence + "."


def test_dclip_head_is_the_mean_of_per_descriptor_similarities(tiny, tmp_path):
    classes = ["tench", "goldfish", "great white shark"]
    descriptors = {c: IMAGENET[c] for c in classes}
    weights = Heads(tiny, HeadInputs(descriptors=descriptors, dataset="imagenet"), Context(tmp_path)).get("dclip", classes)
    images = F.normalize(torch.randn(7, weights.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    for i, c in enumerate(classes):
        sentence_feats = tiny.text.encode([f"{c}, {dclip_clause(d)}." for d in descriptors[c]])  # "." on ImageNet
        per_descriptor = images @ sentence_feats.T
        assert torch.allclose((images @ weights.T)[:, i], per_descriptor.mean(1), atol=1e-6)
        # CuPL renormalises the mean; DCLIP does not, so a class with more varied descriptors scores lower
        assert weights[i].norm() < 1 - 1e-4
        assert torch.allclose(F.normalize(weights[i], dim=-1), F.normalize(sentence_feats.mean(0), dim=-1), atol=1e-6)


def test_waffle_descriptors_are_seeded_and_sized_as_waffleclip(tiny):
    vocabulary = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    names = ["great white shark", "tench", "tiger shark"]  # 5/3 words -> 2 words of mean length 5
    first = waffle_descriptors(names, vocabulary, list("xyz"), count=4, seed=1)
    assert first == waffle_descriptors(names, vocabulary, list("xyz"), count=4, seed=1)
    assert first != waffle_descriptors(names, vocabulary, list("xyz"), count=4, seed=2)
    assert len(first) == 8
    words, chars = first[0::2], first[1::2]
    assert all(len(w.split(" ")) == 2 and all(len(p) <= 5 for p in w.split(" ")) for w in words)
    # one group more than the names' mean number of spaces (1 -> 2 groups), longest word 5 -> 6 characters in all
    assert all(len(c.split(", ")) == 2 and set(c.replace(", ", "")) <= set("xyz") for c in chars)
    assert all(len(c.replace(", ", "")) == 6 for c in chars)
    assert word_vocabulary(tiny.text.tokenizer) and all(w.isalpha() for w in word_vocabulary(tiny.text.tokenizer))


def test_waffle_head_shares_descriptors_and_takes_a_concept(tiny, tmp_path):
    classes = ["cat", "dog", "frog"]
    heads = Heads(tiny, HeadInputs(waffle=Waffle(count=3, seed=5, concept="animal")), Context(tmp_path))
    shared = heads.waffle_descriptors(classes)
    weights = heads.get("waffle", classes)
    for i, c in enumerate(classes):
        want = tiny.text.encode([f"A photo of a animal: a {c}, {dclip_clause(d)}." for d in shared]).mean(0)
        assert torch.allclose(weights[i], want, atol=1e-6)
    other = Heads(tiny, HeadInputs(waffle=Waffle(count=3, seed=6)), Context(tmp_path)).get("waffle", classes)
    assert not torch.allclose(weights, other, atol=1e-3)
    joint = Heads(tiny, HeadInputs(descriptors={c: ["has fur"] for c in classes}, waffle=Waffle(count=3)), Context(tmp_path))
    both = joint.get("waffle+dclip", classes)
    assert torch.allclose(both, F.normalize(joint.get("waffle", classes) + joint.get("dclip", classes), dim=-1), atol=1e-6)
    assert torch.allclose(both.norm(dim=1), torch.ones(3), atol=1e-5)


def test_bad_descriptor_input_names_the_file_class_or_flag(tiny, tiny_folder, tmp_path, capsys):
    with pytest.raises(ProtextError, match=r"head 'dclip' needs descriptors \(--descriptors FILE or dclip:NAME\) "
                                           r"for every class; none for 'frog'"):
        Heads(tiny, HeadInputs(descriptors={"cat": ["has fur"]}), Context(tmp_path)).get("dclip", ["cat", "frog"])
    with pytest.raises(ProtextError, match=r"head 'dclip' needs descriptors \(--descriptors FILE or dclip:NAME\)$"):
        Heads(tiny, HeadInputs(), Context(tmp_path)).get("dclip", ["cat", "frog"])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"cat": ["has fur"], "frog": []}))
    with pytest.raises(ProtextError, match=r"empty\.json: key 'frog': empty list of descriptors"):
        load_descriptors(str(empty))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cat": ["has fur", 3]}))
    with pytest.raises(ProtextError, match=r"bad\.json: key 'cat', item 1: expected a string"):
        load_descriptors(str(bad))
    with pytest.raises(ProtextError, match="--waffle-count must be at least 1"):
        Waffle(count=0)
    image = str(next((SHARED / "images").rglob("*.jpg")))
    base = ["predict", "--backbone", str(tiny_folder), "--classes", "cat,frog", image, "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["--head", "waffle", "--waffle-count", "0"]) == 2
    assert "--waffle-count must be at least 1" in capsys.readouterr().err
    assert main(base + ["--head", "wafle"]) == 2
    assert "unknown head 'wafle'" in capsys.readouterr().err
    assert main(base + ["--head", "dclip", "--descriptors", str(bad)]) == 2
    assert "bad.json: key 'cat', item 1" in capsys.readouterr().err


def test_published_sets_keep_dclips_convention_for_empty_lists(tmp_path, monkeypatch):
    from protext import sources

    cached = sources.cached_path("dclip:stanford_cars", Context(tmp_path))
    cached.parent.mkdir(parents=True)
    cached.write_text((DCLIP / "descriptors_cars.json").read_text())
    cars = load_descriptors("dclip:stanford_cars", Context(tmp_path))
    raw = json.loads((DCLIP / "descriptors_cars.json").read_text())
    empty = [k for k, v in raw.items() if not "".join(v).strip()]
    assert len(cars) == len(raw) and empty and all(cars[k.lower()] == [""] for k in empty)
    monkeypatch.setitem(sources.SOURCES, "dclip:dtd", "http://127.0.0.1:9/descriptors_dtd.json")
    with pytest.raises(ProtextError, match="pass its path as --descriptors"):
        load_descriptors("dclip:dtd", Context(tmp_path))


def test_new_heads_everywhere(tiny, tiny_folder, tmp_path, capsys):
    classes = ["banded", "bumpy", "dotted"]
    descriptors = str(DCLIP / "descriptors_dtd.json")
    clf = ProTextClassifier.from_backbone(tiny, classes, descriptors=descriptors, head="dclip+waffle",
                                          waffle_count=2)
    assert clf.predict(torch.zeros(2, 3, 32, 32)).probs.shape == (2, 3)
    root = tmp_path / "imgs"
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (20, 20), (40 * i, 90, 200 - 40 * i)).save(root / c / "x.png")
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--backbone", str(tiny_folder),
                 "--heads", "all", "--descriptors", descriptors, "--descriptions", str(CUPL / "texture_prompts_full.json"),
                 "--waffle-count", "2", "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {"clip", "clip80", "cupl", "dclip", "waffle"} <= set(row) and "protext" not in row
    image = str(root / "bumpy" / "x.png")
    assert main(["predict", "--backbone", str(tiny_folder), "--classes", ",".join(classes), image, "--head", "dclip",
                 "--descriptors", descriptors, "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in classes


def test_dclip_rules_as_its_code_has_them(tiny, tmp_path):
    """The full stop on ImageNet only (not its variants), underscores as spaces, and the usual ImageNet
    names DCLIP's file spells otherwise."""
    descriptors = {"airplane cabin": ["has seats"]}
    for dataset, after in (("imagenet", "."), ("imagenetv2", ""), ("imagenet_sketch", ""), (None, "")):
        heads = Heads(tiny, HeadInputs(descriptors=descriptors, dataset=dataset), Context(tmp_path))
        assert heads.sentences_of("dclip", ["airplane_cabin"]) == [f"airplane cabin, which has seats{after}"]
    names = json.loads((SHARED / "classnames" / "imagenet.json").read_text())
    imagenet = load_descriptors(str(DCLIP / "descriptors_imagenet.json"), published=True)
    assert all(normalize(n) in imagenet for n in names)  # 'newt' and 'tights' too
    assert imagenet["newt"] == imagenet["eft"] and imagenet["tights"] == imagenet["maillot"]


def test_waffle_words_are_whole_words_of_the_vocabulary():
    from protext.tiny import clip_tokenizer

    tokenizer = clip_tokenizer(["alphabet", "bravo"])
    words = word_vocabulary(tokenizer)
    assert "alphabet" in words and "bravo" in words
    assert not any(w in words for w in ("alphabe", "alp", "brav"))  # pieces that never end a word


def test_mpvr_descriptions_make_the_cupl_classifier_mpvr_builds(tiny_folder, tmp_path):
    """MPVR's classifier is the renormalised mean of a class's normalised description features
    (CLIP's 77-token cut), which is what the cupl head builds from an mpvr: set."""
    import shutil

    from protext import sources

    ctx = Context(tmp_path, progress=False)
    for name, file in (("mpvr:eurosat", "gpt/EuroSAT.json"), ("mpvr-mixtral:eurosat", "mixtral/EuroSAT.json")):
        cached = sources.cached_path(name, ctx)  # as if downloaded from its pinned address
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "descriptions" / "mpvr" / file, cached)
    assert sources.dataset_of("mpvr:eurosat") == "eurosat"
    data = load_descriptions(SHARED / "descriptions" / "mpvr" / "gpt" / "EuroSAT.json")
    classes = ["Annual Crop Land", "Forest", "River"]
    clf = ProTextClassifier.from_backbone(str(tiny_folder), classes, ctx, head="cupl", descriptions="mpvr:eurosat")
    text = clf.backbone.text
    for i, c in enumerate(classes):
        sentences = data[c.lower()]
        assert len(sentences) == 340  # 34 questions, 10 answers each
        want = F.normalize(F.normalize(text.encode(sentences), dim=-1).mean(0), dim=0)
        assert torch.allclose(clf.weights[i], want, atol=1e-5)
    mixtral = ProTextClassifier.from_backbone(str(tiny_folder), classes, ctx, head="cupl",
                                              descriptions="mpvr-mixtral:eurosat")
    assert not torch.allclose(mixtral.weights, clf.weights)
