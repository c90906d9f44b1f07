"""--dry-run: the plan's numbers against hand arithmetic, and the StableLM 2 report's compute."""

import json

import pytest
import torch
from conftest import run_cli

from slm.errors import SlmError
from slm.model.transformer import ModelConfig
from slm.train.config import TrainSettings
from slm.train.cost import memory_bytes, plan

GiB = 2**30


def test_stablelm_2_at_4T_tokens_on_512_a100s_by_hand():
    """2T tokens seen twice on 512 A100-40GB: the report gives about 92,000 GPU-hours (seed summary)."""
    proc = run_cli("pretrain", "--recipe", "stablelm-2-1_6b", "--dry-run", "--tokens", "4T", "--gpu", "a100-40gb",
                   "--gpus", "512", "--mfu", "0.545", "--gpu-hours", "92000", "--engine", "deepspeed",
                   "--zero-stage", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    P, V, h, L, T = 1_644_515_328, 100_352, 2048, 24, 4096
    assert p["parameters"] == P
    per_token = 6 * (P - V * h) + 12 * L * h * T  # the input embedding is a lookup
    assert p["flops_per_token"] == per_token == 11_049_885_696
    steps = -(-4 * 10**12 // 2**23)  # --tokens rounds up to whole steps of 2^23 tokens
    assert p["steps"] == steps == 476_838 and p["tokens"] == steps * 2**23
    assert p["flops"] == pytest.approx(per_token * steps * 2**23, rel=1e-12)
    assert p["gpu_hours"] == pytest.approx(p["flops"] / (312e12 * 0.545) / 3600, rel=1e-9)
    assert 72_000 < p["gpu_hours"] < 72_500
    assert p["implied_mfu"] == pytest.approx(p["flops"] / (92_000 * 3600 * 312e12), rel=1e-9)
    assert 0.42 < p["implied_mfu"] < 0.435
    assert p["samples_per_step"] == 2048 and p["accumulation_steps"] == 1 and p["engine"] == "deepspeed ZeRO-1"
    m = p["memory_gib_per_process"]
    assert m["weights"] == pytest.approx(4 * P / GiB, abs=1e-3) and m["gradients"] == pytest.approx(4 * P / GiB, abs=1e-3)
    assert m["optimizer"] == pytest.approx(12 * P / 512 / GiB, abs=1e-3)  # moments + ZeRO's fp32 partition, / 512
    # micro-batch 4 x 4096 tokens, bf16: 8h + 2(5h + 3k + 4i) bytes per token and block, + the output layer's
    per_block = 8 * h + 2 * (5 * h + 3 * 2048 + 4 * 5632)
    act = 4 * T * L * per_block + 4 * V * h + 4 * T * 6 * h + 2**27 * 8  # + the loss's chunk of logits (2^27)
    # + autocast's bf16 copy of every block's weights (q/k/v with biases, o, gate/up, down, two LayerNorms)
    act += 2 * L * (h * 3 * h + 3 * h + h * h + h * 2 * 5632 + 5632 * h + 4 * h)
    assert m["activations"] == pytest.approx(act / GiB, abs=1e-3)
    assert not p["fits"] and "does not fit in one a100-40gb (40 GiB)" in proc.stderr
    assert "MFU that 92,000 GPU-hours imply" in proc.stderr and "72,2" in proc.stderr


@pytest.mark.parametrize("engine,zero,weights,grads,opt", [
    ("ddp", None, 4, 4, 8),
    ("fsdp", None, 4 / 8, 4 / 8, 8 / 8),
    ("deepspeed", 1, 4, 4, 12 / 8),
    ("deepspeed", 2, 4, 4 / 8, 12 / 8),
    ("deepspeed", 3, 8 / 8, 4 / 8, 8 / 8),
])
def test_memory_per_engine_by_hand(engine, zero, weights, grads, opt):
    cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536, max_seq_len=2048, tie_embeddings=True)
    t = TrainSettings(tokens_per_step=2048 * 64, micro_batch_size=4, zero_stage=zero or 1,
                      activation_checkpointing=True)
    p = plan(cfg, t, 2048, 10, 8, engine, "h100", 0.4, "bf16")
    P = p["parameters"]
    assert P == 134_515_008  # SmolLM2-135M
    m = p["memory_gib_per_process"]
    assert (m["weights"], m["gradients"], m["optimizer"]) == pytest.approx(
        (weights * P / GiB, grads * P / GiB, opt * P / GiB), abs=1e-3)
    assert p["accumulation_steps"] == 2
    h, k, i, L, tok = 576, 192, 1536, 30, 4 * 2048
    act = tok * (L * 4 * h + 8 * h + 2 * (5 * h + 3 * k + 4 * i)) + 4 * 49152 * h + tok * 6 * h  # checkpointing
    act += 2**27 * 8  # the fused loss's chunk of logits: fp32, a bf16 product and a bf16 gradient
    if engine != "fsdp":  # autocast's bf16 copy of the recomputed block's weights (FSDP computes in its own)
        act += 2 * (h * (h + 2 * k) + h * h + h * 2 * i + i * h + 2 * h)
    assert m["activations"] == pytest.approx(act / GiB, abs=1e-3)
    assert (m["buffers"] > 0) == (engine == "fsdp" or zero in (2, 3))


def test_plan_refusals():
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=64)
    t = TrainSettings(tokens_per_step=256, micro_batch_size=4)
    with pytest.raises(SlmError, match="--gpu 'b200': unknown; expected one of h200, h100"):
        plan(cfg, t, 32, 10, 1, "single", "b200", 0.4, "bf16")
    with pytest.raises(SlmError, match="8 samples per step, not divisible by 3 processes"):
        plan(cfg, t, 32, 10, 3, "ddp", "h100", 0.4, "bf16")
    with pytest.raises(SlmError, match=r"--mfu 1.5: expected a fraction"):
        plan(cfg, t, 32, 10, 1, "single", "h100", 1.5, "bf16")


def test_dry_run_reads_the_mix_and_writes_nothing(tmp_path, train_data):
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", out,
                   "--steps", "7", "--dry-run", "--gpus", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    assert p["seq_len"] == 32 and p["steps"] == 7 and p["processes"] == 2 and p["engine"] == "ddp"
    assert p["parameters"] == 214_016 and not out.exists()
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--dry-run", "--steps", "7")
    assert proc.returncode == 2 and "--data: missing (the plan needs the mix's seq_len" in proc.stderr
    proc = run_cli("pretrain", "--recipe", "tiny", "--dry-run", "--steps", "7")
    assert proc.returncode == 1 and "model.vocab_size: the recipe takes it from the data's tokenizer" in proc.stderr
    last = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", out,
                   "--steps", "2", "--device", "cpu")
    assert last.returncode == 0
    proc = run_cli("cooldown", "--from", out, "--data", train_data / "mix", "--steps", "5", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 5 and json.loads(proc.stdout)["parameters"] == 214_016


def test_a_micro_batch_larger_than_a_process_share_shrinks_aloud(capfd):
    """The tiny recipe's micro-batch 16 on 2 processes that take 8 samples each per step: micro-batches of 8 (the
    step is the same), said on stderr; one that does not divide the share takes the largest size that does."""
    from slm.train.batches import StepBatches

    b = StepBatches(16, 16, rank=0, world=2, device=torch.device("cpu"), micro_name="train.micro_batch_size")
    assert (b.micro, b.accumulation) == (8, 1)
    assert ("train.micro_batch_size 16 is more than the 8 samples each of 2 processes takes per step: using "
            "micro-batches of 8 (1 per step") in capfd.readouterr().err
    b = StepBatches(24, 5, rank=0, world=2, device=torch.device("cpu"))
    assert (b.micro, b.accumulation) == (4, 3) and "does not divide" in capfd.readouterr().err
    b = StepBatches(16, 4, rank=1, world=2, device=torch.device("cpu"))
    assert (b.micro, b.accumulation) == (4, 2) and capfd.readouterr().err == ""
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=64)
    p = plan(cfg, TrainSettings(tokens_per_step=512, micro_batch_size=16), 32, 10, 2, "ddp", "h100", 0.4, "bf16")
    assert (p["micro_batch_size"], p["accumulation_steps"]) == (8, 1)


def test_one_gpu_table_for_the_planner_and_the_carbon_estimate(train_data):
    """Every GPU the carbon estimate knows has its board power; every one with a datasheet peak plans; a100 is the
    SXM 80 GB board for both."""
    from slm.devices import ALIASES, GPUS, gpu, gpu_of_device
    from slm.stages.carbon import estimate

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=64)
    t = TrainSettings(tokens_per_step=256, micro_batch_size=4)
    for name, g in GPUS.items():
        assert estimate(10, name, None, 1.0, 100, None)["power_w"] == g.power_w
        if g.peak_flops:
            assert plan(cfg, t, 32, 10, 1, "single", name, 0.4, "bf16")["gpu_peak_tflops"] == g.peak_flops / 1e12
        else:
            with pytest.raises(SlmError, match="no datasheet peak FLOPs"):
                plan(cfg, t, 32, 10, 1, "single", name, 0.4, "bf16")
    assert gpu("a100") == gpu("A100-80GB") == GPUS["a100-80gb"] and set(ALIASES.values()) <= set(GPUS)
    assert estimate(10, "a100", None, 1.0, 100, None)["gpu"] == "a100-80gb"
    for device, name in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
                         ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"),
                         ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("Tesla V100-SXM2-32GB", "v100"),
                         ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("AMD Instinct MI300X", "mi300x")):
        assert gpu_of_device(device).name == name, device
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--dry-run",
                   "--steps", "10", "--gpu", "a100", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["gpu"] == "a100-80gb", proc.stderr
    proc = run_cli("carbon", "estimate", "--gpu-hours", "10", "--gpu", "a100", "--intensity", "100", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["power_w"] == 400, proc.stderr


@pytest.mark.parametrize("platform,unit", [("linux", 1024), ("darwin", 1)])
def test_peak_memory_without_proc_reads_ru_maxrss_in_its_platform_unit(monkeypatch, platform, unit):
    """Where /proc/self/status is missing, the peak resident memory (training's memory_gib on a CPU, bench's peak RSS)
    comes from getrusage, whose ru_maxrss is KiB on Linux and bytes on macOS: 3 GiB either way."""
    import builtins
    import resource
    import types

    from slm import devices
    from slm.train.metrics import memory_gib

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(devices.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**30 // unit))
    assert devices.peak_rss_bytes() == 3 * 2**30
    assert memory_gib(torch.device("cpu")) == 3.0


def saved_bytes(cfg, B, T, dtype, documents: bool = False) -> int:
    """What autograd keeps for the backward of one training forward (unique storages, parameters excluded), on rows
    without document boundaries (causal attention), or with DOCUMENTS (two per row: the CPU's dense mask)."""
    import contextlib

    from slm.model.transformer import build

    model = build(cfg, "cpu", seed=0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    seg = None
    if documents:
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[:, T // 3:] = 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(ids, segment_ids=seg, targets=ids)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_dense_document_mask_is_kept_once_not_per_layer(dtype):
    """Packed rows on a CPU attend through scaled_dot_product_attention with a dense [B, T, T] mask: it is built once
    per forward in the dtype attention runs in and shared by every layer, so a block keeps the same bytes with
    document boundaries as without (given the boolean mask, SDPA converted it in each layer and kept each copy)."""
    cfg2 = ModelConfig(family="llama", vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, tie_embeddings=True, max_seq_len=256)
    cfg4 = ModelConfig.from_dict({**cfg2.to_dict(), "num_layers": 4})
    B, T = 2, 256
    per_block = {docs: (saved_bytes(cfg4, B, T, dtype, docs) - saved_bytes(cfg2, B, T, dtype, docs)) / 2
                 for docs in (False, True)}
    assert per_block[True] == per_block[False], per_block
    mask = B * T * T * (2 if dtype == "bf16" else 4)
    assert saved_bytes(cfg2, B, T, dtype, True) - saved_bytes(cfg2, B, T, dtype, False) == pytest.approx(mask, rel=0.01)


@pytest.mark.parametrize("family", ["stablelm", "llama"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_planner_activations_per_block_equal_what_autograd_saves(family, dtype):
    """The planner's memory per block (activations per token, and under bf16 autocast the weights' bf16 copies that
    each linear layer saves) against the bytes autograd actually keeps, measured by a saved-tensors hook: one block's
    worth is the difference between 4 and 2 layers; within 3%. The planner counts what a fused RMSNorm keeps (its
    input); where torch runs rms_norm as a composite of element-wise operations (this CPU build), each norm also
    keeps its normalized output (4 bytes per token and width), which is added to the expectation here."""
    import torch.nn.functional as F

    common = dict(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=704, max_seq_len=256)
    cfg2 = (ModelConfig(family="stablelm", num_kv_heads=4, partial_rotary_factor=0.25, qkv_bias=True, **common)
            if family == "stablelm" else ModelConfig(family="llama", num_kv_heads=2, tie_embeddings=True, **common))
    cfg4 = ModelConfig.from_dict({**cfg2.to_dict(), "num_layers": 4})
    B, T = 2, 256
    measured = (saved_bytes(cfg4, B, T, dtype) - saved_bytes(cfg2, B, T, dtype)) / 2
    t = TrainSettings(tokens_per_step=B * T, micro_batch_size=B)
    act = {c.num_layers: memory_bytes(c, t, T, B, 1, "single", dtype)["activations"] for c in (cfg2, cfg4)}
    planned = (act[4] - act[2]) / 2
    x = torch.randn(2, 8, requires_grad=True)
    composite = type(F.rms_norm(x, (8,), torch.ones(8, requires_grad=True), 1e-5).grad_fn).__name__ == "MulBackward0"
    if family == "llama" and composite:
        planned += 2 * 4 * cfg2.hidden_size * B * T  # two norms per block
    assert planned == pytest.approx(measured, rel=0.03), (planned, measured)
