import functools
import gzip
import json
import unicodedata

import pytest
from conftest import VARIED_TEXT, run_cli, stdlib_samples, write_jsonl

from slm.errors import SlmError
from slm.formats.tokenizer import (ARCADE_SPECIALS, SMOLLM_PATTERN, SMOLLM_SPECIALS, Tokenizer, load_cl100k_ranks)

ARCADE_IDS = {name: 100257 + i for i, name in enumerate(ARCADE_SPECIALS)}


def hf_plain(tok):
    return _hf_plain(str(tok.dir))


@functools.lru_cache(maxsize=4)
def _hf_plain(directory):
    """The tokenizer.json tokenizer with special tokens in text read as text (like tiktoken's encode_ordinary)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(f"{directory}/tokenizer.json")
    hf.encode_special_tokens = True
    return hf


@pytest.fixture(scope="module")
def arcade(arcade_dir):
    return Tokenizer(arcade_dir)


def test_arcade_sizes_and_special_ids(arcade):
    assert arcade.n_vocab == 100_289
    assert arcade.spec.padded_vocab_size == 100_352
    assert len(arcade.ranks) == 100_256
    assert len(ARCADE_SPECIALS) == 32
    # Published ids: cl100k's own specials keep their ids (100257 endoftext, 100276 endofprompt).
    assert arcade.spec.special_tokens == ARCADE_IDS
    assert ARCADE_IDS["<|endoftext|>"] == 100257 and ARCADE_IDS["<|endofprompt|>"] == 100276
    assert ARCADE_IDS["<|im_start|>"] == 100277 and ARCADE_IDS["<|extra0|>"] == 100288
    assert arcade.bos_id == arcade.eos_id == 100257
    assert arcade.token_dtype.name == "int32"
    # The HF tokenizer knows every special at the same id, and the placeholder keeps 100256 unused by text.
    for name, idx in ARCADE_IDS.items():
        assert arcade.hf.token_to_id(name) == idx
    assert arcade.hf.get_vocab_size() == 100_289


def test_arcade_known_ids(arcade):
    assert arcade.encode("hello world") == [15339, 1917]  # cl100k_base's ids
    assert arcade.encode("0123456789") == list(range(15, 25))  # every digit its own token
    assert arcade.encode("2024") == [17, 15, 17, 19]  # cl100k_base would give [2366, 19]
    assert arcade.encode(" 12345") == [220, 16, 17, 18, 19, 20]
    assert arcade.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert arcade.encode("<|endoftext|>") != [100257]  # text, unless allowed


@pytest.mark.parametrize("text", VARIED_TEXT + stdlib_samples(3))
def test_arcade_tiktoken_and_tokenizer_json_agree(arcade, text):
    nfc = unicodedata.normalize("NFC", text)
    want = arcade.encode(text)
    assert hf_plain(arcade).encode(text, add_special_tokens=False).ids == want
    assert arcade.encode_numpy(text).tolist() == want
    assert arcade.decode(want) == nfc
    assert arcade.hf.decode(want, skip_special_tokens=False) == nfc


def test_specials_in_text_agree_when_allowed(arcade):
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert arcade.encode(text, allowed_special="all") == arcade.hf.encode(text, add_special_tokens=False).ids


def test_nfc_normalisation(arcade):
    assert arcade.encode("e\u0301te\u0301") == arcade.encode("\u00e9t\u00e9")


def test_transformers_autotokenizer_opens_the_directory(arcade_dir, arcade):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(arcade_dir))
    for text in VARIED_TEXT[:6]:
        assert hf(text, add_special_tokens=False)["input_ids"] == arcade.encode(text)
    assert hf.eos_token_id == 100257 and hf.bos_token_id == 100257
    assert len(hf) == 100_289


def test_cl100k_hash_is_checked(tmp_path, cl100k_ranks_path):
    data = gzip.decompress(cl100k_ranks_path.read_bytes())
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(data.replace(b" 0\n", b" 1\n", 1))
    with pytest.raises(SlmError, match="is not cl100k_base's"):
        load_cl100k_ranks(bad)
    plain = tmp_path / "plain.tiktoken"
    plain.write_bytes(data)  # uncompressed files work too
    ranks, _ = load_cl100k_ranks(plain)
    assert len(ranks) == 100_256


def test_build_cli_refuses_a_wrong_ranks_file(tmp_path):
    bad = tmp_path / "x.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    proc = run_cli("tokenize", "build", "--ranks", bad, "--out", tmp_path / "tok")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "x.tiktoken" in proc.stderr and "cl100k_base" in proc.stderr
    assert not (tmp_path / "tok").exists()


# --- Locally trained tokenizers ---------------------------------------------------------------------------------

def test_trained_tokenizer_parity_and_reload(small_tok):
    tok = Tokenizer(small_tok)
    assert tok.n_vocab == 1024
    assert tok.spec.padded_vocab_size == 1024
    assert tok.token_dtype.name == "uint16"
    assert tok.spec.special_tokens == {name: 992 + i for i, name in enumerate(ARCADE_SPECIALS)}
    for text in VARIED_TEXT + stdlib_samples(2):
        ids = tok.encode(text)
        assert hf_plain(tok).encode(text, add_special_tokens=False).ids == ids
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert all(tok.encode(str(d)) == [tok.ranks[str(d).encode()]] for d in range(10))  # digits split
    again = Tokenizer(small_tok)
    assert again.hash == tok.hash and again.encode(VARIED_TEXT[0]) == tok.encode(VARIED_TEXT[0])


def test_smollm_rules(tmp_path, small_corpus):
    from slm.stages.tokenize import TrainConfig, train_bpe as train

    out = train(TrainConfig(corpus=[str(small_corpus)], vocab_size=700, out=tmp_path / "smol", rules="smollm"))
    tok = Tokenizer(out)
    assert tok.spec.special_tokens == {name: i for i, name in enumerate(SMOLLM_SPECIALS)}
    assert min(tok.ranks.values()) == 17 and tok.n_vocab == 700
    hf = hf_plain(tok)
    for text in VARIED_TEXT:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_smollm_single_regex_equals_digits_then_gpt2_bytelevel():
    """SmolLM2 splits digits first, then applies GPT-2's regex; slm's one regex must cut text the same way."""
    from tokenizers import Regex, pre_tokenizers

    two_step = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    one_step = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SMOLLM_PATTERN), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    extra = ["a  1", "x  \n1", "  12 34  5", "1's 2'll", "end 9  ", "\n\n1\n \n2", "a.1,2", "tab\t\t3"]
    for text in VARIED_TEXT + extra + stdlib_samples(2):
        assert [p for p, _ in one_step.pre_tokenize_str(text)] == [p for p, _ in two_step.pre_tokenize_str(text)]


def test_train_errors(tmp_path, small_corpus):
    proc = run_cli("tokenize", "train", "--corpus", small_corpus, "--vocab-size", "100", "--out", tmp_path / "t")
    assert proc.returncode == 2 and "--vocab-size" in proc.stderr and "at least 289" in proc.stderr
    proc = run_cli("tokenize", "train", "--corpus", small_corpus, "--vocab-size", "500", "--rules", "gpt9",
                   "--out", tmp_path / "t")
    assert proc.returncode == 2 and "--rules" in proc.stderr
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    proc = run_cli("tokenize", "train", "--corpus", empty, "--vocab-size", "500", "--out", tmp_path / "t")
    assert proc.returncode == 1
    assert not (tmp_path / "t").exists()


def test_tokenizer_dir_manifest(small_tok):
    m = json.loads((small_tok / "manifest.json").read_text())
    assert m["kind"] == "tokenizer" and m["format_version"] == 1
    assert m["tokenizer_sha256"] == Tokenizer(small_tok).hash
    assert m["counts"]["n_vocab"] == 1024


def test_cl100k_from_tiktokens_cache(tmp_path, monkeypatch, cl100k_ranks_path):
    """Without --ranks, the ranks come from tiktoken's cache (filled by a download when online)."""
    import hashlib

    from slm.formats.tokenizer import CL100K_URL

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(gzip.decompress(cl100k_ranks_path.read_bytes()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    ranks, source = load_cl100k_ranks(None)
    assert len(ranks) == 100_256 and source == CL100K_URL
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network: a one-line error with the way out
    with pytest.raises(SlmError, match="pass a local copy with --ranks PATH"):
        load_cl100k_ranks(None)


def released_copy(src, dst, edit=None):
    """A tokenizer as a model's hub directory ships it: tokenizer.json and tokenizer_config.json, no encoding.json."""
    dst.mkdir(parents=True)
    tj = json.loads((src / "tokenizer.json").read_text())
    if edit:
        edit(tj)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (dst / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    return dst


def test_a_released_tokenizer_json_made_from_tiktoken_ranks_runs_as_tiktoken(arcade_dir, tmp_path):
    """StableLM 2 ships Arcade100k as a tokenizer.json converted from tiktoken ranks: slm proves its merges are
    tiktoken's for its vocabulary and bulk-encodes with tiktoken, with tokenizers' ids on every text; a file whose
    merges differ (SmolLM2's kind, here two swapped) keeps tokenizers, and `tokenize encode` says which and why."""
    rel = Tokenizer(released_copy(arcade_dir, tmp_path / "stablelm-2"))
    assert rel.backend == "hf" and rel.encoder == "tiktoken"
    assert "_tj" not in rel.__dict__  # the parsed tokenizer.json (~60 MB) is not kept once ranks and the proof ran
    texts = VARIED_TEXT + stdlib_samples(3) + ["x" + " " * 9 + "\n\n\t  \r\n" * 3 + "=" * 17 + "ab" * 9 + "a1234567"]
    hf = hf_plain(rel)
    want = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    assert [a.tolist() for a in rel.encode_many(texts)] == want
    assert want[0] == Tokenizer(arcade_dir).encode(texts[0])  # slm's own Arcade100k: the same ids

    def swap(tj):
        tj["model"]["merges"][5], tj["model"]["merges"][6] = tj["model"]["merges"][6], tj["model"]["merges"][5]

    other = Tokenizer(released_copy(arcade_dir, tmp_path / "swapped", swap))
    assert other.fast is None and "merge 6 is" in other.fast_reason
    assert [a.tolist() for a in other.encode_many(texts[:2])] == [hf_plain(other).encode(t, add_special_tokens=False)
                                                                   .ids for t in texts[:2]]

    def no_ignore(tj):  # converted before tokenizers had ignore_merges: BPE must reach every token by itself
        tj["model"]["ignore_merges"] = False

    assert Tokenizer(released_copy(arcade_dir, tmp_path / "old", no_ignore)).encoder == "tiktoken"
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    for name, says in (("stablelm-2", "encoded by tiktoken, its ids proven equal to tokenizers'"),
                       ("swapped", "encoded by Hugging Face tokenizers (its merges are not tiktoken's")):
        proc = run_cli("tokenize", "encode", "--tokenizer", tmp_path / name, docs, "--out", tmp_path / f"t-{name}")
        assert proc.returncode == 0 and says in proc.stderr, proc.stderr


def test_the_merge_check_agrees_with_generating_tiktokens_merges(small_tok):
    """tiktoken_equivalence checks a released merge list against tiktoken's rule without generating tiktoken's
    list (keys strictly increasing, every merge a split, as many as there are splits): on the list itself, in
    either JSON form, and on lists that differ in every way a file can, it says what comparing with the generated
    list says."""
    from slm.formats.tokenizer import (_merge_pairs, _merges_are_tiktokens, _tiktoken_merges, bytes_to_bpe_str,
                                       tiktoken_merges)

    ranks = Tokenizer(small_tok).ranks
    vocab = {bytes_to_bpe_str(b): i for b, i in ranks.items()}
    merges = tiktoken_merges(ranks)
    joined = next(a + b for a, b in merges if (a + b) * 2 not in vocab)
    variants = {
        "as generated": merges, "as 'a b' strings": [" ".join(m) for m in merges],
        "two swapped": merges[:5] + [merges[6], merges[5]] + merges[7:], "one left out": merges[:9] + merges[10:],
        "the last left out": merges[:-1], "one twice": merges[:10] + [merges[9]] + merges[10:],
        "a pair that makes no token": merges + [(joined, joined)],
        "a part outside the vocabulary": [("\u0100zz", merges[0][1])] + merges[1:],
        "not pairs": [merges[0][0]] + merges[1:], "empty": [],
    }
    names = {i: s for s, i in vocab.items()}
    for name, listed in variants.items():
        generated = list(_tiktoken_merges(ranks, names)) == _merge_pairs(listed)
        assert _merges_are_tiktokens(listed, vocab, set()) == generated, name
        assert generated == (name in ("as generated", "as 'a b' strings")), name
    assert _merges_are_tiktokens(merges, {**vocab, "<|x|>": len(vocab)}, {"<|x|>"})  # added tokens are not ranks


def test_byte_level_strings_to_bytes():
    from slm.formats.tokenizer import bpe_str_to_bytes, bytes_to_bpe_str

    every = bytes(range(256))
    assert bpe_str_to_bytes(bytes_to_bpe_str(every)) == every and bpe_str_to_bytes("\u0120hello") == b" hello"
    for outside in (" hello", "a\u0000", "\u4e2d"):  # characters that no byte stands for
        with pytest.raises(KeyError):
            bpe_str_to_bytes(outside)
