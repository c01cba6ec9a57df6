"""`protext serve` with its default limits, attacked as the cases that once locked it out, at their
sizes: what each attack got, how long normal requests took meanwhile, and what the server's memory did.

The server is the real command in a subprocess on 127.0.0.1, a random CLIP (224 px) saved to a
temporary folder, one label set of 4 classes. Attackers connect from 127.0.0.2 (still loopback),
the normal client from 127.0.0.1; a normal request (one real JPEG, the label set loaded at start)
runs every 0.2 s through every case. Cases:

- 64 requests with head clip80 and 100 new labels each, sent with a 2 s client time-out;
- 64 connections sending one byte every 2 s (slow bodies), and 64 sending their headers at one
  byte a second (slow headers), for 20 s;
- a 70-byte looping EPS file;
- 48 chunked uploads of 31 MiB each, 16 at a time;
- four requests of sixteen 40-megapixel PNGs, and four of two;
- 999 labels in one request (the form parser's own limit is 1,000 fields);
- SIGTERM with a stalled upload: how long until exit, and the exit status.

    python benchmarks/serve_abuse.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from measure import free_port, process_rss_mib

ROOT = Path(__file__).resolve().parents[1]
IMAGE = sorted((ROOT.parent / "shared" / "data" / "images" / "imagenet_sample").iterdir())[0]


class Server:
    def __init__(self, model: Path, work: Path, *flags: str):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "protext", "serve", "--backbone", str(model), "--classes",
                                      "cat,dog,frog,ship", "--port", str(self.port), "--cache-dir", str(work / "cache"),
                                      *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise SystemExit("the server did not start")


def attacker(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    return s


def post(url: str, timeout: float = 120, **kw):
    """A request from the attacker's address, 127.0.0.2."""
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=timeout,
                          transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
            return c.post(url + "/v1/classify", **kw).status_code
    except httpx.TimeoutException:
        return "client time-out"
    except httpx.TransportError as e:
        return type(e).__name__


def png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (20, 120, 220)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def chunked_upload(mib: int):
    yield (b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n"
           b"Content-Type: image/jpeg\r\n\r\n")
    for _ in range(mib * 16):
        yield b"y" * 65536


def drip(port: int, seconds: float, headers_only: bool) -> str:
    s = attacker(port)
    start = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " if headers_only else
             b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
             b"Content-Length: 100000\r\n\r\n--x\r\n")
    try:
        s.sendall(start)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(b"a")
            time.sleep(1 if headers_only else 2)
        return "kept open"
    except OSError:
        s.settimeout(2)
        try:
            return s.recv(200).split(b"\r\n", 1)[0].decode() or "closed"
        except OSError:
            return "closed"
    finally:
        s.close()


def measure(server: Server, attack, label: str) -> dict:
    """Run `attack()` while a normal client sends a request every 0.2 s; statuses, latencies, memory."""
    import httpx

    times, codes, stop, peak = [], [], threading.Event(), [process_rss_mib(server.proc.pid)]
    before = peak[0]

    def normal():
        with httpx.Client(trust_env=False, timeout=120) as c:
            while not stop.is_set():
                t = time.monotonic()
                r = c.post(server.url + "/v1/classify", files=[("images", (IMAGE.name, IMAGE.read_bytes()))])
                times.append(time.monotonic() - t)
                codes.append(r.status_code)
                time.sleep(0.2)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process_rss_mib(server.proc.pid))
            time.sleep(0.05)

    threads = [threading.Thread(target=normal), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        results = attack()
    finally:
        stop.set()
        for t in threads:
            t.join()
    time.sleep(1)
    counted = {}
    for r in results:
        counted[str(r)] = counted.get(str(r), 0) + 1
    return {"case": label, "attack got": ", ".join(f"{k} x{v}" for k, v in sorted(counted.items())),
            "normal": f"{len(codes)} ({sorted(set(codes))})", "normal p50 / max s":
            f"{statistics.median(times):.2f} / {max(times):.2f}" if times else "-",
            "RSS before / peak / after MiB": f"{before:.0f} / {peak[0]:.0f} / {process_rss_mib(server.proc.pid):.0f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20, help="how long the slow connections drip")
    args = ap.parse_args()

    from protext.tiny import save_tiny_clip

    work = Path(tempfile.mkdtemp(prefix="protext-abuse-"))
    model = save_tiny_clip(work / "clip", seed=0, image_size=224, patch=32, vision_width=64, vision_layers=2)
    server = Server(model, work)
    big16 = [("images", (f"{i}.png", png(6324))) for i in range(16)]  # 40 megapixels each
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"
    image = [("images", (IMAGE.name, IMAGE.read_bytes()))]
    cases = [
        ("64 x clip80 with 100 new labels, 2 s client time-out", lambda: list(ThreadPoolExecutor(64).map(
            lambda i: post(server.url, timeout=2, files=image, data={"head": "clip80", "labels": [
                f"label {i} {j}" for j in range(100)]}), range(64)))),
        (f"64 slow bodies, one byte every 2 s, {args.seconds:g} s", lambda: list(ThreadPoolExecutor(64).map(
            lambda _: drip(server.port, args.seconds, False), range(64)))),
        (f"64 slow headers, one byte a second, {args.seconds:g} s", lambda: list(ThreadPoolExecutor(64).map(
            lambda _: drip(server.port, args.seconds, True), range(64)))),
        ("a looping EPS", lambda: [post(server.url, files=[("images", ("loop.eps", eps))])]),
        ("48 chunked uploads of 31 MiB, 16 at a time", lambda: list(ThreadPoolExecutor(16).map(
            lambda _: post(server.url, content=chunked_upload(31), headers={
                "content-type": "multipart/form-data; boundary=x"}), range(48)))),
        ("4 requests of 16 x 40-megapixel PNGs", lambda: list(ThreadPoolExecutor(4).map(
            lambda _: post(server.url, files=big16), range(4)))),
        ("4 requests of 2 x 40-megapixel PNGs", lambda: list(ThreadPoolExecutor(4).map(
            lambda _: post(server.url, files=big16[:2]), range(4)))),
        ("999 labels in one request", lambda: [post(server.url, files=image, data={
            "labels": [f"class {i}" for i in range(999)], "head": "clip"})]),
    ]
    rows = [measure(server, attack, label) for label, attack in cases]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n" + "|---" * len(keys) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |", flush=True)
    stalled = attacker(server.port)
    stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                    b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(60)
    print(f"SIGTERM with a stalled upload: exit status {code} after {time.monotonic() - t0:.1f} s "
          f"(--drain-timeout-s 10)")


if __name__ == "__main__":
    main()
