"""`protext label` and `protext features` with `--engine ray`: the same folders as the single-machine
path, written by the machines of a Ray cluster.

The driver opens the job exactly as the single-machine path does (`label.open_job`,
`feature_folder.open_folder`: the same parts, settings and checks; for labels the class
embeddings are built once on the driver, so the text side never leaves it) and then only hands
out part numbers. A pool of `PartWorker` actors, each holding the image tower (on a GPU when
it is given one), computes a part the way the single-machine engine does (`engine.run`: its own
decoding threads, the same batches) and writes it, atomically, straight into the shared output
folder, returning a few numbers. So:

- nothing grows on the driver with the number of images: a manifest (`inputs.Manifest`) is read
  by the workers a part at a time, and the rows never pass through the driver until
  `--output FILE` streams the finished parts into one file (none with `--out DIR`);
- the parts are the single-machine path's, byte for byte up to float rounding, and a rerun on
  either engine computes only the parts not yet written;
- an actor whose process or machine dies is restarted (elsewhere) and its part computed again;
  a part file is whole or absent, so no row is ever written twice.

The output folders must be reachable at the same path from every machine (a shared or network
file system); the images and manifests may be local to it too, or any filesystem pyarrow opens
(`s3://`, `gs://`, ...).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .backbone import Backbone, load_backbone
from .classifier import ProTextClassifier
from .context import Context
from .engine import MAX_LISTED, Encoder, JobReport, check_counts, default_batch_size, parts_to_compute, run
from .errors import ProtextError
from .feature_folder import FeaturesEncoder, open_folder, summarise
from .images import MAX_PIXELS
from .inputs import Inputs, ListInputs, PartInputs, as_inputs, open_inputs
from .label import LabelJob, open_job
from .listing import listable, list_on_ray
from .parts import PartFolder


def _single_view(clf: ProTextClassifier) -> None:
    if clf.views:
        raise ProtextError(f"head '{clf.head}' scores augmented views of each image, which --engine ray does not "
                           f"make; run it on the local engine")


def _paths_only(inputs: Inputs) -> None:
    if isinstance(inputs, ListInputs) and any(not isinstance(p, (str, Path)) for p in inputs.items[:1000]):
        raise ProtextError("--engine ray reads files and URIs; rows of a dataset (--dataset hf:...) run on the "
                           "local engine")


def ray_module():
    """Ray, or an error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ProtextError("--engine ray needs Ray: pip install 'protext[ray]' (or pip install 'ray[data]')") from e
    return ray


def connect(address: str | None, **init) -> None:
    """Join the Ray cluster at `address` ("auto", "ray://host:port"), or start a local instance (None);
    `init` goes to `ray.init` (a local instance's `num_cpus`, say).

    A local instance lives only as long as the job, so it starts without the dashboard (a process
    and seconds of start-up nobody can look at afterwards) and its workers run at the caller's
    priority: Ray's default, nice 15, lets any other program on the machine take the CPUs from
    the job, which the local engine does not. Its worker processes, started with it, import torch
    and transformers (`PRELOAD`) before any actor exists, so an actor that lands in one starts in
    under a second instead of the several an import takes; a caller that connects before loading
    its own model (the CLI does) overlaps the two. None of this touches a cluster that is already
    running."""
    ray = ray_module()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", "0")  # read only by the processes a new instance starts
        if address is None and not os.environ.get("RAY_ADDRESS"):  # a new local instance: its own settings
            init = {**init, "_system_config": {"preload_python_modules": list(PRELOAD),
                                               **init.get("_system_config", {})}}
        ray.init(address=address, **{"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False,
                                     **init})


# What an actor imports before its first part (torch comes with this module); transformers'
# model code is the slow part, several seconds on two cores.
PRELOAD = ("protext.distributed", "transformers.modeling_utils")


def open_ray_inputs(paths: Sequence[str | Path], part_size: int, listing: Path, address: str | None = None,
                    workers: int = 2, notes: list[str] | None = None) -> Inputs:
    """The inputs of a job on Ray: image folders listed by Ray tasks into `listing/`
    (`listing.list_on_ray`, the single-machine listing exactly), anything else, and folders holding
    links to folders, opened as on one machine (`inputs.open_inputs`)."""
    folders = listable(paths)
    if folders is not None:
        connect(address)
        found = list_on_ray(folders, listing, part_size, units=max(16, 4 * workers), tasks=max(2, workers), notes=notes)
        if found is not None:
            return found
    return open_inputs(paths, part_size, notes)


class PartWorker:
    """A Ray actor: the image tower, loaded once, and the job's folders; computes and writes whole parts.

    `outputs` are (folder, suffix, encoder) with the encoders of the single-machine path
    (`label.RowsEncoder`, `feature_folder.FeaturesEncoder`); `scoring` (classes, class embeddings,
    head, activation), when given, scores each batch as `label` does."""

    def __init__(self, backbone: str, revision: str | None, fingerprint: str, precision: str,
                 outputs: list[tuple[str, str, Encoder]], inputs: Inputs | None, scoring: dict | None,
                 batch_size: int | None, threads: int | None, max_pixels: int):
        device = "cpu" if precision == "int8" or not torch.cuda.is_available() else "cuda"  # int8: CPU kernels
        self.backbone = load_backbone(backbone, revision, device, progress=False, precision=precision)
        if self.backbone.image is None or self.backbone.image.fingerprint() != fingerprint:
            raise ProtextError(f"backbone '{backbone}' on this worker has other image weights than on the driver")
        self.outputs = [(PartFolder(path, suffix), encode) for path, suffix, encode in outputs]
        self.inputs = inputs
        self.batch_size, self.threads, self.max_pixels = batch_size, threads, max_pixels
        self.head = None
        if scoring is not None:
            clf = ProTextClassifier.from_weights(self.backbone, scoring["classes"], scoring["weights"], scoring["head"])
            self.head = lambda f: clf.probabilities(f, scoring["activation"])

    def compute(self, index: int, part_size: int, given: PartInputs | None, need: list[bool]) -> dict:
        """Part `index` (its inputs `given`, else read from the job's manifest or shards) into each
        folder `need` marks; returns their records and the names of the part's unreadable inputs."""
        given = given if given is not None else self.inputs.part(index, part_size)
        part = next(run(self.backbone, [(index, given.items)], self.batch_size, self.threads, self.head,
                        max_pixels=self.max_pixels))
        records = []
        for (folder, encode), wanted in zip(self.outputs, need):
            if wanted:
                folder.write(index, encode(part, given), len(given.names), part.unreadable)
            records.append(folder.records.get(index))
        unreadable = [(n, e) for n, e in zip(given.names, part.errors) if e is not None][:MAX_LISTED]
        return {"records": records, "unreadable": unreadable}


def _run(inputs: Inputs, outputs: Sequence[tuple[PartFolder, Encoder]], part_size: int, backbone: Backbone,
         scoring: dict | None, *, address: str | None, workers: int, num_gpus_per_worker: float,
         batch_size: int | None, runtime_env: dict | None, desc: str, ctx: Context, max_pixels: int = MAX_PIXELS,
         threads: int | None = None, cpus_per_worker: float = 1) -> tuple[int, int, float, JobReport]:
    """The parts any of the `outputs` folders lacks, computed by `workers` `PartWorker` actors, at most
    two parts each in flight. Returns (images processed, reused, seconds, the unreadable inputs noted)."""
    check_counts({"--threads": threads})
    if cpus_per_worker <= 0:
        raise ProtextError(f"--cpus-per-worker must be above 0, got {cpus_per_worker}")
    folders = [folder for folder, _ in outputs]
    todo, processed = parts_to_compute(inputs, folders, part_size)
    notes = JobReport(folders[0].folder, inputs.images, processed, inputs.images - processed)
    if not todo:
        return 0, inputs.images, 0.0, notes
    ray = ray_module()
    connect(address)
    started = time.perf_counter()
    tower = backbone.image
    shared = None if isinstance(inputs, ListInputs) else inputs  # a list travels a part at a time
    # Ray restarts an actor whose process or node died and retries its calls there: a part is computed again
    actor = ray.remote(PartWorker).options(max_restarts=-1, max_task_retries=-1, num_gpus=num_gpus_per_worker,
                                           num_cpus=cpus_per_worker, scheduling_strategy="SPREAD",
                                           **({"runtime_env": runtime_env} if runtime_env else {}))
    args = (backbone.name, backbone.revision, tower.fingerprint(), tower.precision,
            [(str(Path(f.folder).resolve()), f.suffix, encode) for f, encode in outputs], shared, scoring,
            default_batch_size(batch_size, "cuda" if num_gpus_per_worker > 0 else "cpu"), threads, max_pixels)
    pool = [actor.remote(*args) for _ in range(workers)]
    pending: dict = {}
    queue = list(reversed(todo))
    free = [a for a in pool for _ in range(2)]

    def submit() -> None:
        while queue and free:
            index, worker = queue.pop(), free.pop()
            given = None if shared is not None else inputs.sources(index, part_size)
            need = [not folder.done(index) for folder in folders]
            pending[worker.compute.remote(index, part_size, given, need)] = (index, worker)

    try:
        with ctx.bar(processed, desc, "img") as bar:
            submit()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index, worker = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:  # a user-fixable problem a worker found: say it as such
                    if isinstance(e.cause, ProtextError):
                        raise ProtextError(str(e.cause)) from None
                    raise
                for folder, record in zip(folders, result["records"]):
                    if record is not None:
                        folder.records[index] = record
                for name, reason in result["unreadable"]:
                    notes.note(name, reason)
                bar.update(min(part_size, inputs.images - index * part_size))
                free.append(worker)
                submit()
    finally:
        for worker in pool:
            ray.kill(worker)
    return processed, inputs.images - processed, time.perf_counter() - started, notes


def label_on_ray(clf: ProTextClassifier, paths: Sequence | Inputs, output: Path | None = None,
                 top_k: int = 3, min_prob: float | None = None, activation: str = "softmax",
                 address: str | None = None, workers: int = 2, num_gpus_per_worker: float = 0,
                 batch_size: int | None = None, part_size: int = 512, ctx: Context = Context(),
                 runtime_env: dict | None = None, max_pixels: int = MAX_PIXELS, *, out: Path | None = None,
                 part_format: str = ".parquet", save_features: Path | None = None,
                 threads: int | None = None, cpus_per_worker: float = 1) -> JobReport:
    """Label `paths` (or a manifest) on a Ray cluster (`address`: "auto", "ray://host:port", or None
    for a local instance) into `output` or the folder `out`, resuming from the parts an earlier run
    (on either engine) wrote; `save_features` as in `label.label`. `workers` is the number of
    actors, each reserving `cpus_per_worker` CPUs (Ray gives it as many torch threads) and decoding
    with `threads` threads (default: as many as the machine's CPUs, at most 8); `runtime_env` is
    Ray's, for the actors."""
    ray_module()
    _single_view(clf)
    job = open_job(clf, paths, output, top_k, min_prob, activation, part_size,
                   {"--workers": workers, "--batch-size": batch_size}, out=out, part_format=part_format,
                   save_features=save_features)
    _paths_only(job.inputs)
    return _label(job, address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker,
                  batch_size=batch_size, ctx=ctx, runtime_env=runtime_env, max_pixels=max_pixels, threads=threads,
                  cpus_per_worker=cpus_per_worker)


def _label(job: LabelJob, **options) -> JobReport:
    scoring = {"classes": job.clf.classes, "weights": job.clf.weights, "head": job.clf.head,
               "activation": job.activation}
    processed, reused, seconds, notes = _run(job.inputs, job.outputs(), job.part_size, job.clf.backbone, scoring,
                                             desc="labelling (ray)", **options)
    return job.finish(processed, reused, seconds, notes)


def features_on_ray(backbone: Backbone, paths: Sequence | Inputs, out: str | Path,
                    part_size: int = 1024, address: str | None = None, workers: int = 2,
                    num_gpus_per_worker: float = 0, batch_size: int | None = None, ctx: Context = Context(),
                    runtime_env: dict | None = None, max_pixels: int = MAX_PIXELS,
                    threads: int | None = None, cpus_per_worker: float = 1) -> JobReport:
    """`feature_folder.write_features` on a Ray cluster: the same parts (one per `part_size` inputs),
    resumed the same way; the other arguments as in `label_on_ray`."""
    ray_module()
    inputs = as_inputs(paths)
    _paths_only(inputs)
    folder = open_folder(backbone, inputs, Path(out), part_size, {"--workers": workers, "--batch-size": batch_size})
    encode = FeaturesEncoder(folder.settings["dim"], inputs.columns)
    processed, reused, seconds, notes = _run(inputs, [(folder, encode)], part_size, backbone, None,
                                             address=address, workers=workers,
                                             num_gpus_per_worker=num_gpus_per_worker, batch_size=batch_size,
                                             runtime_env=runtime_env, desc="image features (ray)", ctx=ctx,
                                             max_pixels=max_pixels, threads=threads, cpus_per_worker=cpus_per_worker)
    return summarise(folder, inputs.images, processed, reused, seconds, notes)

