"""AWT: views from a seed, the entropy weights and the transport on numbers checked by hand, and the
head in every command. (`benchmarks/parity.py --awt CHECKOUT` runs AWT's own code against these.)"""

import json
import math

import pytest
import torch
from PIL import Image
from support import SHARED

from protext import awt
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import Context
from protext.heads import HeadInputs
from protext.images import views

AWT = SHARED / "descriptions" / "awt" / "dtd.json"
CAT = sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[0]


def test_views_are_the_image_then_seeded_random_crops():
    image = Image.open(CAT).convert("RGB").resize((64, 48))
    a = views(image, 32, (0.5,) * 3, (0.5,) * 3, 6, seed=0)
    assert a.shape == (7, 3, 32, 32)
    assert torch.equal(a, views(image.copy(), 32, (0.5,) * 3, (0.5,) * 3, 6, seed=0))  # same pixels, same views
    assert not torch.equal(a[1:], views(image, 32, (0.5,) * 3, (0.5,) * 3, 6, seed=1)[1:])
    from protext.images import preprocess

    assert torch.equal(a[0], preprocess(image, 32, (0.5,) * 3, (0.5,) * 3))  # view 0 is the image itself


def entropy(row):
    p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
    return -sum(q * math.log(q) for q in p)


def test_entropy_weights_by_hand():
    # two views, two prompts, two classes; out[v, p, c]
    out = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.0, 0.5], [0.5, 0.0]]])
    image, text = awt.weights(out, torch.ones(2, 2, dtype=torch.bool), 0.5, 0.5)
    h0, h1 = entropy([1.5, 0.5]), entropy([0.25, 0.25])  # each view's mean over prompts
    want = [math.exp(-h0 / 0.5), math.exp(-h1 / 0.5)]
    assert image.tolist() == pytest.approx([w / sum(want) for w in want], abs=1e-6)
    m = [1.5, 0.5]  # view 0, mean over prompts
    for c in range(2):
        hs = [entropy([out[0, p, c].item() if k == c else m[k] for k in range(2)]) for p in range(2)]
        w = [math.exp(-h / 0.5) for h in hs]
        assert text[c].tolist() == pytest.approx([x / sum(w) for x in w], abs=1e-6)


def test_transport_with_one_view_and_one_prompt_is_the_cosine_logit():
    out = torch.tensor([[[30.0, 10.0]]])  # V = P = 1, two classes
    score = awt.transport(out, 100.0, torch.ones(1), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool), 0.1, 100,
                          1e-2)
    assert score.tolist() == pytest.approx([30.0, 10.0], rel=1e-5)  # the plan is all mass on the one pair


def test_padded_prompts_take_no_weight_and_no_transport():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    padded = torch.cat([texts, torch.zeros(3, 2, 8)], 1)
    assert torch.allclose(awt.logits(feats, texts, 100.0, None), awt.logits(feats, padded, 100.0, None), atol=1e-4)


def test_the_awt_head_in_predict_eval_label_and_serve(tiny_folder, tmp_path, capsys):
    classes = ["banded", "blotchy", "braided"]
    common = ["--backbone", str(tiny_folder), "--head", "awt", "--descriptions", str(AWT), "--dataset", "dtd",
              "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    image = str(CAT)
    assert main(["predict", *common, "--classes", ",".join(classes), image]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["head"] == "awt" and abs(sum(p for _, p in line["top"]) - 1) < 1e-3
    clf = ProTextClassifier.from_backbone(str(tiny_folder), classes, Context(tmp_path / "c", progress=False),
                                          head="awt", descriptions=str(AWT), dataset="dtd")
    assert clf.views == 50 and clf.weights.shape[:2] == (3, 51)
    assert torch.allclose(clf.predict([image]).probs, clf.predict([image]).probs)  # seeded: the same views
    assert line["top"][0][1] == pytest.approx(clf.predict([image]).top(1)[0][0][1], abs=1e-4)
    assert main(["label", image, "--output", str(tmp_path / "l.jsonl"), "--classes", ",".join(classes), *common]) == 0
    row = json.loads((tmp_path / "l.jsonl").read_text())
    assert row["label"] == line["label"]
    root = tmp_path / "imgs"
    for c in classes:
        (root / c).mkdir(parents=True)
        Image.open(CAT).save(root / c / "a.png")
    capsys.readouterr()
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--heads", "awt,clip", "--backbone",
                 str(tiny_folder), "--descriptions", str(AWT), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["awt"] <= 100 and "clip" in result
    assert main(["export", "--out", str(tmp_path / "e"), "--classes", ",".join(classes), *common]) == 2
    assert "no class-embedding matrix to export" in capsys.readouterr().err
    with pytest.raises(Exception, match="cannot be joined"):
        ProTextClassifier.from_backbone(str(tiny_folder), classes, head="awt+clip", descriptions=str(AWT))


def test_awt_through_the_server_answers_as_the_classifier(tiny_folder, tmp_path):
    from fastapi.testclient import TestClient

    from protext.api import create_app
    from protext.backbone import load_backbone
    from protext.descriptions import load_descriptions
    from protext.serve import Service

    backbone = load_backbone(str(tiny_folder), device="cpu")
    inputs = HeadInputs(descriptions=load_descriptions(AWT), dataset="dtd")
    service = Service(backbone, inputs, {"dtd": ["banded", "blotchy", "braided"]}, "awt", ctx=Context(tmp_path))
    want = ProTextClassifier(backbone, ["banded", "blotchy", "braided"], "awt", inputs, Context(tmp_path))
    with TestClient(create_app(service), base_url="http://127.0.0.1:8000") as c:
        r = c.post("/v1/classify", files=[("images", (CAT.name, CAT.read_bytes()))], data={"top_k": "3"})
        plain = c.post("/v1/classify", files=[("images", (CAT.name, CAT.read_bytes()))], data={"head": "clip"})
    assert r.status_code == 200 and r.json()["head"] == "awt" and plain.status_code == 200
    got = {t["label"]: t["prob"] for t in r.json()["results"][0]["top"]}
    expected = dict(zip(want.classes, want.predict([CAT]).probs[0].tolist()))
    assert got == pytest.approx(expected, abs=1e-4)
