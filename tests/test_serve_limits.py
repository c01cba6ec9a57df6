"""`protext serve` tried as an attacker would, on 127.0.0.1 only: every case refused with a 4xx (or
503), nothing ever answered 5xx, normal requests still served within a bound, memory within the
README's bound, and a shutdown that drains and exits 0. Attackers connect from 127.0.0.2 (still
loopback), so that limits per client address do not also refuse the normal client."""

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import SHARED

from protext.api import Access, create_app
from protext.backbone import load_backbone
from protext.context import Context
from protext.heads import HeadInputs
from protext.serve import ApiError, Busy, Limits, Service

CIFAR = SHARED / "images" / "cifar10_test_sample"
IMAGE = sorted((CIFAR / "cat").iterdir())[0]
LOCAL = "http://127.0.0.1:8000"
ATTACKER = "127.0.0.2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(timeout=60):
    return httpx.Client(trust_env=False, timeout=timeout)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def start(tiny_folder, folder, *flags):
    port = free_port()
    log = open(folder / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "protext", "serve", "--backbone", str(tiny_folder), "--classes",
                             "cat,dog,frog,ship", "--port", str(port), "--cache-dir", str(folder / "cache"), *flags],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with client() as c:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the server did not start:\n" + (folder / "server.log").read_text())
            try:
                if c.get(url + "/readyz").status_code == 200:
                    return proc, url, port
            except httpx.TransportError:
                time.sleep(0.2)


LIMITS = ["--header-timeout-s", "2", "--body-timeout-s", "3", "--request-timeout-s", "20",
          "--max-connections-per-client", "8", "--max-connections", "64", "--max-upload-mb", "4",
          "--max-inflight-mb", "16", "--max-pixels", "4000000", "--max-request-pixels", "6000000",
          "--max-new-texts", "300", "--drain-timeout-s", "3"]


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("abused")
    proc, url, port = start(tiny_folder, folder, *LIMITS)
    yield proc, url, port
    proc.kill()
    proc.wait()


def post(url, **kw):
    with client() as c:
        return c.post(url + "/v1/classify", **kw)


def classify(url, files=None, data=None, **kw):
    files = files or [("images", (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"))]
    with client() as c:
        return c.post(url + "/v1/classify", files=files, data=data or {}, **kw)


PART = (b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n")


def chunked(chunks, size=65536):
    """A multipart body without a length, sent in chunks: one file part that goes on and on."""
    yield PART
    for _ in range(chunks):
        yield b"y" * size


def attacker_socket(port):
    s = socket.socket()
    s.bind((ATTACKER, 0))
    s.connect(("127.0.0.1", port))
    return s


def answer_of(s, limit_s=10):
    """The status line a server sends on a raw connection (or '' when it just closed it)."""
    s.settimeout(limit_s)
    try:
        data = s.recv(4096)
    except (TimeoutError, ConnectionResetError):
        return ""
    return data.split(b"\r\n", 1)[0].decode()


def test_slow_headers_are_dropped_and_a_normal_client_is_still_served(server):
    proc, url, port = server
    slow = [attacker_socket(port) for _ in range(6)]
    for s in slow:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and then nothing more, ever
    t0 = time.monotonic()
    assert classify(url).status_code == 200 and time.monotonic() - t0 < 5
    assert all(answer_of(s).startswith("HTTP/1.1 408") for s in slow)  # closed after --header-timeout-s
    assert time.monotonic() - t0 < 8


def test_connections_are_capped_per_client_address_and_the_others_still_get_in(server):
    proc, url, port = server
    idle = [attacker_socket(port) for _ in range(8)]
    time.sleep(0.3)
    extra = attacker_socket(port)
    assert answer_of(extra).startswith("HTTP/1.1 503")  # the ninth from 127.0.0.2
    assert classify(url).status_code == 200  # 127.0.0.1 is another client
    for s in idle:
        s.close()


def test_a_slow_body_gets_408_and_no_slot_is_kept(server):
    proc, url, port = server
    body_start = b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n"
    slow = attacker_socket(port)
    slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n" + body_start)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 6:
        try:
            slow.sendall(b"x")  # one byte a fifth of a second: far below what the body needs
        except OSError:
            break
        time.sleep(0.2)
    assert answer_of(slow).startswith("HTTP/1.1 408")
    assert 2.5 < time.monotonic() - t0 < 6.5  # --body-timeout-s 3


def png_bomb(width, height):
    """A valid PNG that says it is width x height: a few hundred bytes that would decode to gigabytes."""
    def chunk(kind, data):
        import struct
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    import struct
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def big_png(pixels_side):
    buffer = io.BytesIO()
    Image.new("RGB", (pixels_side, pixels_side), (20, 120, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_abuse_is_a_4xx_while_normal_traffic_is_served_and_memory_stays_bounded(server):
    proc, url, port = server
    before = rss_mb(proc.pid)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"
    two_mp = big_png(1500)  # 2.25 megapixels each, under --max-pixels 4,000,000
    abuses = {
        "decompression bomb": lambda: classify(url, files=[("images", ("b.png", png_bomb(30_000, 30_000)))]),
        "looping EPS": lambda: classify(url, files=[("images", ("loop.eps", eps))]),
        "malformed multipart": lambda: post(url, content=b"--x\r\nnonsense",
                                            headers={"content-type": "multipart/form-data; boundary=x"}),
        "100,000 labels": lambda: classify(url, data={"labels": [f"label {i}" for i in range(100_000)]}),
        "an expensive new label set": lambda: classify(url, data={"labels": [f"thing {i}" for i in range(20)],
                                                                  "head": "clip80"}),
        "images over the request's pixel budget": lambda: classify(
            url, files=[("images", (f"{i}.png", two_mp)) for i in range(3)]),
        "a chunked body over the limit": lambda: post(url, content=chunked(80),
                                                     headers={"content-type": "multipart/form-data; boundary=x"}),
        "a page on another site": lambda: classify(url, headers={"Origin": "http://evil.example"}),
        "a rebinding host name": lambda: classify(url, headers={"Host": "evil.example"}),
        "a head the server cannot run": lambda: classify(url, data={"head": "cupl"}),
    }
    want = {"decompression bomb": 413, "looping EPS": 415, "malformed multipart": 400, "100,000 labels": 413,
            "an expensive new label set": 413, "images over the request's pixel budget": 413,
            "a chunked body over the limit": 413, "a page on another site": 403, "a rebinding host name": 421,
            "a head the server cannot run": 400}
    normal_times, statuses = [], {}
    stop = threading.Event()

    def normal_traffic():
        while not stop.is_set():
            t = time.monotonic()
            r = classify(url)
            normal_times.append((time.monotonic() - t, r.status_code))

    background = threading.Thread(target=normal_traffic)
    background.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(2):  # each abuse twice, four at a time
                for name, status in zip(abuses, pool.map(lambda f: f().status_code, abuses.values())):
                    statuses.setdefault(name, set()).add(status)
    finally:
        stop.set()
        background.join()
    assert {name: sorted(s) for name, s in statuses.items()} == {name: [code] for name, code in want.items()}
    assert normal_times and all(code == 200 for _, code in normal_times)
    assert max(t for t, _ in normal_times) < 5, normal_times
    grew = rss_mb(proc.pid) - before
    assert grew < 300, f"the server grew by {grew:.0f} MiB"  # the README's bound for these limits


def test_chunked_uploads_hold_no_more_than_the_in_flight_budget(server):
    proc, url, port = server
    before, peak, stop = rss_mb(proc.pid), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()

    def upload(_):  # 3.5 MiB each, no length: counted as it arrives
        return post(url, content=chunked(56), headers={"content-type": "multipart/form-data; boundary=x"}).status_code

    try:
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(upload, range(24)))
    finally:
        stop.set()
        sampler.join()
    assert set(codes) <= {400, 503} and 400 in codes  # read whole and refused (no closing boundary), or turned away
    assert peak[0] - before < 16 * 3 + 64, f"peak {peak[0] - before:.0f} MiB over {before:.0f}"


def test_readiness_metrics_and_health(server):
    proc, url, port = server
    with client() as c:
        assert c.get(url + "/healthz").json()["status"] == "ok"
        ready = c.get(url + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        text = c.get(url + "/metrics").text
    assert 'protext_requests_total{path="/v1/classify",status="200"}' in text
    assert "protext_request_seconds_bucket" in text and "protext_batch_images_count" in text
    assert "protext_queue_images" in text and "protext_label_sets_cached" in text
    with client() as c:
        info = c.get(url + "/v1/label-sets").json()
    assert "/" not in info["backbone"] and info["backbone"].endswith("(local folder)")  # no path of this machine
    assert "cupl" not in info["heads"] and "dclip" not in info["heads"]  # only heads it can run


def test_sigterm_with_a_stalled_upload_drains_and_exits_0_and_a_second_one_stops_at_once(tiny_folder, tmp_path):
    proc, url, port = start(tiny_folder, tmp_path, *LIMITS[:-1], "10", "--body-timeout-s", "30")
    stalled = attacker_socket(port)
    stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                    b"boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0 and time.monotonic() - t0 < 10 + 5  # within --drain-timeout-s
    proc, url, port = start(tiny_folder, tmp_path, *LIMITS[:-1], "60", "--body-timeout-s", "120")
    stalled = attacker_socket(port)
    stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                    b"boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proc.poll() is None  # draining
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0 and time.monotonic() - t0 < 10


# -- the service itself, with a slow encoder ---------------------------------------------------

@pytest.fixture(scope="module")
def backbone(tiny_folder):
    return load_backbone(str(tiny_folder), device="cpu")


def slow_service(backbone, tmp_path, seconds, **limits):
    service = Service(backbone, HeadInputs(), {"base": ["cat", "dog"]}, limits=Limits(**limits), ctx=Context(tmp_path))
    real = service._make

    def slow(labels, head):
        time.sleep(seconds)
        return real(labels, head)

    service._make = slow
    return service


def test_encodings_nobody_waits_for_are_dropped_and_pending_sets_are_capped(backbone, tmp_path):
    service = slow_service(backbone, tmp_path, 0.5, max_pending_label_sets=3)

    async def scenario():
        service.start()
        tasks = [asyncio.ensure_future(service.classifier("clip", [f"new {i}", "x"])) for i in range(3)]
        await asyncio.sleep(0.1)
        with pytest.raises(Busy, match="3 new label sets are waiting to be encoded"):
            await service.classifier("clip", ["one more", "y"])
        assert not service.readiness()[0]
        for t in tasks:
            t.cancel()  # every client gave up
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(1.0)
        counts = dict(service.counts)
        ready = service.readiness()[0]
        service.close()
        return counts, ready

    counts, ready = asyncio.run(scenario())
    assert counts["label_sets_dropped"] >= 2 and counts["label_sets_encoded"] <= 1  # the first had started
    assert ready


def test_a_new_label_set_is_costed_before_anything_is_encoded(backbone, tmp_path):
    service = Service(backbone, HeadInputs(), limits=Limits(max_new_texts=100), ctx=Context(tmp_path))
    before = sorted((tmp_path / "text").rglob("*.safetensors"))

    async def scenario():
        service.start()
        try:
            with pytest.raises(ApiError, match="needs 160 new sentences encoded, more than the limit of 100"):
                await service.classifier("clip80", ["a", "b"])
            return await service.classifier("clip80", ["a"])  # 80 texts: allowed
        finally:
            service.close()

    assert asyncio.run(scenario()).weights.shape[0] == 1
    assert before == [] and service.counts["refused_new_texts"] == 1


def test_a_request_over_its_deadline_gets_504_and_the_next_is_served(backbone, tmp_path):
    service = slow_service(backbone, tmp_path, 3, request_timeout_s=0.5)
    image = [("images", (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"))]
    with TestClient(create_app(service), base_url=LOCAL) as c:
        t0 = time.monotonic()
        r = c.post("/v1/classify", files=image, data={"labels": ["slow", "set"]})
        assert r.status_code == 504 and "--request-timeout-s" in r.json()["error"] and time.monotonic() - t0 < 2
        assert c.post("/v1/classify", files=image).status_code == 200  # the set loaded at start


def test_an_api_key_guards_the_api_but_not_health(backbone, tmp_path):
    service = Service(backbone, HeadInputs(), {"base": ["cat", "dog"]}, ctx=Context(tmp_path))
    image = [("images", (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"))]
    with TestClient(create_app(service, Access(api_key="s3cret")), base_url=LOCAL) as c:
        refused = c.post("/v1/classify", files=image)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/classify", files=image, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/classify", files=image, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/label-sets", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200 and c.get("/").status_code == 200
        same_origin = c.post("/v1/classify", files=image, headers={"Authorization": "Bearer s3cret", "Origin": LOCAL})
        assert same_origin.status_code == 200  # the page's own requests


def test_max_labels_takes_effect_beyond_the_form_parsers_default(backbone, tmp_path):
    service = Service(backbone, HeadInputs(), limits=Limits(max_labels=1500, max_new_texts=5000), ctx=Context(tmp_path))
    image = [("images", (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"))]
    with TestClient(create_app(service), base_url=LOCAL) as c:
        ok = c.post("/v1/classify", files=image, data={"labels": [f"class {i}" for i in range(1200)], "top_k": "2"})
        assert ok.status_code == 200, ok.text
        over = c.post("/v1/classify", files=image, data={"labels": [f"class {i}" for i in range(1501)]})
        assert over.status_code in (400, 413) and "--max-labels" in over.json()["error"]
    assert json.loads(json.dumps(ok.json()))["labels"] == 1200
