import json

import pytest
import torch
import torch.nn.functional as F
from support import SHARED

from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.errors import ProtextError
from protext.context import Context
from protext.heads import HeadInputs, Heads
from protext.images import open_image, preprocess
from protext.model import ProText
from protext.templates import IMAGENET_80

CLASSES = ["airplane", "cat", "frog"]


@pytest.fixture(scope="module")
def prompts(tiny):
    pt = ProText.create(tiny, depth=2, seed=2)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    return pt


def test_head_arithmetic_against_hand_computed_values(tiny, prompts, tmp_path):
    descs = {"cat": ["A cat is small.", "Cats purr."], "airplane": ["An airplane has wings."]}
    heads = Heads(tiny, HeadInputs(prompts, descs), Context(tmp_path))
    enc = tiny.text.encode
    clip = Heads(tiny, HeadInputs(dataset="oxford_pets"), Context(tmp_path)).get("clip", CLASSES)
    assert torch.allclose(clip, enc([f"a photo of a {c}, a type of pet." for c in CLASSES]), atol=1e-6)
    want80 = torch.stack([F.normalize(enc([t.format(c) for t in IMAGENET_80]).mean(0), dim=-1) for c in CLASSES])
    assert torch.allclose(heads.get("clip80", CLASSES), want80, atol=1e-5)
    cupl = heads.get("cupl", CLASSES)
    assert torch.allclose(cupl[1], F.normalize(enc(descs["cat"]).mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(cupl[0], enc(descs["airplane"])[0], atol=1e-6)
    assert torch.allclose(cupl[2], heads.get("clip", CLASSES)[2], atol=1e-6)  # no descriptions: falls back
    assert heads.fallbacks[("cupl", tuple(CLASSES))] == ["frog"]
    pro = heads.get("protext", CLASSES)
    assert torch.allclose(pro, prompts.encode_classes(CLASSES, "a photo of a {}."), atol=1e-6)
    both = heads.get("protext+cupl", CLASSES)
    assert torch.allclose(both, F.normalize(pro + cupl, dim=-1), atol=1e-6)
    assert heads.get("protext", CLASSES) is pro  # computed once per label set
    assert torch.allclose(torch.linalg.norm(both, dim=1), torch.ones(3), atol=1e-5)
    # ProText's code: "a photo of a {}." except for prompts learned on another dataset
    def on(dataset, cross=False):
        return Heads(tiny, HeadInputs(prompts, descs, dataset=dataset, cross_dataset=cross), Context(tmp_path))

    assert torch.allclose(on("oxford_pets").get("protext", CLASSES), pro, atol=1e-6)
    cross = on("oxford_pets", cross=True).get("protext", CLASSES)
    assert torch.allclose(cross, prompts.encode_classes(CLASSES, "a photo of a {}, a type of pet."), atol=1e-6)
    assert not torch.allclose(cross, pro, atol=1e-3)
    assert torch.allclose(on("imagenet", cross=True).get("protext", CLASSES), pro, atol=1e-6)
    with pytest.raises(ProtextError, match="unknown head"):
        heads.get("nope", CLASSES)
    with pytest.raises(ProtextError, match=r"head 'protext' needs prompts \(--prompts DIR\)"):
        Heads(tiny).get("protext", CLASSES)
    with pytest.raises(ProtextError, match=r"head 'cupl' needs descriptions \(--descriptions FILE or cupl:NAME\)"):
        Heads(tiny).get("cupl", CLASSES)  # never silently the clip head


def test_classifier_accepts_paths_pil_and_tensors(tiny, prompts, shared):
    files = sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[:3]
    clf = ProTextClassifier(tiny, CLASSES, inputs=HeadInputs(prompts))
    by_path = clf.predict(files)
    by_pil = clf.predict([open_image(f) for f in files])
    tower = tiny.image
    by_tensor = clf.predict(torch.stack([preprocess(open_image(f), tower.image_size, tower.mean, tower.std) for f in files]))
    assert by_path.probs.shape == (3, 3)
    assert torch.allclose(by_path.probs, by_pil.probs) and torch.allclose(by_path.probs, by_tensor.probs, atol=1e-6)
    assert torch.allclose(by_path.probs.sum(1), torch.ones(3))
    assert by_path.labels == [CLASSES[i] for i in by_path.probs.argmax(1).tolist()]
    assert by_path.top(2)[0][0][0] == by_path.labels[0]
    clf.set_classes(["dog", "ship"])
    assert clf.predict(files[0]).probs.shape == (1, 2)
    with pytest.raises(ProtextError, match="repeat"):
        clf.set_classes(["Dog", "dog"])


def test_predict_command(tiny_folder, tmp_path, capsys, shared):
    from protext.backbone import load_backbone

    ProText.create(load_backbone(str(tiny_folder), device="cpu"), depth=2).save_pretrained(tmp_path / "p")
    files = [str(f) for f in sorted((SHARED / "images" / "cifar10_test_sample" / "frog").iterdir())[:2]]
    code = main(["predict", "--prompts", str(tmp_path / "p"), "--classes", "frog,ship,truck", "--top-k", "2",
                 *files, str(tmp_path / "missing.jpg"), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr()
    lines = [json.loads(l) for l in out.out.splitlines()]
    assert code == 0 and len(lines) == 2 and lines[0]["image"] == files[0]
    assert lines[0]["label"] in {"frog", "ship", "truck"} and len(lines[0]["top"]) == 2
    assert "skipped" in out.err and "missing.jpg" in out.err


def test_predict_skips_a_decompression_bomb_and_keeps_the_rest(tiny, tmp_path, monkeypatch):
    from PIL import Image

    files = []
    for name, side in (("a.png", 8), ("bomb.png", 64), ("b.png", 12)):
        Image.new("RGB", (side, side), (0, side, 0)).save(tmp_path / name)
        files.append(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000: PIL raises, not warns
    pred = ProTextClassifier(tiny, CLASSES).predict(files + [Image.new("RGB", (9, 9))])
    assert pred.inputs == [str(files[0]), str(files[2]), "image[3]"] and pred.probs.shape == (3, 3)
    assert [name for name, _ in pred.skipped] == [str(files[1])]
    assert pred.skipped[0][1].startswith("DecompressionBombError: ")


def test_any_heads_join_with_plus_as_their_renormalised_mean(tiny, prompts, tmp_path):
    descs = {"cat": ["A cat is small.", "Cats purr."], "airplane": ["An airplane has wings."], "frog": ["A frog hops."]}
    heads = Heads(tiny, HeadInputs(prompts, descs), Context(tmp_path))
    for combo in ("clip+cupl", "clip80+protext", "clip+cupl+protext"):
        want = F.normalize(sum(heads.get(h, CLASSES) for h in combo.split("+")), dim=-1)
        assert torch.allclose(heads.get(combo, CLASSES), want, atol=1e-6)
    with pytest.raises(ProtextError, match="unknown head 'nope'.*join them with '\\+'"):
        heads.get("clip+nope", CLASSES)


def test_classifier_constructors_load_one_backbone(tiny_folder, tmp_path, monkeypatch):
    import protext.classifier as classifier_module
    from protext.backbone import load_backbone

    loads = []
    real = classifier_module.load_backbone

    def counting(*a, **k):
        loads.append(a[0])
        return real(*a, **k)

    backbone = load_backbone(str(tiny_folder), device="cpu")
    ProText.create(backbone, depth=2).save_pretrained(tmp_path / "p")
    monkeypatch.setattr(classifier_module, "load_backbone", counting)
    clf = ProTextClassifier.from_prompts(tmp_path / "p", CLASSES, backbone=str(tiny_folder))
    assert loads == [str(tiny_folder)] and clf.head == "protext"
    assert clf.inputs.prompts.backbone is clf.backbone
    plain = ProTextClassifier.from_backbone(backbone, CLASSES, head="clip80")
    assert plain.head == "clip80" and plain.inputs.prompts is None
    with pytest.raises(ProtextError, match="weights differ"):
        ProTextClassifier.from_prompts(tmp_path / "p", CLASSES, backbone=__import__("protext.tiny").tiny.tiny_clip(seed=3))
    with pytest.raises(ProtextError, match="unknown head"):
        ProTextClassifier.from_backbone(backbone, CLASSES, head="nope")


def test_cross_dataset_switches_the_protext_template_dataset_alone_does_not(tiny, prompts):
    plain = ProTextClassifier(tiny, CLASSES, inputs=HeadInputs(prompts, dataset="oxford_pets"))
    cross = ProTextClassifier(tiny, CLASSES, inputs=HeadInputs(prompts, dataset="oxford_pets", cross_dataset=True))
    assert torch.allclose(plain.weights, prompts.encode_classes(CLASSES, "a photo of a {}."), atol=1e-6)
    assert torch.allclose(cross.weights, prompts.encode_classes(CLASSES, "a photo of a {}, a type of pet."), atol=1e-6)


def test_class_names_longer_than_the_context_are_refused_by_name(tiny, prompts, tmp_path):
    long_a = " ".join(["photo"] * 80) + " alpha"
    long_b = " ".join(["photo"] * 80) + " beta"  # the same as long_a once cut at 77 tokens
    for head in ("clip", "clip80", "protext", "waffle"):
        with pytest.raises(ProtextError, match=r"2 class names are too long for the 77-token context .* head "
                                               rf"'{head}'.*'photo photo"):
            ProTextClassifier(tiny, ["cat", long_a, long_b], head, HeadInputs(prompts), Context(tmp_path))
    fits = " ".join(["photo"] * 60)
    assert ProTextClassifier(tiny, ["cat", fits], "clip", ctx=Context(tmp_path)).weights.shape[0] == 2
