"""`protext label` and `protext features` with `--engine ray`: the same output as the single-machine
path, from the machines of a Ray cluster.

The driver cuts the image list into the same parts as the single-machine engine (`engine.spans`;
for labels, the class embeddings are built once on the driver: the text side never leaves it).
Ray Data runs the rest: images are read and decoded in Ray tasks (local paths, or any filesystem
pyarrow opens: s3://, gs://, ... when the filesystem's packages are installed), and the image
tower runs in a pool of actors, each of which loads it once (on a GPU when the cluster has them).
The driver writes each finished part atomically into the same `parts.PartFolder` the
single-machine path writes, so:

- a rerun after a failure computes only the parts not yet written, on either engine;
- a task or actor that dies is retried by Ray, and a part file is whole or absent, so no row
  is ever written twice;
- the output is the same as the single-machine path's, row for row.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone, load_backbone
from .cache import to_json
from .classifier import ProTextClassifier
from .context import Context
from .engine import JobReport, default_batch_size, spans
from .errors import ProtextError
from .feature_folder import open_folder, part_bytes, summarise
from .images import MAX_PIXELS, UnreadableImage, is_uri, load_pixels
from .label import finish, row, start
from .parts import PartFolder, jsonl


def _single_view(clf: ProTextClassifier) -> None:
    if clf.views:
        raise ProtextError(f"head '{clf.head}' scores augmented views of each image, which --engine ray does not "
                           f"make; run it on the local engine")


def _paths_only(paths: Sequence) -> None:
    if any(not isinstance(p, (str, Path)) for p in paths[:1000]):
        raise ProtextError("--engine ray reads files and URIs; rows of a dataset (--dataset hf:...) run on the "
                           "local engine")


def ray_module():
    """Ray, or an error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ProtextError("--engine ray needs Ray: pip install 'protext[ray]' (or pip install 'ray[data]')") from e
    return ray


def decode(batch: dict, size, mean: Sequence[float], std: Sequence[float], max_pixels: int = MAX_PIXELS) -> dict:
    """A Ray Data task: the files at `source` -> preprocessed pixels, or the reason an image is
    unreadable (its pixels zeros of the same shape, so that every batch stacks alike)."""
    pixels, errors = [], []
    for path, source in zip(batch["path"], batch["source"]):
        try:
            pixels.append(load_pixels(str(source), size, mean, std, max_pixels).numpy())
            errors.append("")
        except UnreadableImage as e:
            pixels.append(None)
            errors.append(str(e).replace(str(source), str(path)))  # the reason as the local path words it
    if any(p is None for p in pixels):
        blank = np.zeros(load_pixels(Image.new("RGB", (8, 8)), size, mean, std).shape, np.float32)
        pixels = [blank if p is None else p for p in pixels]
    batch["pixels"] = np.stack(pixels)
    batch["error"] = np.array(errors, dtype=object)
    return batch


class TowerActor:
    """A Ray Data actor holding the image tower, loaded once per actor (on its GPU when it has one)."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, precision: str = "fp32"):
        device = "cpu" if precision == "int8" or not torch.cuda.is_available() else "cuda"  # int8: CPU kernels
        self.backbone = load_backbone(backbone, revision, device, precision=precision)
        if self.backbone.image is None or self.backbone.image.fingerprint() != fingerprint:
            raise ProtextError(f"backbone '{backbone}' on this worker has other image weights than on the driver")

    def features(self, batch: dict) -> tuple[list[int], torch.Tensor]:
        """The decoded images' positions in the batch and their features, on the CPU."""
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        if not ok:
            return ok, torch.empty(0)
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.backbone.device)
        with torch.no_grad():
            return ok, self.backbone.image(pixels).cpu()


class Classify(TowerActor):
    """Scores decoded images against the class embeddings; one JSON row per image."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, precision: str, classes: list[str],
                 weights: torch.Tensor, head: str, activation: str, top_k: int, min_prob: float | None):
        TowerActor.__init__(self, backbone, revision, fingerprint, precision)  # named: a subclass Ray ships by value still finds it
        self.clf = ProTextClassifier.from_weights(self.backbone, classes, weights, head)
        self.activation, self.top_k, self.min_prob = activation, top_k, min_prob

    def __call__(self, batch: dict) -> dict:
        ok, feats = self.features(batch)
        probs = dict(zip(ok, self.clf.probabilities(feats, self.activation))) if ok else {}
        rows = [row(str(p), probs.get(i), self.clf.classes, self.top_k, self.min_prob, batch["error"][i] or None)
                for i, p in enumerate(batch["path"])]
        return {"part": batch["part"], "index": batch["index"],
                "row": np.array([to_json(r, indent=None) for r in rows], dtype=object)}


class Embed(TowerActor):
    """The decoded images' features (zeros where unreadable, the reason in `error`)."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, precision: str, dim: int):
        TowerActor.__init__(self, backbone, revision, fingerprint, precision)  # named: a subclass Ray ships by value still finds it
        self.dim = dim

    def __call__(self, batch: dict) -> dict:
        ok, feats = self.features(batch)
        out = np.zeros((len(batch["path"]), self.dim), np.float32)
        if ok:
            out[ok] = feats.numpy()
        return {"part": batch["part"], "index": batch["index"], "path": batch["path"], "feature": out,
                "error": batch["error"]}


def _run(names: Sequence[str], folder: PartFolder, part_size: int, tower, actor: type, actor_args: tuple, save, *,
         address: str | None, workers: int, num_gpus_per_worker: float, batch_size: int | None,
         runtime_env: dict | None,
         desc: str, ctx: Context, max_pixels: int = MAX_PIXELS) -> tuple[int, int, float]:
    """The parts `folder` lacks: decode their images in Ray tasks, run `actor` on them in a pool of
    `workers` actors, and call `save(part, records)` on the driver as soon as all of a part's
    records are back, in input order (each record: the actor's columns). Returns (images
    processed, reused, seconds). `batch_size` None: `engine.default_batch_size` for the workers' device.

    Workers read each image from its absolute path (a relative one would be resolved in the
    worker's own folder), while `path` keeps the spelling the user gave, for the output."""
    batch_size = default_batch_size(batch_size, "cuda" if num_gpus_per_worker > 0 else "cpu")
    layout = spans(len(names), part_size)
    todo = folder.missing(range(len(layout)))
    processed = sum(len(layout[p]) for p in todo)
    started = time.perf_counter()
    if not todo:
        return 0, len(names), 0.0
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    items = [{"part": p, "index": k, "path": names[i],
              "source": names[i] if is_uri(names[i]) else str(Path(names[i]).resolve())}
             for p in todo for k, i in enumerate(layout[p])]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    decoded = dataset.map_batches(decode, fn_kwargs={"size": tower.image_size, "mean": tower.mean, "std": tower.std,
                                                     "max_pixels": max_pixels},
                                  batch_size=batch_size, batch_format="numpy")
    # Ray Data restarts a dead actor and retries its batches by default (max_restarts and
    # max_task_retries of -1); a batch's rows reach the driver once, from the try that finished.
    done = decoded.map_batches(actor, fn_constructor_args=actor_args, batch_size=batch_size, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=num_gpus_per_worker,
                               **({"runtime_env": runtime_env} if runtime_env else {}))
    pending: dict[int, dict[int, dict]] = defaultdict(dict)
    with ctx.bar(len(items), desc, "img") as bar:
        for batch in done.iter_batches(batch_format="numpy", batch_size=None):
            for j in range(len(batch["part"])):
                part = int(batch["part"][j])
                pending[part][int(batch["index"][j])] = {k: v[j] for k, v in batch.items()}
                if len(pending[part]) == len(layout[part]):
                    records = pending.pop(part)
                    save(part, [records[k] for k in sorted(records)])
            bar.update(len(batch["part"]))
    if pending:
        raise ProtextError(f"Ray returned no rows for {sum(len(layout[p]) - len(r) for p, r in pending.items())} "
                           f"images; rerun to compute them")
    return processed, len(names) - processed, time.perf_counter() - started


def label_on_ray(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int = 3,
                 min_prob: float | None = None, activation: str = "softmax", address: str | None = None,
                 workers: int = 2, num_gpus_per_worker: float = 0, batch_size: int | None = None, part_size: int = 512,
                 ctx: Context = Context(), runtime_env: dict | None = None, max_pixels: int = MAX_PIXELS) -> JobReport:
    """Label `paths` on a Ray cluster (`address`: "auto", "ray://host:port", or None for a local
    instance) into `output`, resuming from the parts an earlier run (on either engine) wrote.
    `workers` is the number of classifying actors (and decoding tasks at once); `runtime_env` is
    Ray's, for the actors (packages or environment variables the cluster's machines need)."""
    ray_module()
    _paths_only(paths)
    _single_view(clf)
    output = Path(output)
    fmt, names, folder = start(clf, paths, output, top_k, min_prob, activation, part_size,
                               {"--workers": workers, "--batch-size": batch_size})
    tower = clf.backbone.image
    args = (clf.backbone.name, clf.backbone.revision, tower.fingerprint(), tower.precision, clf.classes, clf.weights,
            clf.head,
            activation, top_k, min_prob)

    def save(part: int, records: list[dict]) -> None:
        rows = [json.loads(r["row"]) for r in records]
        folder.write(part, jsonl(rows), len(rows), sum(r["error"] is not None for r in rows))

    processed, reused, seconds = _run(names, folder, part_size, tower, Classify, args, save, address=address,
                                      workers=workers, num_gpus_per_worker=num_gpus_per_worker,
                                      batch_size=batch_size, runtime_env=runtime_env, desc="labelling (ray)", ctx=ctx,
                                      max_pixels=max_pixels)
    return finish(folder, len(spans(len(names), part_size)), output, fmt, top_k, len(names), processed, reused,
                  seconds)


def features_on_ray(backbone: Backbone, paths: Sequence[str | Path], out: str | Path, part_size: int = 1024,
                    address: str | None = None, workers: int = 2, num_gpus_per_worker: float = 0,
                    batch_size: int | None = None, ctx: Context = Context(), runtime_env: dict | None = None,
                    max_pixels: int = MAX_PIXELS) -> JobReport:
    """`feature_folder.write_features` on a Ray cluster: the same parts (one per `part_size` inputs),
    resumed the same way; the other arguments as in `label_on_ray`."""
    ray_module()
    _paths_only(paths)
    names = [str(p) for p in paths]
    folder = open_folder(backbone, names, Path(out), part_size, {"--workers": workers, "--batch-size": batch_size})
    dim = folder.settings["dim"]

    def save(part: int, records: list[dict]) -> None:
        errors = [str(r["error"]) or None for r in records]
        folder.write(part, part_bytes([str(r["path"]) for r in records], np.stack([r["feature"] for r in records]),
                                      errors, dim), len(records), sum(e is not None for e in errors))

    tower = backbone.image
    processed, reused, seconds = _run(names, folder, part_size, tower, Embed,
                                      (backbone.name, backbone.revision, tower.fingerprint(), tower.precision, dim),
                                      save,
                                      address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker,
                                      batch_size=batch_size, runtime_env=runtime_env, desc="image features (ray)",
                                      ctx=ctx, max_pixels=max_pixels)
    return summarise(folder, len(names), processed, reused, seconds)
