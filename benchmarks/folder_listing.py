"""Listing an image folder tree for a Ray job: the driver's memory and seconds, on one process and on Ray.

Builds a tree of `--images` files (hard links to a few real CIFAR-10 sample JPEGs from ../shared/data,
`--per-folder` to a folder, 100 folders to a parent) at each size, then, each in its own child
process (so its peak resident memory, getrusage's ru_maxrss, is that run's alone):

- driver: `inputs.collect` then `ListInputs`, what `--engine local` does (and what `--engine ray`
  did before its folders were listed by tasks);
- ray: `distributed.open_ray_inputs` on a local Ray instance (every node on 127.0.0.1): Ray tasks
  list the subfolders into Parquet files, the driver digests them (`listing.FolderListing`).

Both give the same job identity (checked: the same paths, in the same order). Target (the last
lines): the Ray listing's peak driver memory at the largest size at most 100 MB over the smallest's.

    python benchmarks/folder_listing.py [--images 10000,1000000] [--per-folder 1000]
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


def child(args: argparse.Namespace) -> None:
    from protext.inputs import ListInputs, collect

    t0 = time.perf_counter()
    if args.engine == "ray":
        from protext.distributed import connect, open_ray_inputs

        connect(None, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")
        t0 = time.perf_counter()  # the listing, not Ray's start-up
        inputs = open_ray_inputs([args.folder], 4096, Path(args.work) / "_listing", workers=2)
        assert type(inputs).__name__ == "FolderListing", "the tree was listed on the driver"
    else:
        inputs = ListInputs(collect([args.folder]))
    seconds = time.perf_counter() - t0
    print(json.dumps({"identity": inputs.identity(), "seconds": seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="10000,1000000")
    ap.add_argument("--per-folder", type=int, default=1000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    sizes = [int(n) for n in args.images.split(",")]
    sources = sorted(CIFAR.rglob("*.jpg"))[:16]
    results = {}
    with tempfile.TemporaryDirectory(prefix="protext-listing-") as work:
        for n in sizes:
            root = Path(work) / f"tree-{n}"
            t0 = time.perf_counter()
            for i in range(n):
                folder = root / f"{i // (args.per_folder * 100):04d}" / f"{i // args.per_folder % 100:03d}"
                if i % args.per_folder == 0:
                    folder.mkdir(parents=True)
                os.link(sources[i % len(sources)], folder / f"{i:09d}.jpg")
            print(f"{n:,} files made in {time.perf_counter() - t0:.0f} s", flush=True)
            for engine in ("driver", "ray"):
                cmd = [sys.executable, __file__, "--child", "--engine", engine, "--folder", str(root),
                       "--work", str(Path(work) / f"w-{engine}-{n}")]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{engine} at {n} images failed:\n{done.stderr[-3000:]}")
                results[engine, n] = r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{engine} {n:,} images: listed in {r['seconds']:.1f} s, peak driver RSS "
                      f"{r['peak_rss_mb']:.0f} MB", flush=True)
            assert results["driver", n]["identity"] == results["ray", n]["identity"], "the listings differ"
    print(f"\nfolders of {args.per_folder} hard-linked JPEGs; {os.cpu_count()} CPUs; the same paths and order both ways")
    print("| listing | images | seconds | peak driver RSS MB |\n|---|---|---|---|")
    for (engine, n), r in results.items():
        print(f"| {'one process' if engine == 'driver' else 'ray tasks'} | {n:,} | {r['seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")
    small, large = sizes[0], sizes[-1]
    for engine in ("driver", "ray"):
        grow = results[engine, large]["peak_rss_mb"] - results[engine, small]["peak_rss_mb"]
        print(f"{engine}: peak driver RSS {grow:+.0f} MB from {small:,} to {large:,} images"
              + (" (target at most +100)" if engine == "ray" else ""))


if __name__ == "__main__":
    main()
