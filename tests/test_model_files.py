import json

import pytest
import torch
from safetensors.torch import save_file

from protext.errors import ProtextError
from protext.model import CONFIG_FILE, PROMPTS_FILE, ProText, prompted_text
from protext.tiny import tiny_clip


def test_save_and_load_round_trip_stores_only_prompts(tiny, tmp_path):
    pt = ProText.create(tiny, n_ctx=4, depth=2, seed=4)
    with torch.no_grad():
        pt.prompts.normal_()
    pt.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPTS_FILE, CONFIG_FILE]
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (cfg["backbone"], cfg["n_ctx"], cfg["depth"], cfg["template"]) == (tiny.name, 4, 2, "a photo of a {}.")
    assert (tmp_path / PROMPTS_FILE).stat().st_size < 4096  # 2 x 4 x 32 floats, not the backbone
    back = ProText.from_pretrained(tmp_path, backbone=tiny)
    assert torch.equal(back.prompts, pt.prompts)
    assert torch.allclose(back.encode_classes(["cat"]), pt.encode_classes(["cat"]))


def test_loading_onto_other_weights_is_refused(tiny, tmp_path):
    ProText.create(tiny, depth=2).save_pretrained(tmp_path)
    with pytest.raises(ProtextError, match="weights differ"):
        ProText.from_pretrained(tmp_path, backbone=tiny_clip(seed=1))
    with pytest.raises(ProtextError, match="width 32.*width 48"):
        ProText.from_pretrained(tmp_path, backbone=tiny_clip(seed=0, width=48))


def test_prompt_folder_loads_its_backbone_from_the_config(tiny_folder, tmp_path):
    from protext.backbone import load_backbone

    b = load_backbone(str(tiny_folder), device="cpu")
    ProText.create(b, depth=2).save_pretrained(tmp_path)
    again = ProText.from_pretrained(tmp_path)
    assert again.backbone.name == str(tiny_folder)


def test_bad_prompt_files_name_the_file(tiny, tmp_path):
    with pytest.raises(ProtextError, match="no such prompt folder"):
        ProText.from_pretrained(tmp_path / "nothing", backbone=tiny)
    ProText.create(tiny, depth=2).save_pretrained(tmp_path)
    (tmp_path / PROMPTS_FILE).write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle
    with pytest.raises(ProtextError, match=PROMPTS_FILE):
        ProText.from_pretrained(tmp_path, backbone=tiny)
    save_file({"prompts": torch.zeros(3, 4, 32)}, str(tmp_path / PROMPTS_FILE))
    with pytest.raises(ProtextError, match=r"shape \(3, 4, 32\), expected \(2, 4, 32\)"):
        ProText.from_pretrained(tmp_path, backbone=tiny)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ProtextError, match=CONFIG_FILE):
        ProText.from_pretrained(tmp_path, backbone=tiny)


def test_context_initialisation_rules(tiny):
    pt = ProText.create(tiny, n_ctx=4, depth=2)
    ids = tiny.text.tokenize(["a photo of a"]).ids[0, 1:5]
    assert torch.allclose(pt.prompts[0], tiny.text.token_embedding.weight[ids])
    assert pt.prompts[1:].std() < 0.05
    wide = ProText.create(tiny, n_ctx=16, depth=2)
    assert wide.config.init is None and wide.config.placeholder == " ".join(["X"] * 16)
    assert wide.prompts[0].std() < 0.05
    assert prompted_text("a photo of a {}, a type of pet.", "pug", "X X") == "X X pug, a type of pet."
    assert prompted_text("{} texture.", "bumpy", "a photo of a") == "a photo of a bumpy texture."
    with pytest.raises(ProtextError, match="tokens for this tokenizer"):
        ProText.create(tiny, n_ctx=3, depth=1, init="a photo of a")
    with pytest.raises(ProtextError, match="depth"):
        ProText.create(tiny, n_ctx=4, depth=3 + tiny.text.num_layers)


def test_push_to_hub_uploads_only_the_prompt_files(tiny, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = ProText.create(tiny, depth=2).push_to_hub("me/my-prompts", token="hf_x")
    assert url == "https://huggingface.co/me/my-prompts"
    assert calls == {"token": "hf_x", "repo": ("me/my-prompts", False, True), "files": [PROMPTS_FILE, CONFIG_FILE]}


def test_hub_id_that_cannot_be_reached_gives_an_actionable_error(tiny, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ProtextError, match="could not download prompts 'someone/prompts'.*pass its path"):
        ProText.from_pretrained("someone/prompts", backbone=tiny)
