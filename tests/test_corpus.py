import json

import pytest
from conftest import run_cli

from slm.stages.corpus import CorpusConfig, run


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "test").mkdir()
    (root / "pydoc_data").mkdir()
    (root / "os.py").write_text('"""Operating system interfaces for portable code."""\n\n'
                                "# This comment explains how the path separator\n# is chosen on each platform.\n"
                                "sep = '/'  # noqa: E501\n\n\ndef f():\n    \"\"\"Return nothing at all, quietly.\"\"\"\n")
    (root / "pkg" / "mod.py").write_text("class A:\n    '''A small class with a docstring.'''\n")
    (root / "site-packages" / "third.py").write_text("x = 'not the standard library'\n")
    (root / "test" / "test_os.py").write_text("# tests for the os module go here\nassert True\n")
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")
    (root / "pydoc_data" / "topics.py").write_text("topics = {'assert': 'The assert statement is a convenient "
                                                   "way.', 'if': 'The if statement is used for branching.'}\n")
    (root / "LICENSE.txt").write_text("PSF LICENSE AGREEMENT FOR PYTHON\n")
    return root


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_from_a_standard_library(tmp_path, fake_stdlib):
    out = run(CorpusConfig(out=tmp_path / "corpus", stdlib=fake_stdlib, heldout_percent=0))
    code = read(out / "code" / "train.jsonl")
    assert [d["path"] for d in code] == ["os.py", "pkg/mod.py", "test/test_os.py"]  # sorted, no site-packages
    assert code[0]["text"] == (fake_stdlib / "os.py").read_text()
    prose = {d["path"]: d["text"] for d in read(out / "prose" / "train.jsonl")}
    assert prose["os.py"] == ("Operating system interfaces for portable code.\n\nReturn nothing at all, quietly.\n\n"
                              "This comment explains how the path separator is chosen on each platform.")
    assert prose["pydoc_data/topics.py#if"] == "The if statement is used for branching."
    assert "LICENSE.txt" in prose and "test/test_os.py" in prose
    assert read(out / "code" / "valid.jsonl") == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "corpus" and m["counts"]["code/train"]["documents"] == 3
    assert m["counts"]["files_skipped_not_utf8"] == 1
    no_tests = run(CorpusConfig(out=tmp_path / "c2", stdlib=fake_stdlib, include_tests=False))
    assert "test/test_os.py" not in {d["path"] for d in read(no_tests / "code" / "train.jsonl")}


def test_heldout_split_is_stable(tmp_path, fake_stdlib):
    a = run(CorpusConfig(out=tmp_path / "a", stdlib=fake_stdlib, heldout_percent=50))
    b = run(CorpusConfig(out=tmp_path / "b", stdlib=fake_stdlib, heldout_percent=50))
    for split in ("train", "valid"):
        assert (a / "code" / f"{split}.jsonl").read_text() == (b / "code" / f"{split}.jsonl").read_text()
    paths = [d["path"] for s in ("train", "valid") for d in read(a / "code" / f"{s}.jsonl")]
    assert sorted(paths) == ["os.py", "pkg/mod.py", "test/test_os.py"]


def test_not_a_stdlib(tmp_path):
    proc = run_cli("tokenize", "corpus", "--stdlib", tmp_path, "--out", tmp_path / "c")
    assert proc.returncode == 1 and "not a Python standard library (no os.py)" in proc.stderr
