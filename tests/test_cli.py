import json

import pytest

from conftest import CUPL
from protext import sources
from protext.cli import main
from protext.model import ProText


def test_train_command_writes_prompts_and_summary(tiny_folder, tmp_path, capsys):
    code = main(["train", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 "--classes", "forest,river,sea or lake", "--depth", "2", "--epochs", "2", "--out", str(tmp_path / "p"),
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == 3 and summary["descriptions"] == 75
    pt = ProText.from_pretrained(tmp_path / "p")
    assert pt.config.training["epochs"] == 2 and pt.config.depth == 2


def test_bad_arguments_give_one_line_errors(tiny_folder, tmp_path, capsys):
    assert main(["train", "--backbone", str(tiny_folder), "--descriptions", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "p")]) == 2
    assert "none.json: no such description file" in capsys.readouterr().err
    assert main(["train", "--backbone", str(tmp_path), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 "--out", str(tmp_path / "p")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["train", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 "--loss", "huber", "--out", str(tmp_path / "p")]) == 2
    assert "loss must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])


def test_offline_description_download_names_url_and_place(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sources.SOURCES, "cupl:imagenet", "http://127.0.0.1:9/imagenet_prompts_base.json")
    code = main(["train", "--descriptions", "cupl:imagenet", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2
    assert "http://127.0.0.1:9/imagenet_prompts_base.json" in err
    assert str(tmp_path / "descriptions" / "cupl-imagenet.json") in err


def test_offline_backbone_download_says_how_to_supply_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    code = main(["train", "--backbone", "someone/not-cached-clip", "--descriptions",
                 str(CUPL / "eurosat_prompts_full.json"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load backbone 'someone/not-cached-clip'" in err and "--local-dir" in err
