"""`protext serve`: a zero-shot classifier behind a JSON API and a web page, on one machine.

The backbone and prompts are loaded once. Requests carry images (multipart uploads) and a
label set: their own labels, or the name of a set loaded at start. What is expensive is
done once and shared:

- images from concurrent requests are collected by a `Batcher` into one forward pass of
  the image tower (at most `max_batch` images, waiting at most `max_wait_ms` for company);
- class embeddings are a `ProTextClassifier` per (head, labels), kept in a bounded LRU:
  a label set seen once is not encoded again, and concurrent first requests for the same
  set wait for one encoding. The sets loaded at start are never evicted.

Nobody can take the server for themselves. Every limit is a field of `Limits` (a flag of the
command), checked before the work it protects, and answered with a 4xx or 503 JSON body
`{"error": "..."}` that says what was wrong:

- a new label set costs at most `max_new_texts` sentences to encode (counted before any is
  encoded, against the feature cache), and at most `max_pending_label_sets` wait for encoding;
  an encoding nobody waits for any more (every client gone or timed out) is dropped before it
  starts;
- a request's images together have at most `max_request_pixels` pixels (each at most
  `max_pixels`, read from its header; only the raster formats of `images.FORMATS` are decoded),
  and are decoded one after the other, so the decoding threads take turns between requests
  instead of serving one request's sixteen huge images first;
- the HTTP layer (`api`) bounds the rest: request time (`request_timeout_s`, then 504 and its
  work stops), how long headers and bodies may take, connections per client and in all, body
  bytes held at once, and how long a shutdown waits.

Model work runs on two single threads, one for image batches and one for new label sets,
so a large new label set does not stop images of known sets from being classified.

This module needs no web framework; `api` puts the service behind HTTP (FastAPI, uvicorn).
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import math
import re
from collections import OrderedDict, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Sequence

import torch
from PIL import Image

from .backbone import Backbone
from .cache import sha1
from .classifier import ACTIVATIONS, ProTextClassifier
from .context import Context
from .descriptions import read_class_list
from .errors import ProtextError
from .feature_cache import feature_store
from .flags import option
from .heads import HEADS, Heads, HeadInputs, all_heads, default_heads, explains, head_names, runnable
from .images import TooManyPixels, UnsupportedFormat, open_header, preprocess, views

MAX_EXPLAIN = 20  # descriptions per image a request may ask for


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may ask for; each field is a flag of `protext serve`."""

    max_upload_mb: float = option(32.0, "largest request body, all images together, in MiB")
    max_inflight_mb: float = option(256.0, "request bodies held at once, all requests together, in MiB; more are "
                                           "refused with 503")
    max_images: int = option(16, "most images in one request")
    max_pixels: int = option(40_000_000, "most pixels of one image, read from its header before decoding "
                                         "(decompression bombs are refused here)")
    max_request_pixels: int = option(100_000_000, "most pixels of all the images of one request together")
    max_labels: int = option(1000, "most labels in one request")
    max_label_chars: int = option(100, "longest label, in characters")
    max_new_texts: int = option(2048, "most sentences one request may have the server encode for a label set it "
                                      "has not seen (labels x templates or descriptions not in the feature cache); "
                                      "load larger sets at start with --classes")
    max_pending_label_sets: int = option(4, "new label sets waiting to be encoded at once; more are refused with 503")
    max_batch: int = option(32, "most images in one forward pass")
    max_wait_ms: float = option(10.0, "how long a forward pass waits for more images to batch")
    max_queue: int = option(256, "most images accepted and not yet answered; more are refused with 503")
    max_requests: int = option(64, "most classify requests in flight; more are refused with 503")
    request_timeout_s: float = option(60.0, "seconds a classify request may take; then it gets 504 and its work "
                                            "stops")
    header_timeout_s: float = option(10.0, "seconds a client may take to send a request's headers")
    body_timeout_s: float = option(60.0, "seconds a client may take to send a request's body")
    max_connections: int = option(256, "open connections, all clients together")
    max_connections_per_client: int = option(32, "open connections from one client address")
    drain_timeout_s: float = option(10.0, "on SIGTERM or Ctrl-C, seconds to finish the requests in flight")
    label_cache: int = option(64, "label sets (per head) whose class embeddings are kept, besides those loaded "
                                  "at start")
    decode_workers: int = option(2, "threads decoding uploaded images")
    top_k: int = option(5, "labels per image when a request names no top_k")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(f.default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                need = "a whole number, at least 1"
            elif f.name in ("max_upload_mb", "max_inflight_mb") or f.name.endswith("_timeout_s"):
                ok, need = _number(value) and value > 0, "a number above 0"
            else:
                ok, need = _number(value) and value >= 0, "a number, 0 or more"
            if not ok:
                raise ProtextError(f"{flag} must be {need}, got {value!r}")
        if self.max_inflight_mb < self.max_upload_mb:
            raise ProtextError(f"--max-inflight-mb ({self.max_inflight_mb:g}) must be at least --max-upload-mb "
                               f"({self.max_upload_mb:g})")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)


def load_label_sets(specs: Sequence[str]) -> dict[str, list[str]]:
    """Named label sets from `--classes` values: `FILE` (named after the file), `NAME=FILE` or `NAME=a,b,c`;
    one unnamed `a,b,c` list is named "labels"."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        named = re.match(r"([A-Za-z0-9_.-]+)=(.+)", spec)
        name, source = (named.group(1), named.group(2)) if named else (None, spec)
        labels = read_class_list(source)
        name = name or (Path(source).stem if Path(source).is_file() else "labels")
        if name in sets:
            raise ProtextError(f"--classes {spec}: a second label set named {name!r}; name it: --classes NAME={source}")
        sets[name] = labels
    return sets


class ApiError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Busy(ApiError):
    def __init__(self, message: str):
        super().__init__(503, message)


class Batcher:
    """Collects images from concurrent callers into one forward pass.

    `features(pixels)` queues (3, H, W) tensors and returns their rows of `forward(batch)`.
    A worker task (`run`) takes the queued images as soon as there are `max_batch`, or when
    the first has waited `max_wait_s`; callers that gave up are dropped before the forward.
    More than `max_queue` images waiting is refused (`Busy`), so memory stays bounded.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float,
                 max_queue: int, executor: Executor, observe: Callable[[int], None] | None = None):
        self.forward, self.max_batch, self.max_wait_s, self.max_queue = forward, max_batch, max_wait_s, max_queue
        self.executor, self.observe = executor, observe
        self.stats = {"forward_passes": 0, "images": 0, "largest_batch": 0}
        self._items: deque[tuple[torch.Tensor, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Images accepted and not yet answered."""
        return self._waiting

    async def features(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._waiting + len(pixels) > self.max_queue:
            raise Busy(f"server busy: {self._waiting} images are waiting for the model (--max-queue "
                       f"{self.max_queue}); retry shortly")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in pixels]
        self._items.extend(zip(pixels, futures))
        self._arrived.set()
        self._waiting += len(pixels)
        try:
            return torch.stack(await asyncio.gather(*futures))
        finally:
            self._waiting -= len(pixels)

    async def _gather(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while len(self._items) < self.max_batch and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        shape, batch, rest = self._items[0][0].shape, [], deque()
        while self._items and len(batch) < self.max_batch:  # one shape a pass: images, or an image's views
            item = self._items.popleft()
            (batch if item[0].shape == shape else rest).append(item)
        self._items.extendleft(reversed(rest))
        return [(p, f) for p, f in batch if not f.done()]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                feats = await loop.run_in_executor(self.executor, self.forward, torch.stack([p for p, _ in batch]))
            except Exception as e:  # the callers answer 500; the worker keeps serving
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats["forward_passes"] += 1
            self.stats["images"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            if self.observe is not None:
                self.observe(len(batch))
            for (_, f), row in zip(batch, feats):
                if not f.done():
                    f.set_result(row)


def public_name(name: str) -> str:
    """A backbone's name as the server shows it: a Hub id as it is, a local folder by its last part only
    (its absolute path says how this machine is laid out)."""
    path = Path(name)
    return f"{path.name} (local folder)" if path.is_absolute() else name


Upload = tuple[str, "bytes | BinaryIO"]


def release_memory() -> None:
    """Give freed heap memory back to the system after a large request (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Service:
    """The classifier behind the API: label sets, class embeddings, batched image features.

    Takes loaded objects, as `ProTextClassifier` does (`classifier.load_inputs` loads them from
    names); every classifier it builds reads the same `inputs`. The sets in `label_sets` are
    encoded with the default head at once, so a bad set fails at start rather than at the first
    request.
    """

    def __init__(self, backbone: Backbone, inputs: HeadInputs = HeadInputs(),
                 label_sets: Mapping[str, Sequence[str]] | None = None, head: str | None = None,
                 limits: Limits = Limits(), ctx: Context = Context()):
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower; image classification needs a CLIP or SigLIP")
        self.backbone, self.inputs, self.limits, self.ctx = backbone, inputs, limits, ctx
        self.head = head or default_heads(inputs)[-1]
        head_names(self.head)
        if not runnable(self.head, inputs):
            Heads(backbone, inputs, ctx).get(self.head, ["x"])  # raises: says what the head needs
        self.heads = all_heads(inputs)
        self._make = partial(ProTextClassifier, backbone, inputs=inputs, ctx=ctx)
        self.label_sets = {name: list(labels) for name, labels in (label_sets or {}).items()}
        self._pinned: dict[tuple, ProTextClassifier] = {}
        for name, labels in self.label_sets.items():
            self._check_labels(labels, f"label set '{name}'", ProtextError)
            self._pinned[(self.head, tuple(labels))] = self._make(labels, self.head)
        self._cache: OrderedDict[tuple, ProTextClassifier] = OrderedDict()
        self._building: dict[tuple, asyncio.Future] = {}
        self._waiters: dict[tuple, int] = {}
        self._text_store = feature_store(backbone, "text", ctx)
        self.counts = {"label_sets_encoded": 0, "label_sets_dropped": 0, "refused_new_texts": 0}
        self.batcher: Batcher | None = None
        self._worker: asyncio.Task | None = None

    # -- lifecycle (the app's lifespan) ----------------------------------------------------
    def start(self, observe: Callable[[int], None] | None = None) -> asyncio.Task:
        """Start the threads and the batcher on the running event loop; returns the batcher's task.
        `observe(n)` is told the size of every forward pass (the metrics' histogram)."""
        lim = self.limits
        self._images_thread = ThreadPoolExecutor(1, thread_name_prefix="protext-images")
        self._labels_thread = ThreadPoolExecutor(1, thread_name_prefix="protext-labels")
        self._decoders = ThreadPoolExecutor(lim.decode_workers, thread_name_prefix="protext-decode")
        self._costing = ThreadPoolExecutor(1, thread_name_prefix="protext-costing")
        self.batcher = Batcher(self.image_features, lim.max_batch, lim.max_wait_ms / 1000, lim.max_queue,
                               self._images_thread, observe)
        self._worker = asyncio.get_running_loop().create_task(self.batcher.run())
        return self._worker

    def close(self) -> None:
        for pool in (self._images_thread, self._labels_thread, self._decoders, self._costing):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the pieces of a request -----------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """One forward pass of the image tower (the batcher's model call); (B, views, 3, H, W) gives
        (B, views, dim)."""
        if pixels.dim() == 5:
            b, v = pixels.shape[:2]
            return self.backbone.image(pixels.flatten(0, 1).to(self.backbone.device)).cpu().view(b, v, -1)
        return self.backbone.image(pixels.to(self.backbone.device)).cpu()

    def _check_labels(self, labels: Sequence[str], where: str, error: Callable[[str], Exception]) -> None:
        lim = self.limits
        if not labels:
            raise error(f"{where}: no labels")
        if len(labels) > lim.max_labels:
            raise error(f"{where}: {len(labels)} labels, more than the limit of {lim.max_labels} (--max-labels)")
        for i, label in enumerate(labels, 1):
            if not label.strip():
                raise error(f"{where}: label {i} is empty")
            if len(label) > lim.max_label_chars:
                raise error(f"{where}: label {i} has {len(label)} characters, more than the limit of "
                            f"{lim.max_label_chars} (--max-label-chars)")

    def resolve_labels(self, labels: Sequence[str] | None, label_set: str | None) -> tuple[list[str], str | None]:
        """The request's labels and the name of their set (None for labels given in the request)."""
        if labels and label_set:
            raise ApiError(400, "give either 'labels' or 'label_set', not both")
        if label_set is not None:
            if label_set not in self.label_sets:
                known = ", ".join(self.label_sets) or "none were loaded (start the server with --classes FILE)"
                raise ApiError(400, f"unknown label set {label_set!r}; known: {known}")
            return self.label_sets[label_set], label_set
        if labels is None:
            if not self.label_sets:
                raise ApiError(400, "no labels: send 'labels' (one form field per label) or a 'label_set' name")
            name = next(iter(self.label_sets))
            return self.label_sets[name], name
        labels = [label.strip() for label in labels]
        self._check_labels(labels, "labels", lambda message: ApiError(400, message))
        return labels, None

    def resolve_head(self, head: str | None) -> str:
        if head is None or not head.strip():
            return self.head
        try:
            head_names(head)
        except ProtextError as e:
            raise ApiError(400, str(e)) from e
        if not runnable(head.strip(), self.inputs):
            needs = "; ".join(f"head '{p}' needs {HEADS[p].needs} ({HEADS[p].given_by})" for p in head_names(head)
                              if not self.inputs.has(HEADS[p].needs))
            raise ApiError(400, f"{needs}, which this server was not started with; heads here: {', '.join(self.heads)}")
        return head.strip()

    def most_texts(self, head: str, labels: Sequence[str]) -> int:
        """An upper bound of `new_texts`, from counts alone (no sentence is made): cheap enough for every
        request."""
        count = 0
        key = lambda c: " ".join(c.replace("_", " ").split()).lower()  # noqa: E731 (as normalize_name)
        for part in head_names(head):
            if part == "awt":  # the class-name prompt and the first descriptions
                table = {k.lower(): v for k, v in (self.inputs.descriptions or {}).items()}
                count += sum(1 + min(self.inputs.awt.descriptions, len(table.get(key(c), []))) for c in labels)
            elif part == "fudd":  # the first pass, then every caption between two of the labels
                from .fudd import symmetric, texts_of

                count += len(texts_of(symmetric(self.inputs.differential or {}), labels))
            elif part == "clip" or HEADS[part].encode is not None:
                count += len(labels)
            elif part == "clip80":
                count += 80 * len(labels)
            elif part == "waffle":
                count += 2 * self.inputs.waffle.count * len(labels)
            else:  # cupl, dclip: the class's own sentences (a class without any: the clip fallback, one)
                table = {k.lower(): v for k, v in ((self.inputs.descriptions if part == "cupl" else
                                                    self.inputs.descriptors) or {}).items()}
                count += sum(len(table.get(key(c), [0])) for c in labels)
        return count

    def new_texts(self, head: str, labels: Sequence[str]) -> int:
        """How many sentences building (head, labels) would encode: the text heads' sentences not in the
        feature cache, and one prompted pass per label for the prompt heads."""
        heads = Heads(self.backbone, self.inputs, self.ctx)
        count = 0
        for part in head_names(head):
            if part in ("awt", "fudd"):  # texts made while scoring: counted as if none were cached
                count += self.most_texts(part, labels)
            elif HEADS[part].encode is not None:
                count += len(labels)
            else:
                count += len({k for k in map(sha1, heads.sentences_of(part, labels)) if k not in self._text_store})
        return count

    async def classifier(self, head: str, labels: Sequence[str]) -> ProTextClassifier:
        """The classifier of (head, labels), encoded once: from the start-up sets, the LRU, or built now.

        A new set is costed before anything is encoded, and refused over the limits; an encoding
        whose every waiter has gone is cancelled before it starts."""
        lim, key = self.limits, (head, tuple(labels))
        if key in self._pinned:
            return self._pinned[key]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        future = self._building.get(key)
        if future is None:
            if len(self._building) >= lim.max_pending_label_sets:
                raise Busy(f"server busy: {len(self._building)} new label sets are waiting to be encoded "
                           f"(--max-pending-label-sets {lim.max_pending_label_sets}); retry shortly, or use a label "
                           f"set loaded at start")
            loop = asyncio.get_running_loop()
            cost = self.most_texts(head, labels)  # counted exactly (against the cache) only when it might pass
            if lim.max_new_texts < cost <= 4 * lim.max_new_texts:
                cost = await loop.run_in_executor(self._costing, self.new_texts, head, list(labels))
            future = self._building.get(key)  # another request may have started it meanwhile
            if future is None:
                if cost > lim.max_new_texts:
                    self.counts["refused_new_texts"] += 1
                    raise ApiError(413, f"head '{head}' for these {len(labels)} labels needs {cost} new sentences "
                                        f"encoded{' or more' if cost > 4 * lim.max_new_texts else ''}, more than the "
                                        f"limit of {lim.max_new_texts} a request may ask for (--max-new-texts); load "
                                        f"the set at start (--classes) or use a lighter head")
                future = loop.run_in_executor(self._labels_thread, self._make, list(labels), head)
                self._building[key], self._waiters[key] = future, 0
                future.add_done_callback(partial(self._built, key))
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(future)  # a caller that gives up does not cancel the others' encoding
        except ProtextError as e:
            raise ApiError(400, str(e)) from e
        finally:
            if key in self._waiters:
                self._waiters[key] -= 1
                if self._waiters[key] == 0 and not future.done():
                    future.cancel()  # nobody waits for it: dropped unless it already started

    def _built(self, key: tuple, future: asyncio.Future) -> None:
        self._building.pop(key, None)
        self._waiters.pop(key, None)
        if future.cancelled():
            self.counts["label_sets_dropped"] += 1
            return
        if future.exception() is not None:
            return
        self.counts["label_sets_encoded"] += 1
        self._text_store = feature_store(self.backbone, "text", self.ctx)  # it holds the new sentences now
        self._cache[key] = future.result()
        while len(self._cache) > self.limits.label_cache:
            self._cache.popitem(last=False)

    def open(self, name: str, data: bytes | BinaryIO, budget: list[int]) -> Image.Image:
        """An upload opened from its header, checked against the format list, the per-image pixel
        limit and what is left of the request's pixel budget (`budget[0]`, reduced here)."""
        try:
            image = open_header(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data,
                                self.limits.max_pixels)
        except TooManyPixels as e:
            raise ApiError(413, f"{name}: {e}; a decompression bomb or just too large") from e
        except UnsupportedFormat as e:
            raise ApiError(415, f"{name}: {e}") from e
        except Image.DecompressionBombError as e:
            raise ApiError(413, f"{name}: {e}") from e
        except Exception as e:
            raise ApiError(415, f"{name}: not an image this server can read ({e.__class__.__name__})") from e
        pixels = image.size[0] * image.size[1]
        if pixels > budget[0]:
            image.close()
            raise ApiError(413, f"{name}: the request's images together have more than "
                                f"{self.limits.max_request_pixels} pixels (--max-request-pixels); send fewer or "
                                f"smaller images per request")
        budget[0] -= pixels
        return image

    def decode(self, name: str, image: Image.Image, augment: tuple[int, int] | None = None) -> torch.Tensor:
        """Pixels of one opened upload (with `augment`, its views too: `images.views`)."""
        tower = self.backbone.image
        try:
            image.load()
            if augment is not None:
                return views(image, tower.image_size, tower.mean, tower.std, *augment)
            return preprocess(image, tower.image_size, tower.mean, tower.std)
        except Exception as e:  # PIL's many error classes for a broken file
            raise ApiError(422, f"{name}: the image could not be decoded ({e.__class__.__name__}: {e})") from e
        finally:
            image.close()

    def check_activation(self, activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise ApiError(400, f"activation must be {' or '.join(ACTIVATIONS)}, got {activation!r}")
        if activation == "sigmoid" and self.backbone.logit_bias is None:
            raise ApiError(400, f"sigmoid probabilities need a backbone trained with a sigmoid loss and a learned bias "
                                f"(SigLIP); '{public_name(self.backbone.name)}' has none: use softmax")

    async def classify(self, images: Sequence[Upload], labels: Sequence[str] | None = None,
                       label_set: str | None = None, head: str | None = None, top_k: int | None = None,
                       activation: str = "softmax", explain: int = 0) -> dict:
        """Top-k labels with probabilities for each image: the answer of `POST /v1/classify`.

        `images` are (name, bytes or a file). Every header is read and checked (formats, pixels,
        the request's pixel budget) before any image is decoded; then they are decoded one after
        the other."""
        lim = self.limits
        head = self.resolve_head(head)
        names, set_name = self.resolve_labels(labels, label_set)
        k = lim.top_k if top_k is None else top_k
        if k < 1:
            raise ApiError(400, f"top_k must be at least 1, got {k}")
        if not 0 <= explain <= MAX_EXPLAIN:
            raise ApiError(400, f"explain must be between 0 and {MAX_EXPLAIN}, got {explain}")
        if not images:
            raise ApiError(400, "no images: send one or more files in the 'images' field")
        if len(images) > lim.max_images:
            raise ApiError(413, f"{len(images)} images, more than the limit of {lim.max_images} per request "
                                f"(--max-images)")
        self.check_activation(activation)
        clf = await self.classifier(head, names)
        if explain and not explains(head):
            raise ApiError(400, f"head '{head}' has no descriptions to explain a label with; ask a head built from "
                                f"texts (cupl, dclip, awt, fudd, clip80, waffle)")
        loop = asyncio.get_running_loop()
        budget, opened = [lim.max_request_pixels], []
        try:
            for name, data in images:
                opened.append(self.open(name, data, budget))
        except ApiError:
            for image in opened:
                image.close()
            raise
        pixels = []
        decoded = lim.max_request_pixels - budget[0]
        augment = (clf.views, self.inputs.awt.seed) if clf.views else None
        for (name, _), image in zip(images, opened):  # one at a time: requests take turns on the decoding threads
            pixels.append(await loop.run_in_executor(self._decoders, self.decode, name, image, augment))
        if decoded > 16_000_000:
            release_memory()
        feats = await self.batcher.features(pixels)
        probs = clf.probabilities(feats, activation)
        values, idx = probs.topk(min(k, len(names)), dim=1)
        results = [{"image": name, "top": [{"label": names[j], "prob": p} for p, j in zip(vs.tolist(), ix.tolist())]}
                   for (name, _), vs, ix in zip(images, values, idx)]
        if explain:
            reasons = await loop.run_in_executor(None, clf.explain, feats, idx[:, 0].tolist(), explain)
            for result, found in zip(results, reasons):
                result["explain"] = [{"text": t, "score": v} for t, v in found]
        return {"head": head, "label_set": set_name, "labels": len(names), "activation": activation,
                "results": results}

    def info(self) -> dict:
        """What `GET /v1/label-sets` answers: the sets, the heads, the defaults."""
        return {"label_sets": [{"name": n, "size": len(v), "labels": v} for n, v in self.label_sets.items()],
                "default_label_set": next(iter(self.label_sets), None),
                "heads": [self.head] + [h for h in self.heads if h != self.head], "default_head": self.head,
                "explains": [h for h in self.heads if explains(h)],
                "top_k": self.limits.top_k, "backbone": public_name(self.backbone.name),
                "precision": self.backbone.image.precision, "prompts": self.inputs.prompts is not None}

    def health(self) -> dict:
        """What `GET /healthz` answers: liveness, the batching counters, label sets encoded and kept, the limits."""
        return {"status": "ok", "batching": dict(self.batcher.stats) if self.batcher else {},
                "label_sets_encoded": self.counts["label_sets_encoded"], "label_sets_dropped":
                self.counts["label_sets_dropped"], "label_sets_cached": len(self._cache) + len(self._pinned),
                "limits": asdict(self.limits)}

    def readiness(self) -> tuple[bool, dict]:
        """What `GET /readyz` answers: whether a request sent now would be served."""
        reasons = []
        if self.batcher is None or self._worker is None:
            reasons.append("the model is not loaded yet")
        elif self._worker.done():
            reasons.append("the image worker has stopped")
        else:
            waiting, lim = self.batcher.waiting, self.limits
            if waiting >= lim.max_queue:
                reasons.append(f"{waiting} images are waiting for the model (--max-queue {lim.max_queue})")
            if len(self._building) >= lim.max_pending_label_sets:
                reasons.append(f"{len(self._building)} new label sets are waiting to be encoded "
                               f"(--max-pending-label-sets {lim.max_pending_label_sets})")
        return not reasons, {"status": "ready" if not reasons else "not ready", "reasons": reasons,
                             "images_waiting": self.batcher.waiting if self.batcher else 0,
                             "label_sets_waiting": len(self._building)}
