import json
import os
import signal
import subprocess
import sys
import time

import pytest
from chat_server import ChatServer
from support import ROOT

from protext.context import QUIET
from protext.cli import main
from protext.training.describe import QUESTIONS, ChatClient, clean_answer, clean_answers, describe, parse_retry_after
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
        report = describe(["Red_Fox", "owl"], "objects", out, gen, samples=2, concurrency=3, ctx=QUIET)
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


@pytest.mark.parametrize("failure", ["429", "500", "bad-json", "no-choices", "list-content", "null-content",
                                     "number-content", "short-body", "hang-up", "reset"])
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
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_null_token_counts_count_as_zero():
    with ChatServer(script=["null-usage"]) as server:
        gen = client(server)
        assert gen("Describe what a cat looks like.").startswith("1. A cat")
    assert gen.usage.as_dict() == {"requests": 1, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}


def test_timeouts_are_retried_then_reported():
    with ChatServer(default="slow", delay=0.5) as server:
        gen = ChatClient(server.url, "m", timeout=0.1, max_retries=1, backoff=0.01)
        with pytest.raises(ProtextError, match="giving up after 2 tries"):
            gen("Describe a cat.")


def test_timeout_bounds_the_whole_request_not_one_read():
    with ChatServer(default="trickle") as server:
        gen = ChatClient(server.url, "m", timeout=0.5, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(ProtextError, match="giving up after 2 tries"):
            gen("Describe a cat.")
    assert time.monotonic() - start < 2.0
    assert gen.usage.requests == 2


@pytest.mark.parametrize("status", ["401", "403"])
def test_a_refused_api_key_stops_the_run_at_once(tmp_path, status):
    with ChatServer(default=status) as server:
        with pytest.raises(ProtextError, match="the server refused the API key") as refused:
            describe(["cat", "dog"], "objects", tmp_path / "d.json", client(server), samples=2, concurrency=1,
                     ctx=QUIET)
    assert server.url in str(refused.value) and status in str(refused.value)
    assert len(server.questions) == 1


def test_a_refused_api_key_lets_only_the_requests_in_flight_finish(tmp_path):
    with ChatServer(default="401", delay=0.5) as server:
        with pytest.raises(ProtextError, match="the server refused the API key"):
            describe(["cat", "dog"], "objects", tmp_path / "d.json", client(server), samples=2, concurrency=3,
                     ctx=QUIET)
    assert server.max_in_flight == 3 and len(server.questions) == 3


def test_other_client_errors_fail_only_their_class(tmp_path):
    with ChatServer(script=["404"] + ["ok"] * 9) as server:
        report = describe(["cat", "dog"], "objects", tmp_path / "d.json", client(server), samples=1, concurrency=1,
                          ctx=QUIET)
    assert list(report["failed"]) == ["cat"] and "HTTP 404" in report["failed"]["cat"]
    assert list(json.loads((tmp_path / "d.json").read_text())) == ["dog"]


def test_a_dropped_answer_keeps_the_others_and_a_rerun_asks_only_for_it(tmp_path):
    out = tmp_path / "d.json"
    sidecar = tmp_path / "d.json.partial.json"
    n = len(QUESTIONS["objects"])
    with ChatServer(script=["ok", "short-body", "hang-up"]) as server:
        report = describe(["cat", "dog"], "objects", out, client(server, max_retries=1), samples=1, concurrency=1,
                          ctx=QUIET)
    assert list(report["failed"]) == ["cat"] and "giving up after 2 tries" in report["failed"]["cat"]
    assert list(json.loads(out.read_text())) == ["dog"]
    kept = json.loads(sidecar.read_text())
    assert list(kept) == ["cat"] and sum(len(a) for a in kept["cat"].values()) == n - 1
    with ChatServer() as server:
        report = describe(["cat", "dog"], "objects", out, client(server), samples=1, ctx=QUIET)
    assert server.questions == [QUESTIONS["objects"][1].format("cat")]
    assert report["failed"] == {} and report["already_saved"] == 1
    assert set(json.loads(out.read_text())) == {"cat", "dog"} and not sidecar.exists()


def test_a_bug_in_one_request_does_not_discard_finished_work(tmp_path):
    def generate(question):
        if "owl" in question:
            raise ValueError("a bug")
        return "A fox is orange."

    report = describe(["fox", "owl"], "objects", tmp_path / "d.json", generate, samples=1, concurrency=2,
                      ctx=QUIET)
    assert list(report["failed"]) == ["owl"] and "a bug" in report["failed"]["owl"]
    assert json.loads((tmp_path / "d.json").read_text()) == {"fox": ["A fox is orange."]}


def test_concurrency_limit_is_respected(tmp_path):
    with ChatServer(default="slow", delay=0.15) as server:
        describe(["a1", "b1", "c1"], "pets", tmp_path / "d.json", client(server), samples=2, concurrency=3,
                 ctx=QUIET)
    assert server.max_in_flight == 3


def test_a_failing_class_is_left_out_and_asked_again(tmp_path):
    out = tmp_path / "d.json"
    with ChatServer(default="500") as server:
        report = describe(["cat"], "objects", out, client(server, max_retries=1), samples=1, ctx=QUIET)
    assert "cat" in report["failed"] and not out.exists()
    with ChatServer() as server:
        report = describe(["cat"], "objects", out, client(server), samples=1, ctx=QUIET)
    assert report["described"] == 1 and "cat" in json.loads(out.read_text())


def test_killed_generation_resumes_with_only_missing_classes(tmp_path):
    classes = [f"class{i}" for i in range(12)]
    (tmp_path / "classes.txt").write_text("\n".join(classes))
    out = tmp_path / "d.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with ChatServer(default="slow", delay=0.05) as server:
        cmd = [sys.executable, "-m", "protext", "describe", "--classes", str(tmp_path / "classes.txt"),
               "--dataset-kind", "food", "--samples", "1", "--concurrency", "1", "--base-url", server.url,
               "--model", "m", "--output", str(out), "--no-progress"]
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
                     "--base-url", server.url, "--model", "m", "--output", str(tmp_path / "d.json"), "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["usage"]["requests"] == 2 * len(QUESTIONS["pets"])


def test_unknown_kind_is_rejected():
    with pytest.raises(SystemExit):
        main(["describe", "--classes", "pug", "--dataset-kind", "nope", "--output", "x.json"])


def test_local_transformers_model_as_describer(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from protext.training.describe import LocalGenerator
    from protext.tiny import clip_tokenizer

    tok = clip_tokenizer(["a", "cat", "is", "the", "photo", "describe"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    gen = LocalGenerator(str(tmp_path / "lm"), max_new_tokens=8)
    answer = gen("Describe what a cat looks like.")
    assert isinstance(answer, str)
    assert gen.usage.requests == 1 and 1 <= gen.usage.completion_tokens <= 8 and gen.usage.prompt_tokens > 5
