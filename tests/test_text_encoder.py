import html

import torch
import torch.nn.functional as F
from support import CUPL, block_by_hand, quick_gelu

from protext.backbone import from_model
from protext.descriptions import load_descriptions
from protext.model import ProText
from protext.text_encoder import clip_clean, length_groups, pad
from protext.tiny import _build

NAMES = ["cat", "tench", "great white shark", "Annual Crop Land"]

# ImageNet CuPL sentences with typographic quotes, and the text OpenAI's CLIP tokenizer made of them
# (simple_tokenizer.py: ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case).
CLEANED_BY_CLIP = {
    ("killer whale", "Killer whales are one of the world\u2019s largest predators."):
        "killer whales are one of the world's largest predators.",
    ("goose", "A goose has a long neck, webbed feet, and flies in a \u201cV\u201d formation."):
        'a goose has a long neck, webbed feet, and flies in a "v" formation.',
    ("banana", "A banana is an edible fruit \u2013 the world\u2019s most popular, in fact."):
        "a banana is an edible fruit \u2013 the world's most popular, in fact.",
}


def test_untrained_depth1_prompts_equal_plain_clip_features():
    model, tok = _build(3, ("a", "photo", "of"), {})
    backbone = from_model(model, tok, "tiny")
    prompted = ProText.create(backbone, n_ctx=4, depth=1).encode_classes(NAMES)
    texts = [f"a photo of a {n}." for n in NAMES]
    enc = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        reference = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
    assert torch.allclose(prompted, reference, atol=1e-6), (prompted - reference).abs().max()


def test_deep_prompt_replacement_matches_hand_computed_two_layer_model():
    model, tok = _build(5, ("a", "photo", "of"), {"layers": 2})
    assert model.config.text_config.hidden_act == "quick_gelu"
    backbone = from_model(model, tok, "tiny")
    pt = ProText.create(backbone, n_ctx=4, depth=2, seed=7)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.5)  # make the replacement visible
        got = pt.encode_classes(NAMES)
    tm = model.text_model
    lists = pt.class_token_lists(NAMES)
    n = 4
    want = []
    with torch.no_grad():
        for ids in lists:
            ids = torch.tensor(ids)
            x = tm.embeddings.token_embedding.weight[ids].clone()
            x[1 : 1 + n] = pt.prompts[0]
            x = (x + tm.embeddings.position_embedding.weight[: len(ids)])[None]
            x = block_by_hand(tm.encoder.layers[0], x, causal=True, gelu=quick_gelu)
            x[0, 1 : 1 + n] = pt.prompts[1]
            x = block_by_hand(tm.encoder.layers[1], x, causal=True, gelu=quick_gelu)
            eot = F.layer_norm(x[0, -1], (x.shape[-1],), tm.final_layer_norm.weight, tm.final_layer_norm.bias,
                               tm.final_layer_norm.eps)
            want.append(F.normalize(eot @ model.text_projection.weight.T, dim=-1))
    want = torch.stack(want)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # and the deep prompt really matters: depth 1 with the same layer-0 prompt differs
    shallow = ProText(backbone, pt.config.__class__(**{**pt.config.__dict__, "depth": 1}), pt.prompts[:1].detach())
    assert not torch.allclose(shallow.encode_classes(NAMES), got, atol=1e-3)


def test_cutting_to_longest_sequence_changes_nothing(tiny):
    pt = ProText.create(tiny, n_ctx=4, depth=2, seed=1)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.3)
        lists = pt.class_token_lists(NAMES)
        cut = pt(pad(lists, tiny.text.pad_id))
        full = pt(pad(lists, tiny.text.pad_id, length=77))
    assert torch.allclose(cut, full, atol=1e-6)


def test_length_groups_are_the_cheapest_split_into_neighbouring_lengths():
    import itertools
    import random

    rng = random.Random(0)
    for trial in range(30):
        lengths = [rng.randint(3, 12) for _ in range(rng.randint(1, 14))]
        overhead = rng.choice([0, 3, 20])
        groups = length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        spans = [(min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups]
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # neighbouring lengths, shortest first

        def cost(gs):
            return sum(len(g) * max(lengths[i] for i in g) + overhead for g in gs)

        # every split of the sorted distinct lengths into runs, by brute force
        distinct = sorted(set(lengths))
        best = min(cost([[i for i in range(len(lengths)) if distinct[a] <= lengths[i] <= distinct[b - 1]]
                         for a, b in zip((0, *cuts), (*cuts, len(distinct)))])
                   for k in range(len(distinct)) for cuts in itertools.combinations(range(1, len(distinct)), k))
        assert cost(groups) == best


def test_length_grouped_step_gives_the_features_and_gradients_of_one_padded_batch(tiny):
    names = NAMES + ["a very long and winding class name with many words in it", "x"]
    pt = ProText.create(tiny, n_ctx=4, depth=2, seed=1)
    lists = pt.class_token_lists(names)
    assert len(length_groups([len(s) for s in lists])) > 1
    target = torch.randn(len(names), tiny.text.feature_dim)
    grads = []
    for run in (lambda: tiny.text.forward_lists(lists, pt.prompts), lambda: pt(pad(lists, tiny.text.pad_id))):
        pt.prompts.grad = None
        feats = run()
        ((feats - target) ** 2).sum().backward()
        grads.append((feats.detach(), pt.prompts.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5), (grads[0][1] - grads[1][1]).abs().max()
    assert grads[0][1].abs().sum() > 0
    assert tiny.text.forward_lists([], pt.prompts).shape == (0, tiny.text.feature_dim)


def test_bert_tower_matches_mean_pooled_transformers_output():
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "x", ".", "big", "red"]
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.txt"), "w") as f:
            f.write("\n".join(words))
        tok = BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    bert = BertModel(cfg).eval()
    backbone = from_model(bert, tok, "tiny-bert")
    assert backbone.image is None and backbone.text.kind == "bert"
    texts = ["a photo of a cat.", "a big red dog.", "a cat"]
    mine = backbone.text.encode(texts)
    assert backbone.text.token_lists(["a &amp; cat"]) == tok(["a &amp; cat"])["input_ids"]  # no CLIP cleaning
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(mine, ref, atol=1e-5)
    # prompts go right after [CLS], and padding a batch further changes nothing
    assert torch.allclose(ProText.create(backbone, n_ctx=4, depth=1).encode_classes(["cat", "dog"]), backbone.text.encode(["a photo of a cat.", "a photo of a dog."]), atol=1e-5)
    pt = ProText.create(backbone, n_ctx=4, depth=2)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.3)
        lists = pt.class_token_lists(["cat", "big red dog"])
        assert torch.allclose(pt(pad(lists, 0)), pt(pad(lists, 0, length=20)), atol=1e-5)


def test_clip_tokens_are_those_of_text_cleaned_as_openai_clip_cleans_it(shared, tiny):
    data = load_descriptions(CUPL / "imagenet_prompts_base.json")
    text = tiny.text
    for (name, sentence), cleaned in CLEANED_BY_CLIP.items():
        assert sentence in data[name]
        assert clip_clean(sentence) == cleaned
        plain = text.tokenizer(cleaned)["input_ids"]
        assert text.token_lists([sentence]) == [plain]
        assert text.tokenizer(sentence)["input_ids"] != plain  # the tokenizer alone has no ftfy step
    curly = "the world\u2019s"
    assert text.count_words(curly) == text.count_words("the world's")
    assert text.count_words(curly) != len(text.tokenizer(curly, add_special_tokens=False)["input_ids"])


def test_clip_tokens_undo_html_entities_escaped_once_or_twice(tiny):
    text = tiny.text
    sentence = 'A goose flies in a "V" formation & honks.'
    once, twice = html.escape(sentence), html.escape(html.escape(sentence))
    assert "&quot;" in once and "&amp;quot;" in twice
    assert text.token_lists([once, twice]) == text.token_lists([sentence]) * 2
    assert text.tokenizer(once)["input_ids"] != text.token_lists([sentence])[0]


def test_clip_cleaning_is_idempotent_and_leaves_plain_text_alone(shared):
    sentences = [s for v in load_descriptions(CUPL / "imagenet_prompts_base.json").values() for s in v]
    changed = 0
    for s in sentences:
        c = clip_clean(s)
        assert clip_clean(c) == c
        if s.isascii() and "&" not in s:
            assert c == " ".join(s.split()).lower()  # what transformers' normalizer alone makes of it
        changed += c != " ".join(s.split()).lower()
    assert 10 <= changed <= 30, changed
