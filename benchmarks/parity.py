"""Exactness of the awt and fudd heads and of transductive labelling against the original code,
run from checkouts of it on a tiny random CLIP that has CLIP's real vocabulary.

    git clone https://github.com/MCG-NJU/AWT /tmp/AWT
    git clone https://github.com/BatsResearch/fudd /tmp/fudd
    git clone https://github.com/MaxZanella/transduction-for-vlms /tmp/transclip
    python benchmarks/parity.py --awt /tmp/AWT --fudd /tmp/fudd --transclip /tmp/transclip

Each check prints one row (method, what is compared, the largest difference, the tolerance) and
the script exits 1 if any is over its tolerance. The tiny CLIP's tokenizer is built from the BPE
merges file that AWT's vendored `clip` package ships, so the texts are tokenised by both sides
with CLIP's own vocabulary, and the token ids are compared too. Nothing of the original code is
kept: it is imported from the checkout while this script runs.

- AWT: its `AWT_evaluation` on dtd, with the tiny CLIP's text tower behind its `encode_text`, over
  the view features protext makes for real images; compared: every prompt text, their token ids,
  and every image's logits.
- FuDD: its `FuDD` module and `PromptFactory` over its published EuroSAT differential descriptions;
  compared: each image's ambiguous classes, the captions per class, the second-pass cosines.
- TransCLIP: its `TransCLIP_solver` on the tiny CLIP's features of real images and clip-head text
  embeddings; compared: the soft labels z.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IMAGES = sorted((SHARED / "images" / "cifar10_test_sample").rglob("*.png")) + \
    sorted((SHARED / "images" / "cifar10_test_sample").rglob("*.jpg"))
rows: list[tuple[str, str, float, float]] = []


def check(method: str, what: str, difference: float, tolerance: float) -> None:
    rows.append((method, what, difference, tolerance))
    print(f"{method:10s} {what:58s} {difference:10.3g}  (≤ {tolerance:g})  {'ok' if difference <= tolerance else 'FAIL'}",
          flush=True)


def stub_torchvision() -> None:
    """The checkouts import torchvision for their data pipelines, which these checks do not use."""
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "RandomResizedCrop",
                 "RandomHorizontalFlip"):
        setattr(transforms, name, object)
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    tv.transforms = transforms
    sys.modules.setdefault("torchvision", tv)
    sys.modules.setdefault("torchvision.transforms", transforms)


def real_vocabulary_clip(bpe_gz: Path, folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP whose tokenizer is CLIP's: its byte table, then the first 48,894 merges
    of the BPE file, then the start and end tokens (49,408 ids)."""
    from transformers import CLIPModel, CLIPTokenizer

    from protext.tiny import clip_config

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    merges = [tuple(m.split()) for m in gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok.model_max_length = 77
    config = clip_config(vocab_size=len(tokens))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class TextTower(torch.nn.Module):
    """What the original code calls on a CLIP: `encode_text` over token ids, `logit_scale`."""

    def __init__(self, folder: Path):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.logit_scale = self.model.logit_scale.detach()

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=ids)
        return out if torch.is_tensor(out) else out.pooler_output


@contextlib.contextmanager
def on_path(folder: Path, cwd: Path | None = None):
    sys.path.insert(0, str(folder))
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)
        sys.path.remove(str(folder))


def awt(checkout: Path, folder: Path, work: Path) -> None:
    from protext.classifier import ProTextClassifier
    from protext.context import QUIET
    from protext.heads import _awt_prompts

    code = checkout / "AWT_zero_shot"
    stub_torchvision()
    torch.Tensor.cuda = lambda self, *a, **k: self  # the checkout moves tensors to a GPU
    with on_path(code, cwd=work):
        E = importlib.import_module("evaluate")
        clip = importlib.import_module("clip")
        classes = E.get_classnames("dtd")
        texts: list[str] = []
        tokenize = clip.clip.tokenize
        E.clip.tokenize = lambda t, *a, **k: (texts.append(t), tokenize(t, *a, **k))[1]
        logits: list[torch.Tensor] = []
        accuracy = E.accuracy
        E.accuracy = lambda output, target, topk: (logits.append(output.detach().clone()), accuracy(output, target, topk))[1]

        descriptions = code / "descriptions" / "image_datasets" / "dtd.json"
        clf = ProTextClassifier.from_backbone(str(folder), classes, QUIET, head="awt", descriptions=str(descriptions),
                                              dataset="dtd")
        feats, _, _ = clf.image_features(IMAGES[:6])
        saved = work / "pre_extracted_feat" / "ViT-B16" / "seed0"
        saved.mkdir(parents=True, exist_ok=True)
        torch.save([(f, torch.tensor([0])) for f in feats], saved / "dtd.pth")
        tower = TextTower(folder)
        args = argparse.Namespace(test_set="dtd", arch="ViT-B/16", seed=0, print_freq=1000, num_descriptor=50,
                                  descriptor_path=str(code / "descriptions" / "image_datasets"))
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            E.AWT_evaluation(tower, args)
        ours = [t for c in classes for t in _awt_prompts(clf.heads, c)]
        same = lambda a, b: " ".join(a.split()) == " ".join(b.split())  # noqa: E731 (CLIP's tokenizer strips spaces)
        check("awt", f"prompt texts ({len(texts)}) differing but in spaces",
              float(sum(not same(a, b) for a, b in zip(texts, ours)) + abs(len(texts) - len(ours))), 0)
        reference_ids = torch.cat([tokenize(t) for t in ours])
        tokens = clf.backbone.text.tokenize(ours, length=77)
        real = torch.arange(77)[None] < tokens.lengths[:, None]
        check("awt", "token ids differing from CLIP's own tokenizer",
              float(((reference_ids != tokens.ids) & real).sum() + (reference_ids[~real] != 0).sum()), 0)
        want = torch.cat(logits)
        got = clf.logits(feats)
        check("awt", f"logits of {len(feats)} images x {len(classes)} classes (scale 100)",
              (want - got).abs().max().item(), 1e-5)
        del sys.modules["evaluate"]


def fudd(checkout: Path, folder: Path) -> None:
    from protext.backbone import load_backbone
    from protext.classifier import ProTextClassifier
    from protext.context import QUIET
    from protext.fudd import first_pass_text, texts_of

    backbone = load_backbone(str(folder), device="cpu")
    encoded: dict[str, torch.Tensor] = {}

    def tokenize(texts):
        for t in texts:
            encoded.setdefault(t, None)
        table = list(encoded)
        return torch.tensor([[table.index(t)] for t in texts])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def encode_text(self, ids):
            table = list(encoded)
            return backbone.text.encode([table[i] for i in ids[:, 0].tolist()])

        def encode_image(self, x):
            return x

    model = Model()
    sys.modules["clip"] = types.SimpleNamespace(load=lambda name, device="cpu": (model, None), tokenize=tokenize)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    root = checkout / "differential_descriptions"
    with on_path(checkout):
        factory_module = importlib.import_module("prompt_factory")
        model_module = importlib.import_module("fudd_model")
        factory = factory_module.PromptFactory(str(root), "eurosat")
        reference = model_module.FuDD(10, factory, "ViT-B/32", True, "gpt")
    names = [n.replace("_", " ") for n in json.loads((root / "eurosat_class_names.json").read_text())]
    pairs = json.loads((root / "eurosat_prompt_pairs.json").read_text())
    differential: dict[str, dict[str, list[str]]] = {}
    for entry in pairs.values():
        i, j = entry["classes"]
        for p in entry["prompt_pairs"]:
            differential.setdefault(names[i], {}).setdefault(names[j], []).append(p["prompt_pair"][0])
            differential.setdefault(names[j], {}).setdefault(names[i], []).append(p["prompt_pair"][1])
    clf = ProTextClassifier.from_backbone(str(folder), names, QUIET, head="fudd", differential=differential)
    feats, _, _ = clf.image_features(IMAGES[:8])
    first = [t for ts in factory.get_prompts(None, "single_template") for t in ts]
    check("fudd", "first-pass texts not the same", float(sum(a != b for a, b in zip(first, map(first_pass_text, names)))), 0)
    plain = set(first)
    theirs = {t for ts in factory.get_all_classes_prompts("gpt") for t in ts} - plain
    ours_ = set(texts_of(clf.heads.differential, names)) - plain
    check("fudd", f"captions ({len(theirs)}) only one side reads", float(len(theirs ^ ours_)), 0)
    with torch.no_grad():
        ref_logits, ref_ids = reference(feats)
    ours = clf.logits(feats)
    scale, bias = clf.backbone.logit_scale, clf.backbone.logit_bias or 0.0
    order = ours.topk(10, dim=1).indices
    check("fudd", "second-pass choices differing (of 8 images)", float((order[:, 0] != ref_ids[torch.arange(len(feats)),
                                                                        ref_logits.argmax(1)]).sum()), 0)
    gathered = (ours.gather(1, ref_ids) - bias) / scale
    check("fudd", "second-pass cosines of the 10 ambiguous classes", (gathered - ref_logits).abs().max().item(), 1e-5)
    check("fudd", "images whose ambiguous sets differ", float((torch.sort(ref_ids, 1).values !=
                                                                torch.sort(order, 1).values).any(1).sum()), 0)
    for name in ("clip", "prompt_factory", "fudd_model"):
        sys.modules.pop(name, None)


def transclip(checkout: Path, folder: Path) -> None:
    from protext.classifier import ProTextClassifier
    from protext.context import QUIET
    from protext.transductive import refine, transclip_probabilities

    torch.Tensor.cuda = lambda self, *a, **k: self
    with on_path(checkout):
        solver = importlib.import_module("TransCLIP_solver.TransCLIP")
        utils = importlib.import_module("TransCLIP_solver.TransCLIP_utils")

    def accuracy(output, target, topk=1):  # the checkout's own needs NumPy < 2
        return 100.0 * (output.argmax(1) == target).float().mean().item()

    solver.cls_acc = utils.cls_acc = accuracy
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    clf = ProTextClassifier.from_backbone(str(folder), classes, QUIET, head="clip")
    feats, names, _ = clf.image_features(IMAGES)
    labels = torch.tensor([classes.index(Path(n).parent.name) for n in names])
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        z_ref, _ = solver.TransCLIP_solver(None, None, None, None, feats, labels, clf.weights.T.contiguous(),
                                           verbose=False)
    z = refine(feats, transclip_probabilities(feats, clf.weights), ctx=QUIET)
    check("transclip", f"soft labels z of {len(feats)} images", (z - z_ref).abs().max().item(), 1e-5)
    check("transclip", "labels differing", float((z.argmax(1) != z_ref.argmax(1)).sum()), 0)
    g = torch.Generator().manual_seed(0)  # and on features with clusters, where the refinement moves labels more
    text = F.normalize(torch.randn(10, 64, generator=g), dim=1)
    y = torch.arange(1000) % 10
    x = F.normalize(text[y] + 0.5 * torch.randn(1000, 64, generator=g), dim=1)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        z_ref, _ = solver.TransCLIP_solver(None, None, None, None, x, y, text.T.contiguous(), verbose=False)
    z = refine(x, transclip_probabilities(x, text), ctx=QUIET)
    check("transclip", "soft labels z, 1000 clustered 64-d features", (z - z_ref).abs().max().item(), 1e-5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--awt", type=Path, help="a checkout of MCG-NJU/AWT")
    ap.add_argument("--fudd", type=Path, help="a checkout of BatsResearch/fudd")
    ap.add_argument("--transclip", type=Path, help="a checkout of MaxZanella/transduction-for-vlms")
    ap.add_argument("--bpe", type=Path, default=None,
                    help="CLIP's BPE merges file (default: the one in the AWT checkout, AWT_zero_shot/clip/)")
    args = ap.parse_args()
    if not (args.awt or args.fudd or args.transclip):
        ap.error("give at least one checkout: --awt, --fudd, --transclip")
    bpe = args.bpe or (args.awt / "AWT_zero_shot" / "clip" / "bpe_simple_vocab_16e6.txt.gz" if args.awt else None)
    if bpe is None or not bpe.is_file():
        ap.error("CLIP's BPE file is needed for the tokenizer: give --awt or --bpe bpe_simple_vocab_16e6.txt.gz")
    with tempfile.TemporaryDirectory() as tmp:
        folder = real_vocabulary_clip(bpe, Path(tmp) / "clip")
        if args.awt:
            awt(args.awt.resolve(), folder, Path(tmp))
        if args.fudd:
            fudd(args.fudd.resolve(), folder)
        if args.transclip:
            transclip(args.transclip.resolve(), folder)
    failed = [r for r in rows if r[2] > r[3]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
