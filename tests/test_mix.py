import json

import numpy as np
import pytest
import yaml
from conftest import run_cli, write_jsonl

from slm.errors import SlmError
from slm.formats.mixplan import MixReader, cumulative_counts, permute
from slm.formats.tokenizer import Tokenizer
from slm.formats.manifest import read_json
from slm.recipes import parse_budget
from slm.stages.encode import EncodeConfig, run as encode
from slm.stages.mix import MixConfig, resolve, run as mix


@pytest.fixture(scope="module")
def sources(tmp_path_factory, small_tok):
    """Sources whose token counts are known by hand: every digit is one token (Arcade rules), plus one EOD per doc."""
    d = tmp_path_factory.mktemp("sources")
    a_docs = ["1" * 99, "2" * 199, "3" * 299, "4" * 403]  # 100 + 200 + 300 + 404 = 1004 tokens
    b_docs = ["5" * 200, "6" * 200]  # 201 + 201 = 402 tokens
    out = {}
    for name, docs in (("a", a_docs), ("b", b_docs)):
        encode(EncodeConfig(tokenizer=small_tok, inputs=[str(write_jsonl(d / f"{name}.jsonl", docs))],
                            out=d / name, workers=1))
        out[name] = d / name
    return out


def write_mix(path, sources, phases, seq_len=10, seed=7, **extra):
    path.write_text(yaml.safe_dump({"seq_len": seq_len, "seed": seed, "sources": {k: str(v) for k, v in sources.items()},
                                    "phases": phases, **extra}))
    return path


PHASES = [{"name": "one", "tokens": 500, "weights": {"a": 3, "b": 2}},
          {"name": "two", "tokens": "1k", "weights": {"a": 1, "b": 3}},
          {"name": "three", "tokens": 70, "weights": {"a": 1, "b": 1}}]


def test_ledger_by_hand(tmp_path, sources):
    plan, _, _ = resolve(MixConfig(mix=str(write_mix(tmp_path / "m.yaml", sources, PHASES))))
    by = {s["name"]: s for s in plan["sources"]}
    assert by["a"]["tokens"] == 1004 and by["a"]["sequences"] == 100  # (1004 - 1) // 10
    assert by["b"]["tokens"] == 402 and by["b"]["sequences"] == 40
    rows = {(r["phase"], r["source"]): r for r in plan["ledger"]}
    # phase one: 500 // 10 = 50 samples; 3:2 -> 30 and 20
    assert rows["one", "a"]["tokens_drawn"] == 300 and rows["one", "a"]["epochs"] == pytest.approx(0.30)
    assert rows["one", "b"]["tokens_drawn"] == 200 and rows["one", "b"]["epochs"] == pytest.approx(0.50)
    assert rows["one", "a"]["weight"] == pytest.approx(0.6) and rows["one", "a"]["tokens_available"] == 1004
    # phase two: 100 samples; 1:3 -> 25 and 75; epochs count through the phase
    assert rows["two", "a"]["tokens_drawn"] == 250 and rows["two", "a"]["epochs"] == pytest.approx(0.55)
    assert rows["two", "b"]["tokens_drawn"] == 750 and rows["two", "b"]["epochs"] == pytest.approx(95 / 40)
    assert rows["two", "b"]["epochs_in_phase"] == pytest.approx(75 / 40)
    # phase three: 7 samples, 3.5 : 3.5 -> the tie goes to the first source
    assert rows["three", "a"]["tokens_drawn"] == 40 and rows["three", "b"]["tokens_drawn"] == 30
    assert plan["total_samples"] == 157 and plan["total_tokens"] == 1570


def test_reader_draws_exactly_the_ledger(tmp_path, sources):
    out = mix(MixConfig(mix=str(write_mix(tmp_path / "m.yaml", sources, PHASES)), out=tmp_path / "mix"))
    plan = read_json(out / "plan.json")
    r = MixReader(out)
    phase, source, start = r.plan.locate(np.arange(len(r)))
    for p, ph in enumerate(plan["phases"]):
        for s, name in enumerate(r.plan.source_names):
            assert ((phase == p) & (source == s)).sum() == ph["samples_per_source"].get(name, 0)
    # Each epoch of a source visits each of its sequences once: b has 40 sequences and is drawn 20 + 75 + 3 times.
    b = start[source == 1] // 10
    assert sorted(b[:40].tolist()) == list(range(40)) and sorted(b[40:80].tolist()) == list(range(40))
    assert b[:40].tolist() != b[40:80].tolist()  # a new order each epoch
    assert not np.array_equal(b[:40], np.arange(40))  # shuffled


def test_samples_and_document_starts(tmp_path, sources, small_tok):
    out = mix(MixConfig(mix=str(write_mix(tmp_path / "m.yaml", sources, PHASES, seq_len=64)), out=tmp_path / "mix"))
    r = MixReader(out)
    eos = Tokenizer(small_tok).eos_id
    streams = [src.read(0, src.n_tokens) for src in r.sources]
    for s in r.samples(range(len(r))):
        assert s.tokens.shape == (65,)
        stream = streams[s.source]
        assert np.array_equal(s.tokens, stream[s.start:s.start + 65])
        # Brute force: a document starts at 0 of the stream and after every end-of-document token.
        starts = [i for i in range(s.start, s.start + 65) if i == 0 or stream[i - 1] == eos]
        assert s.doc_starts.tolist() == [i - s.start for i in starts]


def test_determinism_and_world_size_independence(tmp_path, sources):
    out = mix(MixConfig(mix=str(write_mix(tmp_path / "m.yaml", sources, PHASES)), out=tmp_path / "mix"))
    one = MixReader(out)
    full, _ = one.batch(np.arange(len(one)))
    again, _ = MixReader(out).batch(np.arange(len(one)))
    assert np.array_equal(full, again)
    # Two processes reading halves, and two reading strided slices, rebuild the same stream.
    halves = [MixReader(out).batch(np.arange(k * 80, min((k + 1) * 80, len(one))))[0] for k in range(2)]
    assert np.array_equal(np.concatenate(halves), full)
    for world in (2, 3):
        parts = [MixReader(out).batch(np.arange(rank, len(one), world))[0] for rank in range(world)]
        rebuilt = np.empty_like(full)
        for rank, part in enumerate(parts):
            rebuilt[rank::world] = part
        assert np.array_equal(rebuilt, full)
    # Reading one sample at a time in any order gives the same rows.
    for n in (156, 0, 77, 3):
        assert np.array_equal(one.sample(n).tokens, full[n])
    # Another seed, another order, the same ledger.
    out2 = mix(MixConfig(mix=str(write_mix(tmp_path / "m2.yaml", sources, PHASES, seed=8)), out=tmp_path / "mix2"))
    other, _ = MixReader(out2).batch(np.arange(len(one)))
    assert not np.array_equal(other, full)


def test_permutation_is_a_bijection():
    for n in list(range(1, 70)) + [1000, 4097, 123457]:
        p = permute(np.arange(n), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    assert permute(np.array([5, 9]), 1000, 1).tolist() == [a[5], a[9]]


def test_block_counts_are_exact_and_monotone():
    per = np.array([99_900, 100])  # a weight of 0.001
    total = int(per.sum())
    block = max(4096, -(-total // 100))
    prev = np.zeros(2, dtype=np.int64)
    for m in list(range(0, total, block)) + [total]:
        c = cumulative_counts(per, total, m)
        assert c.sum() == m and (c >= prev).all()
        prev = c
    assert prev.tolist() == per.tolist()


def test_epoch_warning_and_json(tmp_path, sources):
    m = write_mix(tmp_path / "m.yaml", sources, [{"name": "big", "tokens": 3000, "weights": {"a": 1, "b": 1}}])
    proc = run_cli("mix", m, "--out", tmp_path / "mix", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "source 'b' is repeated 3.8 epochs" not in proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["ledger"][1]["epochs"] == pytest.approx(150 / 40)
    m = write_mix(tmp_path / "m.yaml", sources, [{"name": "big", "tokens": 4000, "weights": {"a": 1, "b": 1}}])
    proc = run_cli("mix", m, "--dry-run")
    assert proc.returncode == 0 and proc.stdout == ""
    assert "source 'b' is repeated 5.0 epochs, more than 4" in proc.stderr
    assert "the token ledger" in proc.stderr


def test_refuses_sources_with_different_tokenizers(tmp_path, sources, arcade_dir):
    encode(EncodeConfig(tokenizer=arcade_dir, inputs=[str(write_jsonl(tmp_path / "c.jsonl", ["77777"]))],
                        out=tmp_path / "c", workers=1))
    m = write_mix(tmp_path / "m.yaml", {"a": sources["a"], "c": tmp_path / "c"},
                  [{"name": "x", "tokens": 100, "weights": {"a": 1, "c": 1}}], seq_len=2)
    proc = run_cli("mix", m, "--out", tmp_path / "mix")
    assert proc.returncode == 1 and "sources disagree on the tokenizer: 'a'" in proc.stderr
    assert not (tmp_path / "mix").exists()


@pytest.mark.parametrize("change,message", [
    (lambda d: d["phases"][0]["weights"].update(a=-1), "phases[0].weights.a: expected a positive number, got -1"),
    (lambda d: d["phases"][0]["weights"].update(zzz=1), "phases[0].weights.zzz: no such source (sources: a, b)"),
    (lambda d: d["phases"][0].update(tokens="lots"), "phases[0].tokens: expected a token budget like 6T"),
    (lambda d: d["phases"][0].update(tokens=5), "phases[0].tokens: 5 is less than one sample of 10 tokens"),
    (lambda d: d.update(seq_len=0), "seq_len: expected an integer >= 1, got 0"),
    (lambda d: d.update(seqlen=4), "unknown key 'seqlen'"),
    (lambda d: d["sources"].update(a="/nonexistent/tokens"), "/nonexistent/tokens: no such directory"),
    (lambda d: d.update(seq_len=1000), "source 'b'"),
    (lambda d: d.update(phases=[]), "phases: expected a list"),
])
def test_validation_errors(tmp_path, sources, change, message):
    data = {"seq_len": 10, "seed": 1, "sources": {k: str(v) for k, v in sources.items()},
            "phases": [{"name": "p", "tokens": 100, "weights": {"a": 1, "b": 1}}]}
    change(data)
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(data))
    proc = run_cli("mix", m, "--out", tmp_path / "mix")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "mix").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("seq_len: 10\nsources:\n  a: [unclosed\nphases: []\n")
    proc = run_cli("mix", m, "--dry-run")
    assert proc.returncode == 1 and f"{m}:" in proc.stderr and "not valid YAML" in proc.stderr


def test_budgets():
    assert parse_budget("6T", "x") == 6 * 10**12
    assert parse_budget("500B", "x") == 5 * 10**11
    assert parse_budget("20M", "x") == 20_000_000
    assert parse_budget("1.5k", "x") == 1500
    assert parse_budget(2_000, "x") == 2000
    assert parse_budget("3_000", "x") == 3000
    for bad in ("-1", "6X", "", True, 0):
        with pytest.raises(SlmError):
            parse_budget(bad, "x")


def test_recipe_mixtures(tmp_path, sources):
    binds = [x for name in ("fineweb_edu", "dclm", "starcoderdata", "stack_edu", "openwebmath", "infimm_webmath",
                            "finemath", "infiwebmath", "cosmopedia_v2") for x in ("--source", f"{name}={sources['a']}")]
    proc = run_cli("mix", "smollm2-1_7b", *binds, "--seq-len", "8", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [p["name"] for p in plan["phases"]] == ["stable-1", "stable-2", "stable-3", "decay"]
    assert [p["tokens_requested"] for p in plan["phases"]] == [6 * 10**12, 2 * 10**12, 2 * 10**12, 10**12]
    assert plan["phases"][0]["weights"] == pytest.approx({"fineweb_edu": 0.54, "dclm": 0.36, "starcoderdata": 0.10})
    proc = run_cli("mix", "smollm2-1_7b", "--dry-run")
    assert proc.returncode == 1 and "has no path: bind it with --source" in proc.stderr
    root = tmp_path / "root"
    root.mkdir()
    (root / "code").symlink_to(sources["a"])
    (root / "prose").symlink_to(sources["b"])
    proc = run_cli("mix", "tiny", "--source-root", root, "--seq-len", "8", "--out", tmp_path / "tinymix")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "tinymix")
    assert len(MixReader(tmp_path / "tinymix")) == 1_000_000
    proc = run_cli("mix", "stablelm-2-1_6b", "--source-root", root, "--dry-run")
    assert proc.returncode == 1 and "no such directory" in proc.stderr


def test_changed_source_is_detected(tmp_path, small_tok):
    src = tmp_path / "s"
    encode(EncodeConfig(tokenizer=small_tok, inputs=[str(write_jsonl(tmp_path / "s.jsonl", ["1" * 100]))], out=src,
                        workers=1))
    out = mix(MixConfig(mix=str(write_mix(tmp_path / "m.yaml", {"a": src}, [{"tokens": 50, "weights": {"a": 1}}])),
                           out=tmp_path / "mix"))
    MixReader(out)
    encode(EncodeConfig(tokenizer=small_tok, inputs=[str(write_jsonl(tmp_path / "s.jsonl", ["2" * 100]))], out=src,
                        workers=1))
    with pytest.raises(SlmError, match="changed since the mix was planned"):
        MixReader(out)


def test_refuses_a_truncated_shard_before_planning(tmp_path, sources):
    """A .bin cut short after encoding (a copy that stopped, a full disk) is found by `slm mix`, not by training."""
    import shutil

    broken = tmp_path / "a"
    shutil.copytree(sources["a"], broken)
    bin_path = next((broken / "shards").glob("*.bin"))
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.truncate(size - 6)
    m = write_mix(tmp_path / "m.yaml", {"a": broken, "b": sources["b"]}, PHASES)
    proc = run_cli("mix", m, "--out", tmp_path / "mix")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"source 'a': {bin_path}: {size - 6} bytes, the index says {size}" in proc.stderr
    assert not (tmp_path / "mix").exists()


def _documents_by_brute_force(stream: np.ndarray, eos: int) -> list[tuple[int, int]]:
    """(start, length) of every document: a document ends with its end-of-document token."""
    ends = np.flatnonzero(stream == eos) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def test_min_doc_tokens_keeps_only_windows_inside_long_documents(tmp_path, sources, small_tok):
    """SmolLM2's long-context filter: a source of only the windows that lie inside documents of 250+ tokens (a's
    documents are 100, 200, 300 and 404 tokens long), beside the same directory unfiltered."""
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "seq_len": 10, "seed": 3,
        "sources": {"a": str(sources["a"]), "a_long": {"source": "a", "min_doc_tokens": 250}, "b": str(sources["b"])},
        "phases": [{"name": "long", "tokens": 2000, "weights": {"a_long": 0.4, "a": 0.3, "b": 0.3}}]}))
    out = mix(MixConfig(mix=str(tmp_path / "m.yaml"), out=tmp_path / "mix"))
    plan = read_json(out / "plan.json")
    long = {s["name"]: s for s in plan["sources"]}["a_long"]
    # by hand: (300 - 1) // 10 = 29 windows from offset 300, (404 - 1) // 10 = 40 from offset 600
    assert long["sequences"] == 69 and long["documents"] == 2 and long["tokens"] == 704
    assert long["tokens_all"] == 1004 and long["path"] == str(sources["a"])
    r = MixReader(out)
    eos = Tokenizer(small_tok).eos_id
    stream = r.sources[0].read(0, r.sources[0].n_tokens)
    docs = _documents_by_brute_force(stream, eos)
    assert [n for _, n in docs] == [100, 200, 300, 404]
    phase, source, start = r.plan.locate(np.arange(len(r)))
    li = r.plan.source_names.index("a_long")
    drawn = start[source == li]
    assert len(drawn) == 80  # 0.4 of 200 samples: every window once, then 11 of a second epoch
    assert sorted(set(drawn.tolist())) == [300 + 10 * k for k in range(29)] + [600 + 10 * k for k in range(40)]
    for n in np.flatnonzero(source == li):
        s = r.sample(int(n))
        inside = [(a, m) for a, m in docs if a <= s.start and s.start + 11 <= a + m]
        assert len(inside) == 1 and inside[0][1] >= 250  # the whole window inside one long document
        assert s.doc_starts.tolist() in ([], [0])
        assert np.array_equal(s.tokens, stream[s.start:s.start + 11])
    # the unfiltered sources still read the packed stream from offset 0
    assert (start[source == r.plan.source_names.index("a")] % 10 == 0).all()
    # the table is checked against plan.json
    table = np.load(out / long["windows"])
    np.save(out / long["windows"], table[::-1].copy())
    with pytest.raises(SlmError, match="window table of source 'a_long' is not the one plan.json names"):
        MixReader(out)


@pytest.mark.parametrize("source,message", [
    ({"source": "a", "min_doc_tokens": 500}, "no document has 500+ tokens"),
    ({"source": "a", "min_doc_tokens": 0}, "min_doc_tokens: expected a positive integer, got 0"),
    ({"source": "zz", "min_doc_tokens": 9}, "sources.a_long.source: expected the name of another source"),
    ({"source": "a", "path": "x"}, "give path or source, not both"),
    ({"source": "a", "min_docs": 9}, "sources.a_long: unknown key 'min_docs'"),
])
def test_min_doc_tokens_errors(tmp_path, sources, source, message):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"seq_len": 10, "sources": {"a": str(sources["a"]), "a_long": source},
                                    "phases": [{"tokens": 100, "weights": {"a_long": 1}}]}))
    proc = run_cli("mix", path, "--dry-run")
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_weights_that_do_not_add_up_to_one_are_normalised_aloud(tmp_path, sources):
    """{a: 0.7, b: 0.7} is 0.5 / 0.5: said on stderr, with the shares used; weights that add up to 1 say nothing."""
    m = write_mix(tmp_path / "m.yaml", sources, [{"name": "p", "tokens": 500, "weights": {"a": 0.7, "b": 0.7}}])
    proc = run_cli("mix", m, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "phases[0].weights add up to 1.4, not 1: normalised to a 0.5, b 0.5" in proc.stderr
    assert [r["weight"] for r in json.loads(proc.stdout)["ledger"]] == [0.5, 0.5]
    ok = write_mix(tmp_path / "ok.yaml", sources, [{"name": "p", "tokens": 500, "weights": {"a": 0.7, "b": 0.3}}])
    assert "add up to" not in run_cli("mix", ok, "--dry-run").stderr
    ratios = write_mix(tmp_path / "r.yaml", sources, [{"name": "p", "tokens": 500, "weights": {"a": 3, "b": 2}}])
    assert "add up to" not in run_cli("mix", ratios, "--dry-run").stderr  # ratios, as the docs allow
