import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CUPL, ROOT
from protext.cache import load_tensors
from protext.descriptions import pairs
from protext.errors import ProtextError
from protext.model import ProText
from protext.train import TrainConfig, batch_loss, encode_texts, lr_at, make_config, train
from reference import plain_loss


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

    targets = encode_texts(tiny, texts, tmp_path, show_progress=False)[torch.tensor(txt_idx)]
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
    first = encode_texts(tiny, texts, tmp_path, show_progress=False)
    calls = []
    original = tiny.text.encode
    monkeypatch.setattr(tiny.text, "encode", lambda t, **k: calls.append(len(t)) or original(t, **k))
    again = encode_texts(tiny, texts, tmp_path, show_progress=False)
    assert calls == [] and torch.equal(first, again)
    more = encode_texts(tiny, texts + ["A brand new sentence."], tmp_path, show_progress=False)
    assert calls == [1] and torch.equal(more[:-1], first)


def test_schedule_is_constant_warmup_then_cosine():
    cfg = TrainConfig(lr=0.03, epochs=10, warmup_epochs=5, warmup_lr=1e-5)
    assert [lr_at(cfg, e) for e in range(5)] == [1e-5] * 5
    assert lr_at(cfg, 5) == pytest.approx(0.03)
    assert lr_at(cfg, 9) == pytest.approx(0.015 * (1 + math.cos(math.pi * 4 / 10)))


def test_presets_files_and_flags_override_in_order(tmp_path):
    assert make_config("imagenet-200ep").n_ctx == 16 and make_config("imagenet-200ep").init is None
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
    model, summary = train(tiny, eurosat, cfg, tmp_path / "run", tmp_path / "cache", show_progress=False,
                           on_epoch=lambda e, l: losses.append(l))
    assert losses[-1] < 0.6 * losses[0]
    assert summary["trainable_parameters"] == 2 * 4 * 32
    _, again = train(tiny, eurosat, cfg, tmp_path / "run", tmp_path / "cache", resume=True, show_progress=False)
    assert again["resumed_from_epoch"] == 6 and again["final_epoch_loss"] == summary["final_epoch_loss"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.safetensors", "prompts.safetensors", "protext_config.json", "train_log.jsonl"]
    with pytest.raises(ProtextError, match="--resume"):
        train(tiny, eurosat, cfg, tmp_path / "run", tmp_path / "cache", show_progress=False)
    with pytest.raises(ProtextError, match="settings differ.*lr"):
        train(tiny, eurosat, TrainConfig(depth=2, epochs=6, batch_size=32, warmup_epochs=1, lr=0.01),
              tmp_path / "run", tmp_path / "cache", resume=True, show_progress=False)
    other = dict(list(eurosat.items())[:5])
    with pytest.raises(ProtextError, match="descriptions differ"):
        train(tiny, other, cfg, tmp_path / "run", tmp_path / "cache", resume=True, show_progress=False)


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
    assert summary["resumed_from_epoch"] == 1
    a = load_tensors(tmp_path / "full" / "prompts.safetensors")["prompts"]
    b = load_tensors(out / "prompts.safetensors")["prompts"]
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
