"""The inference settings beyond the paper: learned prompts used through more templates (--templates ensemble)
and blended with the frozen encoder (--blend)."""

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from protext.cli import main
from protext.context import Context
from protext.errors import ProtextError
from protext.feature_cache import encode_texts
from protext.heads import HeadInputs, Heads
from protext.model import INFERENCE, ProText, read_config
from protext.templates import IMAGENET_7
from protext.training.text_eval import TextEvaluator, make_queries
from protext.training.train import PRESETS, TrainConfig, load_or_train, make_config

CLASSES = ["cat", "dog", "car", "ship"]
DATA = {c: [f"A {c} is a thing with {w} parts." for w in ("red", "blue", "small", "round", "long")] for c in CLASSES}


def test_the_paper_presets_are_unchanged_and_use_the_prompts_as_the_paper_does():
    paper = dict(n_ctx=4, depth=9, lr=0.03, init="words", init_words="a photo of a")
    assert PRESETS["cross-dataset"] == {**paper, "epochs": 10}
    assert PRESETS["base2novel"] == {**paper, "epochs": 30}
    assert sorted(PRESETS) == ["base2novel", "cross-dataset", "imagenet-200ep", "text-only"]
    for name in PRESETS:
        a, b = asdict(make_config(name)), asdict(make_config(name, overrides={"templates": "ensemble", "blend": 0.5}))
        assert {k for k in a if a[k] != b[k]} == set(INFERENCE)
        assert (a["templates"], a["blend"]) == ("one", 0.0)


def test_the_ensemble_head_is_the_blend_of_the_learned_and_frozen_template_means(tiny, tmp_path):
    pt = ProText.create(tiny, depth=2, seed=3)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ctx = Context(tmp_path, progress=False)
    used = pt.used_with(templates="ensemble", blend=0.25)
    assert used.prompts is pt.prompts and pt.config.templates == "one"  # the same tensor; the original unchanged
    got = Heads(tiny, HeadInputs(used), ctx).get("protext", CLASSES)
    templates = ["a photo of a {}.", *IMAGENET_7]
    learned = F.normalize(torch.stack([pt.encode_classes(CLASSES, t) for t in templates]).mean(0), dim=-1)
    frozen = torch.stack([encode_texts(tiny, [t.format(c) for t in templates], ctx).mean(0) for c in CLASSES])
    want = F.normalize(0.75 * learned + 0.25 * F.normalize(frozen, dim=-1), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    paper = Heads(tiny, HeadInputs(pt), ctx).get("protext", CLASSES)
    assert torch.allclose(paper, pt.encode_classes(CLASSES, "a photo of a {}."))
    templates_only = Heads(tiny, HeadInputs(pt.used_with(templates="ensemble")), ctx).get("protext", CLASSES)
    assert torch.allclose(templates_only, learned, atol=1e-6) and not torch.allclose(templates_only, paper)


def test_inference_settings_out_of_range_are_refused_naming_the_setting_or_file(tiny, tmp_path):
    pt = ProText.create(tiny, depth=2)
    with pytest.raises(ProtextError, match="blend"):
        pt.used_with(blend=1.5)
    with pytest.raises(ProtextError, match="not inference settings: lr"):
        pt.used_with(lr=0.1)
    with pytest.raises(ProtextError, match=r"templates \(--templates\) must be one of one, ensemble"):
        TrainConfig(templates="all")
    folder = pt.used_with(templates="ensemble", blend=0.5).save_pretrained(tmp_path / "p")
    assert (read_config(folder / "protext_config.json").templates, read_config(folder / "protext_config.json").blend) \
        == ("ensemble", 0.5)
    raw = json.loads((folder / "protext_config.json").read_text())
    (folder / "protext_config.json").write_text(json.dumps({**raw, "blend": -1}))
    with pytest.raises(ProtextError, match=r"protext_config.json: blend \(--blend\) must be a number from 0 to 1"):
        read_config(folder / "protext_config.json")


def test_inference_settings_reuse_the_paper_run_and_train_into_prompts_that_keep_them(tiny, tmp_path):
    ctx = Context(tmp_path / "cache", progress=False)
    small = dict(depth=2, epochs=1, warmup_epochs=0, lr=0.001)
    paper = make_config("base2novel", overrides=small)
    ensemble = make_config("base2novel", overrides={**small, "templates": "ensemble", "blend": 0.5})
    a = TextEvaluator(tiny, paper, ctx, work_dir=tmp_path / "runs")
    b = TextEvaluator(tiny, ensemble, ctx, work_dir=tmp_path / "runs")
    first = a.train_prompts(DATA)
    runs = list((tmp_path / "runs").iterdir())
    second = b.train_prompts(DATA)  # the same training: the finished run is used, with the config's settings
    assert list((tmp_path / "runs").iterdir()) == runs and torch.equal(first.prompts, second.prompts)
    assert (second.config.templates, second.config.blend) == ("ensemble", 0.5) and first.config.templates == "one"
    trained = load_or_train(tiny, DATA, ensemble, tmp_path / "fresh", ctx)  # a new run records them in its files
    saved = read_config(tmp_path / "fresh" / "protext_config.json")
    assert (saved.templates, saved.blend) == ("ensemble", 0.5) and torch.equal(trained.prompts, first.prompts)
    # the evaluator's variant columns are these heads, from the one run
    q = make_queries(DATA, CLASSES, "thing")
    with_variants = TextEvaluator(tiny, paper, ctx, work_dir=tmp_path / "runs",
                                  variants={"protext-ensemble": {"templates": "ensemble", "blend": 0.5}})
    scores = with_variants.score(q, CLASSES, first, None, "a photo of a {}.", None, "check")
    assert scores["protext-ensemble"] == b.score(q, CLASSES, second, None, "a photo of a {}.", None, "check")["protext"]


def test_train_help_lists_the_inference_settings_and_their_flags_are_kept_in_the_prompts(tiny_folder, tmp_path,
                                                                                          capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--templates" in out and "--blend" in out
    (tmp_path / "d.json").write_text(json.dumps(DATA))
    code = main(["train", "--preset", "base2novel", "--descriptions", str(tmp_path / "d.json"), "--backbone",
                 str(tiny_folder), "--out", str(tmp_path / "p"), "--epochs", "1", "--warmup-epochs", "0",
                 "--depth", "2", "--templates", "ensemble", "--blend", "0.3", "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"])
    assert code == 0
    saved = read_config(tmp_path / "p" / "protext_config.json")
    assert (saved.templates, saved.blend) == ("ensemble", 0.3)
    assert main(["train", "--descriptions", str(tmp_path / "d.json"), "--backbone", str(tiny_folder), "--out",
                 str(tmp_path / "q"), "--blend", "2", "--no-progress"]) != 0
    assert "blend (--blend) must be a number from 0 to 1, got 2.0" in capsys.readouterr().err
