import pytest
import torch
from support import CUPL

from protext.descriptions import load_descriptions


def test_encoding_batched_by_length_keeps_the_order_and_the_values(tiny):
    texts = [s for v in load_descriptions(CUPL / "eurosat_prompts_full.json").values() for s in v][:300]
    texts += ["a cat.", "a photo of a very long " + "winding " * 20 + "road."]
    text = tiny.text
    sorted_batches = text.encode(texts, batch_size=64)
    one_by_one = torch.cat([text(text.tokenize([t])) for t in texts])
    in_given_order = torch.cat([text(text.tokenize(texts[i : i + 64])) for i in range(0, len(texts), 64)])
    assert torch.allclose(sorted_batches, one_by_one, atol=1e-6)
    assert torch.allclose(sorted_batches, in_given_order, atol=1e-6)
    assert text.encode([]).shape == (0, text.feature_dim)


def test_chunked_top_k_equals_the_full_score_matrix():
    from protext.metrics import top1, top_k

    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(1000, 16, generator=gen), dim=-1)
    weights = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    values, indices = top_k(feats, weights, k=5, chunk=64)
    full_values, full_indices = (feats @ weights.T).topk(5, dim=1)
    assert torch.equal(indices, full_indices) and torch.allclose(values, full_values)
    labels = full_indices[:, 0].clone()
    labels[:100] = (labels[:100] + 1) % 300
    assert top1(feats, labels, weights) == pytest.approx(90.0)


def test_prompted_class_encoding_batched_by_length_equals_one_by_one(tiny):
    from protext.model import ProText

    pt = ProText.create(tiny, depth=2, seed=1)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    names = ["cat", "great white shark", "a very long class name with many words in it", "ox"] * 3
    batched = pt.encode_classes(names, batch_size=5)
    single = torch.cat([pt.encode_classes([n]) for n in names])
    assert torch.allclose(batched, single, atol=1e-6)
