"""Transductive labelling (TransCLIP): the blockwise solver against the procedure written out
densely, the neighbour graph, and `label --transductive` over images and feature folders.
(`benchmarks/parity.py --transclip CHECKOUT` runs TransCLIP's own solver against `refine`.)"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from protext.classifier import ProTextClassifier
from protext.cli import main
from protext.context import QUIET, Context
from protext.errors import ProtextError
from protext.transductive import TransductiveSettings, neighbours, refine, transclip_probabilities


def dense(x, probs, k=3, rounds=10, steps=5, tau=50.0, confident=8):
    """The procedure as the module's docstring states it, on whole matrices: an N × N graph,
    squared differences broadcast over (N, K, d)."""
    n, d = x.shape
    s = x @ x.T
    s.fill_diagonal_(float("-inf"))
    idx = s.topk(k, dim=1).indices
    w = torch.zeros(n, n, dtype=x.dtype)
    w[torch.arange(n)[:, None], idx] = (x @ x.T).gather(1, idx)
    top = probs.topk(confident, dim=0).indices
    mu = F.normalize(torch.stack([(probs[top[:, c], c, None] * x[top[:, c]]).sum(0) for c in range(probs.shape[1])]),
                     dim=1)
    var = torch.full((d,), 1.0 / d, dtype=x.dtype)
    z = probs.clone()
    for r in range(rounds + 1):
        loglik = -0.5 * (((x[:, None, :] - mu[None]) ** 2) / var).sum(-1)
        for _ in range(steps):
            a = loglik / tau + ((w + w.T) @ z) / (2 * k)
            u = probs * torch.exp(a - a.max(1, keepdim=True).values)
            z = u / u.sum(1, keepdim=True)
        if r == rounds:
            return z
        mu = F.normalize(z.T @ x / z.sum(0)[:, None], dim=1)
        var = (z[:, :, None] * (x[:, None, :] - mu[None]) ** 2).sum((0, 1)) / z.sum()


def problem(n=240, d=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.arange(n) % k
    x = F.normalize(text[labels] + 0.6 * torch.randn(n, d, generator=g), dim=1)
    return x, text, labels


def test_blockwise_solver_is_the_dense_procedure(tmp_path):
    x, text, _ = problem()
    probs = transclip_probabilities(x, text)
    want = dense(x.double(), probs.double()).float()
    for block in (2048, 37):
        got = refine(x, probs, TransductiveSettings(block=block), ctx=QUIET)
        assert (got - want).abs().max() < 2e-5 and torch.equal(got.argmax(1), want.argmax(1))
    stored = refine(x, probs, TransductiveSettings(block=50), store=tmp_path / "s", ctx=QUIET)
    assert (stored - want).abs().max() < 2e-5
    assert [f.name for f in (tmp_path / "s").iterdir()] == ["next_z.npy"]  # only the result is left


def test_one_step_by_hand():
    # four points on a line of two clusters; one z update from the start, no mean update
    x = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0]]), dim=1)
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7], [0.45, 0.55]])
    got = refine(x, probs, TransductiveSettings(neighbours=1, iterations=0, z_steps=1, confident=1), ctx=QUIET)
    # neighbours: 0<->1 and 2<->3, each the other's only one, so W + Wᵀ doubles each weight
    mu = F.normalize(torch.stack([0.6 * x[0], 0.7 * x[2]]), dim=1)  # each class's likeliest image
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):
        loglik = [-0.5 * 2 * ((x[i] - mu[c]) ** 2).sum().item() for c in range(2)]  # v = 1/d = 1/2
        a = [loglik[c] / 50 + 2 * (x[i] @ x[j]).item() * probs[j, c].item() / 2 for c in range(2)]
        u = [probs[i, c].item() * torch.tensor(a[c]).exp().item() for c in range(2)]
        assert got[i].tolist() == pytest.approx([v / sum(u) for v in u], abs=1e-6)


def test_an_image_is_never_its_own_neighbour_even_duplicated():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    index, value = neighbours(x, 1, block=3, columns=2, ctx=QUIET)
    assert index[:, 0].tolist() == [1, 0, 3, 2 if value[3, 0] > 0.61 else 0]
    with pytest.raises(ProtextError, match="more than 3 readable images"):
        neighbours(x[:3], 3, ctx=QUIET)


def test_label_transductive_over_images_and_features(tiny_folder, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = tmp_path / "imgs" / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    classes = ["cat", "dog", "frog"]
    common = ["--backbone", str(tiny_folder), "--classes", ",".join(classes), "--head", "clip", "--cache-dir",
              str(tmp_path / "c"), "--no-progress"]
    out = tmp_path / "t.jsonl"
    assert main(["label", str(tmp_path / "imgs"), "--output", str(out), "--transductive", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unreadable"] == 1 and not (tmp_path / "t.jsonl.features").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 13 and all(r["transductive"] for r in rows)
    assert [r["error"] is not None for r in rows] == [False] * 12 + [True]  # broken.png sorts last

    clf = ProTextClassifier.from_backbone(str(tiny_folder), classes, Context(tmp_path / "c", progress=False),
                                          head="clip")
    feats, names, _ = clf.image_features(paths)
    want = clf.refine(feats, TransductiveSettings())
    got = {r["path"]: r for r in rows}
    for name, z in zip(names, want):
        assert got[name]["top_probs"][0] == pytest.approx(z.max().item(), abs=1e-5)
        assert got[name]["label"] == classes[int(z.argmax())]
    plain = clf.predict(paths).probs
    assert not torch.allclose(plain, want, atol=1e-3)  # the refinement changed something

    assert main(["features", str(tmp_path / "imgs"), "--out", str(tmp_path / "f"), "--backbone", str(tiny_folder),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["label", "--features", str(tmp_path / "f"), "--output", str(tmp_path / "t.csv"), "--transductive",
                 *common[2:]]) == 0
    with open(tmp_path / "t.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] or "" for r in rows]
    assert all(r["transductive"] == "true" for r in table)
    assert main(["label", str(paths[0]), str(paths[1]), "--output", str(tmp_path / "few.jsonl"), "--transductive",
                 *common]) == 2
    assert "more than 3 readable images" in capsys.readouterr().err
    assert main(["label", str(paths[0]), "--output", str(tmp_path / "s.jsonl"), "--transductive", "--activation",
                 "sigmoid", *common]) == 2
