import gzip
import hashlib
import json
import unicodedata

import numpy as np
import pytest
from conftest import VARIED_TEXT, run_cli, stdlib_samples, write_jsonl

from slm.formats.tokenizer import Tokenizer
from slm.formats.tokens import TokensDir
from slm.stages.encode import EncodeConfig, run, summary

DOCS = [t for t in VARIED_TEXT if t.strip()] + stdlib_samples(2)


@pytest.fixture(scope="module")
def tok(small_tok):
    return Tokenizer(small_tok)


def encode(tok, inputs, out, **kw):
    path = run(EncodeConfig(tokenizer=tok.dir, inputs=[str(i) for i in inputs], out=out, workers=kw.pop("workers", 1),
                            **kw))
    return TokensDir(path), summary(path)


def decoded_docs(tok, td, eos=True):
    out = []
    for doc in td.documents():
        ids = doc.tolist()
        if eos:
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            ids = ids[:-1]
        out.append(tok.decode(ids))
    return out


def nfc(texts):
    return [unicodedata.normalize("NFC", t) for t in texts]


def test_every_input_format(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset, DatasetDict

    plain = write_jsonl(tmp_path / "in" / "a.jsonl", DOCS)
    gz = tmp_path / "in" / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "in" / "c.jsonl.zst"
    # two concatenated zstd frames: readers must read across frames
    half = plain.read_bytes().split(b"\n", 3)
    zst.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(half[:3]) + b"\n")
                    + zstandard.ZstdCompressor().compress(half[3]))
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "in" / "d.parquet", row_group_size=4)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "e.txt").write_text(DOCS[0], encoding="utf-8")
    Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": Dataset.from_dict({"text": DOCS[:3]}), "test": Dataset.from_dict({"text": DOCS[3:5]})}
                ).save_to_disk(str(tmp_path / "dd"))
    for inp, want in [(plain, DOCS), (gz, DOCS), (zst, DOCS), (tmp_path / "in" / "d.parquet", DOCS),
                      (tmp_path / "txt" / "e.txt", [DOCS[0]]), (tmp_path / "ds", DOCS),
                      (tmp_path / "dd", DOCS[:5])]:
        td, summary = encode(tok, [inp], tmp_path / "out" / inp.name)
        assert decoded_docs(tok, td) == nfc(want), inp.name
        assert summary["documents"] == len(want) == td.n_documents
        assert td.n_tokens == summary["tokens"] == sum(len(tok.encode(t)) + 1 for t in want)
    # A directory: every input in it, in sorted order.
    td, summary = encode(tok, [tmp_path / "in"], tmp_path / "out" / "dir")
    assert summary["inputs"] == 4 and td.n_documents == 4 * len(DOCS)
    td, summary = encode(tok, [str(tmp_path / "in" / "*.jsonl*")], tmp_path / "out" / "glob")
    assert summary["inputs"] == 3


def test_paragraph_txt_and_split_units(tmp_path, tok):
    paragraphs = [f"Paragraph {i}: " + " ".join(["word"] * (i % 7 + 1)) + "\nsecond line." for i in range(300)]
    txt = tmp_path / "p.txt"
    txt.write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    one, s1 = encode(tok, [txt], tmp_path / "one", txt_mode="paragraph")
    many, s2 = encode(tok, [txt], tmp_path / "many", txt_mode="paragraph", shard_mb=0.002)
    assert s1["shards"] == 1 and s2["shards"] > 5
    assert decoded_docs(tok, one) == paragraphs == decoded_docs(tok, many)
    jsonl = write_jsonl(tmp_path / "big.jsonl", paragraphs)
    split, s3 = encode(tok, [jsonl], tmp_path / "split", shard_mb=0.003, workers=2)
    assert s3["shards"] > 5
    assert np.array_equal(split.read(0, split.n_tokens), one.read(0, one.n_tokens))


def test_two_workers_write_the_same_shards(tmp_path, tok):
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", DOCS[i:] + DOCS[:i]) for i in range(4)]
    a, _ = encode(tok, inputs, tmp_path / "a", workers=1)
    b, _ = encode(tok, inputs, tmp_path / "b", workers=2)
    assert a.shard_names == b.shard_names
    for name in a.shard_names:
        for ext in (".bin", ".idx"):
            assert (a.dir / "shards" / f"{name}{ext}").read_bytes() == (b.dir / "shards" / f"{name}{ext}").read_bytes()


def test_default_workers_where_the_os_has_no_affinity_call(tmp_path, tok, monkeypatch):
    """Without --workers, encode uses every core the process may run on; on an OS without os.sched_getaffinity
    (macOS) that is os.cpu_count(), not an AttributeError."""
    import os

    from slm import devices

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert devices.usable_cores() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert devices.usable_cores() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", DOCS) for i in range(2)]
    td, s = encode(tok, inputs, tmp_path / "out", workers=None)
    assert s["documents"] == 2 * len(DOCS) and len(td.shard_names) == 2


def test_manifest_counts_and_hashes(tmp_path, tok):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS + [""])
    td, summary = encode(tok, [inp], tmp_path / "out")
    m = td.manifest
    assert m["kind"] == "tokens" and m["format_version"] == 1
    assert m["tokenizer"]["tokenizer_sha256"] == tok.hash and m["dtype"] == "uint16"
    assert m["inputs"][0]["sha256"] == hashlib.sha256(inp.read_bytes()).hexdigest()
    assert m["counts"]["bytes_read"] == inp.stat().st_size
    assert m["counts"]["documents"] == len(DOCS) and m["counts"]["empty_documents"] == 1
    assert m["counts"]["tokens"] == td.n_tokens == sum(s["tokens"] for s in m["shards"])
    shard = m["shards"][0]
    assert shard["bin_sha256"] == hashlib.sha256((td.dir / "shards" / f"{shard['name']}.bin").read_bytes()).hexdigest()
    assert summary["path"] == str(td.dir)


def test_inputs_are_hashed_in_a_forked_process_beside_the_encoder_build(tmp_path, monkeypatch):
    """A forked process hashes the inputs while the main one builds the encoder (MEANWHILE): each hash is the
    file's sha256 whatever its size (read and reported 4 MB at a time), an input unchanged since the previous run
    keeps its hash unread, a read error in the hasher reaches the user as itself, and a hasher that dies is named."""
    import os

    from slm.errors import SlmError
    from slm.formats.records import expand_inputs
    from slm.stages import encode as enc

    paths = [write_jsonl(tmp_path / f"in{i}.jsonl", DOCS[i:]) for i in range(3)]
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"text": "' + b"x" * (70 << 20) + b'"}\n')
    paths.append(big)
    inputs = expand_inputs([str(p) for p in paths])
    ran_in = []
    hashes = enc._hash_inputs(inputs, {}, meanwhile=lambda: ran_in.append(os.getpid()))
    assert hashes == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert ran_in == [os.getpid()]  # the build ran here, where forked workers inherit it

    first = inputs[0]
    previous = {str(first.path): {"bytes": first.size, "mtime_ns": first.mtime_ns, "sha256": "kept"}}
    assert enc._hash_inputs(inputs[:1], previous, meanwhile=lambda: ran_in.append(0)) == ["kept"]
    assert ran_in == [os.getpid()]  # nothing to hash: the encoder is built later, only if some unit needs it

    def unreadable(inp, advance):
        raise PermissionError(13, "Permission denied", str(inp.path))

    monkeypatch.setattr(enc, "_hash_one", unreadable)
    with pytest.raises(PermissionError, match="in0.jsonl"):
        enc._hash_inputs(inputs, {}, meanwhile=lambda: None)
    monkeypatch.setattr(enc, "_hash_one", lambda inp, advance: os._exit(3))
    with pytest.raises(SlmError, match=r"hashing process ended early \(exit code 3\)"):
        enc._hash_inputs(inputs, {}, meanwhile=lambda: None)


def test_no_eos(tmp_path, tok):
    td, _ = encode(tok, [write_jsonl(tmp_path / "in.jsonl", DOCS)], tmp_path / "out", eos=False)
    assert decoded_docs(tok, td, eos=False) == nfc(DOCS)
    assert td.manifest["eos_appended"] is False


def test_arcade_shards_are_int32(tmp_path, arcade_dir):
    tok = Tokenizer(arcade_dir)
    td, _ = encode(tok, [write_jsonl(tmp_path / "in.jsonl", DOCS[:4])], tmp_path / "out")
    assert td.dtype == np.int32 and td.shards[0].dtype == np.int32
    assert decoded_docs(tok, td) == nfc(DOCS[:4])


def test_rerun_reuses_unchanged_inputs(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[::-1])
    first, s1 = encode(tok, [a, b], tmp_path / "out")
    before = first.read(0, first.n_tokens)
    _, s2 = encode(tok, [a, b], tmp_path / "out")
    assert s1["reused_shards"] == 0 and s2["reused_shards"] == 2
    write_jsonl(b, DOCS[:3])
    third, s3 = encode(tok, [a, b], tmp_path / "out")
    assert s3["reused_shards"] == 1
    assert decoded_docs(tok, third) == nfc(DOCS + DOCS[:3])
    assert np.array_equal(third.read(0, first.shards[0].n_tokens), before[:first.shards[0].n_tokens])
    _, s4 = encode(tok, [a, b], tmp_path / "out", eos=False)  # a setting changed: nothing reused
    assert s4["reused_shards"] == 0
    assert not (tmp_path / "out.partial").exists()


def test_failed_run_resumes_where_it_stopped(tmp_path, tok):
    good = write_jsonl(tmp_path / "a.jsonl", DOCS)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, good, bad, "--out", tmp_path / "out", "-j", "1")
    assert proc.returncode == 1 and f"{bad}:2: not valid JSON" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "out.partial" / "units").iterdir())  # a's shard is kept for the next run
    write_jsonl(bad, ["fine", "now fixed"])
    _, summary = encode(tok, [good, bad], tmp_path / "out")
    assert summary["reused_shards"] == 1 and summary["documents"] == len(DOCS) + 2
    assert not (tmp_path / "out.partial").exists()


BAD = [
    ('{"text": "ok"}\n{"text": "unterminated\n', "{f}:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', '{f}:2: no "text" field (the record has keys: body)'),
    ('{"text": 5}\n', '{f}:1: "text" is int, expected a string'),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "{f}:2: invalid UTF-8 at byte 14 of the line"),
    ("[1, 2]\n", "{f}:1: expected a JSON object, got list"),
    ("", "{f}: empty file (expected at least one document"),
    ("\n\n", "{f}: no documents"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_inputs_give_one_line_errors(tmp_path, tok, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = run_cli("tokenize", "encode", "-t", tok.dir, f, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message.format(f=f) in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written shard anywhere


def test_line_numbers_in_a_split_unit(tmp_path, tok):
    lines = [json.dumps({"text": f"document number {i} " * 5}) for i in range(400)]
    lines[377] = '{"text": oops}'
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, f, "--out", tmp_path / "out", "--shard-mb", "0.002", "-j", "2")
    assert proc.returncode == 1 and f"{f}:378: not valid JSON" in proc.stderr


def test_skip_bad_counts(tmp_path, tok):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"text": "one"}\n{"text": broken\n{"body": 1}\n{"text": "caf\xe9"}\n{"text": "two"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, f, empty, "--out", tmp_path / "out", "--skip-bad", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["bad_records"] == 3 and summary["documents"] == 2 and summary["skipped_inputs"] == 1
    td = TokensDir(tmp_path / "out")
    assert decoded_docs(tok, td) == ["one", "two"]
    assert td.manifest["inputs"][0]["bad_records"] == 3
    assert td.manifest["inputs"][1]["skipped"] == "empty file"


def test_missing_column_and_unknown_inputs(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, tmp_path / "x.parquet", "--out", tmp_path / "o")
    assert proc.returncode == 1 and 'no column "text" (columns: content)' in proc.stderr
    proc = run_cli("tokenize", "encode", "-t", tok.dir, tmp_path / "x.parquet", "--out", tmp_path / "o",
                   "--text-key", "content")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "x.csv").write_text("a,b\n")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, tmp_path / "x.csv", "--out", tmp_path / "o2")
    assert proc.returncode == 1 and "x.csv: unsupported input" in proc.stderr
    proc = run_cli("tokenize", "encode", "-t", tmp_path, tmp_path / "x.parquet", "--out", tmp_path / "o3")
    assert proc.returncode == 1 and "no manifest.json" in proc.stderr


def test_refuses_to_replace_a_foreign_directory(tmp_path, tok):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    proc = run_cli("tokenize", "encode", "-t", tok.dir, write_jsonl(tmp_path / "a.jsonl", DOCS),
                   "--out", tmp_path / "home")
    assert proc.returncode == 1 and "not written by slm" in proc.stderr
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"
