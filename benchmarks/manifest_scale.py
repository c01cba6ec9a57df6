"""A manifest of a million rows: the driver's memory and images/s at 10,000 and at 1,000,000 rows.

A synthetic Parquet manifest (`path`, plus an `id` column carried to the output) whose rows cycle
through a few small real images (the CIFAR-10 sample PNGs in ../shared/data), labelled with the
tiny random CLIP (32 px, 2 layers: the image tower is cheap, so what is measured is everything
around it) into `label --out DIR` parts, on the local engine and on a local Ray instance (every
node on 127.0.0.1). Each run is its own child process, so that its peak resident memory
(getrusage's ru_maxrss: the driver's, the Ray workers are other processes) belongs to that run
alone.

Targets (the last lines): peak driver memory at 1,000,000 rows at most 100 MB over 10,000 rows'
(flat), and the 1,000,000-row images/s at least 0.9 of the 10,000-row rate.

    python benchmarks/manifest_scale.py [--rows 10000,1000000] [--engines local,ray] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "images" / "cifar10_test_sample"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def child(args: argparse.Namespace) -> None:
    """One run: label the manifest into a fresh folder; print images/s and the peak RSS."""
    from protext.classifier import ProTextClassifier
    from protext.context import Context
    from protext.inputs import open_inputs

    ctx = Context(Path(args.work) / "cache", "cpu", progress=False)
    clf = ProTextClassifier.from_backbone(str(Path(args.work) / "clip"), CLASSES, ctx, head="clip")
    t0 = time.perf_counter()
    manifest = open_inputs([args.manifest], args.part_size)
    opened = time.perf_counter() - t0
    out = Path(args.work) / f"out-{args.engine}-{args.rows}"
    if args.engine == "ray":
        from protext.distributed import connect, label_on_ray

        connect(None, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")
        report = label_on_ray(clf, manifest, out=out, part_size=args.part_size, workers=args.workers,
                              cpus_per_worker=max(1, (os.cpu_count() or 2) // args.workers), batch_size=256, ctx=ctx)
    else:
        from protext.label import label

        report = label(clf, manifest, out=out, part_size=args.part_size, batch_size=256, ctx=ctx)
    seconds = time.perf_counter() - t0
    assert report.images == args.rows and report.processed == args.rows
    print(json.dumps({"images_per_s": args.rows / seconds, "seconds": seconds, "open_seconds": opened,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="10000,1000000")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workers", type=int, default=2, help="ray: actors")
    ap.add_argument("--part-size", type=int, default=4096)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.rows = int(args.rows)
        child(args)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    from protext.inputs import collect
    from protext.tiny import save_tiny_clip

    sizes = [int(n) for n in args.rows.split(",")]
    images = [str(p) for p in collect([CIFAR])[:16]]
    with tempfile.TemporaryDirectory(prefix="protext-manifest-") as work:
        save_tiny_clip(Path(work) / "clip", seed=0)
        manifests = {}
        for n in sizes:
            manifests[n] = Path(work) / f"m-{n}.parquet"
            pq.write_table(pa.table({"path": [images[i % len(images)] for i in range(n)], "id": list(range(n))}),
                           manifests[n], row_group_size=65536)
        results = {}
        for engine in args.engines.split(","):
            for n in sizes:
                cmd = [sys.executable, __file__, "--child", "--engine", engine, "--rows", str(n), "--manifest",
                       str(manifests[n]), "--work", work, "--workers", str(args.workers), "--part-size",
                       str(args.part_size)]
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if done.returncode != 0:
                    raise SystemExit(f"{engine} at {n} rows failed:\n{done.stderr[-3000:]}")
                results[engine, n] = json.loads(done.stdout.strip().splitlines()[-1])
                r = results[engine, n]
                print(f"{engine} {n} rows: {r['images_per_s']:.0f} images/s, peak driver RSS {r['peak_rss_mb']:.0f} MB, "
                      f"manifest opened in {r['open_seconds']:.2f} s", flush=True)

    small, large = sizes[0], sizes[-1]
    print(f"\nParquet manifest cycling {len(images)} real 32x32 PNGs, tiny random CLIP (32 px), clip head, 10 classes, "
          f"label --out DIR, parts of {args.part_size}; {os.cpu_count()} CPUs")
    print("| engine | rows | images/s | peak driver RSS MB |\n|---|---|---|---|")
    for (engine, n), r in results.items():
        print(f"| {engine} | {n:,} | {r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    for engine in args.engines.split(","):
        a, b = results[engine, small], results[engine, large]
        print(f"{engine}: peak driver RSS {b['peak_rss_mb'] - a['peak_rss_mb']:+.0f} MB from {small:,} to {large:,} "
              f"rows (target at most +100); images/s ratio {b['images_per_s'] / a['images_per_s']:.2f} "
              f"(target at least 0.9)")


if __name__ == "__main__":
    main()
