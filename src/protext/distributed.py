"""`protext label` and `protext features` with `--engine ray`: the same output as the single-machine
path, from the machines of a Ray cluster.

The driver cuts the image list into fixed shards (for labels, the class embeddings are built
once on the driver: the text side never leaves it). Ray Data runs the rest: images are read
and decoded in Ray tasks (local paths, or any filesystem pyarrow opens: s3://, gs://, ...
when the filesystem's packages are installed), and the image tower runs in a pool of actors,
each of which loads it once (on a GPU when the cluster has them). The driver writes each
finished shard atomically, as the single-machine path does (`label.Parts`,
`feature_folder.FeatureFolder`), so:

- a rerun after a failure skips the shards already written;
- a task or actor that dies is retried by Ray, and a shard file is whole or absent, so no
  row is ever written twice;
- the output is the same as the single-machine path's, row for row.
"""

from __future__ import annotations

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
from .errors import ProtextError
from .feature_folder import FeaturesReport, start_features
from .images import UnreadableImage, is_uri, load_pixels
from .label import LabelReport, _row, start_job, write_rows

SHARD = 256  # images per shard: the unit of resuming


def ray_module():
    """Ray, or an error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ProtextError("--engine ray needs Ray: pip install 'protext[ray]' (or pip install 'ray[data]')") from e
    return ray


def decode(batch: dict, size, mean: Sequence[float], std: Sequence[float]) -> dict:
    """A Ray Data task: the files at `source` -> preprocessed pixels, or the reason an image is
    unreadable (its pixels zeros of the same shape, so that every batch stacks alike)."""
    pixels, errors = [], []
    for path, source in zip(batch["path"], batch["source"]):
        try:
            pixels.append(load_pixels(str(source), size, mean, std).numpy())
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

    def __init__(self, backbone: str, revision: str | None, fingerprint: str):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(backbone, revision, device)
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

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, classes: list[str],
                 weights: torch.Tensor, head: str, scores: str, top_k: int, min_prob: float | None):
        TowerActor.__init__(self, backbone, revision, fingerprint)  # named: a subclass Ray ships by value still finds it
        self.clf = ProTextClassifier.from_weights(self.backbone, classes, weights, head)
        self.scores, self.top_k, self.min_prob = scores, top_k, min_prob

    def __call__(self, batch: dict) -> dict:
        ok, feats = self.features(batch)
        probs = dict(zip(ok, self.clf.probabilities(feats, self.scores))) if ok else {}
        rows = [_row(str(p), probs.get(i), self.clf.classes, self.top_k, self.min_prob, batch["error"][i] or None)
                for i, p in enumerate(batch["path"])]
        return {"shard": batch["shard"], "index": batch["index"],
                "row": np.array([to_json(r, indent=None) for r in rows], dtype=object)}


class Embed(TowerActor):
    """The decoded images' features (zeros where unreadable, the reason in `error`)."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, dim: int):
        TowerActor.__init__(self, backbone, revision, fingerprint)  # named: a subclass Ray ships by value still finds it
        self.dim = dim

    def __call__(self, batch: dict) -> dict:
        ok, feats = self.features(batch)
        out = np.zeros((len(batch["path"]), self.dim), np.float32)
        if ok:
            out[ok] = feats.numpy()
        return {"shard": batch["shard"], "index": batch["index"], "path": batch["path"], "feature": out,
                "error": batch["error"]}


def _run(items: list[dict], sizes: dict[int, int], tower, actor: type, actor_args: tuple, save, *, address: str | None,
         workers: int, num_gpus_per_worker: float, batch_size: int, runtime_env: dict | None, desc: str,
         show_progress: bool) -> None:
    """Decode `items` ({"shard", "index", "path"}) in Ray tasks, run `actor` on them in a pool of
    `workers` actors, and call `save(shard, records)` on the driver as soon as a shard's
    `sizes[shard]` records are all back, in input order (each record: the actor's columns).

    Workers read each image from its absolute path (a relative one would be resolved in the
    worker's own folder), while `path` keeps the spelling the user gave, for the output."""
    from tqdm.auto import tqdm

    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    for item in items:
        item["source"] = item["path"] if is_uri(item["path"]) else str(Path(item["path"]).resolve())
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    decoded = dataset.map_batches(decode, fn_kwargs={"size": tower.image_size, "mean": tower.mean, "std": tower.std},
                                  batch_size=batch_size, batch_format="numpy")
    # Ray Data restarts a dead actor and retries its batches by default (max_restarts and
    # max_task_retries of -1); a batch's rows reach the driver once, from the try that finished.
    done = decoded.map_batches(actor, fn_constructor_args=actor_args, batch_size=batch_size, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=num_gpus_per_worker,
                               **({"runtime_env": runtime_env} if runtime_env else {}))
    pending: dict[int, dict[int, dict]] = defaultdict(dict)
    with tqdm(total=len(items), desc=desc, unit="img", disable=not show_progress) as bar:
        for batch in done.iter_batches(batch_format="numpy", batch_size=None):
            for j in range(len(batch["shard"])):
                shard = int(batch["shard"][j])
                pending[shard][int(batch["index"][j])] = {k: v[j] for k, v in batch.items()}
                if len(pending[shard]) == sizes[shard]:
                    records = pending.pop(shard)
                    save(shard, [records[k] for k in sorted(records)])
            bar.update(len(batch["shard"]))
    if pending:
        raise ProtextError(f"Ray returned no rows for {sum(sizes[s] - len(r) for s, r in pending.items())} "
                           f"images; rerun to compute them")


def label_on_ray(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int = 3,
                 min_prob: float | None = None, scores: str = "softmax", address: str | None = None,
                 workers: int = 2, num_gpus_per_worker: float = 0, batch_size: int = 32,
                 show_progress: bool = True, runtime_env: dict | None = None) -> LabelReport:
    """Label `paths` on a Ray cluster (`address`: "auto", "ray://host:port", or None for a local
    instance) into `output`, resuming from the shards an earlier run wrote. `workers` is the
    number of classifying actors (and decoding tasks at once); `runtime_env` is Ray's, for the
    actors (packages or environment variables the cluster's machines need)."""
    import json



    ray_module()
    output = Path(output)
    fmt, names, parts = start_job(clf, paths, output, top_k, min_prob, scores,
                                  {"--workers": workers, "--batch-size": batch_size})
    unique = list(dict.fromkeys(names))  # a path given twice is labelled once and written twice
    shards = {i: unique[start : start + SHARD] for i, start in enumerate(range(0, len(unique), SHARD))}
    # a shard is reused only when it holds rows for all its paths: the list may have changed since
    todo = {i: shard for i, shard in shards.items() if not (parts.has_shard(i) and all(p in parts.rows for p in shard))}
    reused = sum(len(s) for i, s in shards.items() if i not in todo)
    start = time.perf_counter()
    if todo:
        tower = clf.backbone.image
        items = [{"shard": i, "index": k, "path": p} for i, shard in todo.items() for k, p in enumerate(shard)]
        args = (clf.backbone.name, clf.backbone.revision, tower.fingerprint(), clf.classes, clf.weights, clf.head,
                scores, top_k, min_prob)
        _run(items, {i: len(s) for i, s in todo.items()}, tower, Classify, args,
             lambda shard, records: parts.write_shard(shard, [json.loads(r["row"]) for r in records]),
             address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker, batch_size=batch_size,
             runtime_env=runtime_env, desc="labelling (ray)", show_progress=show_progress)
    seconds = time.perf_counter() - start
    final = [parts.rows[n] for n in names]
    write_rows(final, output, fmt, top_k)
    parts.remove()
    return LabelReport(output, len(names), len(unique) - reused, reused,
                       [(r["path"], r["error"]) for r in final if r["error"] is not None], seconds)


def features_on_ray(backbone: Backbone, paths: Sequence[str | Path], out: str | Path, chunk: int = 1024,
                    address: str | None = None, workers: int = 2, num_gpus_per_worker: float = 0,
                    batch_size: int = 32, show_progress: bool = True,
                    runtime_env: dict | None = None) -> FeaturesReport:
    """`feature_folder.write_features` on a Ray cluster: the same parts (one per `chunk` inputs),
    resumed the same way; the other arguments as in `label_on_ray`."""
    ray_module()
    names, folder = start_features(backbone, paths, Path(out), chunk, {"--workers": workers, "--batch-size": batch_size})
    todo = folder.missing()
    started = time.perf_counter()
    if todo:
        tower = backbone.image
        items = [{"shard": part, "index": k, "path": names[i]} for part in todo for k, i in enumerate(folder.span(part))]

        def save(part: int, records: list[dict]) -> None:
            folder.write(part, [str(r["path"]) for r in records], np.stack([r["feature"] for r in records]),
                         [str(r["error"]) or None for r in records])

        _run(items, {p: len(folder.span(p)) for p in todo}, tower, Embed,
             (backbone.name, backbone.revision, tower.fingerprint(), folder.dim), save, address=address,
             workers=workers, num_gpus_per_worker=num_gpus_per_worker, batch_size=batch_size, runtime_env=runtime_env,
             desc="image features (ray)", show_progress=show_progress)
    computed = sum(len(folder.span(p)) for p in todo)
    return folder.finish(started, computed, len(names) - computed)
