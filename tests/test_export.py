import json
import shutil

import onnxruntime
import pytest
import torch
from safetensors.torch import load_file
from support import ROOT, SHARED

import protext.export as export_module
from protext.context import Context
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.errors import ProtextError
from protext.export import export
from protext.images import list_images, load_pixels

CLASSES = ["airplane", "cat", "frog", "ship"]


@pytest.fixture(scope="module")
def clf(prompts_dir, tmp_path_factory):
    return ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path_factory.mktemp("cache"), "cpu"))


def docs_example() -> str:
    text = (ROOT / "docs" / "commands" / "export.md").read_text()
    block = text.split("<!-- export-example -->", 1)[1].split("<!-- /export-example -->", 1)[0]
    return block.strip().removeprefix("```python").removesuffix("```")


def test_exported_files_reproduce_the_classifier_with_transformers_alone(clf, prompts_dir, tmp_path, monkeypatch):
    meta = export(clf, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["classifier.json", "classifier.safetensors"]
    assert json.loads((tmp_path / "export" / "classifier.json").read_text()) == meta
    assert meta["labels"] == CLASSES and meta["head"] == "protext"
    assert meta["backbone"]["name"] == clf.backbone.name and meta["backbone"]["image_fingerprint"] == clf.backbone.image.fingerprint()
    assert meta["head_text"]["parts"]["protext"]["template"] == "a photo of a {}."
    prompt_sha = json.loads((prompts_dir / "protext_config.json").read_text())["prompts_sha256"]
    assert meta["head_text"]["parts"]["protext"]["prompts_sha256"] == prompt_sha
    assert meta["preprocessing"]["image_size"] == clf.backbone.image.image_size
    tensors = load_file(tmp_path / "export" / "classifier.safetensors")
    assert torch.equal(tensors["class_embeddings"], clf.weights) and float(tensors["logit_scale"]) == pytest.approx(clf.backbone.logit_scale)

    image = sorted((SHARED / "images" / "imagenet_sample").iterdir())[3]
    shutil.copy(image, tmp_path / "a.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(docs_example(), scope)  # the export page's lines, as they are
    want = clf.predict(image)
    assert torch.allclose(scope["probs"], want.probs, atol=1e-4)
    assert scope["probs"].argmax().item() == CLASSES.index(want.labels[0])


def test_onnx_model_gives_the_classifiers_logits_on_the_shared_images(clf, tmp_path):
    images = list_images(SHARED / "images")
    meta = export(clf, tmp_path / "export", onnx=True, check_images=[SHARED / "images"])
    check = meta["onnx"]["check"]
    assert check["on"] == f"{len(images)} images" and len(images) == 200 and check["max_abs_diff"] <= 1e-4
    assert meta["files"]["classifier.onnx"] and (tmp_path / "export" / "classifier.onnx").is_file()

    # independently of the export's own check: onnxruntime on pixels made from the JSON's facts
    pre = meta["preprocessing"]
    pixels = torch.stack([load_pixels(p, pre["image_size"], pre["mean"], pre["std"]) for p in images])
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "classifier.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run([meta["onnx"]["output"]], {meta["onnx"]["input"]: pixels.numpy()})[0])
    want = clf.logits(clf.backbone.image(pixels))
    assert got.shape == (200, len(CLASSES)) and (got - want).abs().max() <= 1e-4
    assert got.argmax(1).tolist() == want.argmax(1).tolist()

    export(clf, tmp_path / "export")  # without --onnx: the earlier model, for these or other labels, goes
    assert not (tmp_path / "export" / "classifier.onnx").exists()


def test_an_onnx_model_that_disagrees_with_pytorch_writes_nothing(clf, tmp_path, monkeypatch):
    other = ProTextClassifier(clf.backbone, list(reversed(CLASSES)), inputs=clf.inputs)
    real = export_module.onnx_model
    monkeypatch.setattr(export_module, "onnx_model", lambda module, example: real(export_module.PixelsToLogits(other), example))
    with pytest.raises(ProtextError, match="ONNX model's logits differ from PyTorch's by up to .*nothing was written"):
        export(clf, tmp_path / "export", onnx=True)
    assert not (tmp_path / "export").exists()


def test_export_command(prompts_dir, tmp_path, capsys):
    base = ["export", "--prompts", str(prompts_dir), "--classes", "cat,ship", "--cache-dir", str(tmp_path / "c")]
    assert main([*base, "--out", str(tmp_path / "out"), "--onnx", "--check-images",
                 str(SHARED / "images" / "cifar10_test_sample" / "cat")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == ["classifier.onnx", "classifier.safetensors", "classifier.json"]
    assert printed["onnx_check"]["on"] == "10 images" and printed["onnx_check"]["max_abs_diff"] <= 1e-4
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o2"), "--onnx", "--check-images", str(tmp_path / "file")]) == 2
    assert "none of the 1 --check-images could be read" in capsys.readouterr().err
