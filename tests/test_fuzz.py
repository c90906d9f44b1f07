"""Property-based fuzzing of the readers a user's file reaches: every generated input ends in a correct result or
one clear line (SlmError, no newline), never another exception. 1,000 cases each."""

import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from slm.errors import SlmError  # noqa: E402

CASES = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "User", None, 3])
message = st.fixed_dictionaries({}, optional={"role": roles, "content": scalars, "from": roles, "value": scalars})
chat_record = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), json_values)}),
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.text(max_size=10), json_values),
                                        "chosen": st.one_of(st.text(max_size=10), st.lists(message, max_size=2)),
                                        "rejected": st.one_of(st.text(max_size=10), st.lists(message, max_size=2)),
                                        "score_chosen": scalars, "score_rejected": scalars}),
    json_values)
lines = st.lists(st.one_of(chat_record.map(lambda o: json.dumps(o)), st.text(max_size=30)), max_size=5)


def one_line(e: SlmError) -> None:
    assert str(e) and "\n" not in str(e).strip(), repr(str(e))


def survives(read, *args) -> None:
    """READ(*ARGS) returns, or fails with one line (any other exception fails the test)."""
    try:
        read(*args)
    except SlmError as e:
        one_line(e)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_chat_and_preference_jsonl(scratch):
    from slm.formats.chat import iter_objects, parse_chat, parse_pair

    path = scratch / "records.jsonl"

    @CASES
    @given(lines)
    def check(rows):
        path.write_text("\n".join(rows) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            for where, obj in iter_objects([str(path)], skip_bad=False, counts={}):
                for parse in (parse_chat, parse_pair):
                    survives(parse, obj, where)
        except SlmError as e:
            one_line(e)

    check()


def test_facts_files(scratch):
    from slm.formats.facts import load_facts

    path = scratch / "facts.yaml"
    facts = st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "name": scalars, "maker": scalars, "description": scalars, "limits": json_values,
        "examples": st.lists(st.fixed_dictionaries({}, optional={"user": scalars, "assistant": scalars}), max_size=3),
        "eval": json_values}))

    @CASES
    @given(st.one_of(facts.map(json.dumps), st.text(max_size=80)))
    def check(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        survives(load_facts, path)

    check()


def test_mix_yaml(scratch):
    from slm.stages.mix import MixConfig, resolve

    path = scratch / "mix.yaml"
    mixes = st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "seq_len": scalars, "seed": scalars, "block_size": scalars,
        "sources": st.dictionaries(st.text(max_size=6), st.one_of(
            scalars, json_values, st.fixed_dictionaries({}, optional={"path": scalars, "source": scalars,
                                                                      "min_doc_tokens": scalars, "dataset": scalars})), max_size=3),
        "phases": st.lists(st.fixed_dictionaries({}, optional={"name": scalars, "tokens": scalars,
                                                                "weights": json_values}), max_size=3)}))

    @CASES
    @given(st.one_of(mixes.map(json.dumps), st.text(max_size=80)))
    def check(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        survives(resolve, MixConfig(mix=str(path)))

    check()


def test_config_files(scratch):
    from slm.train.config import resolve, train_settings

    path = scratch / "config.yaml"
    sections = st.fixed_dictionaries({}, optional={"model": json_values, "train": st.one_of(json_values, st.dictionaries(
        st.sampled_from(["lr_peak", "steps", "micro_batch_size", "schedule", "dtype", "betas", "warmup_steps"]),
        scalars, max_size=4)), "recipe": scalars})

    @CASES
    @given(st.one_of(sections.map(json.dumps), st.text(max_size=80)))
    def check(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        survives(lambda: train_settings(resolve(None, path)))

    check()


def test_manifests(scratch):
    from slm.formats.manifest import read_manifest

    d = scratch / "artifact"
    d.mkdir(exist_ok=True)

    @CASES
    @given(st.one_of(json_values.map(json.dumps), st.fixed_dictionaries(
        {"kind": st.sampled_from(["tokens", "mix", "checkpoint", "x", 3]), "format_version": scalars}).map(json.dumps),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
    def check(text):
        (d / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        survives(read_manifest, d, ("tokens", "mix"))

    check()


def test_mt_bench_questions(scratch):
    from slm.evaluation.mtbench import read_questions

    path = scratch / "q.jsonl"
    q = st.fixed_dictionaries({}, optional={"question_id": scalars, "category": scalars,
                                            "turns": st.one_of(st.lists(scalars, max_size=3), json_values)})

    @CASES
    @given(st.lists(st.one_of(q.map(json.dumps), st.text(max_size=30)), max_size=4))
    def check(rows):
        path.write_text("\n".join(rows), encoding="utf-8", errors="surrogatepass")
        survives(read_questions, path)

    check()


def test_model_paths_and_gguf_files(scratch):
    """What `slm eval` / `slm info` are given as a model: any bytes in a .gguf file, any directory content."""
    from slm.evaluation.models import model_backend
    from slm.views.info import describe

    path = scratch / "m.gguf"

    @CASES
    @given(st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b"GGUF" + b)))
    def check(data):
        path.write_bytes(data)
        for fn in (model_backend, describe):
            survives(fn, path)

    check()


@pytest.fixture(scope="module")
def good_tokens(tmp_path_factory, small_tok):
    from conftest import VARIED_TEXT, write_jsonl

    from slm.stages.encode import EncodeConfig, run as encode

    d = tmp_path_factory.mktemp("fuzz_tokens")
    encode(EncodeConfig(tokenizer=small_tok, inputs=[str(write_jsonl(d / "t.jsonl", VARIED_TEXT * 2))],
                        out=d / "tokens", workers=1))
    return d / "tokens"


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


def _mutate(data: bytes, changes, cut) -> bytes:
    b = bytearray(data)
    for pos, val in changes:
        b[pos % len(b)] = val
    return bytes(b[:cut]) if cut is not None else bytes(b)


def test_shard_indexes(scratch, good_tokens):
    """A tokens directory whose .idx (or .bin) was damaged: bytes changed, cut short. `slm mix` opens the shards and
    reads the document table (the long-document filter); a reader reads tokens and document starts."""
    import shutil

    from slm.formats.tokens import TokensDir

    d = scratch / "tokens"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(good_tokens, d)
    idx = next((d / "shards").glob("*.idx"))
    binf = idx.with_suffix(".bin")
    idx_bytes, bin_bytes = idx.read_bytes(), binf.read_bytes()

    def use():
        t = TokensDir(d)
        t.shards
        starts, lengths = t.document_bounds()
        t.read(0, min(16, t.n_tokens))
        t.document_starts(0, t.n_tokens)
        assert (lengths >= 0).all() and len(starts) == len(lengths)

    @CASES
    @given(edits, st.one_of(st.none(), st.integers(0, len(idx_bytes))), st.booleans())
    def check(changes, cut, damage_bin):
        idx.write_bytes(_mutate(idx_bytes, changes, cut) if not damage_bin else idx_bytes)
        binf.write_bytes(_mutate(bin_bytes, changes, cut) if damage_bin else bin_bytes)
        survives(use)

    check()


def test_checkpoint_directories(scratch, base_ckpt):
    """A checkpoint directory given by path whose config.json, manifest.json or weights are not what they should be:
    opened, its model config, weights, tokenizer and optimizer state read (what --model / --from / quantize do)."""
    import shutil

    from slm.formats.checkpoint import Checkpoint

    d = scratch / "ckpt"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base_ckpt, d)
    originals = {n: (d / n).read_bytes() for n in ("config.json", "manifest.json", "model.safetensors",
                                                     "train_state/optimizer.safetensors", "encoding.json")}
    config = json.loads(originals["config.json"])

    def use():
        c = Checkpoint.open(d)
        c.model_config
        c.state_dict()
        c.tokenizer()
        c.manifest
        c.optimizer_state()
        c.step

    @CASES
    @given(st.sampled_from(sorted(originals)), st.one_of(
        st.tuples(st.just("bytes"), edits, st.one_of(st.none(), st.integers(0, 4096))),
        st.tuples(st.just("json"), json_values),
        st.tuples(st.just("field"), st.sampled_from(sorted(config)), json_values)))
    def check(name, change):
        for n, data in originals.items():
            (d / n).write_bytes(data)
        if change[0] == "bytes":
            (d / name).write_bytes(_mutate(originals[name], change[1], change[2]))
        elif change[0] == "json":
            (d / name).write_text(json.dumps(change[1]))
        else:
            (d / "config.json").write_text(json.dumps({**config, change[1]: change[2]}))
        survives(use)

    check()
