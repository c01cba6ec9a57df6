import json

import pytest
from support import CUPL, SHARED

from protext import sources
from protext.cli import main
from protext.errors import ProtextError
from protext.formats import descriptor_sentence, import_descriptions


def test_dclip_descriptors_become_sentences(tmp_path):
    p = tmp_path / "dclip.json"
    p.write_text(json.dumps({"Owl": ["large round eyes", "is nocturnal", "which has feathers"], "apple": ["red skin"]}))
    data = import_descriptions(p, "dclip")
    assert data["owl"] == ["An owl, which has large round eyes.", "An owl, which is nocturnal.",
                           "An owl, which has feathers."]
    assert data["apple"] == ["An apple, which has red skin."]
    assert descriptor_sentence("pug", "usually fawn.") == "A pug, which usually fawn."


def test_text_folder_one_file_per_class(tmp_path):
    (tmp_path / "Red_Fox.txt").write_text("A red fox is orange.\n\nIt has a bushy tail.\n")
    (tmp_path / "owl.txt").write_text("An owl has big eyes.\n")
    assert import_descriptions(tmp_path, "text") == {"red fox": ["A red fox is orange.", "It has a bushy tail."],
                                                     "owl": ["An owl has big eyes."]}
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ProtextError, match="empty.*empty list"):
        import_descriptions(tmp_path, "text")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ProtextError, match="no .txt files"):
        import_descriptions(tmp_path / "sub", "text")
    with pytest.raises(ProtextError, match="expected a folder"):
        import_descriptions(tmp_path / "nowhere", "text")


def test_import_command_writes_protext_json(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cat.txt").write_text("A cat naps.\n")
    assert main(["descriptions", "import", str(tmp_path / "in"), "--format", "text", "--output", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text()) == {"cat": ["A cat naps."]}
    assert main(["descriptions", "import", str(CUPL / "pets_prompts_full.json"), "--format", "cupl",
                 "--output", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())) == 37


def test_stats_command(capsys):
    assert main(["descriptions", "stats", str(CUPL / "pets_prompts_full.json"), "--classes", "pug,sphynx,dragon"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["classes"] == 37 and s["sentences"] == 740
    assert s["per_class"] == {"min": 20, "mean": 20.0, "max": 20}
    assert s["label_set"]["missing"] == ["dragon"] and s["duplicates_within_class"] > 0
    assert s["words_per_sentence"]["p5"] <= s["words_per_sentence"]["median"] <= s["words_per_sentence"]["max"]


def test_fetch_offline_names_url_and_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sources.SOURCES, "cupl:dtd", "http://127.0.0.1:9/texture_prompts_full.json")
    assert main(["descriptions", "fetch", "cupl:dtd", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/texture_prompts_full.json" in err and str(tmp_path / "descriptions" / "cupl-dtd.json") in err
    assert main(["descriptions", "fetch", "cupl:nope"]) == 2
    assert "unknown description set" in capsys.readouterr().err


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch, capsys):
    import http.server
    import threading

    served = []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            served.append(self.path)
            body = (CUPL / "texture_prompts_full.json").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(sources.SOURCES, "cupl:dtd", f"http://127.0.0.1:{httpd.server_address[1]}/t.json")
        for _ in range(2):
            assert main(["descriptions", "fetch", "cupl:dtd", "--cache-dir", str(tmp_path), "--output", str(tmp_path / "t.json")]) == 0
    finally:
        httpd.shutdown()
    assert served == ["/t.json"]
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads((CUPL / "texture_prompts_full.json").read_text())


def test_dclip_and_text_files_with_a_byte_order_mark_load_as_without(shared, tmp_path):
    source = SHARED / "descriptions" / "dclip" / "descriptors_pets.json"
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    assert import_descriptions(p, "dclip") == import_descriptions(source, "dclip")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "owl.txt").write_bytes("\ufeffAn owl has big eyes.\n".encode())
    assert import_descriptions(tmp_path / "txt", "text") == {"owl": ["An owl has big eyes."]}


def test_dclip_repeated_or_missing_file_is_rejected_with_the_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"owl": ["big eyes"], "owl": ["feathers"]}')
    with pytest.raises(ProtextError, match=r"d\.json: key 'owl' appears twice \(line 1\)"):
        import_descriptions(p, "dclip")
    with pytest.raises(ProtextError, match="nowhere.json: no such DCLIP descriptor file"):
        import_descriptions(tmp_path / "nowhere.json", "dclip")
