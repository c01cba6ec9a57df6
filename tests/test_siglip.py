"""SigLIP and SigLIP 2 backbones (issue #12), on tiny random models built from a config.

Three variants, as published: "siglip" (google/siglip-*: SentencePiece tokenizer padding with
EOS), "siglip2" (google/siglip2-*-224: the same SiglipModel with a Gemma tokenizer and its own
pad token) and "siglip2-naflex" (google/siglip2-*-naflex: Siglip2Model, native-resolution patches).
"""

import glob
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import CUPL, SHARED, block_by_hand, make_coop_tree, plain_loss, tanh_gelu

from protext.context import Context
from protext.backbone import from_model, load_backbone
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.descriptions import pairs
from protext.errors import ProtextError
from protext.feature_cache import encode_texts
from protext.images import NaFlex, open_image, preprocess, to_rgb
from protext.model import ProText
from protext.text_encoder import Siglip2Text, SiglipText, pad, siglip_clean
from protext.tiny import _build_siglip, save_tiny_siglip, tiny_clip, tiny_siglip
from protext.training.train import TrainConfig, batch_loss

VARIANTS = ["siglip", "siglip2", "siglip2-naflex"]
NAMES = ["cat", "tench", "great white shark", "Annual Crop Land"]
CLASSES = ["airplane", "cat", "frog"]


def _reference_text(variant: str, text: str) -> str:
    """What the model's own tokenizer reads: SiglipTokenizer canonicalises text itself (the tiny fast
    tokenizer cannot), Siglip2Tokenizer lower-cases by itself, so SigLIP 2 text goes in raw."""
    return siglip_clean(text) if variant == "siglip" else text


def _text_features(model, tok, texts):
    """`get_text_features` on input padded to 64 tokens with the tokenizer's pad token and no mask, as
    the models were trained (and as the Hub processors' examples say: padding="max_length")."""
    enc = tok(texts, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(model.get_text_features(input_ids=enc["input_ids"]).pooler_output, dim=-1)


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("tinysiglip"), seed=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_untrained_depth1_prompts_equal_get_text_features(variant):
    model, tok = _build_siglip(3, variant, ("a", "photo", "of"), {})
    backbone = from_model(model, tok, "tiny")
    prompted = ProText.create(backbone, n_ctx=4, depth=1).encode_classes(NAMES)
    reference = _text_features(model, tok, [_reference_text(variant, f"a photo of a {n}.") for n in NAMES])
    assert torch.allclose(prompted, reference, atol=1e-6), (prompted - reference).abs().max()
    assert torch.allclose(backbone.text.encode([f"A photo of a {n}." for n in NAMES]), reference, atol=1e-6)


@pytest.mark.parametrize("variant, pad_token", [("siglip", "</s>"), ("siglip2", "<pad>")])
def test_deep_prompts_match_a_hand_computed_two_layer_model(variant, pad_token):
    model, tok = _build_siglip(5, variant, ("a", "photo", "of"), {"layers": 2})
    assert model.config.text_config.hidden_act == "gelu_pytorch_tanh"
    backbone = from_model(model, tok, "tiny")
    pt = ProText.create(backbone, n_ctx=4, depth=2, seed=7)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.5)
        got = pt.encode_classes(NAMES)
    tm, n, pad_id = model.text_model, 4, tok.convert_tokens_to_ids(pad_token)
    want = []
    with torch.no_grad():
        for ids in pt.class_token_lists(NAMES):
            assert tok.convert_ids_to_tokens(ids[-1]) == tok.eos_token  # EOS appended, nothing in front
            ids = torch.tensor(ids + [pad_id] * (64 - len(ids)))
            x = tm.embeddings.token_embedding.weight[ids].clone()
            x[0:n] = pt.prompts[0]  # no start token: the context takes positions 0..3
            x = (x + tm.embeddings.position_embedding.weight[:64])[None]
            x = block_by_hand(tm.encoder.layers[0], x, causal=False, gelu=tanh_gelu)
            x[0, 0:n] = pt.prompts[1]
            x = block_by_hand(tm.encoder.layers[1], x, causal=False, gelu=tanh_gelu)
            last = F.layer_norm(x[0, -1], (x.shape[-1],), tm.final_layer_norm.weight, tm.final_layer_norm.bias,
                                tm.final_layer_norm.eps)
            want.append(F.normalize(last @ tm.head.weight.T + tm.head.bias, dim=-1))
    want = torch.stack(want)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    shallow = ProText(backbone, pt.config.__class__(**{**pt.config.__dict__, "depth": 1}), pt.prompts[:1].detach())
    assert not torch.allclose(shallow.encode_classes(NAMES), got, atol=1e-3)


def test_padding_rules_are_the_models_and_batches_are_never_cut(tiny):
    siglip, siglip2 = tiny_siglip(0, "siglip"), tiny_siglip(0, "siglip2")
    assert type(siglip.text) is SiglipText and type(siglip2.text) is Siglip2Text
    assert (tiny.text.prompt_start, siglip.text.prompt_start, siglip2.text.prompt_start) == (1, 0, 0)
    for backbone, pad_token in ((siglip, "</s>"), (siglip2, "<pad>")):
        text, tok = backbone.text, backbone.text.tokenizer
        toks = text.tokenize(["a photo of a cat.", "a photo of a great white shark."])
        assert toks.ids.shape == (2, 64)
        for ids, n in zip(toks.ids.tolist(), toks.lengths.tolist()):
            assert ids[n - 1] == tok.eos_token_id and set(ids[n:]) == {tok.convert_tokens_to_ids(pad_token)}
        lists = ProText.create(backbone, depth=1).class_token_lists(["cat", "great white shark"])
        assert text.batch(lists).ids.shape[1] == 64  # what training and the heads use
        with pytest.raises(ValueError, match="pad batches to 64"):
            text(pad(lists, text.pad_id))
    # Why: with attention over the padding and the last position pooled, cutting changes the feature.
    model, tok = _build_siglip(0, "siglip", ("a", "photo", "of"), {})
    ids = tok(["a photo of a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cut = model.get_text_features(input_ids=ids).pooler_output
    assert not torch.allclose(F.normalize(cut, dim=-1), _text_features(model, tok, ["a photo of a cat"]), atol=1e-3)


def test_text_is_normalised_as_each_tokenizer_does():
    assert siglip_clean("A goose flies in a \u201cV\u201d formation &  honks!") == \
        "a goose flies in a \u201cv\u201d formation honks"
    siglip, siglip2 = tiny_siglip(0, "siglip").text, tiny_siglip(0, "siglip2").text
    assert siglip.token_lists(["A Photo, of a CAT!"]) == siglip.tokenizer(["a photo of a cat"])["input_ids"]
    assert siglip2.token_lists(["A Photo of a CAT."]) == siglip2.token_lists(["a photo of a cat."])
    assert siglip2.token_lists(["a photo of a cat."]) != siglip2.token_lists(["a photo of a cat"])  # kept
    assert len({tiny_clip(0).text.text_rule, siglip.text_rule, siglip2.text_rule}) == 3  # cache keys differ


@pytest.mark.parametrize("variant", ["siglip", "siglip2"])
def test_fast_step_equals_plain_step(variant, eurosat, tmp_path):
    backbone = tiny_siglip(0, variant)
    cfg = TrainConfig(depth=2)
    classes, texts, cls_idx, txt_idx = pairs(eurosat)
    batch = torch.randperm(len(cls_idx), generator=torch.Generator().manual_seed(0))[:64]
    assert len(set(torch.tensor(cls_idx)[batch].tolist())) < 64  # the batch repeats classes
    fast, plain = ProText.create(backbone, depth=2, seed=3), ProText.create(backbone, depth=2, seed=3)
    with torch.no_grad():
        fast.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        plain.prompts.copy_(fast.prompts)
    cached = encode_texts(backbone, texts, Context(tmp_path, progress=False))
    assert torch.equal(encode_texts(backbone, texts, Context(tmp_path, progress=False)), cached)  # from the cache
    targets = cached[torch.tensor(txt_idx)]
    loss_fast = batch_loss(fast, fast.class_token_lists(classes), torch.tensor(cls_idx)[batch], targets[batch], cfg)
    loss_fast.backward()
    names = [classes[cls_idx[i]] for i in batch.tolist()]
    loss_plain = plain_loss(plain, names, [texts[txt_idx[i]] for i in batch.tolist()], cfg)
    loss_plain.backward()
    assert abs(loss_fast.item() - loss_plain.item()) <= 1e-5 * max(1.0, abs(loss_plain.item()))
    assert torch.allclose(fast.prompts.grad, plain.prompts.grad, atol=1e-5, rtol=1e-5)
    assert fast.prompts.grad.abs().sum() > 0


def _sample_images():
    files = sorted(glob.glob(str(SHARED / "images" / "imagenet_sample" / "*")))[:12]
    return files + sorted(glob.glob(str(SHARED / "images" / "cifar10_test_sample" / "*" / "0000.jpg")))[:3]


@pytest.mark.parametrize("size", [224, 32])
def test_siglip_preprocessing_matches_transformers_processor(shared, size):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": size, "width": size})
    for f in _sample_images():
        img = open_image(f)
        ours = preprocess(img, (size, size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        ref = torch.as_tensor(np.asarray(proc(images=to_rgb(img), return_tensors="np")["pixel_values"][0]))
        assert ours.shape == (3, size, size) and torch.allclose(ours, ref, atol=1e-4), f


@pytest.mark.parametrize("patch, max_patches", [(16, 256), (8, 16)])
def test_naflex_preprocessing_matches_transformers_processor(shared, patch, max_patches):
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    proc = Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_patches)
    shapes = set()
    for f in _sample_images():
        img = open_image(f)
        ours = preprocess(img, NaFlex(patch, max_patches), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        ref = proc(images=to_rgb(img), return_tensors="pt")
        mask, (rows, cols) = ref["pixel_attention_mask"][0], ref["spatial_shapes"][0].tolist()
        shapes.add((rows, cols))
        assert ours.shape == (max_patches, 3 * patch * patch + 2)
        assert torch.allclose(ours[:, :-2], ref["pixel_values"][0], atol=1e-4), f
        assert torch.equal(ours[:, -2] >= 0, mask.bool())
        assert (ours[:, -2:].amax(0) + 1).tolist() == [rows, cols]
    assert len(shapes) > 2  # several aspect ratios


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_features_and_scores_are_the_models(variant, shared):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    model, tok = _build_siglip(2, variant, CLASSES + ["a", "photo", "of"], {})
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)  # the init's zero bias would hide a missing one
    backbone = from_model(model, tok, "tiny")
    files = sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[:2] + [_sample_images()[9]]
    images = [to_rgb(open_image(f)) for f in files]
    if variant == "siglip2-naflex":
        inputs = dict(Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)(images=images, return_tensors="pt"))
    else:
        inputs = {"pixel_values": SiglipImageProcessorPil(size={"height": 32, "width": 32})(
            images=images, return_tensors="pt")["pixel_values"]}
    ids = tok([_reference_text(variant, f"a photo of a {c}.") for c in CLASSES], padding="max_length", max_length=64,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, **inputs)
    clf = ProTextClassifier(backbone, CLASSES, head="clip")
    feats, _, _ = clf.image_features(files)
    assert torch.allclose(feats, out.image_embeds, atol=1e-5)
    assert torch.allclose(clf.logits(feats), out.logits_per_image, atol=1e-4)
    sigmoid, softmax = clf.predict(files, activation="sigmoid"), clf.predict(files)
    assert (sigmoid.activation, softmax.activation) == ("sigmoid", "softmax")
    assert torch.allclose(sigmoid.probs, out.logits_per_image.sigmoid(), atol=1e-5)
    assert torch.allclose(softmax.probs, out.logits_per_image.softmax(-1), atol=1e-5)
    assert torch.allclose(softmax.probs.sum(1), torch.ones(3)) and sigmoid.labels == softmax.labels
    with pytest.raises(ProtextError, match="activation must be softmax or sigmoid"):
        clf.predict(files, activation="tanh")


def test_sigmoid_scores_are_refused_for_clip(tiny, shared):
    clf = ProTextClassifier(tiny, CLASSES, head="clip")
    with pytest.raises(ProtextError, match="sigmoid probabilities need .*SigLIP.*'tiny-clip-0' has none"):
        clf.predict(_sample_images()[:1], activation="sigmoid")


@pytest.mark.parametrize("variant", VARIANTS)
def test_folders_of_every_variant_load(variant, tmp_path):
    folder = save_tiny_siglip(tmp_path / variant, seed=1, variant=variant)
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert model_type == ("siglip2" if variant == "siglip2-naflex" else "siglip")
    loaded, built = load_backbone(str(folder), device="cpu"), tiny_siglip(1, variant)
    assert loaded.text.kind == built.text.kind == ("siglip" if variant == "siglip" else "siglip2")
    assert loaded.image.image_size == built.image.image_size
    assert loaded.image.mean == (0.5, 0.5, 0.5) and loaded.fingerprint() == built.fingerprint()
    texts = ["a photo of a cat.", "A type of pet!"]
    assert torch.allclose(loaded.text.encode(texts), built.text.encode(texts), atol=1e-6)


def test_a_sentencepiece_tokenizer_without_its_package_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("sentencepiece"):
        pytest.skip("sentencepiece is installed here")
    folder = save_tiny_siglip(tmp_path / "spm")
    (folder / "tokenizer.json").unlink()
    (folder / "spiece.model").write_bytes(b"a SentencePiece model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer"}))
    with pytest.raises(ProtextError, match="tokenizer needs a package that is not installed.*pip install sentencepiece"):
        load_backbone(str(folder), device="cpu")


def test_prompts_refuse_a_backbone_of_another_kind(tiny, tmp_path):
    siglip, siglip2 = tiny_siglip(0, "siglip"), tiny_siglip(0, "siglip2")
    assert siglip.text.width == siglip2.text.width == tiny.text.width  # only the tower kind tells them apart
    ProText.create(siglip, depth=2).save_pretrained(tmp_path / "siglip")
    ProText.create(tiny, depth=2).save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "siglip" / "protext_config.json").read_text())["tower"] == "siglip"
    with pytest.raises(ProtextError, match="trained on the siglip text tower .* has a clip text tower"):
        ProText.from_pretrained(tmp_path / "siglip", backbone=tiny)
    with pytest.raises(ProtextError, match="trained on the clip text tower .* has a siglip text tower"):
        ProText.from_pretrained(tmp_path / "clip", backbone=siglip)
    with pytest.raises(ProtextError, match="siglip text tower .* has a siglip2 text tower"):
        ProText.from_pretrained(tmp_path / "siglip", backbone=siglip2)
    with pytest.raises(ProtextError, match="weights differ"):
        ProText.from_pretrained(tmp_path / "siglip", backbone=tiny_siglip(1, "siglip"))
    assert ProText.from_pretrained(tmp_path / "siglip", backbone=siglip).config.tower == "siglip"


def test_train_predict_eval_and_eval_text_commands(siglip_folder, tmp_path, capsys, shared):
    common = ["--backbone", str(siglip_folder), "--cache-dir", str(tmp_path / "c")]
    assert main(["train", *common, "--descriptions", str(CUPL / "eurosat_prompts_full.json"), "--depth", "2",
                 "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == 10
    assert ProText.from_pretrained(tmp_path / "p").backbone.text.kind == "siglip"

    images = [str(f) for f in sorted((SHARED / "images" / "cifar10_test_sample" / "cat").iterdir())[:2]]
    for scores in ("softmax", "sigmoid"):
        assert main(["predict", "--prompts", str(tmp_path / "p"), "--classes", "cat,dog,frog", "--activation", scores,
                     "--cache-dir", str(tmp_path / "c"), *images]) == 0
        lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
        assert len(lines) == 2 and all(l["activation"] == scores for l in lines)
        total = sum(p for _, p in lines[0]["top"])
        assert total == pytest.approx(1.0, abs=1e-3) if scores == "softmax" else total != pytest.approx(1.0, abs=1e-3)

    assert main(["eval", "--dataset", "folder", "--data-root", str(SHARED / "images" / "cifar10_test_sample"),
                 "--prompts", str(tmp_path / "p"), "--heads", "clip,protext", "--cache-dir", str(tmp_path / "c"),
                 "--output", str(tmp_path / "row.json"), "--no-progress"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["images"] == 100 and row["classes"] == 10 and 0 <= row["protext"] <= 100

    assert main(["eval-text", *common, "--protocol", "base2novel", "--descriptions",
                 str(CUPL / "eurosat_prompts_full.json"), "--set", "depth=2", "--set", "epochs=1",
                 "--set", "warmup_epochs=0", "--out", str(tmp_path / "et"), "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "et" / "eval_text.json").read_text())
    assert set(report["sets"]["base2novel"]) == {"eurosat_prompts_full"}


def test_base2novel_protocol_end_to_end(siglip_folder, tmp_path, shared):
    root, descs = tmp_path / "data", tmp_path / "descs"
    make_coop_tree(root, "eurosat", per_class=1)
    descs.mkdir()
    shutil.copy(CUPL / "eurosat_prompts_full.json", descs / "eurosat.json")
    assert main(["benchmark", "base2novel", "--data-root", str(root), "--descriptions-dir", str(descs),
                 "--datasets", "eurosat", "--backbone", str(siglip_folder), "--set", "depth=2", "--set", "epochs=1",
                 "--set", "warmup_epochs=0", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "base2novel.json").read_text())["rows"]
    measured = [r for r in rows if r["source"] == "measured" and r["head"] == "protext"]
    assert [(r["dataset"], r["split"]) for r in measured] == [("eurosat", "base"), ("eurosat", "novel"), ("eurosat", "all")]


def test_naflex_predict_command(tmp_path, capsys, shared):
    folder = save_tiny_siglip(tmp_path / "naflex", seed=0, variant="siglip2-naflex")
    images = [str(f) for f in _sample_images()[8:11]]  # portrait, landscape and near-square
    assert main(["predict", "--backbone", str(folder), "--classes", "cat,dog", "--activation", "sigmoid",
                 "--cache-dir", str(tmp_path / "c"), *images]) == 0
    assert [json.loads(l)["image"] for l in capsys.readouterr().out.splitlines()] == images
