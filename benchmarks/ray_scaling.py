"""`label` and `features` with `--engine ray` against the single-process path: images per second.

Model: a random CLIP with ViT-B/16's image tower (see measure.vit_b16_clip). Images: the real
ImageNet sample JPEGs in ../shared/data, repeated to `--images`. For each job (`--jobs`), runs
the single-process path (`label.label`, `feature_folder.write_features`), then the Ray path
(`distributed.label_on_ray`, `distributed.features_on_ray`) with 1 and 2 actors (each with a
fresh output), on a local Ray instance (or `--address auto` on a real cluster, where
`--workers` can go up to its nodes); each actor reserves its share of the machine's CPUs
(`--cpus-per-worker`, which is also its torch threads). On one machine Ray can only add
overhead (actors that each hold a model, their start-up, part hand-outs); the point of the
figure is how much (target: at least 0.95). The last lines give the ratio of the best Ray
figure to the single-process one, per job, with the actors' start-up (their processes, imports
and models) and without it (the images after the first n parts, one per actor, over the time
after they are written, which a long job approaches). Ray is started (or joined) first, as
`protext label --engine ray` does before it loads its model, and its workers' imports are waited
for (`distributed.PRELOAD`), so that they take no CPU from the single-process runs.

    python benchmarks/ray_scaling.py [--images 384] [--workers 1,2] [--jobs label,features] [--part-size 64]
                                     [--address auto]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from measure import IMAGENET_DESCRIPTIONS, SHARED, vit_b16_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--address", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--jobs", default="label,features")
    ap.add_argument("--part-size", type=int, default=64, help="images per part (parts are what actors share out)")
    args = ap.parse_args()

    import ray

    from protext.classifier import ProTextClassifier
    from protext.context import QUIET
    from protext.descriptions import load_descriptions
    from protext.distributed import PRELOAD, connect, features_on_ray, label_on_ray
    from protext.feature_folder import write_features
    from protext.label import label

    work = Path(tempfile.mkdtemp(prefix="protext-ray-"))
    texts = [s for v in load_descriptions(IMAGENET_DESCRIPTIONS).values() for s in v][:2000]
    backbone = vit_b16_clip(texts, folder=work / "clip")  # a folder: the actors load the backbone by its path
    clf = ProTextClassifier.from_backbone(backbone, ["otter", "beaver", "muskrat", "cat", "dog"])
    samples = sorted((SHARED / "images" / "imagenet_sample").iterdir())
    (work / "images").mkdir()
    paths = []
    for i in range(args.images):  # distinct files, so that nothing is labelled once for two paths
        paths.append(work / "images" / f"{i:05d}{samples[i % len(samples)].suffix}")
        shutil.copy(samples[i % len(samples)], paths[-1])
    print(f"{args.images} ImageNet JPEGs, ViT-B/16-shaped random CLIP, torch threads {torch.get_num_threads()}")
    bs = args.batch_size
    ps = args.part_size
    single = {"label": lambda out: label(clf, paths, out / "labels.jsonl", batch_size=bs, part_size=ps, ctx=QUIET),
              "features": lambda out: write_features(backbone, paths, out, batch_size=bs, part_size=ps, ctx=QUIET)}
    cpus = lambda n: max(1, (os.cpu_count() or 1) // n)  # noqa: E731  each actor its share of the machine
    on_ray = {"label": lambda out, n: label_on_ray(clf, paths, out / "labels.jsonl", workers=n, batch_size=bs,
                                                   part_size=ps, cpus_per_worker=cpus(n), ctx=QUIET),
              "features": lambda out, n: features_on_ray(backbone, paths, out, workers=n, batch_size=bs,
                                                         part_size=ps, cpus_per_worker=cpus(n), ctx=QUIET)}
    # Ray first, as `protext label --engine ray` starts or joins it before loading its model; its workers'
    # imports are waited for, so that they take no CPU from the single-process runs
    t0 = time.perf_counter()
    connect(args.address, **({} if args.address else {"_node_ip_address": "127.0.0.1"}))  # loopback only
    preloaded = ray.get([ray.remote(num_cpus=1)(_imported).remote(PRELOAD) for _ in range(os.cpu_count() or 1)])
    print(f"Ray {'joined' if args.address else 'started'} in {time.perf_counter() - t0:.1f} s, its workers' "
          f"imports done ({sum(preloaded)} of {len(preloaded)} workers had {', '.join(PRELOAD)} before their first task)")
    print("| job | path | images/s |\n|---|---|---|", flush=True)
    ratios = []
    for job in args.jobs.split(","):
        out = work / f"{job}-single"
        out.mkdir()
        t0 = time.perf_counter()
        single[job](out)
        one = args.images / (time.perf_counter() - t0)
        print(f"| {job} | single process | {one:.2f} |", flush=True)
        best = steady_best = 0.0
        for n in map(int, args.workers.split(",")):
            out = work / f"{job}-ray-{n}"
            out.mkdir()
            first: list[float] = []

            def watch() -> None:  # when n part files are there: every actor is up and has run a part
                while not first and len(list(out.rglob("part-*"))) < n:
                    time.sleep(0.05)
                first.append(time.perf_counter())

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            on_ray[job](out, n)
            end = time.perf_counter()
            watcher.join()
            rate = args.images / (end - t0)
            steady = (args.images - n * args.part_size) / max(1e-9, end - first[0])
            best, steady_best = max(best, rate), max(steady_best, steady)
            print(f"| {job} | ray, {n} actor(s) (start-up included) | {rate:.2f} |", flush=True)
            print(f"| {job} | ray, {n} actor(s), after the first {n} part(s) (start-up excluded) | {steady:.2f} |",
                  flush=True)
        ratios.append(f"{job}: best ray / single process images per second: {best / one:.2f} start-up included, "
                      f"{steady_best / one:.2f} after each actor's first part (target: at least 0.95)")
    print("\n".join(ratios))


def _imported(modules: tuple[str, ...]) -> bool:
    """A task runs only once its worker's preloading is over; says whether it had preloaded `modules`."""
    import sys
    return all(m in sys.modules for m in modules)


if __name__ == "__main__":
    main()
