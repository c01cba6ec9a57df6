import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import CUPL, ROOT, plain_loss

from protext.context import Context
from protext.cache import load_tensors
from protext.descriptions import pairs
from protext.errors import ProtextError
from protext.feature_cache import encode_texts, feature_store
from protext.model import ProText
from protext.text_encoder import pad
from protext.training.train import TrainConfig, batch_loss, lr_at, make_config, train

train_module = importlib.import_module("protext.training.train")  # `protext.training.train` is also the function


def test_fast_step_equals_plain_step(tiny, eurosat, tmp_path):
    cfg = TrainConfig(depth=2)
    classes, texts, cls_idx, txt_idx = pairs(eurosat)
    batch = torch.randperm(len(cls_idx), generator=torch.Generator().manual_seed(0))[:64]
    assert len(set(torch.tensor(cls_idx)[batch].tolist())) < 64  # the batch repeats classes
    fast = ProText.create(tiny, n_ctx=4, depth=2, seed=3)
    plain = ProText.create(tiny, n_ctx=4, depth=2, seed=3)
    with torch.no_grad():  # non-trivial prompts so that gradients are not special
        fast.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        plain.prompts.copy_(fast.prompts)

    targets = encode_texts(tiny, texts, Context(tmp_path, progress=False))[torch.tensor(txt_idx)]
    loss_fast = batch_loss(fast, fast.class_token_lists(classes), torch.tensor(cls_idx)[batch], targets[batch], cfg)
    loss_fast.backward()

    names = [classes[cls_idx[i]] for i in batch.tolist()]
    descs = [texts[txt_idx[i]] for i in batch.tolist()]
    loss_plain = plain_loss(plain, names, descs, cfg)
    loss_plain.backward()

    assert abs(loss_fast.item() - loss_plain.item()) <= 1e-5 * max(1.0, abs(loss_plain.item()))
    assert torch.allclose(fast.prompts.grad, plain.prompts.grad, atol=1e-5, rtol=1e-5)
    assert fast.prompts.grad.abs().sum() > 0


def test_targets_are_cached_and_reused(tiny, eurosat, tmp_path, monkeypatch):
    _, texts, _, _ = pairs(eurosat)
    first = encode_texts(tiny, texts, Context(tmp_path, progress=False))
    calls = []
    original = tiny.text.encode
    monkeypatch.setattr(tiny.text, "encode", lambda t, **k: calls.append(len(t)) or original(t, **k))
    again = encode_texts(tiny, texts, Context(tmp_path, progress=False))
    assert calls == [] and torch.equal(first, again)
    more = encode_texts(tiny, texts + ["A brand new sentence."], Context(tmp_path, progress=False))
    assert calls == [1] and torch.equal(more[:-1], first)


def test_schedule_is_constant_warmup_then_cosine():
    cfg = TrainConfig(lr=0.03, epochs=10, warmup_epochs=5, warmup_lr=1e-5)
    assert [lr_at(cfg, e) for e in range(5)] == [1e-5] * 5
    assert lr_at(cfg, 5) == pytest.approx(0.03)
    assert lr_at(cfg, 9) == pytest.approx(0.015 * (1 + math.cos(math.pi * 4 / 10)))


def test_presets_files_and_flags_override_in_order(tmp_path):
    assert make_config("imagenet-200ep").n_ctx == 16 and make_config("imagenet-200ep").init == "random"
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.5\nepochs = 3\n")
    cfg = make_config("cross-dataset", f, {"epochs": 7, "seed": None})
    assert (cfg.lr, cfg.epochs, cfg.n_ctx, cfg.seed) == (0.5, 7, 4, 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1}')
    with pytest.raises(ProtextError, match=r"bad\.json.*learning_rate"):
        make_config(None, bad)
    with pytest.raises(ProtextError, match="unknown preset"):
        make_config("nope")
    with pytest.raises(ProtextError, match="loss"):
        TrainConfig(loss="cosine")


def test_training_lowers_loss_and_refuses_to_overwrite(tiny, eurosat, tmp_path):
    losses = []
    cfg = TrainConfig(depth=2, epochs=6, batch_size=32, warmup_epochs=1, lr=0.005)
    model, summary = train(tiny, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False),
                           on_epoch=lambda e, l: losses.append(l))
    assert losses[-1] < 0.6 * losses[0]
    assert summary["trainable_parameters"] == 2 * 4 * 32
    _, again = train(tiny, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False), resume=True)
    assert again["resumed_from_epoch"] == 6 and again["final_epoch_loss"] == summary["final_epoch_loss"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.safetensors", "prompts.safetensors", "protext_config.json", "train_log.jsonl"]
    with pytest.raises(ProtextError, match="--resume"):
        train(tiny, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False))
    with pytest.raises(ProtextError, match="settings differ.*lr"):
        train(tiny, eurosat, TrainConfig(depth=2, epochs=6, batch_size=32, warmup_epochs=1, lr=0.01),
              tmp_path / "run", Context(tmp_path / "cache", progress=False), resume=True)
    other = dict(list(eurosat.items())[:5])
    with pytest.raises(ProtextError, match="descriptions differ"):
        train(tiny, other, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False), resume=True)


def _train_cmd(folder, out, cache):
    return [sys.executable, "-m", "protext", "train", "--backbone", str(folder),
            "--descriptions", str(CUPL / "pets_prompts_full.json"), "--depth", "2", "--epochs", "3",
            "--warmup-epochs", "1", "--batch-size", "2", "--lr", "0.01", "--out", str(out),
            "--cache-dir", str(cache), "--no-progress"]


def test_resume_after_kill_gives_the_same_prompts(tiny_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cache = tmp_path / "cache"
    full = subprocess.run(_train_cmd(tiny_folder, tmp_path / "full", cache), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_folder, out, cache), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(l).get("epoch") == 2 and "step" in json.loads(l)
                                for l in log.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out / "prompts.safetensors").exists()
    assert (out / "checkpoint.safetensors").exists()  # epoch 1 survived the kill

    resumed = subprocess.run(_train_cmd(tiny_folder, out, cache) + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert 1 <= summary["resumed_from_epoch"] < 3  # killed during epoch 2 (or just after it, on a loaded machine)
    a = load_tensors(tmp_path / "full" / "prompts.safetensors")["prompts"]
    b = load_tensors(out / "prompts.safetensors")["prompts"]
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_diverged_training_stops_and_keeps_the_last_good_checkpoint(tiny, eurosat, tmp_path):
    cfg = TrainConfig(depth=2, epochs=3, batch_size=64, warmup_epochs=1, lr=1e30)
    with pytest.raises(ProtextError, match=r"diverged.*epoch 2.*kept in .*checkpoint\.safetensors"):
        train(tiny, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False))
    assert not (tmp_path / "run" / "prompts.safetensors").exists()  # no NaN prompts saved
    kept = load_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert torch.isfinite(kept["prompts"]).all() and torch.isfinite(kept["optimizer.0.exp_avg"]).all()


@pytest.mark.parametrize("setting, value, message", [
    ("lr", float("nan"), "'lr' must be a finite number"),
    ("lr", float("inf"), "'lr' must be a finite number"),
    ("lr", "0.01", "'lr' must be a number, got '0.01'"),
    ("epochs", "abc", "'epochs' must be a whole number, got 'abc'"),
    ("epochs", True, "'epochs' must be a whole number, got True"),
    ("epochs", 2.5, "'epochs' must be a whole number"),
    ("init", 5, "'init' must be a string"),
    ("init", None, "'init' must be a string"),
    ("init", "a photo of", "init must be 'words' or 'random', got 'a photo of'; the words themselves go in init_words"),
    ("init_words", 3, "'init_words' must be a string"),
    ("template", "a {} of {}", "exactly one '{}'"),
    ("template", "a photo of {0}", "exactly one '{}'"),
])
def test_settings_of_the_wrong_type_name_the_setting(setting, value, message):
    with pytest.raises(ProtextError, match=re.escape(message)):
        TrainConfig(**{setting: value})


def test_config_files_with_wrong_types_name_the_file_and_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"lr": "0.01"}')
    with pytest.raises(ProtextError, match=r"c\.json: setting 'lr' must be a number"):
        make_config("cross-dataset", f)
    t = tmp_path / "c.toml"
    t.write_text('epochs = "abc"\n')
    with pytest.raises(ProtextError, match=r"c\.toml: setting 'epochs' must be a whole number"):
        make_config("cross-dataset", t)
    with pytest.raises(ProtextError, match="is a folder"):
        make_config("cross-dataset", tmp_path)
    f.write_text('{"lr": 0.1, "lr": 0.2}')
    with pytest.raises(ProtextError, match="key 'lr' appears twice"):
        make_config("cross-dataset", f)
    assert make_config("cross-dataset", None, {"lr": 1}).lr == 1.0  # an int is a number


def test_settings_are_checked_against_the_backbone_before_encoding(tiny, eurosat, tmp_path, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("encoding started before the settings were checked")

    monkeypatch.setattr(train_module, "encode_texts", no_encoding)
    with pytest.raises(ProtextError, match="n_ctx 100 .* more than the 77-token context"):
        train(tiny, eurosat, TrainConfig(n_ctx=100, depth=2, init="random"), tmp_path / "a",
              Context(tmp_path / "c", progress=False))
    with pytest.raises(ProtextError, match="depth must be between 1 and 2"):
        train(tiny, eurosat, TrainConfig(depth=5), tmp_path / "b", Context(tmp_path / "c", progress=False))


def test_cli_refuses_non_finite_and_mistyped_settings(tiny_folder, tmp_path, capsys):
    from protext.cli import main

    base = ["train", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
            "--depth", "2", "--out", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(base + ["--lr", "nan"]) == 2
    assert "'lr' must be a finite number" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"init": 5}')
    assert main(base + ["--config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: setting 'init' must be a string" in capsys.readouterr().err
    assert main(base + ["--config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(base + ["--n-ctx", "100"]) == 2
    assert "'a photo of a' are 4 tokens for this tokenizer, but n_ctx is 100" in capsys.readouterr().err
    assert main(base + ["--n-ctx", "100", "--init", "random"]) == 2
    assert "77-token context" in capsys.readouterr().err
    assert main(base + ["--template", "{} and {}"]) == 2
    assert "exactly one '{}'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def _bf16_and_fp32_losses(backbone, data, device):
    cfg32 = TrainConfig(depth=2, precision="fp32")
    cfg16 = TrainConfig(depth=2, precision="bf16")
    classes, texts, cls_idx, txt_idx = pairs(data)
    model = ProText.create(backbone, n_ctx=4, depth=2, seed=3)
    with torch.no_grad():
        model.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    tokens = model.class_token_lists(classes)
    targets = backbone.text.encode(texts)[torch.tensor(txt_idx)].to(device)
    idx = torch.arange(64)
    cls_t = torch.tensor(cls_idx)[idx]
    out = {}
    for cfg in (cfg32, cfg16):
        autocast, scaler = train_module._autocast(cfg, torch.device(device))
        with autocast:
            loss = batch_loss(model, tokens, cls_t, targets[idx], cfg)
        assert scaler is None
        out[cfg.precision] = loss
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_branch_runs_and_stays_close_to_fp32(device, eurosat, tmp_path):
    from protext.tiny import tiny_clip

    backbone = tiny_clip(seed=0).to(device)
    losses = _bf16_and_fp32_losses(backbone, eurosat, device)
    assert torch.isfinite(losses["bf16"]) and losses["bf16"].dtype == torch.float32
    assert losses["bf16"].item() == pytest.approx(losses["fp32"].item(), rel=0.05)
    assert losses["bf16"].item() != losses["fp32"].item()  # the bf16 branch really ran

    cfg = TrainConfig(depth=2, epochs=2, batch_size=64, warmup_epochs=1, precision="bf16")
    model, summary = train(backbone, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False))
    assert math.isfinite(summary["final_epoch_loss"])
    saved = load_tensors(tmp_path / "run" / "prompts.safetensors")["prompts"]
    ckpt = load_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert saved.dtype == torch.float32 and all(t.dtype == torch.float32 for t in ckpt.values())
    assert torch.equal(saved, model.prompts.detach().cpu())


def test_text_cache_is_keyed_by_the_text_cleaning_rule(tiny, tmp_path, monkeypatch):
    before = feature_store(tiny, "text", Context(tmp_path)).folder
    monkeypatch.setattr(type(tiny.text), "text_rule", "another-rule")
    assert feature_store(tiny, "text", Context(tmp_path)).folder != before


def test_settings_as_key_value_pairs():
    from protext.training.train import parse_assignments

    got = parse_assignments(["lr=0.01", "init=random", "epochs=3", "warmup-epochs=0", "template=a {}."])
    assert got == {"lr": 0.01, "init": "random", "epochs": 3, "warmup_epochs": 0, "template": "a {}."}
    assert make_config("base2novel", None, got).epochs == 3
    with pytest.raises(ProtextError, match="--set 'learning_rate=1': expected KEY=VALUE"):
        parse_assignments(["learning_rate=1"])
    with pytest.raises(ProtextError, match="'epochs' must be a whole number"):
        make_config("base2novel", None, parse_assignments(["epochs=three"]))


def test_checkpoint_holds_the_optimisers_whole_state(tiny, eurosat, tmp_path):
    cfg = TrainConfig(depth=2, epochs=1, batch_size=64, warmup_epochs=0)
    train(tiny, eurosat, cfg, tmp_path / "run", Context(tmp_path / "cache", progress=False))
    from safetensors import safe_open

    tensors = load_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert {"optimizer.0.step", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq"} <= set(tensors)
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["protext_checkpoint"])
    group = meta["optimizer"]["param_groups"][0]
    assert group["betas"] == [0.9, 0.98] and group["weight_decay"] == 0.1


def test_grouped_batching_visits_every_pair_once_from_few_classes(eurosat):
    from protext.training.train import epoch_order

    classes, _, cls_idx, _ = pairs(eurosat)
    cls_t = torch.tensor(cls_idx)
    paper = TrainConfig()
    grouped = TrainConfig(batching="grouped", classes_per_batch=2)
    assert torch.equal(epoch_order(cls_t, paper, 3), torch.randperm(len(cls_idx), generator=torch.Generator()
                                                                     .manual_seed(paper.seed * 1_000_003 + 3)))
    order = epoch_order(cls_t, grouped, 3)
    assert sorted(order.tolist()) == list(range(len(cls_idx)))  # every pair once
    assert torch.equal(order, epoch_order(cls_t, grouped, 3))  # resumable: a function of (seed, epoch)
    assert not torch.equal(order, epoch_order(cls_t, grouped, 4))
    per_batch = [len(set(cls_t[order[i : i + 50]].tolist())) for i in range(0, len(order), 50)]
    paper_order = epoch_order(cls_t, paper, 3)
    per_paper_batch = [len(set(cls_t[paper_order[i : i + 50]].tolist())) for i in range(0, len(order), 50)]
    assert max(per_batch) <= 2 * 2 and sum(per_batch) < sum(per_paper_batch) / 2
    with pytest.raises(ProtextError, match=r"batching \(--batching\) must be one of paper, grouped"):
        TrainConfig(batching="random")


def test_grouped_training_runs_end_to_end(tiny, eurosat, tmp_path):
    cfg = TrainConfig(depth=2, epochs=2, batch_size=50, warmup_epochs=1, batching="grouped", classes_per_batch=2)
    model, summary = train(tiny, eurosat, cfg, tmp_path / "g", Context(tmp_path / "c", progress=False))
    assert math.isfinite(summary["final_epoch_loss"])
    assert model.config.training["batching"] == "grouped"


def test_contrastive_term_is_the_cross_entropy_over_the_batchs_classes(tiny, eurosat, tmp_path):
    """Written out pair by pair: each description's softmax over the distinct classes of its batch."""
    cfg = TrainConfig(depth=2, contrast=0.5, contrast_temperature=0.1)
    classes, texts, cls_idx, txt_idx = pairs(eurosat)
    batch = torch.randperm(len(cls_idx), generator=torch.Generator().manual_seed(0))[:48]
    model = ProText.create(tiny, n_ctx=4, depth=2, seed=3)
    with torch.no_grad():
        model.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    targets = encode_texts(tiny, texts, Context(tmp_path, progress=False))[torch.tensor(txt_idx)][batch]
    labels = torch.tensor(cls_idx)[batch]
    with torch.no_grad():
        both = batch_loss(model, model.class_token_lists(classes), labels, targets, cfg)
        regression = batch_loss(model, model.class_token_lists(classes), labels, targets, TrainConfig(depth=2))
        present = sorted(set(labels.tolist()))
        feats = model(pad(model.class_token_lists([classes[c] for c in present]), tiny.text.pad_id,
                          length=tiny.text.max_length))
        by_hand = 0.0
        for t, c in zip(targets, labels.tolist()):
            logits = torch.stack([t @ feats[k] for k in range(len(present))]) / 0.1
            by_hand += -torch.log_softmax(logits, 0)[present.index(c)] / len(labels)
    assert len(present) > 1 and feats.shape[0] == len(present)
    assert abs((both - regression).item() - 0.5 * by_hand.item()) < 1e-4
    with pytest.raises(ProtextError, match=r"contrast \(--contrast\)"):
        TrainConfig(contrast=-1)
    with pytest.raises(ProtextError, match="contrast_temperature"):
        TrainConfig(contrast_temperature=0)


def test_training_through_several_templates_draws_one_per_class_and_batch_and_encodes_it_with_the_context(tiny, eurosat, tmp_path):
    """With train_templates 'ensemble' a pair's input is its class through one of the inference
    ensemble's templates, one per class and batch; the loss equals the pair-by-pair regression on
    those very texts."""
    from protext.heads import HeadInputs, Heads, _protext_templates
    from protext.model import prompted_text
    from protext.training.train import epoch_inputs, training_templates

    cfg = TrainConfig(depth=2, train_templates="ensemble")
    templates = training_templates(cfg)
    model = ProText.create(tiny, n_ctx=4, depth=2, seed=3).used_with(templates="ensemble")
    heads = Heads(tiny, HeadInputs(model, template=cfg.template), Context(tmp_path, progress=False))
    assert templates == _protext_templates(heads) and len(templates) == 8  # what inference averages
    assert training_templates(TrainConfig()) == [TrainConfig().template]
    classes, texts, cls_idx, txt_idx = pairs(eurosat)
    cls_t = torch.tensor(cls_idx)
    cfg = TrainConfig(depth=2, train_templates="ensemble", batch_size=40)
    order = torch.randperm(len(cls_idx), generator=torch.Generator().manual_seed(0))
    inputs = epoch_inputs(order, cls_t, len(classes), len(templates), cfg, 2)
    assert torch.equal(inputs % len(classes), cls_t)  # the class is kept
    assert len(set((inputs // len(classes)).tolist())) == len(templates)  # every template is drawn
    for start in range(0, len(order), 40):  # a batch has as many inputs as classes: one template per class
        idx = order[start : start + 40]
        assert len(set(inputs[idx].tolist())) == len(set(cls_t[idx].tolist()))
    assert torch.equal(inputs, epoch_inputs(order, cls_t, len(classes), len(templates), cfg, 2))  # resumable
    assert not torch.equal(inputs, epoch_inputs(order, cls_t, len(classes), len(templates), cfg, 3))
    assert torch.equal(epoch_inputs(order, cls_t, len(classes), 1, TrainConfig(), 2), cls_t)  # the paper: the class

    with torch.no_grad():
        model.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = order[:40]
    targets = encode_texts(tiny, texts, Context(tmp_path, progress=False))[torch.tensor(txt_idx)][batch]
    tokens = [ids for t in templates for ids in model.class_token_lists(classes, t)]
    with torch.no_grad():
        fast = batch_loss(model, tokens, inputs[batch], targets, cfg)
        texts_by_hand = [prompted_text(templates[int(k) // len(classes)], classes[int(k) % len(classes)],
                                       model.config.placeholder) for k in inputs[batch]]
        feats = model(pad(tiny.text.token_lists(texts_by_hand), tiny.text.pad_id, length=tiny.text.max_length))
        by_hand = torch.nn.functional.mse_loss(feats, targets) * cfg.loss_scale
    assert len({inputs[int(i)].item() // len(classes) for i in batch}) > 1  # the batch mixes templates
    assert abs(fast.item() - by_hand.item()) <= 1e-5 * max(1.0, by_hand.item())

    run, summary = train(tiny, eurosat, TrainConfig(depth=2, epochs=2, batch_size=50, warmup_epochs=1,
                                                    train_templates="ensemble"),
                         tmp_path / "t", Context(tmp_path / "c", progress=False))
    assert math.isfinite(summary["final_epoch_loss"]) and run.config.training["train_templates"] == "ensemble"
    with pytest.raises(ProtextError, match=r"train_templates \(--train-templates\) must be one of one, ensemble"):
        TrainConfig(train_templates="all")
    with pytest.raises(ProtextError, match=r"contrast \(--contrast\).*train_templates"):
        TrainConfig(contrast=1.0, train_templates="ensemble")


def test_the_anchor_of_each_training_input_is_its_own_plain_text():
    from protext.training.train import anchor_texts

    cfg = TrainConfig(train_templates="ensemble")
    texts = anchor_texts(cfg, ["tench", "goldfish"])
    assert texts[:2] == ["a photo of a tench.", "a photo of a goldfish."] and len(texts) == 16
    assert texts[2:4] == ["itap of a tench.", "itap of a goldfish."]  # input t * C + c
    assert anchor_texts(TrainConfig(), ["tench"]) == ["a photo of a tench."]



def test_finished_prompts_of_other_training_settings_are_not_reused(tiny, eurosat, tmp_path):
    from protext.training.train import load_or_train

    ctx = Context(tmp_path / "c", progress=False)
    cfg = TrainConfig(depth=2, epochs=1, warmup_epochs=0, batch_size=100)
    first = load_or_train(tiny, eurosat, cfg, tmp_path / "run", ctx)
    again = load_or_train(tiny, eurosat, TrainConfig(depth=2, epochs=1, warmup_epochs=0, batch_size=100,
                                                     templates="ensemble"), tmp_path / "run", ctx)
    assert torch.equal(first.prompts, again.prompts) and again.config.templates == "ensemble"  # inference only
    with pytest.raises(ProtextError, match=r"run holds prompts trained with other settings \(epochs: there 1, now 2\)"):
        load_or_train(tiny, eurosat, TrainConfig(depth=2, epochs=2, warmup_epochs=0, batch_size=100),
                      tmp_path / "run", ctx)


def test_frozen_deep_init_starts_at_the_plain_templates_features(tiny, eurosat, tmp_path):
    """CLIP's causal mask keeps the class name out of the context positions, so deep prompts set to the
    frozen hidden states there give every class exactly its plain-template feature before any step."""
    from protext.training.train import frozen_context

    names = list(eurosat)
    model = ProText.create(tiny, seed=1, n_ctx=4, depth=2, init="words", init_words="a photo of a")
    plain = tiny.text.encode([f"a photo of a {n}." for n in names])
    assert (model.encode_classes(names) - plain).abs().max() > 1e-3  # the paper's random start is elsewhere
    states = frozen_context(model, model.class_token_lists(names))
    assert torch.equal(states[0], model.prompts[0].detach())
    with torch.no_grad():
        model.prompts[1:] = states[1:]
    assert (model.encode_classes(names) - plain).abs().max() < 1e-5

    run, summary = train(tiny, eurosat, TrainConfig(depth=2, epochs=2, batch_size=50, warmup_epochs=1,
                                                    deep_init="frozen"),
                         tmp_path / "t", Context(tmp_path / "c", progress=False))
    assert math.isfinite(summary["final_epoch_loss"]) and run.config.training["deep_init"] == "frozen"
    with pytest.raises(ProtextError, match=r"deep_init \(--deep-init\) must be one of random, frozen"):
        TrainConfig(deep_init="zeros")
