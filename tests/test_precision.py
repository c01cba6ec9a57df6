"""--precision: the image tower in int8 (CPU), bf16, fp16 (CUDA), never mixed with fp32 features."""

import json

import pytest
import torch
from support import SHARED

from protext.backbone import load_backbone
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import Context
from protext.engine import default_batch_size
from protext.errors import ProtextError
from protext.export import export
from protext.feature_cache import feature_store
from protext.images import list_images, load_pixels

CLASSES = ["airplane", "cat", "frog", "ship"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def fp32(tiny_folder):
    return load_backbone(str(tiny_folder), device="cpu")


@pytest.fixture(scope="module")
def pixels(fp32):
    tower = fp32.image
    return torch.stack([load_pixels(p, tower.image_size, tower.mean, tower.std)
                        for p in list_images(SHARED / "images")[:40]])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_int8_tower_quantizes_the_linear_layers_of_a_copy_and_stays_close_to_fp32(fp32, pixels):
    want = fp32.image(pixels)
    int8 = fp32.at_precision("int8")
    quantized = torch.ao.nn.quantized.dynamic.Linear
    kinds = [type(m) for m in int8.image.model.modules()]
    assert quantized in kinds and torch.nn.Linear not in kinds
    assert quantized not in [type(m) for m in fp32.image.model.modules()]  # the fp32 tower untouched
    got = int8.image(pixels)
    assert got.dtype == torch.float32 and got.shape == want.shape
    c = cosines(got, want)
    assert float(c.min()) > 0.99 and not torch.allclose(got, want, atol=1e-6)  # close, and really another arithmetic
    assert torch.equal(fp32.image(pixels), want)
    assert int8.image.precision == "int8" and int8.image.fingerprint() == fp32.image.fingerprint() + "-int8"
    assert int8.fingerprint() == fp32.fingerprint() and int8.text is fp32.text  # text stays fp32
    assert int8.at_precision("int8") is int8 and fp32.at_precision("fp32") is fp32


def test_bf16_runs_on_the_cpu_and_fp16_and_int8_say_where_they_run(fp32, pixels):
    bf16 = fp32.at_precision("bf16")
    assert {p.dtype for p in bf16.image.model.parameters()} == {torch.bfloat16}
    got = bf16.image(pixels)
    assert got.dtype == torch.float32 and float(cosines(got, fp32.image(pixels)).min()) > 0.98
    with pytest.raises(ProtextError, match="fp16 needs a CUDA device"):
        fp32.at_precision("fp16")
    with pytest.raises(ProtextError, match="choose one of fp32, int8, bf16, fp16"):
        fp32.at_precision("int4")
    with pytest.raises(ProtextError, match="already runs in bf16"):
        bf16.image.at_precision("int8")
    with pytest.raises(ProtextError, match="--precision int4"):
        load_backbone("no/such-model", precision="int4")  # refused before anything is downloaded


def test_caches_never_share_features_of_two_precisions(fp32, tmp_path):
    ctx = Context(tmp_path)
    stores = {p: feature_store(fp32.at_precision(p), "image", ctx).folder for p in ("fp32", "int8", "bf16")}
    assert len(set(stores.values())) == 3
    assert feature_store(fp32.at_precision("int8"), "text", ctx).folder == feature_store(fp32, "text", ctx).folder


def test_batch_size_is_chosen_for_the_device():
    assert default_batch_size(None, "cpu") == 32 and default_batch_size(None, "cuda") == 256
    assert default_batch_size(8, "cuda") == 8


def test_classifier_in_int8_agrees_with_fp32(prompts_dir, tmp_path):
    images = list_images(SHARED / "images")[:60]
    ctx = Context(tmp_path, "cpu")
    a = ProTextClassifier.from_prompts(prompts_dir, CLASSES, ctx)
    b = ProTextClassifier.from_prompts(prompts_dir, CLASSES, ctx, precision="int8")
    assert b.backbone.image.precision == "int8" and torch.equal(a.weights, b.weights)
    pa, pb = a.predict(images), b.predict(images)
    assert (pa.probs - pb.probs).abs().max() < 0.05
    assert sum(x == y for x, y in zip(pa.labels, pb.labels)) >= 0.9 * len(images)


def test_features_folder_records_its_precision_and_refuses_another(tiny_folder, tmp_path, capsys):
    images = SHARED / "images" / "cifar10_test_sample"
    out = tmp_path / "feats"
    common = ["features", str(images), "--out", str(out), "--backbone", str(tiny_folder), "--device", "cpu",
              "--no-progress", "--part-size", "40", "--cache-dir", str(tmp_path / "cache")]
    assert main(common + ["--precision", "int8"]) == 0
    settings = json.loads((out / "_settings.json").read_text())
    assert settings["precision"] == "int8" and settings["image_tower"].endswith("-int8")
    assert json.loads((out / "_summary.json").read_text())["precision"] == "int8"
    (out / "part-000001.parquet").unlink()  # an unfinished folder: a rerun in fp32 would mix the two
    (out / "_summary.json").unlink()
    capsys.readouterr()
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "'int8' then" in err
    assert main(common + ["--precision", "int8"]) == 0  # the same precision finishes it
    # labelling stored features runs no image tower: any precision of the classifier reads them
    labels = tmp_path / "labels.jsonl"
    assert main(["label", "--features", str(out), "--backbone", str(tiny_folder), "--classes", ",".join(CLASSES),
                 "--output", str(labels), "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(labels.read_text().splitlines()) == len(list_images(images))


def test_export_int8_onnx_is_smaller_and_checked_by_cosine(prompts_dir, tmp_path):
    import onnxruntime

    clf = ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path, "cpu"))
    fp32 = export(clf, tmp_path / "fp32", onnx=True, check_images=[SHARED / "images" / "cifar10_test_sample"])
    int8 = export(clf, tmp_path / "int8", onnx=True, check_images=[SHARED / "images" / "cifar10_test_sample"], int8=True)
    assert fp32["onnx"]["precision"] == "fp32" and int8["onnx"]["precision"] == "int8"
    check = int8["onnx"]["check"]
    assert check["min_cosine"] >= check["min_cosine_needed"] == 0.99 and 0 <= check["top1_agreement"] <= 1
    size = {k: (tmp_path / k / "classifier.onnx").stat().st_size for k in ("fp32", "int8")}
    assert size["int8"] < 0.6 * size["fp32"]
    model = onnxruntime.InferenceSession(str(tmp_path / "int8" / "classifier.onnx"))
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "int8" / "classifier.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    pixels = torch.stack([load_pixels(p, clf.backbone.image.image_size, clf.backbone.image.mean, clf.backbone.image.std)
                          for p in list_images(SHARED / "images" / "cifar10_test_sample")[:8]])
    logits = torch.from_numpy(model.run(["logits"], {"pixel_values": pixels.numpy()})[0])
    assert float(cosines(logits, clf.logits(clf.backbone.image(pixels))).min()) >= 0.99


def test_export_refuses_int8_without_onnx_and_a_quantized_tower(prompts_dir, tmp_path, capsys):
    assert main(["export", "--prompts", str(prompts_dir), "--classes", "cat,dog", "--out", str(tmp_path / "e"),
                 "--int8", "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--int8 quantizes the ONNX model: give --onnx too" in capsys.readouterr().err
    clf = ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path, "cpu"), precision="int8")
    with pytest.raises(ProtextError, match="runs in int8; export from the fp32 tower"):
        export(clf, tmp_path / "e")


@cuda
def test_fp16_and_bf16_on_cuda_and_int8_refused_there(tiny_folder, pixels):
    gpu = load_backbone(str(tiny_folder), device="cuda")
    want = gpu.image(pixels.cuda())
    for precision in ("fp16", "bf16"):
        got = gpu.at_precision(precision).image(pixels.cuda())
        assert float(cosines(got, want).min()) > 0.98
    with pytest.raises(ProtextError, match="int8 runs on the CPU"):
        gpu.at_precision("int8")


def test_every_image_command_takes_precision_and_export_takes_int8():
    from protext.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("label", "features", "predict", "eval", "serve"):
        flags = {o for a in commands[name]._actions for o in a.option_strings}
        assert "--precision" in flags, name
        action = next(a for a in commands[name]._actions if "--precision" in a.option_strings)
        assert tuple(action.choices) == ("fp32", "int8", "bf16", "fp16") and action.default == "fp32"
    export = {o for a in commands["export"]._actions for o in a.option_strings}
    assert "--int8" in export and "--precision" not in export
