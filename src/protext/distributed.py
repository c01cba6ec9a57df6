"""`protext label --engine ray`: the same rows as `label.label`, from the machines of a Ray cluster.

The driver builds the class embeddings once (the text side never leaves it) and cuts the
image list into fixed shards. Ray Data runs the rest: images are read and decoded in Ray
tasks (local paths, or any filesystem pyarrow opens: s3://, gs://, ... when the filesystem's
packages are installed), and classified in a pool of actors, each of which loads the image
tower once (on a GPU when the cluster has them) and is given the class embeddings. The
driver writes each finished shard atomically into `<output>.parts/`, as the single-machine
path does, so:

- a rerun after a failure skips the shards already written;
- a task or actor that dies is retried by Ray, and a shard file is whole or absent, so no
  row is ever written twice;
- the output file is the same as the single-machine path's, row for row.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .backbone import load_backbone
from .cache import to_json
from .classifier import ProTextClassifier
from .errors import ProtextError
from .images import UnreadableImage, load_pixels
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


def open_image_source(path: str):
    """A local path as it is; a URI (s3://..., gs://...) read through pyarrow's filesystems into memory."""
    if "://" not in path:
        return path
    from PIL import Image
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_file(inner) as f:
            return Image.open(io.BytesIO(f.read()))
    except Exception as e:  # missing filesystem package, credentials, network: the image is unreadable
        raise UnreadableImage(f"{e.__class__.__name__}: {e}") from e


class Decode:
    """A Ray Data task: paths -> preprocessed pixels, or the reason an image is unreadable."""

    def __init__(self, size, mean, std):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, batch: dict) -> dict:
        pixels, errors = [], []
        for path in batch["path"]:
            try:
                pixels.append(load_pixels(open_image_source(str(path)), self.size, self.mean, self.std).numpy())
                errors.append("")
            except UnreadableImage as e:
                pixels.append(None)
                errors.append(str(e))
        shape = next((p.shape for p in pixels if p is not None), (3, 1, 1))
        batch["pixels"] = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels])
        batch["error"] = np.array(errors, dtype=object)
        return batch


class Classify:
    """A Ray Data actor: loads the image tower once, scores decoded images against the class embeddings."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, classes: list[str],
                 weights: torch.Tensor, head: str, scores: str, top_k: int, min_prob: float | None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_backbone(backbone, revision, device)
        if loaded.image.fingerprint() != fingerprint:
            raise ProtextError(f"backbone '{backbone}' on this worker has other image weights than on the driver")
        self.clf = ProTextClassifier.from_weights(loaded, classes, weights, head)
        self.scores, self.top_k, self.min_prob = scores, top_k, min_prob

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        probs = {}
        if ok:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.clf.backbone.device)
            with torch.no_grad():
                feats = self.clf.backbone.image(pixels).cpu()
            probs = dict(zip(ok, self.clf.probabilities(feats, self.scores)))
        rows = [_row(str(p), probs.get(i), self.clf.classes, self.top_k, self.min_prob, batch["error"][i] or None)
                for i, p in enumerate(batch["path"])]
        return {"shard": batch["shard"], "row": np.array([_encode(r) for r in rows], dtype=object)}


def _encode(row: dict) -> str:
    return to_json(row, indent=None)


def label_on_ray(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int = 3,
                 min_prob: float | None = None, scores: str = "softmax", address: str | None = None,
                 workers: int = 2, num_gpus_per_worker: float = 0, batch_size: int = 32,
                 show_progress: bool = True, runtime_env: dict | None = None) -> LabelReport:
    """Label `paths` on a Ray cluster (`address`: "auto", "ray://host:port", or None for a local
    instance) into `output`, resuming from the shards an earlier run wrote. `workers` is the
    number of classifying actors (and decoding tasks at once); `runtime_env` is Ray's, for the
    actors (packages or environment variables the cluster's machines need)."""
    import json

    from tqdm.auto import tqdm

    ray = ray_module()
    output = Path(output)
    fmt, names, parts = start_job(clf, paths, output, top_k, min_prob, scores,
                                  {"--workers": workers, "--batch-size": batch_size})
    unique = list(dict.fromkeys(names))  # a path given twice is labelled once and written twice
    shards = {i: unique[start : start + SHARD] for i, start in enumerate(range(0, len(unique), SHARD))}
    todo = {i: shard for i, shard in shards.items() if not parts.has_shard(i)}
    reused = sum(len(s) for i, s in shards.items() if i not in todo)
    start = time.perf_counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        tower = clf.backbone.image
        items = [{"shard": i, "path": p} for i, shard in todo.items() for p in shard]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
        decoded = dataset.map_batches(Decode, fn_constructor_args=(tower.image_size, tower.mean, tower.std),
                                      batch_size=batch_size, batch_format="numpy", concurrency=workers)
        labelled = decoded.map_batches(
            Classify, fn_constructor_args=(clf.backbone.name, clf.backbone.revision, tower.fingerprint(), clf.classes,
                                           clf.weights, clf.head, scores, top_k, min_prob),
            batch_size=batch_size, batch_format="numpy", concurrency=workers, num_gpus=num_gpus_per_worker,
            max_restarts=-1, max_task_retries=-1, **({"runtime_env": runtime_env} if runtime_env else {}))
        pending: dict[int, dict[str, dict]] = defaultdict(dict)
        with tqdm(total=len(items), desc="labelling (ray)", unit="img", disable=not show_progress) as bar:
            for batch in labelled.iter_batches(batch_format="numpy", batch_size=None):
                for shard, text in zip(batch["shard"], batch["row"]):
                    row = json.loads(text)
                    pending[int(shard)][row["path"]] = row
                    if len(pending[int(shard)]) == len(todo[int(shard)]):
                        done = pending.pop(int(shard))
                        parts.write_shard(int(shard), [done[p] for p in todo[int(shard)]])
                bar.update(len(batch["row"]))
        if pending:
            raise ProtextError(f"Ray returned no rows for {sum(len(todo[s]) - len(r) for s, r in pending.items())} "
                               f"images; rerun to label them")
    seconds = time.perf_counter() - start
    final = [parts.rows[n] for n in names]
    write_rows(final, output, fmt, top_k)
    parts.remove()
    return LabelReport(output, len(names), len(unique) - reused, reused,
                       [(r["path"], r["error"]) for r in final if r["error"] is not None], seconds)
