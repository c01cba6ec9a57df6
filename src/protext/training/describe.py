"""Ask an LLM to describe classes, CuPL-style, safely interruptible.

For each class, each question of the dataset kind is asked `samples` times. Answers are
cleaned (one trimmed sentence, no empties, duplicates or overlong ones) and each finished
class is written to the output file at once, atomically; the answers received for classes
not finished yet are kept in a sidecar file, so a rerun asks only for the answers still
missing. Any OpenAI-compatible chat-completions server works (OpenAI, vLLM, Ollama,
llama.cpp), as does a local `transformers` text-generation model.
"""

from __future__ import annotations

import email.utils
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..cache import atomic_write_json
from ..context import Context
from ..descriptions import normalize_name, parse_descriptions, read_json
from ..errors import ProtextError

# Our own question sets, one per kind of label. "{}" is the class name.
QUESTIONS: dict[str, list[str]] = {
    "objects": ["Describe what a {} looks like.", "How can you recognise a {} in a photo?",
                "What are the visual features of a {}?", "Describe a photo of a {}.",
                "What shape, colour and size is a {}?"],
    "scenes": ["Describe what a {} looks like.", "What would you see in a photo of a {}?",
               "Describe the typical layout and objects of a {}.", "How can you tell a photo was taken in a {}?"],
    "textures": ["Describe what a {} texture looks like.", "How does a {} surface appear up close?",
                 "What pattern and feel does a {} material have in a photo?", "Describe an image of a {} texture."],
    "satellite": ["Describe a satellite image of {}.", "How does {} look from above in a satellite photo?",
                  "What colours and shapes mark {} in aerial imagery?", "Describe a centered satellite photo of {}."],
    "actions": ["Describe a photo of a person doing {}.", "What does a person look like while doing {}?",
                "Which body poses and objects appear when someone is doing {}?", "Describe a video frame of {}."],
    "food": ["Describe what {} looks like on a plate.", "How can you recognise {} in a photo?",
             "What colours and textures does {} have?", "Describe a photo of {}, a type of food."],
    "pets": ["Describe what a {} looks like.", "How can you tell a {} from other breeds in a photo?",
             "What are the coat, face and body features of a {}?", "Describe a photo of a {}, a type of pet."],
    "flowers": ["Describe what a {} flower looks like.", "How can you identify a {} in a photo?",
                "What colour and shape are the petals and leaves of a {}?", "Describe a photo of a {}, a type of flower."],
    "aircraft": ["Describe what a {} aircraft looks like.", "How can you identify a {} in a photo?",
                 "What are the distinctive features of the {} airframe?", "Describe a photo of a {}, a type of aircraft."],
    "cars": ["Describe what a {} looks like.", "How can you identify a {} in a photo?",
             "What are the distinctive body and design features of the {}?", "Describe a photo of a {}, a type of car."],
}


@dataclass
class Usage:
    """Counts for the closing report; updated from several threads under a lock."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


class Generator(Protocol):
    def __call__(self, question: str) -> str: ...


class RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(ProtextError):
    """A fault every further request would hit too (a refused API key): it stops the whole run at once."""


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _openai():
    """The openai package, or an error that says how to install it."""
    try:
        import httpx2
        import openai
    except ImportError as e:
        raise ProtextError(f"describe talks to chat servers through the openai package ({e}): pip install -e "
                           f"'.[describe]' (protext's 'describe' extra), or use --local-model") from e
    return openai, httpx2


def _deadline_transport(httpx2, seconds: float):
    """An HTTP transport whose every request ends within `seconds`, however slowly the server sends:
    a read time-out bounds one read only, so a server trickling bytes could hold a request for ever."""

    class Stream(httpx2.SyncByteStream):
        def __init__(self, inner, deadline: float):
            self.inner, self.deadline = inner, deadline

        def __iter__(self):
            for chunk in self.inner:
                if time.monotonic() > self.deadline:
                    raise httpx2.ReadTimeout("the request took longer than the time-out")
                yield chunk

        def close(self) -> None:
            self.inner.close()

    class Deadline(httpx2.HTTPTransport):
        def handle_request(self, request):
            deadline = time.monotonic() + seconds
            response = super().handle_request(request)
            return httpx2.Response(response.status_code, headers=response.headers, request=request,
                                   stream=Stream(response.stream, deadline), extensions=response.extensions)

    return Deadline()


def token_count(usage: object, key: str) -> int:
    """One count of an answer's `usage`, 0 where missing or unreadable: counts only feed the report."""
    value = getattr(usage, key, None) if usage is not None and not isinstance(usage, dict) else (
        usage.get(key) if isinstance(usage, dict) else None)
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


class ChatClient:
    """An OpenAI-compatible chat-completions client (the `openai` package), with retries and backoff.

    `timeout` bounds a whole request. 429, 5xx and every transport or format fault are retried
    (waiting `Retry-After` when the server says, else exponential backoff with jitter); a refused
    API key (401, 403) raises FatalError; other 4xx raise ProtextError at once. The SDK's own
    retries are off: this loop also retries malformed answers, which the SDK cannot see.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.99,
                 max_tokens: int = 80, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, usage: Usage | None = None, sleep: Callable[[float], None] = time.sleep):
        openai, httpx2 = _openai()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.openai, self.model = openai, model
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.usage = usage or Usage()
        self.sleep = sleep
        http = httpx2.Client(transport=_deadline_transport(httpx2, timeout), timeout=timeout, trust_env=True)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0,
                                    http_client=http)

    def __call__(self, question: str) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(question)
            except RetryableError as e:
                if attempt == self.max_retries:
                    raise ProtextError(f"{self.url}: giving up after {attempt + 1} tries: {e}") from e
                self.usage.add(retries=1)
                wait = e.retry_after if e.retry_after is not None else self.backoff * 2 ** attempt * (0.5 + random.random())
                self.sleep(min(wait, self.max_backoff))
        raise AssertionError("unreachable")

    def _once(self, question: str) -> str:
        openai = self.openai
        self.usage.add(requests=1)
        try:
            answer = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": question}], temperature=self.temperature,
                max_tokens=self.max_tokens)
        except openai.APIStatusError as e:
            raise self._status_error(e) from e
        except openai.APIConnectionError as e:  # dropped, reset, timed out, cut short
            cause = e.__cause__ or e
            raise RetryableError(f"no answer ({type(cause).__name__}: {cause})") from e
        except (openai.APIResponseValidationError, ValueError) as e:
            raise RetryableError(f"malformed answer ({type(e).__name__})") from e
        return self._content(answer)

    def _status_error(self, e) -> Exception:
        """What an error status means: try again later, stop the whole run, or fail this request."""
        code = e.status_code
        if code == 429 or code >= 500:
            return RetryableError(f"HTTP {code}", parse_retry_after(e.response.headers.get("Retry-After")))
        if code in (401, 403):
            return FatalError(f"{self.url}: HTTP {code}: the server refused the API key "
                              f"(check --api-key or $OPENAI_API_KEY)")
        return ProtextError(f"{self.url}: HTTP {code}: {str(e.message)[:300]}")

    def _content(self, answer) -> str:
        """The answer's text; a malformed answer is retried, unreadable token counts count as 0."""
        try:
            content = answer.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            raise RetryableError(f"malformed answer: {str(answer)[:120]!r}") from e
        if not isinstance(content, str):
            raise RetryableError(f"malformed answer: content is {type(content).__name__}, not text")
        usage = getattr(answer, "usage", None)
        self.usage.add(prompt_tokens=token_count(usage, "prompt_tokens"),
                       completion_tokens=token_count(usage, "completion_tokens"))
        return content


def chat_client(base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                **options) -> ChatClient:
    """A ChatClient with the usual environment defaults: $OPENAI_BASE_URL (else OpenAI's API),
    $PROTEXT_LLM_MODEL (else gpt-4o-mini) and $OPENAI_API_KEY, as the openai package reads them."""
    import os

    base = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if not base.startswith(("http://", "https://")):
        raise ProtextError(f"base URL {base!r} must start with http:// or https://")
    return ChatClient(base, model or os.environ.get("PROTEXT_LLM_MODEL", "gpt-4o-mini"),
                      api_key or os.environ.get("OPENAI_API_KEY"), **options)


class LocalGenerator:
    """A local `transformers` causal language model as the describer."""

    def __init__(self, model: str, max_new_tokens: int = 60, usage: Usage | None = None, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        if device:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens
        self.usage = usage or Usage()
        self.lock = threading.Lock()

    def __call__(self, question: str) -> str:
        import torch

        prompt = question
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                        add_generation_prompt=True)
        ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        with self.lock, torch.no_grad():
            out = self.model.generate(**ids, do_sample=True, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        self.usage.add(requests=1, prompt_tokens=ids["input_ids"].shape[1], completion_tokens=len(new))
        return self.tokenizer.decode(new, skip_special_tokens=True)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LEADING_JUNK = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|[\"'“”‘’]+)\s*")


def clean_answer(text: str, max_chars: int = 300) -> str | None:
    """One trimmed sentence ending in a full stop, or None for an empty or overlong answer."""
    text = " ".join(text.split())
    while True:
        stripped = _LEADING_JUNK.sub("", text)
        if stripped == text:
            break
        text = stripped
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0].strip().strip("\"'“”‘’ ")
    if not sentence or len(sentence) > max_chars or not re.search(r"[A-Za-z]", sentence):
        return None
    return sentence if sentence[-1] in ".!?" else sentence + "."


def clean_answers(answers: Sequence[str], max_chars: int = 300) -> list[str]:
    out, seen = [], set()
    for a in answers:
        s = clean_answer(a, max_chars)
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


def load_partial(path: Path) -> dict[str, list[str]]:
    """The classes an earlier, possibly interrupted, run already saved."""
    if not path.is_file():
        return {}
    raw = read_json(path, "description file")
    return dict(parse_descriptions(raw, str(path))) if raw else {}


# The answers received for classes not finished yet: class -> question -> answers.
Answers = dict[str, dict[str, list[str]]]


def answers_path(out: Path) -> Path:
    """The sidecar file next to `out` that keeps the answers of classes not finished yet."""
    return out.with_name(out.name + ".partial.json")


def is_answers(raw: object) -> bool:
    """Whether `raw` has the shape of Answers."""
    def is_texts(got: object) -> bool:
        return isinstance(got, list) and all(isinstance(a, str) for a in got)

    return isinstance(raw, dict) and all(isinstance(qs, dict) and all(map(is_texts, qs.values()))
                                         for qs in raw.values())


def load_answers(path: Path, wanted: dict[str, list[str]]) -> Answers:
    """The answers an earlier run kept in `path`, for the classes and questions in `wanted` only."""
    if not path.is_file():
        return {}
    raw = read_json(path, "file of kept answers")
    if not is_answers(raw):
        raise ProtextError(f"{path}: not a file of kept answers; delete it to ask for its answers again")
    kept = {c: {q: raw[c][q] for q in qs if raw[c].get(q)} for c, qs in wanted.items() if c in raw}
    return {c: qs for c, qs in kept.items() if qs}


def save_answers(path: Path, answers: Answers) -> None:
    """Keep the answers of unfinished classes for a rerun (atomically); none left means no file."""
    if answers:
        atomic_write_json(path, answers)
    else:
        path.unlink(missing_ok=True)


def describe(classes: Sequence[str], kind: str, out: str | Path, generate: Generator, samples: int = 3,
             concurrency: int = 4, max_chars: int = 300, ctx: Context = Context(),
             questions: Sequence[str] | None = None) -> dict:
    """Describe every class not yet in `out`; returns a report of what was asked and saved.

    Asks only for the answers neither `out` nor its sidecar file (see `answers_path`) holds. A request that
    fails, for whatever reason, fails its class only; a FatalError stops the run, sending no further request.
    """
    if questions is None:
        if kind not in QUESTIONS:
            raise ProtextError(f"unknown --dataset-kind {kind!r}; choose from {', '.join(QUESTIONS)}")
        questions = QUESTIONS[kind]
    out = Path(out)
    saved = load_partial(out)
    names = list(dict.fromkeys(normalize_name(c) for c in classes))
    todo = [c for c in names if c not in saved]
    wanted = {c: [q.format(c) for q in questions] for c in todo}
    sidecar = answers_path(out)
    received = load_answers(sidecar, wanted)
    asks = [(c, q) for c, qs in wanted.items() for q in qs
            for _ in range(samples - len(received.get(c, {}).get(q, [])))]
    pending = Counter(c for c, _ in asks)
    failed: dict[str, str] = {}
    stop = threading.Event()

    def ask(question: str) -> str:
        """One answer; any fault becomes a ProtextError, so that one bad request cannot discard finished work."""
        if stop.is_set():
            raise ProtextError("not asked: the run was stopped")
        try:
            return generate(question)
        except FatalError:
            stop.set()  # before the next queued request can start, even on this very thread
            raise
        except ProtextError:
            raise
        except Exception as e:
            raise ProtextError(f"{type(e).__name__}: {e}") from e

    def finish(name: str) -> None:
        sentences = clean_answers([a for got in received.pop(name, {}).values() for a in got], max_chars)
        if not sentences:
            failed[name] = "no usable answer"
            return
        saved[name] = sentences
        atomic_write_json(out, saved)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            ctx.bar(len(todo), "describing", "class") as bar:
        for name in todo:
            if not pending[name]:  # every answer came from an earlier run
                finish(name)
                bar.update(1)
        futures = {pool.submit(ask, question): (name, question) for name, question in asks}
        try:
            for future in as_completed(futures):
                name, question = futures[future]
                try:
                    received.setdefault(name, {}).setdefault(question, []).append(future.result())
                except FatalError:
                    raise
                except ProtextError as e:
                    failed.setdefault(name, str(e))
                pending[name] -= 1
                if pending[name] == 0:
                    if name not in failed:
                        finish(name)
                    bar.update(1)
                save_answers(sidecar, received)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on a FatalError or Ctrl-C, ask nothing more
    save_answers(sidecar, received)
    return {"classes": len(names), "already_saved": len(names) - len(todo), "described": len(todo) - len(failed),
            "failed": failed, "out": str(out),
            "sentences": sum(len(saved.get(c, [])) for c in names)}


# -- FuDD: how confusable classes differ ----------------------------------------------------------

def differential_question(a: str, b: str, count: int = 4) -> str:
    """The question about one pair: how a photo of `a` differs from a photo of `b`, attribute by attribute."""
    return (f"In a photo, how does a {a} look different from a {b}? Give {count} visual differences, one per line, "
            f"each written as: <attribute>: a photo of a {a} with <what it shows> | a photo of a {b} with <what it "
            f"shows>")


def parse_differences(answer: str, max_chars: int = 300) -> tuple[list[str], list[str]]:
    """(captions of the first class, of the second) from an answer's "<attribute>: A | B" lines."""
    first, second = [], []
    for line in answer.splitlines():
        if "|" not in line:
            continue
        left, right = (part.strip() for part in line.split("|", 1))
        left = left.split(":", 1)[1].strip() if ":" in left.split(" a photo", 1)[0] else left
        left, right = (_LEADING_JUNK.sub("", side).strip().rstrip(".") for side in (left, right))
        if 3 < len(left) <= max_chars and 3 < len(right) <= max_chars:
            first.append(left + ".")
            second.append(right + ".")
    return first, second


def confusable_pairs(features, classes: Sequence[str], neighbours: int = 3) -> list[tuple[str, str]]:
    """Pairs of classes worth telling apart: each class with its `neighbours` nearest classes by the
    cosine of their text features (a tensor (C, d); an image's top classes come from these), each pair once."""
    similar = features @ features.T
    similar.fill_diagonal_(float("-inf"))
    pairs: dict[tuple[int, int], None] = {}
    for i, row in enumerate(similar):
        for j in row.topk(min(neighbours, len(classes) - 1)).indices.tolist():
            pairs[(min(i, j), max(i, j))] = None
    return [(classes[i], classes[j]) for i, j in pairs]


def pairs_in_top(scores, classes: Sequence[str], k: int = 4) -> list[tuple[str, str]]:
    """Pairs of classes an image is confused between, as FuDD finds them: every pair within each row's
    top `k` classes of `scores` (images, C), e.g. a first pass over a sample of the images to label."""
    pairs: dict[tuple[int, int], None] = {}
    for row in scores:
        top = sorted(row.topk(min(k, len(classes))).indices.tolist())
        for n, i in enumerate(top):
            for j in top[n + 1:]:
                pairs[(i, j)] = None
    return [(classes[i], classes[j]) for i, j in pairs]


def describe_differential(pairs: Sequence[tuple[str, str]], out: str | Path, generate: Generator,
                          concurrency: int = 4, max_chars: int = 300, ctx: Context = Context()) -> dict:
    """Ask how each pair differs; write `{class: {other: [captions]}}` to `out` after every answered pair,
    atomically, so a rerun asks only for the pairs not yet there. A refused key stops the run at once."""
    from ..descriptions import load_differential

    out = Path(out)
    saved = load_differential(out) if out.is_file() else {}
    todo = [(a, b) for a, b in pairs if normalize_name(b) not in saved.get(normalize_name(a), {})]
    failed: dict[str, str] = {}
    stop = threading.Event()

    def ask(a: str, b: str) -> tuple[list[str], list[str]]:
        if stop.is_set():
            raise ProtextError("not asked: the run was stopped")
        try:
            return parse_differences(generate(differential_question(a, b)), max_chars)
        except FatalError:
            stop.set()
            raise
        except ProtextError:
            raise
        except Exception as e:
            raise ProtextError(f"{type(e).__name__}: {e}") from e

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, ctx.bar(len(todo), "differences", "pair") as bar:
        futures = {pool.submit(ask, a, b): (a, b) for a, b in todo}
        try:
            for future in as_completed(futures):
                a, b = futures[future]
                try:
                    first, second = future.result()
                except FatalError:
                    raise
                except ProtextError as e:
                    failed[f"{a} / {b}"] = str(e)
                    bar.update(1)
                    continue
                if not first:
                    failed[f"{a} / {b}"] = "no usable difference in the answer"
                else:
                    saved.setdefault(normalize_name(a), {})[normalize_name(b)] = first
                    saved.setdefault(normalize_name(b), {})[normalize_name(a)] = second
                    atomic_write_json(out, saved)
                bar.update(1)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    return {"pairs": len(pairs), "already_saved": len(pairs) - len(todo), "described": len(todo) - len(failed),
            "failed": failed, "out": str(out)}


# -- MPVR: the LLM writes the questions first ----------------------------------------------------

def meta_question(task: str, count: int = 30) -> str:
    """The meta-prompt: from a one-line description of the images, questions that make an LLM describe a class."""
    return (f"The images show {task}. Write {count} different questions, one per line, that ask for a visual "
            f"description of one class of such images, so that the answers say what the class looks like in them. "
            f"Write {{}} where the class name goes. They should differ in what they ask about (shape, colour, "
            f"parts, context, how the images show it). As an example of the form, for close-up photos of textures "
            f"such questions could be:\nWhat does a {{}} texture look like?\nHow would you recognise the {{}} "
            f"pattern on a surface?\nDescribe the colours and the regularity of a {{}} texture.")


def parse_templates(answer: str) -> list[str]:
    """The question templates of an answer: lines holding the class slot ({}, {class}, <class>)."""
    out = []
    for line in answer.splitlines():
        line = _LEADING_JUNK.sub("", line).strip()
        line = re.sub(r"\{[a-z_ ]*\}|<[a-z_ ]+>|\[[a-z_ ]+\]", "{}", line, flags=re.IGNORECASE)
        if line.count("{}") == 1 and 10 < len(line) < 300:
            out.append(line.replace("{", "{{").replace("}", "}}").replace("{{}}", "{}"))
    return list(dict.fromkeys(out))


def meta_templates(task: str, generate: Generator, path: Path, count: int = 30) -> list[str]:
    """The questions for `task`, asked once: kept in `path` and read from there by a rerun."""
    if path.is_file():
        saved = read_json(path, "template file")
        if isinstance(saved, dict) and saved.get("task") == task and saved.get("templates"):
            return list(saved["templates"])
    templates = parse_templates(generate(meta_question(task, count)))
    if not templates:
        raise ProtextError("the LLM's answer held no question with a class slot ({}); try again, or another model")
    atomic_write_json(path, {"task": task, "templates": templates})
    return templates
