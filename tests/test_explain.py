"""Why this label: the descriptions that weighed most, from `predict --explain`, the Python API
and `serve`, checked against the scores computed independently."""

import json

import pytest
import torch
from support import CUPL, DCLIP, SHARED

from protext import awt, fudd
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import Context
from protext.descriptions import load_descriptions, normalize_name
from protext.errors import ProtextError
from protext.feature_cache import encode_texts

CAT = sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[0]
PETS = ["abyssinian", "beagle", "pug"]


def test_cupl_explanations_are_the_label_descriptions_by_cosine(tiny_folder, tmp_path):
    ctx = Context(tmp_path, progress=False)
    clf = ProTextClassifier.from_backbone(str(tiny_folder), PETS, ctx, head="cupl",
                                          descriptions=str(CUPL / "pets_prompts_full.json"))
    pred = clf.predict([CAT], explain=4)
    label = pred.labels[0]
    sentences = load_descriptions(CUPL / "pets_prompts_full.json")[normalize_name(label)]
    feats, _, _ = clf.image_features([CAT])
    cosines = (encode_texts(clf.backbone, sentences, ctx) @ feats[0]).tolist()
    want = sorted(zip(sentences, cosines), key=lambda p: -p[1])[:4]
    got = pred.explanations[0]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)


def test_predict_explain_on_the_command_line(tiny_folder, tmp_path, capsys):
    common = ["--backbone", str(tiny_folder), "--classes", ",".join(PETS), "--cache-dir", str(tmp_path),
              "--no-progress", str(CAT)]
    assert main(["predict", "--head", "dclip", "--descriptors", str(DCLIP / "descriptors_pets.json"), "--explain", "2",
                 *common]) == 0
    line = json.loads(capsys.readouterr().out)
    assert len(line["explain"]) == 2 and all(t.startswith(f"{line['label']}, which ") for t, _ in line["explain"])
    assert line["explain"][0][1] >= line["explain"][1][1]
    assert main(["predict", "--head", "clip", *common]) == 0
    assert "explain" not in json.loads(capsys.readouterr().out)
    assert main(["predict", "--head", "clip+clip80", "--explain", *common]) == 2
    assert "no descriptions to explain a label" in capsys.readouterr().err


def test_awt_explanations_are_shares_of_the_logit(tiny_folder, tmp_path):
    descriptions = SHARED / "descriptions" / "awt" / "dtd.json"
    classes = ["banded", "blotchy", "braided"]
    clf = ProTextClassifier.from_backbone(str(tiny_folder), classes, Context(tmp_path, progress=False), head="awt",
                                          descriptions=str(descriptions), dataset="dtd")
    feats, _, _ = clf.image_features([CAT])
    logits = clf.logits(feats)
    label = int(logits.argmax())
    everything = clf.explain(feats, [label], k=1000)[0]
    assert len(everything) == 1 + min(50, len(load_descriptions(descriptions)[classes[label]]))
    assert sum(v for _, v in everything) == pytest.approx(logits[0, label].item(), abs=1e-2)  # rounded shares
    shares = awt.shares(feats[0], clf.weights, clf.backbone.logit_scale, None)
    assert shares.sum(1).tolist() == pytest.approx(logits[0].tolist(), abs=1e-4)


def test_fudd_explanations_are_the_second_pass_captions(tiny_folder, tmp_path):
    diff = tmp_path / "d.json"
    diff.write_text(json.dumps({"cat": {"dog": ["a cat with whiskers", "a cat with green eyes"]},
                                "dog": {"cat": ["a dog with a long snout"]}}))
    classes = ["cat", "dog"]
    clf = ProTextClassifier.from_backbone(str(tiny_folder), classes, Context(tmp_path, progress=False), head="fudd",
                                          differential=str(diff))
    feats, _, _ = clf.image_features([CAT])
    for label in (0, 1):
        got = clf.explain(feats, [label], k=5)[0]
        want = fudd.second_pass_texts(clf.heads.differential, classes, [0, 1], label)
        assert sorted(t for t, _ in got) == sorted(want)
    with pytest.raises(ProtextError, match="at least 1"):
        clf.explain(feats, [0], k=0)


def test_serve_explains_on_request(tiny_folder, tmp_path):
    from fastapi.testclient import TestClient

    from protext.api import create_app
    from protext.backbone import load_backbone
    from protext.heads import HeadInputs
    from protext.serve import Service

    backbone = load_backbone(str(tiny_folder), device="cpu")
    descriptions = load_descriptions(CUPL / "pets_prompts_full.json")
    service = Service(backbone, HeadInputs(descriptions=descriptions), {"pets": PETS}, "cupl", ctx=Context(tmp_path))
    want = ProTextClassifier(backbone, PETS, "cupl", HeadInputs(descriptions=descriptions), Context(tmp_path))
    expected = want.predict([CAT], explain=3).explanations[0]
    upload = [("images", (CAT.name, CAT.read_bytes()))]
    with TestClient(create_app(service), base_url="http://127.0.0.1:8000") as c:
        info = c.get("/v1/label-sets").json()
        r = c.post("/v1/classify", files=upload, data={"explain": "3"})
        plain = c.post("/v1/classify", files=upload)
        refused = c.post("/v1/classify", files=upload, data={"explain": "2", "head": "clip+cupl"})
        typo = c.post("/v1/classify", files=upload, data={"explain": "many"})
        too_many = c.post("/v1/classify", files=upload, data={"explain": "1000"})
        still = c.post("/v1/classify", files=upload, data={"explain": "1"})
    assert "cupl" in info["explains"] and "protext" not in info["explains"]
    assert r.status_code == 200
    assert [(e["text"], e["score"]) for e in r.json()["results"][0]["explain"]] == \
        [(t, pytest.approx(v, abs=1e-4)) for t, v in expected]
    assert plain.status_code == 200 and "explain" not in plain.json()["results"][0]
    assert refused.status_code == 400 and "no descriptions to explain" in refused.json()["error"]
    assert typo.status_code == 422 and "explain" in typo.json()["error"]
    assert too_many.status_code == 400 and still.status_code == 200
    assert torch.is_tensor(want.weights)
