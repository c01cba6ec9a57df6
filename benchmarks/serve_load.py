"""`protext serve` under load: N concurrent clients on 127.0.0.1, with batching vs one image per forward.

The server is the real command (`python -m protext serve`) in a subprocess, on a randomly
initialised CLIP saved to a temporary folder (default: ViT-B/32-shaped image tower, 224 px;
`--vit-b16` for ViT-B/16), plain `clip` head, one label set of 100 classes. Each of
`--clients` threads sends `--requests` requests of one real ImageNet JPEG each, all at once.
It runs twice, on two fresh servers:

- batching: `--max-batch 32 --max-wait-ms 10` (the defaults);
- one at a time: `--max-batch 1`, every image its own forward pass.

For each: images/s over the whole load, p50 and p99 request latency, the server's resident
memory before the load and its peak during it (sampled every 20 ms from /proc). Nothing
leaves the loopback address.

Beside them, in the same run, a bare batched forward: the same model loaded in this process,
the same images decoded and preprocessed beforehand (not timed), batches of `--max-batch`
through the image tower and the head's softmax, fastest of two rounds. The last lines are
the ratios of images per second: batching over one at a time, and serve's efficiency,
batching over the bare forward (target under 16 clients: at least 0.9).

    python benchmarks/serve_load.py [--clients 16] [--requests 6] [--vit-b16] [--precision int8] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from measure import free_port, process_rss_mib

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "images" / "imagenet_sample"


def run_load(model: Path, classes: Path, max_batch: int, clients: int, requests: int, images: list[bytes],
             cache: Path, precision: str = "fp32", device: str = "cpu", max_wait_ms: float = 10.0) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "protext", "serve", "--backbone", str(model), "--head", "clip",
                               "--classes", str(classes), "--host", "127.0.0.1", "--port", str(port), "--max-batch",
                               str(max_batch), "--max-requests", str(4 * clients), "--max-queue", str(4 * clients),
                               "--cache-dir", str(cache), "--precision", precision, "--device", device,
                               "--max-wait-ms", str(max_wait_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        with httpx.Client(trust_env=False, timeout=600) as client:
            while True:
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                try:
                    client.get(url + "/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            for data in images[:2]:  # warm-up: the first forward passes are slower
                client.post(url + "/v1/classify", files=[("images", ("w.jpg", data))])
        before = process_rss_mib(server.pid)
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(process_rss_mib(server.pid))
                time.sleep(0.02)

        latencies: list[float] = []
        failures: list[str] = []
        start = threading.Barrier(clients + 1)

        def client_thread(k: int) -> None:
            with httpx.Client(trust_env=False, timeout=600) as client:
                start.wait()
                for r in range(requests):
                    data = images[(k * requests + r) % len(images)]
                    t0 = time.perf_counter()
                    answer = client.post(url + "/v1/classify", files=[("images", (f"{k}-{r}.jpg", data))])
                    latencies.append(time.perf_counter() - t0)
                    if answer.status_code != 200:
                        failures.append(answer.text)

        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(clients)]
        sampler = threading.Thread(target=sample)
        for t in threads:
            t.start()
        sampler.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        with httpx.Client(trust_env=False) as client:
            batching = client.get(url + "/healthz").json()["batching"]
    finally:
        server.terminate()
        server.wait(30)
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    latencies.sort()
    return {"images_per_s": len(latencies) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], "rss_before": before,
            "rss_peak": max(peak), "largest_batch": batching["largest_batch"],
            "mean_batch": batching["images"] / max(1, batching["forward_passes"])}


def bare_forward(model: Path, classes: Path, images: list[bytes], batch: int, precision: str, device: str,
                 cache: Path) -> float:
    """Images/s of the same model and head on pre-decoded images, in batches of `batch` (fastest of two rounds)."""
    import io

    import torch

    from protext.classifier import ProTextClassifier
    from protext.context import Context
    from PIL import Image

    from protext.images import load_pixels

    clf = ProTextClassifier.from_backbone(str(model), classes.read_text().split("\n")[:-1],
                                          Context(cache, device, progress=False), head="clip", precision=precision)
    tower = clf.backbone.image
    pixels = [load_pixels(Image.open(io.BytesIO(data)), tower.image_size, tower.mean, tower.std) for data in images]
    cuda = device.startswith("cuda")

    def one_round() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch):
            clf.logits(tower(torch.stack(pixels[i: i + batch]).to(device)).cpu()).softmax(-1)
        if cuda:
            torch.cuda.synchronize()
        return len(pixels) / (time.perf_counter() - t0)

    one_round()  # warm-up, as the server's
    return max(one_round(), one_round())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=6, help="requests per client, one image each")
    ap.add_argument("--vit-b16", action="store_true", help="ViT-B/16's image tower instead of ViT-B/32's")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the server and the bare forward")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="serve --max-wait-ms of the batching server "
                                                                    "(0: latency of one client, nothing to wait for)")
    args = ap.parse_args()

    from protext.tiny import save_tiny_clip

    images = [f.read_bytes() for f in sorted(IMAGES.iterdir())]
    patch = 16 if args.vit_b16 else 32
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_clip(Path(tmp) / "model", seed=0, width=512, layers=12, heads=8, projection=512,
                               vision_width=768, vision_layers=12, vision_heads=12, image_size=224, patch=patch)
        classes = Path(tmp) / "classes.txt"
        classes.write_text("".join(f"class number {i}\n" for i in range(100)))
        servers = ((f"batching (max batch 32, max wait {args.max_wait_ms:g} ms)", 32), ("one at a time (max batch 1)", 1))
        results = {name: run_load(model, classes, max_batch, args.clients, args.requests, images,
                                  Path(tmp) / f"cache-{max_batch}", args.precision, args.device,
                                  args.max_wait_ms if max_batch > 1 else 0.0)
                   for name, max_batch in servers}  # each server encodes its label set itself
        load = [images[i % len(images)] for i in range(args.clients * args.requests)]  # the images the load sent
        bare = bare_forward(model, classes, load, 32, args.precision, args.device, Path(tmp) / "cache-bare")

    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device}, {args.precision}; ViT-B/{patch}-shaped random CLIP, 224 px, clip head, 100 classes; "
          f"{args.clients} concurrent clients x {args.requests} requests of 1 real JPEG; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print("| server | images/s | p50 latency s | p99 latency s | mean / largest batch | RSS before MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_s']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['mean_batch']:.1f} / "
              f"{r['largest_batch']} | {r['rss_before']:.0f} | {r['rss_peak']:.0f} |")
    print(f"| bare batched forward (batch 32, pre-decoded, same process) | {bare:.2f} | | | | | |")
    batched, single = results.values()
    print(f"batching / one at a time images per second: {batched['images_per_s'] / single['images_per_s']:.2f}")
    print(f"serve efficiency, batching / bare batched forward images per second: {batched['images_per_s'] / bare:.2f}")


if __name__ == "__main__":
    main()
