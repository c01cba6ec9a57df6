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
    _config_names_current_prompts(tmp_path)  # a config written for these bytes, but of another shape
    with pytest.raises(ProtextError, match=r"shape \(3, 4, 32\), expected \(2, 4, 32\)"):
        ProText.from_pretrained(tmp_path, backbone=tiny)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ProtextError, match=CONFIG_FILE):
        ProText.from_pretrained(tmp_path, backbone=tiny)


def _config_names_current_prompts(folder):
    from protext.cache import file_sha256

    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["prompts_sha256"] = file_sha256(folder / PROMPTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def test_context_initialisation_rules(tiny):
    pt = ProText.create(tiny, n_ctx=4, depth=2)
    ids = tiny.text.tokenize(["a photo of a"]).ids[0, 1:5]
    assert torch.allclose(pt.prompts[0], tiny.text.token_embedding.weight[ids])
    assert pt.prompts[1:].std() < 0.05
    wide = ProText.create(tiny, n_ctx=16, depth=2, init="random")
    assert wide.config.init == "random" and wide.config.placeholder == " ".join(["X"] * 16)
    assert wide.prompts[0].std() < 0.05
    assert prompted_text("a photo of a {}, a type of pet.", "pug", "X X") == "X X pug, a type of pet."
    assert prompted_text("{} texture.", "bumpy", "a photo of a") == "a photo of a bumpy texture."
    with pytest.raises(ProtextError, match="tokens for this tokenizer"):
        ProText.create(tiny, n_ctx=3, depth=1, init="words", init_words="a photo of a")
    with pytest.raises(ProtextError, match="init must be one of words, random, got 'a photo of' "
                                           "\\(the words go in init_words\\)"):
        ProText.create(tiny, n_ctx=3, depth=1, init="a photo of")
    with pytest.raises(ProtextError, match="n_ctx is 16; use n_ctx=4, or init='random'"):
        ProText.create(tiny, n_ctx=16, depth=1)  # no silent switch to random
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


def test_prompt_folder_works_from_another_directory_and_on_a_moved_backbone(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from protext.backbone import load_backbone

    monkeypatch.chdir(tiny_folder.parent)
    b = load_backbone(tiny_folder.name, device="cpu")  # a relative path, as users type it
    ProText.create(b, depth=2).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / CONFIG_FILE).read_text())["backbone"] == str(tiny_folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert ProText.from_pretrained(tmp_path / "p").backbone.fingerprint() == b.fingerprint()

    # The backbone folder moves: the prompts say where they were trained and how to go on.
    moved = tmp_path / "elsewhere" / "clip"
    shutil.copytree(tiny_folder, moved)
    cfg = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    cfg["backbone"] = str(tmp_path / "gone")
    (tmp_path / "p" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ProtextError, match="not on this machine.*--backbone"):
        ProText.from_pretrained(tmp_path / "p")
    # A backbone given explicitly replaces the stored one, checked by fingerprint.
    assert ProText.from_pretrained("p", backbone=load_backbone("elsewhere/clip")).backbone.name == str(moved)
    other = tmp_path / "other"
    from protext.tiny import save_tiny_clip

    save_tiny_clip(other, seed=5)
    with pytest.raises(ProtextError, match="weights differ"):
        ProText.from_pretrained(tmp_path / "p", backbone=load_backbone(str(other), device="cpu"))


def test_predict_with_backbone_flag_uses_that_backbone(tiny_folder, tmp_path, capsys, shared):
    import shutil

    from protext.backbone import load_backbone
    from protext.cli import main

    ProText.create(load_backbone(str(tiny_folder), device="cpu"), depth=2).save_pretrained(tmp_path / "p")
    moved = shutil.copytree(tiny_folder, tmp_path / "moved")
    cfg = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    cfg["backbone"] = str(tmp_path / "gone")
    (tmp_path / "p" / CONFIG_FILE).write_text(json.dumps(cfg))
    image = next((shared / "images").rglob("*.jpg"))
    args = ["predict", "--prompts", str(tmp_path / "p"), "--classes", "cat,dog", str(image)]
    assert main(args) == 2
    assert "--backbone" in capsys.readouterr().err
    assert main(args + ["--backbone", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("cat", "dog")


def test_a_save_killed_between_the_two_files_is_not_taken_as_finished(tiny, tmp_path):
    from protext.model import is_complete

    pt = ProText.create(tiny, depth=2)
    pt.save_pretrained(tmp_path)
    assert is_complete(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()  # killed before the config was written
    assert not is_complete(tmp_path)
    pt.save_pretrained(tmp_path)
    with torch.no_grad():
        pt.prompts.add_(1.0)
    from protext.cache import atomic_save_tensors

    # new prompts written, then killed before the new config: the old config names other bytes
    atomic_save_tensors(tmp_path / PROMPTS_FILE, {"prompts": pt.prompts.detach()})
    assert not is_complete(tmp_path)
    with pytest.raises(ProtextError, match="interrupted"):
        ProText.from_pretrained(tmp_path, backbone=tiny)
    # a killed writer's temporary file is cleaned up by the next save
    (tmp_path / f".{PROMPTS_FILE}.abc.tmp").write_bytes(b"partial")
    pt.save_pretrained(tmp_path)
    assert is_complete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPTS_FILE, CONFIG_FILE]


def test_outputs_respect_the_umask(tiny, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        import importlib

        import protext.cache

        importlib.reload(protext.cache)  # the umask is read once, at import
        protext.cache.atomic_write_json(tmp_path / "r.json", {"a": 1})
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
        importlib.reload(protext.cache)


def test_config_from_a_newer_protext_loads_with_a_warning(tiny, tmp_path):
    ProText.create(tiny, depth=2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 2 and (cfg["init"], cfg["init_words"]) == ("words", "a photo of a")
    cfg.update(format_version=3, some_new_key={"x": 1})
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="newer protext.*some_new_key"):
        ProText.from_pretrained(tmp_path, backbone=tiny)


def test_config_of_an_earlier_protext_reads_init_in_todays_words(tiny, tmp_path):
    """Format 1 kept the words themselves in `init` (or "random", or null in 0.1)."""
    before = ProText.create(tiny, depth=2).save_pretrained(tmp_path / "a")
    for old, want in (("a photo of a", ("words", "a photo of a")), ("random", ("random", "a photo of a")),
                      (None, ("random", "a photo of a"))):
        cfg = json.loads((before / CONFIG_FILE).read_text())
        cfg.pop("init_words", None)
        cfg.update(format_version=1, init=old)
        (before / CONFIG_FILE).write_text(json.dumps(cfg))
        loaded = ProText.from_pretrained(before, backbone=tiny)
        assert (loaded.config.init, loaded.config.init_words) == want and loaded.config.format_version == 2


def test_reports_are_strict_json():
    from protext.cache import to_json

    text = to_json({"loss": float("nan"), "rows": [1.0, float("inf")], "name": "café"})
    assert json.loads(text) == {"loss": None, "rows": [1.0, None], "name": "café"}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("tensor", ["token_embedding.weight", "position_embedding.weight", "blocks.0.mlp.fc1.weight",
                                    "blocks.1.self_attn.q_proj.bias", "final_layer_norm.weight", "projection.weight"])
def test_the_fingerprint_sees_every_kind_of_text_tensor(tiny_folder, tmp_path, tensor):
    """Prompts on a backbone whose text weights changed anywhere (as fine-tuning changes them) are refused,
    and its text features are cached apart."""
    from protext.backbone import load_backbone
    from protext.context import Context
    from protext.feature_cache import feature_store

    original = load_backbone(str(tiny_folder), device="cpu")
    ProText.create(original, depth=2).save_pretrained(tmp_path / "p")
    changed = load_backbone(str(tiny_folder), device="cpu")
    with torch.no_grad():
        changed.text.state_dict()[tensor].mul_(1.01).add_(0.001)
    assert changed.fingerprint() != original.fingerprint() and changed.fingerprint().startswith("t2-")
    with pytest.raises(ProtextError, match="weights differ"):
        ProText.from_pretrained(tmp_path / "p", backbone=changed)
    assert feature_store(changed, "text", Context(tmp_path)).folder != feature_store(original, "text", Context(tmp_path)).folder


def test_prompt_files_with_the_earlier_fingerprint_still_load(tiny, tmp_path):
    folder = ProText.create(tiny, depth=2).save_pretrained(tmp_path / "p")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["fingerprint"] = tiny.legacy_fingerprint()  # as protext 0.2 wrote it
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    assert ProText.from_pretrained(folder, backbone=tiny).config.fingerprint == tiny.fingerprint()
    cfg["fingerprint"] = "0123456789abcdef"
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ProtextError, match="weights differ"):
        ProText.from_pretrained(folder, backbone=tiny)
