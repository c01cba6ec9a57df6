"""`protext serve`: a zero-shot classifier behind a JSON API and a web page, on one machine.

The backbone and prompts are loaded once. Requests carry images (multipart uploads) and a
label set: their own labels, or the name of a set loaded at start. What is expensive is
done once and shared:

- images from concurrent requests are collected by a `Batcher` into one forward pass of
  the image tower (at most `max_batch` images, waiting at most `max_wait_ms` for company);
- class embeddings are a `ProTextClassifier` per (head, labels), kept in a bounded LRU:
  a label set seen once is not encoded again, and concurrent first requests for the same
  set wait for one encoding. The sets loaded at start are never evicted.

Bad input must never take the server down nor show a traceback: every limit is a field of
`Limits` (a flag of the command), checked before the work it protects, and answered with a
4xx JSON body `{"error": "..."}` that says what was wrong. Memory is bounded by the limits:
request bodies (`max_upload_bytes` each, `max_requests` at once), decoded images
(`max_pixels` each, `decode_workers` at once) and images waiting for the model (`max_queue`).

Model work runs on two single threads, one for image batches and one for new label sets,
so a large new label set does not stop images of known sets from being classified.

This module needs no web framework; `api` puts the service behind HTTP (FastAPI, uvicorn).
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from collections import OrderedDict, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image

from .backbone import Backbone
from .classifier import ProTextClassifier
from .descriptions import read_class_list
from .errors import ProtextError
from .flags import option
from .context import Context
from .heads import HEADS, HeadInputs, default_heads, head_names
from .images import load_pixels


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may ask for; each field is a flag of `protext serve`."""

    max_upload_mb: float = option(32.0, "largest request body, all images together, in MiB")
    max_images: int = option(16, "most images in one request")
    max_pixels: int = option(40_000_000, "most pixels of one image, read from its header before decoding "
                                         "(decompression bombs are refused here)")
    max_labels: int = option(1000, "most labels in one request")
    max_label_chars: int = option(100, "longest label, in characters")
    max_batch: int = option(32, "most images in one forward pass")
    max_wait_ms: float = option(10.0, "how long a forward pass waits for more images to batch")
    max_queue: int = option(256, "most images accepted and not yet answered; more are refused with 503")
    max_requests: int = option(64, "most classify requests in flight; more are refused with 503")
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
            elif f.name == "max_upload_mb":
                ok, need = _number(value) and value > 0, "a number above 0"
            else:
                ok, need = _number(value) and value >= 0, "a number, 0 or more"
            if not ok:
                raise ProtextError(f"{flag} must be {need}, got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


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
                 max_queue: int, executor: Executor):
        self.forward, self.max_batch, self.max_wait_s, self.max_queue = forward, max_batch, max_wait_s, max_queue
        self.executor = executor
        self.stats = {"forward_passes": 0, "images": 0, "largest_batch": 0}
        self._items: deque[tuple[torch.Tensor, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0

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
        batch = [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]
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
            for (_, f), row in zip(batch, feats):
                if not f.done():
                    f.set_result(row)


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
        self.backbone, self.inputs, self.limits = backbone, inputs, limits
        self.head = head or default_heads(inputs)[-1]
        head_names(self.head)
        self._make = partial(ProTextClassifier, backbone, inputs=inputs, ctx=ctx)
        self.label_sets = {name: list(labels) for name, labels in (label_sets or {}).items()}
        self._pinned: dict[tuple, ProTextClassifier] = {}
        for name, labels in self.label_sets.items():
            self._check_labels(labels, f"label set '{name}'", ProtextError)
            self._pinned[(self.head, tuple(labels))] = self._make(labels, self.head)
        self._cache: OrderedDict[tuple, ProTextClassifier] = OrderedDict()
        self._building: dict[tuple, asyncio.Future] = {}
        self.label_sets_encoded = 0
        self.batcher: Batcher | None = None

    # -- lifecycle (the app's lifespan) ----------------------------------------------------
    def start(self) -> asyncio.Task:
        """Start the threads and the batcher on the running event loop; returns the batcher's task."""
        lim = self.limits
        self._images_thread = ThreadPoolExecutor(1, thread_name_prefix="protext-images")
        self._labels_thread = ThreadPoolExecutor(1, thread_name_prefix="protext-labels")
        self._decoders = ThreadPoolExecutor(lim.decode_workers, thread_name_prefix="protext-decode")
        self.batcher = Batcher(self.image_features, lim.max_batch, lim.max_wait_ms / 1000, lim.max_queue,
                               self._images_thread)
        return asyncio.get_running_loop().create_task(self.batcher.run())

    def close(self) -> None:
        for pool in (self._images_thread, self._labels_thread, self._decoders):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the pieces of a request -----------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """One forward pass of the image tower (the batcher's model call)."""
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
        return head.strip()

    async def classifier(self, head: str, labels: Sequence[str]) -> ProTextClassifier:
        """The classifier of (head, labels), encoded once: from the start-up sets, the LRU, or built now."""
        key = (head, tuple(labels))
        if key in self._pinned:
            return self._pinned[key]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        future = self._building.get(key)
        if future is None:
            build = partial(self._make, list(labels), head)
            future = asyncio.get_running_loop().run_in_executor(self._labels_thread, build)
            self._building[key] = future
            future.add_done_callback(partial(self._built, key))
        try:
            return await asyncio.shield(future)  # a caller that gives up does not cancel the others' encoding
        except ProtextError as e:
            raise ApiError(400, str(e)) from e

    def _built(self, key: tuple, future: asyncio.Future) -> None:
        del self._building[key]
        if future.cancelled() or future.exception() is not None:
            return
        self.label_sets_encoded += 1
        self._cache[key] = future.result()
        while len(self._cache) > self.limits.label_cache:
            self._cache.popitem(last=False)

    def decode(self, name: str, data: bytes) -> torch.Tensor:
        """Pixels of one upload; its size is read from the header and checked before decoding."""
        tower = self.backbone.image
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ApiError(413, f"{name}: {e}") from e
        except Exception as e:
            raise ApiError(415, f"{name}: not an image this server can read ({e.__class__.__name__})") from e
        width, height = image.size
        if width * height > self.limits.max_pixels:
            raise ApiError(413, f"{name}: {width} x {height} = {width * height} pixels, more than the limit of "
                                f"{self.limits.max_pixels} (--max-pixels); a decompression bomb or just too large")
        try:
            image.load()
            return load_pixels(image, tower.image_size, tower.mean, tower.std)
        except Exception as e:  # load_pixels' UnreadableImage, or PIL's own errors from load()
            raise ApiError(422, f"{name}: the image could not be decoded ({e.__class__.__name__}: {e})") from e

    async def classify(self, images: Sequence[tuple[str, bytes]], labels: Sequence[str] | None = None,
                       label_set: str | None = None, head: str | None = None, top_k: int | None = None,
                       activation: str = "softmax") -> dict:
        """Top-k labels with probabilities for each image: the answer of `POST /v1/classify`."""
        lim = self.limits
        head = self.resolve_head(head)
        names, set_name = self.resolve_labels(labels, label_set)
        k = lim.top_k if top_k is None else top_k
        if k < 1:
            raise ApiError(400, f"top_k must be at least 1, got {k}")
        if not images:
            raise ApiError(400, "no images: send one or more files in the 'images' field")
        if len(images) > lim.max_images:
            raise ApiError(413, f"{len(images)} images, more than the limit of {lim.max_images} per request "
                                f"(--max-images)")
        clf = await self.classifier(head, names)
        try:
            clf.check_activation(activation)
        except ProtextError as e:
            raise ApiError(400, str(e)) from e
        loop = asyncio.get_running_loop()
        pixels = await asyncio.gather(*(loop.run_in_executor(self._decoders, self.decode, name, data)
                                        for name, data in images))
        feats = await self.batcher.features(pixels)
        probs = clf.probabilities(feats, activation)
        values, idx = probs.topk(min(k, len(names)), dim=1)
        results = [{"image": name, "top": [{"label": names[j], "prob": p} for p, j in zip(vs.tolist(), ix.tolist())]}
                   for (name, _), vs, ix in zip(images, values, idx)]
        return {"head": head, "label_set": set_name, "labels": len(names), "activation": activation, "results": results}

    def info(self) -> dict:
        """What `GET /v1/label-sets` answers: the sets, the heads, the defaults."""
        return {"label_sets": [{"name": n, "size": len(v), "labels": v} for n, v in self.label_sets.items()],
                "default_label_set": next(iter(self.label_sets), None),
                "heads": [self.head] + [h for h in HEADS if h != self.head], "default_head": self.head,
                "top_k": self.limits.top_k, "backbone": self.backbone.name, "prompts": self.inputs.prompts is not None}

    def health(self) -> dict:
        """What `GET /healthz` answers: liveness, the batching counters, label sets encoded and kept, the limits."""
        return {"status": "ok", "batching": dict(self.batcher.stats) if self.batcher else {},
                "label_sets_encoded": self.label_sets_encoded,
                "label_sets_cached": len(self._cache) + len(self._pinned), "limits": asdict(self.limits)}
