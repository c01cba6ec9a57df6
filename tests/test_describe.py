import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chat_server import ChatServer
from conftest import ROOT
from protext.cli import main
from protext.describe import QUESTIONS, ChatClient, clean_answer, clean_answers, describe, parse_retry_after
from protext.errors import ProtextError

KINDS = {"objects", "scenes", "textures", "satellite", "actions", "food", "pets", "flowers", "aircraft", "cars"}


def client(server, **kw):
    kw.setdefault("backoff", 0.01)
    return ChatClient(server.url, "test-model", "sk-test", timeout=5, **kw)


def test_every_dataset_kind_has_its_own_questions():
    assert set(QUESTIONS) == KINDS
    for questions in QUESTIONS.values():
        assert len(questions) >= 4 and all(q.count("{}") == 1 for q in questions)


def test_normal_answers_are_cleaned_and_saved(tmp_path):
    out = tmp_path / "d.json"
    with ChatServer() as server:
        gen = client(server)
        report = describe(["Red_Fox", "owl"], "objects", out, gen, samples=2, concurrency=3, show_progress=False)
    saved = json.loads(out.read_text())
    assert list(saved) == ["red fox", "owl"] or set(saved) == {"red fox", "owl"}
    assert all(s.endswith(".") and not s.startswith("1.") and "It has" not in s for v in saved.values() for s in v)
    assert report["described"] == 2 and report["failed"] == {}
    n = len(QUESTIONS["objects"]) * 2 * 2
    assert gen.usage.as_dict() == {"requests": n, "retries": 0, "prompt_tokens": 10 * n, "completion_tokens": 12 * n}


def test_cleaning_rules():
    assert clean_answer('  "- A tench is green. It swims."  ') == "A tench is green."
    assert clean_answer("2) a pug has a flat face") == "a pug has a flat face."
    assert clean_answer("   ") is None and clean_answer("...") is None
    assert clean_answer("x" * 400) is None
    assert clean_answers(["A cat.", "a CAT.", "", "A dog."]) == ["A cat.", "A dog."]


@pytest.mark.parametrize("failure", ["429", "500", "bad-json", "no-choices"])
def test_retries_on_transient_failures(failure):
    with ChatServer(script=[failure, failure]) as server:
        gen = client(server)
        assert gen("Describe what a cat looks like.").startswith("1. A cat")
    assert gen.usage.requests == 3 and gen.usage.retries == 2


def test_retry_after_is_honoured():
    waits = []
    with ChatServer(script=["429"], retry_after="2") as server:
        gen = client(server, sleep=waits.append)
        gen("Describe what a cat looks like.")
    assert waits == [2.0]
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after(None) is None


def test_timeouts_are_retried_then_reported():
    with ChatServer(default="slow", delay=0.5) as server:
        gen = ChatClient(server.url, "m", timeout=0.1, max_retries=1, backoff=0.01)
        with pytest.raises(ProtextError, match="giving up after 2 tries"):
            gen("Describe a cat.")


def test_concurrency_limit_is_respected(tmp_path):
    with ChatServer(default="slow", delay=0.15) as server:
        describe(["a1", "b1", "c1"], "pets", tmp_path / "d.json", client(server), samples=2, concurrency=3,
                 show_progress=False)
    assert server.max_in_flight == 3


def test_a_failing_class_is_left_out_and_asked_again(tmp_path):
    out = tmp_path / "d.json"
    with ChatServer(default="500") as server:
        report = describe(["cat"], "objects", out, client(server, max_retries=1), samples=1, show_progress=False)
    assert "cat" in report["failed"] and not out.exists()
    with ChatServer() as server:
        report = describe(["cat"], "objects", out, client(server), samples=1, show_progress=False)
    assert report["described"] == 1 and "cat" in json.loads(out.read_text())


def test_killed_generation_resumes_with_only_missing_classes(tmp_path):
    classes = [f"class{i}" for i in range(12)]
    (tmp_path / "classes.txt").write_text("\n".join(classes))
    out = tmp_path / "d.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with ChatServer(default="slow", delay=0.05) as server:
        cmd = [sys.executable, "-m", "protext", "describe", "--classes", str(tmp_path / "classes.txt"),
               "--dataset-kind", "food", "--samples", "1", "--concurrency", "1", "--base-url", server.url,
               "--model", "m", "--out", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and len(json.loads(out.read_text())) >= 3):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = json.loads(out.read_text())
        assert 3 <= len(first) < 12, "the run was not killed midway"
        asked_before = len(server.questions)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    second_questions = server.questions[asked_before:]
    asked_classes = {c for c in classes if any(q.endswith(f" {c}?") or f" {c} " in q or f" {c}," in q
                                               or q.endswith(f" {c}.") for q in second_questions)}
    assert asked_classes == set(classes) - set(first)
    final = json.loads(out.read_text())
    assert set(final) == set(classes)
    assert all(final[c] == first[c] for c in first)
    assert json.loads(done.stdout)["already_saved"] == len(first)


def test_describe_command_reports_usage(tmp_path, capsys):
    with ChatServer() as server:
        code = main(["describe", "--classes", "pug,beagle", "--dataset-kind", "pets", "--samples", "1",
                     "--base-url", server.url, "--model", "m", "--out", str(tmp_path / "d.json"), "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["usage"]["requests"] == 2 * len(QUESTIONS["pets"])


def test_unknown_kind_is_rejected():
    with pytest.raises(SystemExit):
        main(["describe", "--classes", "pug", "--dataset-kind", "nope", "--out", "x.json"])


def test_local_transformers_model_as_describer(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from protext.describe import LocalGenerator
    from protext.tiny import clip_tokenizer

    tok = clip_tokenizer(["a", "cat", "is", "the", "photo", "describe"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    gen = LocalGenerator(str(tmp_path / "lm"), max_new_tokens=8)
    answer = gen("Describe what a cat looks like.")
    assert isinstance(answer, str)
    assert gen.usage.requests == 1 and 1 <= gen.usage.completion_tokens <= 8 and gen.usage.prompt_tokens > 5
