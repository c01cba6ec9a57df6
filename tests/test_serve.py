import asyncio
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import websocket
from fastapi.testclient import TestClient
from PIL import Image
from support import SHARED

from protext.context import Context
from protext.heads import HeadInputs
from protext.api import create_app
from protext.backbone import load_backbone
from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.errors import ProtextError
from protext.model import ProText
from protext.serve import Batcher, Busy, Limits, Service, load_label_sets

CLASSES = ["airplane", "cat", "frog", "ship"]
CIFAR = SHARED / "images" / "cifar10_test_sample"
LOCAL = "http://127.0.0.1:8000"  # the Host header the server answers to (a test client says "testserver")


@pytest.fixture(scope="module")
def prompts(prompts_dir, tiny_folder):
    return ProText.from_pretrained(prompts_dir, backbone=load_backbone(str(tiny_folder), device="cpu"))


def uploads(paths):
    return [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def tops(body):
    return [[(t["label"], t["prob"]) for t in r["top"]] for r in body["results"]]


def assert_same_top(got, want):
    assert [[c for c, _ in g] for g in got] == [[c for c, _ in w] for w in want]
    assert [p for g in got for _, p in g] == pytest.approx([p for w in want for _, p in w], abs=1e-5)


# A PostScript file that loops for ever: PIL would hand it to Ghostscript, which never returns.
EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"


def png_header(width, height):
    """A small PNG file that claims to be width x height: what a decompression bomb looks like to a header reader."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def test_classify_answers_as_the_classifier_and_encodes_each_label_set_once(prompts, tmp_path):
    backbone = prompts.backbone
    service = Service(backbone, HeadInputs(prompts), {"cifar": CLASSES}, ctx=Context(tmp_path))
    files = sorted((CIFAR / "cat").iterdir())[:3]
    labels = ["dog", "cat", "ship"]
    with TestClient(create_app(service), base_url=LOCAL) as client:
        r = client.post("/v1/classify", files=uploads(files), data={"labels": labels, "top_k": "2"})
        assert r.status_code == 200 and r.json()["head"] == "protext" and r.json()["label_set"] is None
        assert [x["image"] for x in r.json()["results"]] == [f.name for f in files]
        assert_same_top(tops(r.json()), ProTextClassifier(backbone, labels, inputs=HeadInputs(prompts)).predict(files).top(2))
        assert client.get("/healthz").json()["label_sets_encoded"] == 1
        r = client.post("/v1/classify", files=uploads(files[:1]), data={"labels": labels})
        assert r.status_code == 200 and client.get("/healthz").json()["label_sets_encoded"] == 1  # not encoded again

        r = client.post("/v1/classify", files=uploads(files))  # no labels: the first set loaded at start
        assert r.json()["label_set"] == "cifar" and all(len(x["top"]) == 4 for x in r.json()["results"])  # top 5 of 4
        assert_same_top(tops(r.json()), ProTextClassifier(backbone, CLASSES, inputs=HeadInputs(prompts)).predict(files).top(4))
        r = client.post("/v1/classify", files=uploads(files), data={"label_set": "cifar", "head": "clip", "top_k": "3"})
        assert r.json()["head"] == "clip"
        assert_same_top(tops(r.json()), ProTextClassifier(backbone, CLASSES, head="clip").predict(files).top(3))
        assert client.get("/healthz").json()["label_sets_encoded"] == 2

        info = client.get("/v1/label-sets").json()
        assert info["label_sets"] == [{"name": "cifar", "size": 4, "labels": CLASSES}]
        assert info["default_label_set"] == "cifar" and info["heads"][0] == info["default_head"] == "protext"
        page = client.get("/")
        assert page.status_code == 200 and "/v1/classify" in page.text and "/v1/label-sets" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(prompts, tmp_path):
    limits = Limits(max_upload_mb=0.05, max_images=2, max_labels=3, max_label_chars=20, max_pixels=100_000)
    service = Service(prompts.backbone, HeadInputs(prompts), {"cifar": CLASSES[:3]}, limits=limits, ctx=Context(tmp_path))
    good = sorted((CIFAR / "frog").iterdir())[0]
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 400), (10, 200, 30)).save(big)  # 160,000 pixels, a small file
    cases = [
        ({"files": [("images", ("huge.bin", os.urandom(60_000)))]}, 413, "over the limit of 0.05 MiB (--max-upload-mb)"),
        ({"files": [("images", ("bomb.png", png_header(20_000, 20_000)))]}, 413, "bomb.png: Image size (400000000 pixels) exceeds limit"),
        ({"files": uploads([big])}, 413, "big.png: 400 x 400 = 160000 pixels, more than the limit of 100000 (--max-pixels)"),
        ({"files": [("images", ("notes.txt", b"just some text"))]}, 415, "notes.txt: not an image"),
        ({"files": [("images", ("cut.jpg", good.read_bytes()[: len(good.read_bytes()) * 2 // 3]))]}, 422, "cut.jpg: the image could not be decoded"),
        ({"files": uploads([good] * 3)}, 413, "3 images, more than the limit of 2 per request (--max-images)"),
        ({"files": uploads([good]), "data": {"labels": ["a", "b", "c", "d"]}}, 400, "4 labels, more than the limit of 3"),
        ({"files": uploads([good]), "data": {"labels": ["cat", " ", "dog"]}}, 400, "labels: label 2 is empty"),
        ({"files": uploads([good]), "data": {"labels": ["cat", "x" * 21]}}, 400, "label 2 has 21 characters"),
        ({"files": uploads([good]), "data": {"labels": ["cat", "Cat"]}}, 400, "class names repeat"),
        ({"files": uploads([good]), "data": {"head": "nope"}}, 400, "unknown head 'nope'"),
        ({"files": uploads([good]), "data": {"label_set": "dogs"}}, 400, "unknown label set 'dogs'; known: cifar"),
        ({"files": uploads([good]), "data": {"label_set": "cifar", "labels": ["a"]}}, 400, "not both"),
        ({"files": uploads([good]), "data": {"top_k": "0"}}, 400, "top_k must be at least 1"),
        ({"files": uploads([good]), "data": {"top_k": "many"}}, 422, "top_k: must be a whole number, got 'many'"),
        ({"files": uploads([good]), "data": {"scores": "softmax"}}, 422, "unknown form field(s) 'scores'"),
        ({"files": [("images", ("loop.eps", EPS_LOOP))]}, 415, "loop.eps: not an image in a format protext reads"),
        ({"files": uploads([good]), "data": {"top_k": ["1", "2"]}}, 422, "top_k: given 2 times"),
        ({"files": uploads([good]), "data": {"activation": "sigmoid"}}, 400, "sigmoid probabilities need"),
        ({"data": {"labels": ["cat"]}}, 400, "no images: send one or more files in the 'images' field"),
    ]
    with TestClient(create_app(service), base_url=LOCAL) as client:
        for request, status, message in cases:
            r = client.post("/v1/classify", **request)
            assert r.status_code == status, (message, r.text)
            assert list(r.json()) == ["error"] and message in r.json()["error"], r.text
            assert "Traceback" not in r.text
        chunked = client.post("/v1/classify", content=(b"x" * 10_000 for _ in range(10)),
                              headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413 and "--max-upload-mb" in chunked.json()["error"]  # no length given
        missing = client.get("/v2/classify")
        assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/v1/classify", files=uploads([good])).status_code == 200


def test_an_internal_error_is_a_json_500_that_names_nothing_and_the_next_request_works(prompts, tmp_path, monkeypatch):
    service = Service(prompts.backbone, HeadInputs(prompts), {"cifar": CLASSES}, ctx=Context(tmp_path))
    real, failing = service.image_features, [True]

    def flaky(pixels):
        if failing[0]:
            raise RuntimeError("secret detail at /srv/model.py line 12")
        return real(pixels)

    monkeypatch.setattr(service, "image_features", flaky)
    image = sorted((CIFAR / "ship").iterdir())[:1]
    with TestClient(create_app(service), base_url=LOCAL, raise_server_exceptions=False) as client:
        r = client.post("/v1/classify", files=uploads(image))
        assert r.status_code == 500 and r.json() == {"error": "internal error; the server log has the details"}
        assert "secret" not in r.text and "Traceback" not in r.text
        failing[0] = False
        assert client.post("/v1/classify", files=uploads(image)).status_code == 200


def test_batcher_shares_forward_passes_between_callers_and_bounds_its_queue():
    sizes = []

    def forward(batch):
        sizes.append(len(batch))
        if (batch < 0).any():
            raise ValueError("negative")
        return batch * 2

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(forward, max_batch=6, max_wait_s=30, max_queue=7, executor=pool)
            worker = asyncio.get_running_loop().create_task(batcher.run())
            items = [torch.full((2,), float(i)) for i in range(7)]
            three = await asyncio.gather(batcher.features(items[:2]), batcher.features(items[2:4]),
                                         batcher.features(items[4:6]))
            batcher.max_batch, batcher.max_wait_s = 3, 0.05
            seven = await batcher.features(items)
            with pytest.raises(Busy, match="--max-queue 7"):
                await batcher.features(items + items[:1])
            with pytest.raises(ValueError, match="negative"):
                await batcher.features([torch.full((2,), -1.0)])
            after = await batcher.features(items[:1])
            worker.cancel()
            return three, seven, after, batcher.stats

    three, seven, after, stats = asyncio.run(scenario())
    assert sizes == [6, 3, 3, 1, 1, 1]  # three callers in one pass; then max_batch 3; a failed pass; the worker lives on
    assert [t.tolist() for t in three] == [[[0, 0], [2, 2]], [[4, 4], [6, 6]], [[8, 8], [10, 10]]]
    assert seven.tolist() == [[2.0 * i] * 2 for i in range(7)] and after.tolist() == [[0.0, 0.0]]
    assert stats == {"forward_passes": 5, "images": 14, "largest_batch": 6}


def test_openapi_schema_documents_the_api(prompts, tmp_path):
    with TestClient(create_app(Service(prompts.backbone, HeadInputs(prompts), ctx=Context(tmp_path))),
                    base_url=LOCAL) as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 404  # its page loads scripts from a CDN
    assert set(schema["paths"]) == {"/v1/classify", "/v1/label-sets", "/healthz", "/readyz", "/metrics"}
    post = schema["paths"]["/v1/classify"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]] if "$ref" in form else form
    assert set(form["properties"]) == {"images", "labels", "label_set", "head", "top_k", "activation", "explain"}
    assert {"200", "400", "401", "403", "408", "413", "415", "422", "503", "504"} <= set(post["responses"])
    assert "ErrorBody" in schema["components"]["schemas"] and "Classified" in schema["components"]["schemas"]


def test_label_sets_and_limits_from_the_command_line(tmp_path, tiny_folder, capsys):
    (tmp_path / "pets.txt").write_text("cat\ndog\n")
    sets = load_label_sets([str(tmp_path / "pets.txt"), "food=pizza,sushi", "a,b"])
    assert sets == {"pets": ["cat", "dog"], "food": ["pizza", "sushi"], "labels": ["a", "b"]}
    with pytest.raises(ProtextError, match="a second label set named 'labels'; name it: --classes NAME=c,d"):
        load_label_sets(["a,b", "c,d"])
    with pytest.raises(ProtextError, match="--max-batch must be a whole number, at least 1, got 0"):
        Limits(max_batch=0)
    assert main(["serve", "--backbone", str(tiny_folder), "--max-queue", "0"]) == 2
    assert "--max-queue must be a whole number, at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompts", "--classes", "--head", "--host", "--port", "--max-upload-mb", "--max-pixels", "--max-labels",
                 "--max-batch", "--max-wait-ms", "--max-queue", "--max-requests", "--label-cache", "--backbone"):
        assert flag in text, flag


# -- a real server on 127.0.0.1 ----------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_client():
    return httpx.Client(trust_env=False, timeout=120)  # no proxy from the environment: loopback only


@pytest.fixture(scope="module")
def server(prompts_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    (folder / "cifar.txt").write_text("\n".join(CLASSES) + "\n")
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "protext", "serve", "--prompts", str(prompts_dir), "--classes",
                             str(folder / "cifar.txt"), "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8",
                             "--max-wait-ms", "500", "--cache-dir", str(folder / "cache")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with local_client() as client:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the server did not start:\n" + (folder / "server.log").read_text())
            try:
                if client.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


def test_real_server_batches_concurrent_requests_and_answers_as_the_classifier(server, prompts_dir):
    labels = ["dog", "cat", "frog", "ship", "truck"]  # a set no request has sent yet
    files = sorted((CIFAR / "cat").iterdir())[:4] + sorted((CIFAR / "frog").iterdir())[:4]
    with local_client() as client:
        before = client.get(server + "/healthz").json()
    start = threading.Barrier(len(files))

    def ask(path):
        with local_client() as client:
            start.wait()
            return client.post(server + "/v1/classify", files=uploads([path]), data={"labels": labels, "top_k": "3"})

    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(ask, files))
    with local_client() as client:
        after = client.get(server + "/healthz").json()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    want = ProTextClassifier.from_prompts(prompts_dir, labels, Context(device="cpu")).predict(files).top(3)
    assert_same_top([tops(a.json())[0] for a in answers], want)
    passes = after["batching"]["forward_passes"] - before["batching"]["forward_passes"]
    assert after["batching"]["images"] - before["batching"]["images"] == len(files)
    assert after["batching"]["largest_batch"] >= 2 and passes < len(files)  # batched
    assert after["label_sets_encoded"] - before["label_sets_encoded"] == 1  # 8 concurrent first requests, one encoding


# -- the page in a real headless Chromium -----------------------------------------------------
class DevTools:
    """A minimal Chrome DevTools Protocol client on one page's websocket; events are kept in `events`."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True, http_no_proxy=["127.0.0.1"])
        self.next_id, self.events = 0, []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, limit_s=120):
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never got to: {expression}")


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("this test needs Debian's chromium package (apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
         "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1280,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "wb"))
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        port = int(port_file.read_text().split()[0])
        with local_client() as client:
            pages = [t for t in client.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield devtools
        devtools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_classifies_an_uploaded_image_in_headless_chromium(server, chromium, tmp_path):
    image = tmp_path / "frog.jpg"
    shutil.copy(sorted((CIFAR / "frog").iterdir())[2], image)
    page = chromium
    page.call("Network.enable")
    page.call("Page.enable")
    page.call("Page.navigate", url=server + "/")
    page.wait_for("document.body && document.body.dataset.ready === '1'")
    assert page.evaluate("document.querySelector('#labels').value") == "\n".join(CLASSES)  # the set loaded at start
    assert page.evaluate("[...document.querySelectorAll('#head option')].map(o => o.value)")[0] == "protext"
    page.evaluate("""(() => {
        const labels = document.querySelector('#labels');
        labels.value = 'dog\\ncat\\nfrog\\nship\\n';
        labels.dispatchEvent(new Event('input'));
        document.querySelector('#top-k').value = '3';
    })()""")
    assert page.evaluate("document.querySelector('#label-set').value") == ""  # edited: a custom label set
    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    page.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
    rows = page.wait_for("document.querySelectorAll('.result .row').length === 3 && [...document.querySelectorAll("
                         "'.result .row')].map(r => [r.querySelector('.label').textContent, "
                         "r.querySelector('.pct').textContent, r.querySelector('.bar').style.width])")
    assert page.evaluate("document.querySelector('.result h2').textContent") == "frog.jpg"
    assert page.evaluate("document.querySelector('.result img').naturalWidth") > 0  # the thumbnail shows

    with local_client() as client:
        answer = client.post(server + "/v1/classify", files=uploads([image]),
                             data={"labels": ["dog", "cat", "frog", "ship"], "top_k": "3", "head": "protext"}).json()
    want = [[t["label"], f"{t['prob'] * 100:.1f}%", f"{t['prob'] * 100:.1f}%"] for t in answer["results"][0]["top"]]
    assert rows == want
    shot = tmp_path / "page.png"
    shot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
    with Image.open(shot) as im:
        assert im.size[0] >= 800 and im.getextrema() != ((255, 255), (255, 255), (255, 255))
    print(f"screenshot: {shot}")
    urls = [e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith((server + "/", "blob:", "data:")) for u in urls), urls
    assert {u[len(server):] for u in urls if u.startswith(server)} == {"/", "/v1/label-sets", "/v1/classify"}


def test_the_page_says_what_is_wrong_takes_label_files_and_works_by_keyboard(server, chromium, tmp_path):
    page = chromium
    page.call("Page.enable")
    page.call("Page.navigate", url=server + "/")
    page.wait_for("document.body && document.body.dataset.ready === '1'")
    long_label = "a very long label that names a rather particular kind of frog"
    (tmp_path / "labels.txt").write_text(f"cat\n{long_label}\nship\n")
    image = tmp_path / "frog.jpg"
    shutil.copy(sorted((CIFAR / "frog").iterdir())[0], image)
    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    page.call("DOM.setFileInputFiles", files=[str(tmp_path / "labels.txt"), str(image)], nodeId=node)
    page.wait_for("document.querySelectorAll('.result').length === 1")
    assert page.evaluate("document.querySelector('#labels').value") == f"cat\n{long_label}\nship"
    assert "labels from labels.txt" in page.evaluate("document.querySelector('#status').textContent")
    shown = page.evaluate("[...document.querySelectorAll('.result .label')].map(l => [l.textContent, "
                          "l.scrollWidth <= l.clientWidth + 1])")
    assert [long_label, True] in shown  # the whole label, not cut at a few characters

    page.evaluate("document.querySelector('#labels').value = ''; document.querySelector('#label-set').value = ''")
    page.evaluate("document.querySelector('#classify').click()")
    page.wait_for("document.querySelector('#status').className === 'error'")
    assert "Enter the labels" in page.evaluate("document.querySelector('#status').textContent")
    assert page.evaluate("document.querySelectorAll('.result').length") == 0  # old results do not stand beside it

    page.evaluate("document.activeElement.blur()")
    for _ in range(12):  # Tab through the page until the file chooser has the focus
        for kind in ("keyDown", "keyUp"):
            page.call("Input.dispatchKeyEvent", type=kind, key="Tab", code="Tab", windowsVirtualKeyCode=9)
        if page.evaluate("document.activeElement && document.activeElement.id") == "choose":
            break
    assert page.evaluate("document.activeElement.id") == "choose"


def test_the_page_shows_the_descriptions_behind_a_label(server, chromium, tmp_path):
    page = chromium
    page.call("Page.enable")
    page.call("Page.navigate", url=server + "/")
    page.wait_for("document.body && document.body.dataset.ready === '1'")
    assert page.evaluate("document.querySelector('#explain').disabled")  # protext: no descriptions of its own
    page.evaluate("""(() => {
        const head = document.querySelector('#head');
        head.value = 'clip80';
        head.dispatchEvent(new Event('change'));
        document.querySelector('#explain').checked = true;
    })()""")
    assert not page.evaluate("document.querySelector('#explain').disabled")
    image = tmp_path / "cat.jpg"
    shutil.copy(sorted((CIFAR / "cat").iterdir())[1], image)
    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    page.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
    shown = page.wait_for("document.querySelectorAll('.result .why li').length === 3 && "
                          "[...document.querySelectorAll('.result .why li')].map(l => l.textContent)")
    with local_client() as client:
        answer = client.post(server + "/v1/classify", files=uploads([image]),
                             data={"head": "clip80", "explain": "3", "top_k": "5"}).json()
    assert shown == [f"{e['text']} ({e['score']:.3f})" for e in answer["results"][0]["explain"]]
    assert all(answer["results"][0]["top"][0]["label"] in text for text in shown)
