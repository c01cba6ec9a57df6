import json

import pytest
from support import CUPL

from protext import sources
from protext.cli import main
from protext.context import Context
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
    with pytest.raises(SystemExit):
        main(["train", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
              "--loss", "huber", "--out", str(tmp_path / "p")])
    assert "invalid choice: 'huber'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # flags are never abbreviated: --outpu is not --output
        main(["label", str(tmp_path), "--classes", "a,b", "--outpu", str(tmp_path / "l.jsonl")])
    assert "unrecognized arguments: --outpu" in capsys.readouterr().err
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


def _prompts_for(tiny_folder, folder):
    from protext.backbone import load_backbone

    ProText.create(load_backbone(str(tiny_folder), device="cpu"), depth=2).save_pretrained(folder)
    return str(folder)


def test_predict_refuses_top_k_0_and_fails_when_nothing_was_read(tiny_folder, tmp_path, capsys, shared):
    prompts = _prompts_for(tiny_folder, tmp_path / "p")
    image = str(next((shared / "images").rglob("*.jpg")))
    assert main(["predict", "--prompts", prompts, "--classes", "cat,dog", "--top-k", "0", image]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert main(["predict", "--prompts", prompts, "--classes", "cat,dog", str(tmp_path / "broken.jpg"),
                 str(tmp_path / "missing.jpg"), "--cache-dir", str(tmp_path / "c")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "none of the 2 images could be read" in captured.err
    assert "skipped" in captured.err and "broken.jpg" in captured.err


def test_predict_says_which_classes_the_cupl_head_could_not_describe(tiny_folder, tmp_path, capsys, shared):
    import shutil

    image = str(next((shared / "images").rglob("*.jpg")))
    cached = sources.cached_path("cupl:eurosat", Context(tmp_path / "c"))  # a public set already downloaded
    cached.parent.mkdir(parents=True)
    shutil.copy(CUPL / "eurosat_prompts_full.json", cached)
    code = main(["predict", "--backbone", str(tiny_folder), "--descriptions", "cupl:eurosat", "--head", "cupl",
                 "--classes", "forest,river,moon base,mars", image, "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 0
    assert "cupl head: no sentences for 2 of 4 classes, which use the clip head" in err and "moon base, mars" in err


def test_mistyped_class_file_is_an_error_not_a_class(tiny_folder, tmp_path, capsys, shared):
    image = str(next((shared / "images").rglob("*.jpg")))
    assert main(["predict", "--backbone", str(tiny_folder), "--classes", "../classes.tx", image]) == 2
    assert "../classes.tx: no such class file" in capsys.readouterr().err


def test_backbone_with_unknown_model_type_or_truncated_weights(tiny_folder, tmp_path, capsys):
    import shutil

    bad_type = shutil.copytree(tiny_folder, tmp_path / "odd")
    cfg = json.loads((bad_type / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (bad_type / "config.json").write_text(json.dumps(cfg))
    args = ["--descriptions", str(CUPL / "eurosat_prompts_full.json"), "--out", str(tmp_path / "p")]
    assert main(["train", "--backbone", str(bad_type), *args]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "protext supports CLIP" in err and "Traceback" not in err

    truncated = shutil.copytree(tiny_folder, tmp_path / "cut")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["train", "--backbone", str(truncated), *args]) == 2
    assert "truncated or damaged" in capsys.readouterr().err


def test_stats_prints_non_ascii_names_as_they_are(tmp_path, capsys):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"crème brûlée": ["A crème brûlée has a caramel top."], "小笼包": ["Soup dumplings."]}),
                 encoding="utf-8")
    assert main(["descriptions", "stats", str(f)]) == 0
    out = capsys.readouterr().out
    assert "crème brûlée" in out and "小笼包" in out and "\\u" not in out
    assert main(["descriptions", "stats", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_eval_reports_an_empty_class_folder(tiny_folder, tmp_path, capsys, shared):
    import shutil

    root = tmp_path / "imgs"
    for cls in ("frog", "ship"):
        (root / cls).mkdir(parents=True)
        for f in sorted((shared / "images" / "cifar10_test_sample" / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    (root / "truck").mkdir()
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--backbone", str(tiny_folder),
                 "--cache-dir", str(tmp_path / "c"), "--no-progress", "--output", str(tmp_path / "row.json")]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "truck" in err
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["classes"] == 3 and row["images"] == 4 and any("truck" in n for n in row["notes"])


def test_ctrl_c_prints_a_hint_that_fits_the_command(monkeypatch, capsys):
    import protext.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    for command in ("train", "label", "describe"):
        name, description, flags, _, text = cli.COMMANDS[command]
        monkeypatch.setitem(cli.COMMANDS, command, (name, description, flags, interrupted, text))
    assert main(["train"]) == 130 and "rerun with --resume" in capsys.readouterr().err
    assert main(["label", "x.jpg", "--classes", "a,b", "--output", "o.jsonl"]) == 130
    assert "finished parts are kept: rerun the same command" in capsys.readouterr().err
    assert main(["describe", "--classes", "a", "--output", "d.json"]) == 130
    assert "ask only for the rest" in capsys.readouterr().err


def test_version_and_help_answer(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("protext 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "label" in capsys.readouterr().out


def test_unwritable_outputs_are_refused_before_any_work_naming_the_path(tiny_folder, tmp_path, capsys, shared,
                                                                        monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    blocked = tmp_path / "a-file" / "below"  # no one can create anything here, root included
    image = str(next((shared / "images").rglob("*.jpg")))
    common = ["--backbone", str(tiny_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    for argv, flag in (
        (["label", image, "--classes", "a,b", "--output", str(blocked / "l.jsonl"), *common], "--output"),
        (["features", image, "--out", str(blocked), *common], "--out"),
        (["train", "--descriptions", str(CUPL / "eurosat_prompts_full.json"), "--out", str(blocked), *common], "--out"),
        (["export", "--classes", "a,b", "--out", str(blocked), *common], "--out"),
        (["eval", "--dataset", "folder", "--data-root", str(shared / "images" / "cifar10_test_sample"), "--output",
          str(blocked / "row.json"), *common], "--output"),
        (["describe", "--classes", "a,b", "--output", str(blocked / "d.json"), "--base-url", "http://127.0.0.1:9"],
         "--output"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{flag} {blocked}" in err and "cannot be written" in err and "Traceback" not in err, err
    monkeypatch.setenv("PROTEXT_CACHE", str(blocked))
    assert main(["predict", "--backbone", str(tiny_folder), "--classes", "a,b", image]) == 2
    assert "the cache folder (--cache-dir, or $PROTEXT_CACHE)" in capsys.readouterr().err


def test_one_rule_for_blank_class_names_and_clear_words_for_mistakes(tiny_folder, tmp_path, capsys, shared):
    image = str(next((shared / "images").rglob("*.jpg")))
    common = ["--backbone", str(tiny_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "", "dog"]))
    for command in (["predict", image], ["label", image, "--output", str(tmp_path / "l.jsonl")],
                    ["export", "--out", str(tmp_path / "e")]):
        assert main([*command, "--classes", str(tmp_path / "classes.json"), *common]) == 2
        assert "item 2 of the list is a blank class name" in capsys.readouterr().err
    assert main(["predict", image, "--classes", "a,b", "--backbone", "./nope_model"]) == 2
    assert "--backbone ./nope_model: no such folder" in capsys.readouterr().err
    assert main(["label", image, "--classes", "a,b", "--output", str(tmp_path), *common]) == 2
    assert "is a folder; give a file name ending with .jsonl" in capsys.readouterr().err
    assert main(["predict", image, "--classes", "a,b", "--head", "cupl", "--descriptions", "cupl:nope", *common]) == 2
    err = capsys.readouterr().err
    assert "cupl:imagenet" in err and "dclip:" not in err  # only the sets that fit the flag
    assert main(["train", "--descriptions", str(CUPL / "eurosat_prompts_full.json"), "--epochs", "0",
                 "--out", str(tmp_path / "p"), *common]) == 2
    assert "epochs (--epochs) must be at least 1" in capsys.readouterr().err


def test_no_progress_is_quiet_and_a_warm_up_only_run_is_warned_about(tiny_folder, tmp_path, capsys):
    assert main(["train", "--backbone", str(tiny_folder), "--descriptions", str(CUPL / "eurosat_prompts_full.json"),
                 "--classes", "forest,river", "--depth", "2", "--epochs", "2", "--out", str(tmp_path / "p"),
                 "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
    assert "warning: epochs (2) is not more than warmup_epochs (5)" in err and "warnings.warn(" not in err


def test_eval_exits_2_when_no_image_could_be_read_and_names_an_empty_half(tiny_folder, tmp_path, capsys):
    root = tmp_path / "imgs"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(b"broken")
    common = ["--backbone", str(tiny_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), *common]) == 2
    assert "none of the 1 images of imgs could be read" in capsys.readouterr().err
    assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--subset", "novel", *common]) == 2
    assert "its novel half (1 of 2 classes: dog) has no images" in capsys.readouterr().err


def test_links_to_folders_are_followed_and_bad_links_are_said(tmp_path, shared):
    from protext.inputs import collect

    real = tmp_path / "real"
    real.mkdir()
    for i, f in enumerate(sorted((shared / "images" / "cifar10_test_sample" / "cat").iterdir())[:3]):
        (real / f"{i}.jpg").write_bytes(f.read_bytes())
    top = tmp_path / "top"
    top.mkdir()
    (top / "linked").symlink_to(real, target_is_directory=True)
    (real / "back").symlink_to(top, target_is_directory=True)  # a loop
    (top / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    notes = []
    found = collect([top], notes)
    assert [p.name for p in found] == ["0.jpg", "1.jpg", "2.jpg"]
    assert any("a link to a folder already listed (a loop)" in n for n in notes)
    assert any("gone.jpg: a link to nothing (dangling)" in n for n in notes)


def test_accuracies_are_exact_fractions():
    import torch

    from protext.metrics import top1

    feats, labels = torch.eye(3)[[0, 1, 2] * 8 + [0]], torch.tensor([0, 1, 2] * 8 + [1])
    assert top1(feats, labels, torch.eye(3)) == 100.0 * 24 / 25


def test_bash_completion_knows_every_command_and_flag(tmp_path, capsys):
    import subprocess

    assert main(["completion", "bash"]) == 0
    script = tmp_path / "c.sh"
    script.write_text(capsys.readouterr().out)
    run = lambda words: subprocess.run(  # noqa: E731
        ["bash", "-c", f"source {script}; COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; _protext; "
                       f"echo ${{COMPREPLY[@]}}"], capture_output=True, text=True, check=True).stdout.split()
    assert run("protext la") == ["label"]
    assert run("protext label --part") == ["--part-format", "--part-size"] and "--max-new-texts" in run("protext serve --max")


def test_the_package_says_it_is_typed():
    from importlib.resources import files

    assert files("protext").joinpath("py.typed").is_file()
