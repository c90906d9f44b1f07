"""`slm bench`: honest speed numbers for checkpoints, GGUF files and INT4 IRs, like llama-bench's table.

Each model runs in a fresh process (so its peak memory is its own): a warm-up, then --repeat runs of a --prompt
token prompt (random ids, no tokenization in the timings) followed by --gen generated tokens (greedy, no stop). For
each: prompt processing tokens/s (prompt tokens / time to the first token's logits), generation tokens/s (new tokens
after the first / their time), time to first token, mean and standard deviation over the repeats; peak resident
memory; file size; the device (CPU model, threads, GPU).

Generation on a CPU is bound by memory bandwidth: every new token reads every weight once (of an input embedding
that is not also the output matrix, one row). The bound printed is bandwidth (measured here as the streaming-read
speed of a large tensor, or --bandwidth GB/s) / those bytes, and the fraction of it each run reaches. A llama.cpp
row names the CPU backend it ran (`built in`, or the variant a build with all of them picked for this CPU).

Backends: torch (slm checkpoints; a preallocated KV cache, fp32 or bf16), llama.cpp (GGUF, through
llama-cpp-python), openvino (an `slm quantize --type int4` IR, whose keys and values are inputs and outputs).
"""

from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slm import energy
from slm.console import err, progress
from slm.devices import peak_rss_bytes, usable_cores
from slm.errors import AT_LEAST_0, POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.checkpoint import Checkpoint
from slm.formats.manifest import atomic_dir, check_replaceable, new_manifest, read_json, write_json
from slm.formats.tables import bar_chart, render_bench
from slm.inference.llamacpp import cpu_backend, open_gguf
from slm.inference.load import load_model
from slm.inference.openvino import OpenVinoScorer
from slm.model.decode import StaticDecoder, decode_linears

BACKENDS = ("auto", "torch", "llama.cpp", "openvino")
FORMATS = ("md", "json", "csv")


@dataclass
class BenchConfig:
    models: list[Path]
    backend: str = "auto"
    prompt: int = 512
    gen: int = 128
    repeat: int = 5
    threads: int | None = None
    batch: int = 1
    dtype: str = "fp32"
    compile: bool = False
    """torch backend: compile the decode step with torch.compile (tens of seconds once; faster steps)."""
    bandwidth: float | None = None
    """Memory bandwidth in GB/s (default: measured)."""
    out: Path | None = None
    format: str = "md"
    plot: Path | None = None
    seed: int = 0

    def __post_init__(self):
        check_ranges(self, prompt=POSITIVE, gen=POSITIVE, repeat=POSITIVE, threads=POSITIVE, batch=POSITIVE,
                     bandwidth=POSITIVE, seed=AT_LEAST_0)


def detect_backend(path: Path, backend: str) -> str:
    path = Path(path)
    if backend != "auto":
        return backend
    if path.is_file() and path.suffix == ".gguf":
        return "llama.cpp"
    if path.is_dir() and (path / "openvino_model.xml").is_file():
        return "openvino"
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / "checkpoints").is_dir()):
        return "torch"
    raise SlmError(f"{path}: not a checkpoint, a .gguf file or an OpenVINO IR directory")


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if (path / "openvino_model.bin").is_file():
        return (path / "openvino_model.bin").stat().st_size
    return (Checkpoint.open(path).dir / "model.safetensors").stat().st_size


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(gib: float = 1.0, rounds: int = 3) -> float:
    """GB/s of streaming reads (a large float32 tensor summed by torch with all its threads), the best of ROUNDS:
    what reading the weights once per generated token can reach at best."""
    a = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


# --- runners: one prompt, then greedy tokens -----------------------------------------------------------------------
class Runner:
    """run(): seconds to the prompt's logits and to each greedy token, around prefill(ids, batch) and step(state)."""

    name, batched = "", False

    def run(self, ids: list[int], gen: int, batch: int) -> tuple[float, list[float]]:
        if batch != 1 and not self.batched:
            raise UsageError(f"--batch: the {self.name} backend measures batch 1")
        t = time.perf_counter()
        state = self.prefill(ids, batch)
        first = time.perf_counter() - t
        times = []
        for _ in range(gen - 1):
            t = time.perf_counter()
            state = self.step(state)
            times.append(time.perf_counter() - t)
        return first, times


class TorchRunner(Runner):
    """slm's own decoder (slm.model.decode): on CPUs, fp32 weights in the layout one-row products read fastest and
    those products split over the threads; a static KV cache; with COMPILE the decode step compiled by
    torch.compile (one graph for every step)."""

    name, batched = "torch", True

    def __init__(self, path: Path, threads: int | None, dtype: str, max_len: int, compile: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.ckpt = Checkpoint.open(path)
        self.model = load_model(self.ckpt, torch.device("cpu"))
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.model.to(self.dtype)
        if self.dtype == torch.float32:  # bf16 products stay nn.Linear's (no bf16 layout was measured faster)
            decode_linears(self.model)
        self.weight_bytes = read_per_token(self.model)
        self.vocab = self.ckpt.model_config.vocab_size
        self.max_len = min(max_len, self.model.cfg.max_seq_len)
        self.compile = compile
        self.decoder = None

    def run(self, ids: list[int], gen: int, batch: int) -> tuple[float, list[float]]:
        if len(ids) + gen > self.max_len:
            raise SlmError(f"--prompt + --gen = {len(ids) + gen}: more than the model's context ({self.max_len})")
        if self.decoder is None or self.decoder.batch != batch:
            self.decoder = StaticDecoder(self.model, batch, self.max_len, compile=self.compile)
        return super().run(ids, gen, batch)

    def prefill(self, ids, batch):
        return self.decoder.prefill(torch.tensor([ids] * batch))

    def step(self, logits):
        return self.decoder.step(logits.argmax(-1))


def read_per_token(model) -> int:
    """Bytes of weights one generated token reads: every parameter but the input embedding's rows (when the output
    matrix is another tensor: untied, or a transposed copy, only one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight
    out = model.lm_head
    if all(q is not embed for q in out.parameters()):
        total -= embed.numel() * embed.element_size()
    return total


def gguf_read_per_token(path: Path) -> int:
    """The same for a GGUF file: its tensors' bytes (not the tokenizer and other metadata), less token_embd when an
    output.weight tensor is the output matrix."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    return total - tensors["token_embd.weight"] if "output.weight" in tensors and "token_embd.weight" in tensors \
        else total


class LlamaCppRunner(Runner):
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, n_ctx: int):
        self.llm = open_gguf(path, n_ctx, threads, n_batch=min(n_ctx, 512))
        self.vocab = self.llm.n_vocab()
        self.weight_bytes = gguf_read_per_token(Path(path))
        self.cpu = cpu_backend()

    def prefill(self, ids, batch):
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, _):
        last = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab,))
        self.llm.eval([int(last.argmax())])


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, path: Path, threads: int | None):
        self.vocab = read_json(Path(path) / "config.json")["vocab_size"]
        self.scorer = OpenVinoScorer(path, self.vocab, threads, exact=False)
        self.weight_bytes = (Path(path) / "openvino_model.bin").stat().st_size

    def prefill(self, ids, batch):
        return self.scorer.step(ids, *self.scorer.empty_cache())

    def step(self, state):
        logits, k, v = state
        return self.scorer.step([int(logits[-1, :self.vocab].argmax())], k, v)


def bench_one(path: str, backend: str, cfg: dict) -> dict:
    """Measure one model (in the current process): the row of the table."""
    prompt, gen, repeat = cfg["prompt"], cfg["gen"], cfg["repeat"]
    if backend == "torch":
        r = TorchRunner(Path(path), cfg["threads"], cfg["dtype"], prompt + gen, cfg["compile"])
    elif backend == "llama.cpp":
        r = LlamaCppRunner(Path(path), cfg["threads"], prompt + gen + 8)
    else:
        r = OpenVinoRunner(Path(path), cfg["threads"])
    rng = np.random.default_rng(cfg["seed"])
    ids = [int(i) for i in rng.integers(0, min(r.vocab, 1000), prompt)]
    r.run(ids[:min(prompt, 16)], min(gen, 4), cfg["batch"])  # warm-up
    pp, tg, ttft = [], [], []
    for _ in range(repeat):
        first, times = r.run(ids, gen, cfg["batch"])
        ttft.append(first)
        pp.append(prompt * cfg["batch"] / first)
        if times:
            tg.append(len(times) * cfg["batch"] / sum(times))
    peak = peak_rss_bytes()

    def ms(xs):
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    row = {"model": str(path), "backend": backend, "weight_bytes": r.weight_bytes, "pp_tokens_per_s": ms(pp),
           "tg_tokens_per_s": ms(tg) if tg else None, "ttft_s": ms(ttft), "peak_rss_bytes": peak}
    if backend == "llama.cpp":
        row["llama_cpp_cpu"] = r.cpu
    return row


def _child(path: str, backend: str, cfg: dict, queue) -> None:
    try:
        queue.put(("ok", bench_one(path, backend, cfg)))
    except SlmError as e:
        queue.put(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _result(q, p, path: str) -> tuple[str, object]:
    """The child's (status, value); SlmError when it ends without one (a crash in native code, the OOM killer),
    which a plain q.get() would wait for forever."""
    import queue
    import signal

    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if p.is_alive():
                continue
        try:  # ended: what it put before ending is still in the pipe
            return q.get(timeout=1.0)
        except queue.Empty:
            code = p.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
            raise SlmError(f"{path}: the process measuring it {how} before reporting (a crash in the backend's "
                           "native code, or out of memory)") from None


def measure(cfg: BenchConfig) -> dict:
    """Every model measured in a fresh process of its own: the report (device, settings, a row per model)."""
    if not cfg.models:
        raise SlmError("MODEL: give at least one checkpoint, .gguf file or INT4 directory")
    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.format not in FORMATS:
        raise UsageError(f"--format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise UsageError(f"--dtype {cfg.dtype!r}: expected fp32 or bf16")
    jobs = [(str(Path(m)), detect_backend(Path(m), cfg.backend)) for m in cfg.models]
    for path, _ in jobs:
        if not Path(path).exists():
            raise SlmError(f"{path}: no such file or directory")
    threads = cfg.threads or usable_cores()
    settings = {"prompt": cfg.prompt, "gen": cfg.gen, "repeat": cfg.repeat, "threads": threads, "batch": cfg.batch,
                "dtype": cfg.dtype, "compile": cfg.compile, "seed": cfg.seed}
    bandwidth = cfg.bandwidth or measure_bandwidth()
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with progress() as bar:
        task = bar.add_task("bench", total=len(jobs))
        for path, backend in jobs:
            bar.update(task, description=f"bench {Path(path).name} ({backend})")
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(path, backend, settings, q))
            p.start()
            status, value = _result(q, p, path)
            p.join()
            if status == "error":
                raise SlmError(f"{path}: {value}")
            value["file_bytes"] = size_of(Path(path))
            tg = value["tg_tokens_per_s"]
            bound = bandwidth * 1e9 / value["weight_bytes"]
            value["bandwidth_bound_tokens_per_s"] = bound
            value["bound_fraction"] = tg["mean"] / bound if tg else None
            rows.append(value)
            bar.advance(task)
    device = {"cpu": cpu_name(), "threads": threads, "gpu": torch.cuda.get_device_name(0)
              if torch.cuda.is_available() else None, "bandwidth_gb_s": round(bandwidth, 2),
              "bandwidth_source": "given" if cfg.bandwidth else "measured (streaming read)"}
    return {"device": device, "settings": settings, "results": rows}


# --- output ------------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    """Generation tokens/s of each model beside its bandwidth bound."""
    rows = report["results"]
    bar_chart(path, [Path(r["model"]).name for r in rows], {
        "generation tokens/s": [r["tg_tokens_per_s"]["mean"] if r["tg_tokens_per_s"] else 0 for r in rows],
        "bandwidth bound": [r["bandwidth_bound_tokens_per_s"] for r in rows]}, "tokens/s", rotation=30)


def table(cfg: BenchConfig) -> str:
    """Without --out: the report in cfg.format (md, json or csv) for stdout (and cfg.plot drawn)."""
    report = measure(cfg)
    if cfg.plot is not None:
        plot(report, cfg.plot)
    return render_bench(report, cfg.format)


def run(cfg: BenchConfig) -> Path:
    """OUT/bench.json, .md, .csv, .png and the manifest; the table on stderr."""
    if cfg.out is None:
        raise UsageError("--out: missing (the directory to write)")
    check_replaceable(cfg.out)
    started = time.time()
    report = measure(cfg)
    if cfg.plot is not None:
        plot(report, cfg.plot)
    err.print(render_bench(report, "md"), soft_wrap=True, markup=False, highlight=False)
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        write_json(tmp / "bench.json", report)
        (tmp / "bench.md").write_text(render_bench(report, "md") + "\n")
        (tmp / "bench.csv").write_text(render_bench(report, "csv") + "\n")
        plot(report, tmp / "bench.png")
        write_json(tmp / "manifest.json", new_manifest(
            "bench", {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                      if k not in ("models", "out", "plot")},
            inputs=[{"path": str(m), "role": "model"} for m in cfg.models], counts={"models": len(cfg.models)}, started=started,
            energy=energy.take()))
    return out
