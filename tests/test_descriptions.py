import json

import pytest
from support import CUPL

from protext.descriptions import load_descriptions, normalize_name, read_class_list, stats
from protext.errors import ProtextError


def write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_every_shared_description_file_loads(shared):
    files = sorted(CUPL.glob("*.json"))
    assert len(files) == 13
    for f in files:
        data = load_descriptions(f)
        assert all(k == normalize_name(k) for k in data)
        assert all(s and s == s.strip() for v in data.values() for s in v)
    assert len(load_descriptions(CUPL / "imagenet_prompts_base.json")) == 998


def test_names_are_normalised_and_selected_in_order(tmp_path):
    p = write(tmp_path, {"Annual_Crop  Land": [" A field. "], "Forest": ["Trees."]})
    assert load_descriptions(p) == {"annual crop land": ["A field."], "forest": ["Trees."]}
    assert list(load_descriptions(p, ["forest", "ANNUAL CROP_LAND"])) == ["forest", "annual crop land"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"),
    ('{"cat": []}', "key 'cat': empty list"),
    ('{"cat": ["ok", 3]}', "key 'cat', item 1: expected a string"),
    ('{"cat": "a cat"}', "key 'cat': expected a list"),
    ('{"Red_Fox": ["x"], "red fox": ["y"]}', "'Red_Fox' and 'red fox' are the same class"),
    ('{"cat": ["x"],', "not valid JSON \\(line 1"),
    ('{"cat": ["x"], "cat": ["y"]}', "key 'cat' appears twice"),
    ("{}", "no classes"),
])
def test_bad_files_are_rejected_with_file_and_key(tmp_path, content, message):
    p = write(tmp_path, content)
    with pytest.raises(ProtextError, match=message) as e:
        load_descriptions(p)
    assert str(p) in str(e.value)


def test_missing_classes_are_listed(tmp_path):
    p = write(tmp_path, {"cat": ["x"]})
    with pytest.raises(ProtextError, match=r"d\.json: no descriptions for 2 requested classes: 'dog', 'Great_Owl'"):
        load_descriptions(p, ["cat", "dog", "Great_Owl"])
    with pytest.raises(ProtextError, match="no such description file"):
        load_descriptions(tmp_path / "missing.json")


def test_class_lists_from_strings_and_files(tmp_path):
    assert read_class_list("cat, dog ,") == ["cat", "dog"]
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    assert read_class_list(str(tmp_path / "c.txt")) == ["cat", "dog"]
    (tmp_path / "c.json").write_text('["a", 1]')
    with pytest.raises(ProtextError, match="c.json"):
        read_class_list(str(tmp_path / "c.json"))


def test_a_key_repeated_exactly_is_rejected_with_its_line(tmp_path):
    p = write(tmp_path, '{\n  "cat": ["a"],\n  "dog": ["b"],\n  "cat": ["c"]\n}')
    with pytest.raises(ProtextError, match=r"d\.json: key 'cat' appears twice \(line 4\)"):
        load_descriptions(p)


def test_files_with_a_byte_order_mark_load_as_without(shared, tmp_path):
    source = CUPL / "eurosat_prompts_full.json"
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    assert load_descriptions(p) == load_descriptions(source)
    (tmp_path / "c.txt").write_bytes("\ufeffcat\ndog\n".encode())
    assert read_class_list(str(tmp_path / "c.txt")) == ["cat", "dog"]
    (tmp_path / "c.json").write_bytes('\ufeff["cat", "dog"]'.encode())
    assert read_class_list(str(tmp_path / "c.json")) == ["cat", "dog"]


@pytest.mark.parametrize("spec", ["../classes.tx", "classes.txt", "lists/pets", "C:\\lists\\pets", "names.JSON"])
def test_a_missing_class_file_is_an_error_not_a_class_name(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProtextError, match="no such class file; if it is a class name, end it with a comma"):
        read_class_list(spec)


def test_class_names_that_look_like_paths_need_a_comma(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_class_list("AC/DC,") == ["AC/DC"]
    assert read_class_list("T-shirt/top,Trouser") == ["T-shirt/top", "Trouser"]
    (tmp_path / "cat").mkdir()
    assert read_class_list("cat") == ["cat"]  # a folder of that name in the working directory changes nothing


def test_a_class_file_that_is_a_folder_or_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "classes.txt").mkdir()
    with pytest.raises(ProtextError, match="classes.txt: is a folder, not a class file"):
        read_class_list(str(tmp_path / "classes.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProtextError, match="latin1.txt: not UTF-8 text"):
        read_class_list(str(tmp_path / "latin1.txt"))


def test_non_ascii_names_match_composed_or_decomposed(tmp_path):
    decomposed = "Cre\u0300me bru\u0302le\u0301e"  # as a macOS file name spells "Crème brûlée"
    p = write(tmp_path, {decomposed: ["A custard."], "Café au lait": ["A coffee."]})
    data = load_descriptions(p, ["crème brûlée", "CAFÉ_AU_LAIT"])
    assert list(data) == ["crème brûlée", "café au lait"]
    assert stats(data, ["Crème brûlée", "Smørrebrød"])["label_set"] == {"size": 2, "missing": ["Smørrebrød"],
                                                                         "extra": ["café au lait"]}
    (tmp_path / "c.txt").write_text("Crème brûlée\nSmørrebrød\n", encoding="utf-8")
    assert read_class_list(str(tmp_path / "c.txt")) == ["Crème brûlée", "Smørrebrød"]
