"""FuDD: the two passes on numbers checked by hand, the differential file, `describe --differential`
and `--meta-prompt` against a real HTTP chat server, and the fudd head in every command.
(`benchmarks/parity.py --fudd CHECKOUT` runs FuDD's own code against these.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from chat_server import ChatServer
from PIL import Image
from support import SHARED

from protext import fudd
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import Context
from protext.descriptions import load_differential
from protext.errors import ProtextError
from protext.training.describe import confusable_pairs, pairs_in_top, parse_differences, parse_templates

CAT = sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[0]
CLASSES = ["cat", "dog", "frog"]


def test_first_pass_text_is_capitalised_as_fudd_does():
    assert fudd.first_pass_text("American_Bulldog") == "A photo of a american bulldog."


def test_two_passes_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0.2, 0.0]]), dim=-1)
    first = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    differential = {"cat": {"dog": ["x cat"]}, "dog": {"cat": ["y dog", "z dog"]}}
    feats = {"X cat": torch.tensor([0.0, 1.0, 0.0]), "Y dog": torch.tensor([1.0, 0.0, 0.0]),
             "Z dog": torch.tensor([0.0, 1.0, 0.0])}
    out = fudd.logits(image, first, CLASSES, differential, feats, 10.0, None, top_k=2)
    assert out[0, 2] == float("-inf")  # frog is not among the two likeliest: it cannot be chosen
    cat = F.normalize(feats["X cat"], dim=0)
    dog = F.normalize(feats["Y dog"] + feats["Z dog"], dim=0)  # the renormalised mean of the dog's captions
    assert out[0, 0].item() == pytest.approx(10 * (image[0] @ cat).item(), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(10 * (image[0] @ dog).item(), abs=1e-6)


def test_a_pair_never_described_falls_back_to_the_first_pass_text():
    image = F.normalize(torch.tensor([[1.0, 0.5]]), dim=-1)
    first = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    feats = {fudd.first_pass_text("cat"): first[0], fudd.first_pass_text("dog"): first[1]}
    out = fudd.logits(image, first, ["cat", "dog"], {}, feats, 1.0, 0.5)
    assert out[0].tolist() == pytest.approx((image[0] @ first.T + 0.5).tolist(), abs=1e-6)
    assert fudd.texts_of({"cat": {"dog": ["a"], "emu": ["b"]}}, ["cat", "dog"]) == \
        [fudd.first_pass_text("cat"), fudd.first_pass_text("dog"), "A"]


def test_the_differential_file_is_checked(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"cat": {"dog": "not a list"}}))
    with pytest.raises(ProtextError, match=r"d\.json: 'cat' / 'dog'"):
        load_differential(bad)
    bad.write_text(json.dumps(["cat"]))
    with pytest.raises(ProtextError, match=r"d\.json: expected a JSON object"):
        load_differential(bad)


def test_answers_and_pairs_are_parsed():
    first, second = parse_differences("1. color: a photo of a cat with stripes | a photo of a dog with spots\n"
                                      "no bar here\nshape: x | y")
    assert first == ["a photo of a cat with stripes."] and second == ["a photo of a dog with spots."]
    assert parse_templates("1. What does a {class} look like?\n2. no slot\n3. Describe <class name> {x}.") == \
        ["What does a {} look like?"]
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    assert confusable_pairs(feats, CLASSES, 1) == [("cat", "dog"), ("dog", "frog")]
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.8, 0.9]])
    assert pairs_in_top(scores, CLASSES, 2) == [("cat", "dog"), ("dog", "frog")]


def test_describe_differential_asks_each_pair_once_and_resumes(tiny_folder, tmp_path, capsys):
    def describe(url, out, *more):
        return main(["describe", "--classes", ",".join(CLASSES), "--differential", "--neighbours", "2",
                     "--backbone", str(tiny_folder), "--model", "m", "--output", str(out), "--cache-dir",
                     str(tmp_path / "c"), "--no-progress", "--base-url", url, *more])

    out = tmp_path / "diff.json"
    with ChatServer() as server:
        assert describe(server.url, out) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["pairs"] == 3 and report["described"] == 3 and report["usage"]["requests"] == 3
        saved = load_differential(out)
        assert saved["cat"]["dog"] == ["a photo of a cat with warm tones.", "a photo of a cat with round edges."]
        assert saved["dog"]["cat"] == ["a photo of a dog with cold tones.", "a photo of a dog with sharp edges."]
        assert describe(server.url, out) == 0  # everything is there: nothing asked again
        again = json.loads(capsys.readouterr().out)
        assert again["already_saved"] == 3 and again["usage"]["requests"] == 0
        # one image, its two likeliest classes: one pair
        assert describe(server.url, tmp_path / "by-images.json", "--neighbours", "1", "--images", str(CAT)) == 0
        assert json.loads(capsys.readouterr().out)["pairs"] == 1
    with ChatServer(default="401") as server:
        assert describe(server.url, tmp_path / "x.json") == 2
    assert not (tmp_path / "x.json").exists()


def test_describe_meta_prompt_writes_the_templates_then_the_descriptions(tmp_path, capsys):
    out = tmp_path / "land.json"
    args = ["describe", "--classes", "forest,river", "--meta-prompt", "satellite photos of land use", "--samples",
            "1", "--model", "m", "--output", str(out), "--no-progress"]
    with ChatServer() as server:
        assert main([*args, "--base-url", server.url]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["templates"] == 4 and report["usage"]["requests"] == 1 + 2 * 4  # the questions, then answers
        templates = json.loads((tmp_path / "land.templates.json").read_text())
        assert templates["task"] == "satellite photos of land use"
        assert templates["templates"][0] == "Describe how a {} looks in satellite photos of land use, detail 1."
        assert set(json.loads(out.read_text())) == {"forest", "river"}
        assert main([*args, "--base-url", server.url]) == 0  # the questions are kept: not asked again
        assert json.loads(capsys.readouterr().out)["usage"]["requests"] == 0


def test_the_fudd_head_in_predict_eval_label_and_serve(tiny_folder, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from protext.api import create_app
    from protext.backbone import load_backbone
    from protext.heads import HeadInputs
    from protext.serve import Service

    diff = tmp_path / "d.json"
    diff.write_text(json.dumps({"cat": {"dog": ["a cat with whiskers"], "frog": ["a furry cat"]},
                                "dog": {"cat": ["a dog with a long snout"]}}))
    common = ["--backbone", str(tiny_folder), "--head", "fudd", "--differential", str(diff), "--cache-dir",
              str(tmp_path / "c"), "--no-progress"]
    assert main(["predict", *common, "--classes", ",".join(CLASSES), "--top-k", "3", str(CAT)]) == 0
    line = json.loads(capsys.readouterr().out)
    clf = ProTextClassifier.from_backbone(str(tiny_folder), CLASSES, Context(tmp_path / "c", progress=False),
                                          head="fudd", differential=str(diff))
    probs = clf.predict([CAT]).probs[0]
    assert line["head"] == "fudd" and line["label"] == CLASSES[int(probs.argmax())]
    features = clf.image_features([CAT])[0]
    first = F.normalize(clf.weights, dim=-1)
    assert torch.allclose(clf.logits(features), fudd.logits(features, first, CLASSES, load_differential(diff),
                          dict(zip(fudd.texts_of(load_differential(diff), CLASSES),
                                   clf.heads.backbone.text.encode(fudd.texts_of(load_differential(diff), CLASSES)))),
                          clf.backbone.logit_scale, clf.backbone.logit_bias), atol=1e-5)
    assert main(["label", str(CAT), "--output", str(tmp_path / "l.jsonl"), "--classes", ",".join(CLASSES),
                 *common]) == 0
    assert json.loads((tmp_path / "l.jsonl").read_text())["label"] == line["label"]
    root = tmp_path / "imgs"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        Image.open(CAT).save(root / c / "a.png")
    capsys.readouterr()
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--heads", "fudd,clip", *common[:2],
                 *common[4:]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["fudd"] <= 100
    backbone = load_backbone(str(tiny_folder), device="cpu")
    service = Service(backbone, HeadInputs(differential=load_differential(diff)), {"pets": CLASSES}, "fudd",
                      ctx=Context(tmp_path / "c"))
    with TestClient(create_app(service), base_url="http://127.0.0.1:8000") as c:
        r = c.post("/v1/classify", files=[("images", (CAT.name, CAT.read_bytes()))], data={"top_k": "3"})
    assert r.status_code == 200
    got = {t["label"]: t["prob"] for t in r.json()["results"][0]["top"]}
    assert got == pytest.approx(dict(zip(CLASSES, probs.tolist())), abs=1e-4)
