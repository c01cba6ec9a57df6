import json

import pytest

from conftest import CUPL
from protext.descriptions import load_descriptions, normalize_name, read_class_list
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
