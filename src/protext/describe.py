"""Ask an LLM to describe classes, CuPL-style, safely interruptible.

For each class, each question of the dataset kind is asked `samples` times. Answers are
cleaned (one trimmed sentence, no empties, duplicates or overlong ones) and each finished
class is written to the output file at once, atomically; a rerun asks only for the classes
the file lacks. Any OpenAI-compatible chat-completions server works (OpenAI, vLLM, Ollama,
llama.cpp), as does a local `transformers` text-generation model.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .cache import atomic_write_json
from .descriptions import normalize_name, parse_descriptions
from .errors import ProtextError

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


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class ChatClient:
    """An OpenAI-compatible chat-completions client with retries and backoff."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.99,
                 max_tokens: int = 80, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, usage: Usage | None = None, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.usage = usage or Usage()
        self.sleep = sleep

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
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": question}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.usage.add(requests=1)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise RetryableError(f"HTTP {e.code}", parse_retry_after(e.headers.get("Retry-After"))) from e
            detail = e.read()[:300].decode(errors="replace")
            raise ProtextError(f"{self.url}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise RetryableError(f"no answer ({getattr(e, 'reason', e)})") from e
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RetryableError(f"malformed answer: {raw[:120]!r}") from e
        usage = data.get("usage") or {}
        self.usage.add(prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=int(usage.get("completion_tokens", 0)))
        return content or ""


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
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProtextError(f"{path}: exists but is not valid JSON ({e.msg}); move it away or fix it") from e
    return dict(parse_descriptions(raw, str(path))) if raw else {}


def describe(classes: Sequence[str], kind: str, out: str | Path, generate: Generator, samples: int = 3,
             concurrency: int = 4, max_chars: int = 300, show_progress: bool = True,
             questions: Sequence[str] | None = None) -> dict:
    """Describe every class not yet in `out`; returns a report of what was asked and saved."""
    from tqdm.auto import tqdm

    if questions is None:
        if kind not in QUESTIONS:
            raise ProtextError(f"unknown --dataset-kind {kind!r}; choose from {', '.join(QUESTIONS)}")
        questions = QUESTIONS[kind]
    out = Path(out)
    saved = load_partial(out)
    names = list(dict.fromkeys(normalize_name(c) for c in classes))
    todo = [c for c in names if c not in saved]
    lock = threading.Lock()
    answers: dict[str, list[str]] = {c: [] for c in todo}
    pending = {c: len(questions) * samples for c in todo}
    failed: dict[str, str] = {}

    def finish(name: str) -> None:
        sentences = clean_answers(answers[name], max_chars)
        if not sentences:
            failed[name] = "no usable answer"
            return
        saved[name] = sentences
        atomic_write_json(out, saved)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(todo), desc="describing", unit="class", disable=not show_progress) as bar:
        futures = {pool.submit(generate, q.format(c)): c for c in todo for q in questions for _ in range(samples)}
        for future in as_completed(futures):
            name = futures[future]
            with lock:
                try:
                    answers[name].append(future.result())
                except ProtextError as e:
                    failed.setdefault(name, str(e))
                pending[name] -= 1
                if pending[name] == 0:
                    if name not in failed:
                        finish(name)
                    bar.update(1)
    return {"classes": len(names), "already_saved": len(names) - len(todo), "described": len(todo) - len(failed),
            "failed": failed, "out": str(out),
            "sentences": sum(len(saved.get(c, [])) for c in names)}
