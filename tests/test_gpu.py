"""slm's GPU path, checked on a GPU: `pytest -m gpu` (benchmarks/gpu.sh runs these and the GPU benchmarks).

Without CUDA every test here skips and says why. SLM_GPU_TESTS_DEVICE=cpu runs the same checks on the CPU: that
checks the tests themselves on a machine without a GPU, and proves nothing about CUDA kernels.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from slm.model.transformer import ModelConfig, build, document_mask
from slm.train import engine
from slm.train.config import TrainSettings
from slm.train.dist import Dist

DEVICE = os.environ.get("SLM_GPU_TESTS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                 reason="no CUDA device: slm's GPU path is checked on one (bash benchmarks/gpu.sh); "
                                        "SLM_GPU_TESTS_DEVICE=cpu checks these tests on the CPU")]

# Both families at a small size: StableLM 2 (LayerNorm, partial rotary, qkv bias, untied) and SmolLM2 / Llama
# (RMSNorm, full rotary, grouped-query attention, tied).
FAMILIES = {
    "stablelm": ModelConfig(family="stablelm", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=4, intermediate_size=256, partial_rotary_factor=0.25, qkv_bias=True,
                            max_seq_len=256),
    "llama": ModelConfig(family="llama", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=256, tie_embeddings=True, max_seq_len=256),
}


def dev() -> torch.device:
    return torch.device(DEVICE)


def packed(cfg: ModelConfig, batch: int = 2, seq: int = 256, seed: int = 0):
    """Rows of several documents each (random lengths), as `slm mix` packs them: ids, targets, segment ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    seg = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        for cut in torch.randint(1, seq, (5,), generator=g).tolist():
            seg[b, cut:] += 1
    return tokens[:, :-1].to(dev()), tokens[:, 1:].to(dev()), seg.to(dev())


def loss_and_grads(model, ids, targets, seg, autocast=None):
    model.zero_grad(set_to_none=True)
    with autocast or torch.autocast(dev().type, enabled=False):
        s, n = model(ids, segment_ids=seg, targets=targets)
    loss = s / n
    loss.backward()
    return loss.detach().float(), {k: p.grad.detach().float().clone() for k, p in model.named_parameters()}


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([v.flatten() for v in a.values()])
    y = torch.cat([b[k].flatten() for k in a])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_document_masked_flex_attention_equals_the_masked_sdpa_reference(family):
    """On a GPU, packed rows attend through FlexAttention's block mask (what train.attention auto picks there): its
    loss and every gradient equal the reference, scaled_dot_product_attention with the dense document mask."""
    from torch.nn.attention.flex_attention import BlockMask

    cfg = FAMILIES[family]
    model = build(cfg, "cpu", seed=0).to(dev())
    ids, targets, seg = packed(cfg)
    if ON_GPU:
        assert isinstance(document_mask(seg, "auto"), BlockMask)
    results = {}
    for backend in ("flex", "sdpa"):
        model.attention_backend = backend
        if not ON_GPU:  # FlexAttention has no backward on a CPU: the forward only
            with torch.no_grad():
                s, n = model(ids, segment_ids=seg, targets=targets)
            results[backend] = (s / n, {})
            continue
        results[backend] = loss_and_grads(model, ids, targets, seg)
    (lf, gf), (ls, gs) = results["flex"], results["sdpa"]
    torch.testing.assert_close(lf, ls, rtol=1e-4, atol=1e-5)
    for k in gs:
        torch.testing.assert_close(gf[k], gs[k], rtol=2e-3, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_bf16_autocast_step_tracks_fp32():
    """train.dtype auto is bf16 autocast on a GPU; its loss is within 1% of fp32's and its gradient points the same
    way (cosine > 0.99) on packed rows (the stated tolerance: bf16 keeps 8 bits of mantissa)."""
    cfg = FAMILIES["llama"]
    if ON_GPU:
        assert engine.compute_dtype(TrainSettings(), dev()) == "bf16"
    model = build(cfg, "cpu", seed=0).to(dev())
    ids, targets, seg = packed(cfg)
    l32, g32 = loss_and_grads(model, ids, targets, seg)
    l16, g16 = loss_and_grads(model, ids, targets, seg, torch.autocast(dev().type, dtype=torch.bfloat16))
    assert abs(float(l16 / l32) - 1) < 0.01, (float(l16), float(l32))
    assert cosine(g16, g32) > 0.99


def two_steps(eng, ids, targets, seg, autocast=None) -> list[float]:
    losses = []
    for _ in range(2):
        with eng.accumulating(True), autocast or torch.autocast(dev().type, enabled=False):
            s, n = eng.forward_model(ids, segment_ids=seg, targets=targets)
        eng.backward(s / n, True)
        _, applied = eng.finish_step(True)
        assert applied
        losses.append(float(s.detach() / n))
    return losses


def test_fsdp_with_its_bf16_policy_on_one_process():
    """--engine fsdp with train.dtype bf16 (bf16 compute, fp32 master weights and reduction) on one process: two
    steps track the single engine's bf16 autocast steps, and the full fp32 weights gather back for a checkpoint."""
    import torch.distributed as dist

    cfg = FAMILIES["stablelm"]
    t = TrainSettings(dtype="bf16", engine="fsdp", lr_peak=1e-3)
    d = Dist(device=dev())
    ids, targets, seg = packed(cfg)
    base = build(cfg, "cpu", seed=0).to(dev())
    ref = engine.build("single", d, copy.deepcopy(base), t, 1, 2)
    ref.set_lr(1e-3)
    want = two_steps(ref, ids, targets, seg, torch.autocast(dev().type, dtype=torch.bfloat16))
    try:
        eng = engine.build("fsdp", d, base, t, 1, 2)
        eng.set_lr(1e-3)
        got = two_steps(eng, ids, targets, seg)
        weights = eng.full_weights()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert got[1] < got[0] and abs(got[0] / want[0] - 1) < 0.01 and abs(got[1] / want[1] - 1) < 0.02, (got, want)
    ref_weights = ref.model.state_dict()
    assert weights.keys() == ref_weights.keys()
    for k, w in weights.items():
        assert w.dtype == torch.float32, k
        torch.testing.assert_close(w.to(dev()), ref_weights[k], rtol=0.05, atol=5e-3, msg=lambda m, k=k: f"{k}: {m}")


def test_compiled_training_step_equals_eager():
    """train.compile: the compiled model (document mask and fused output-layer loss included) gives eager's loss and
    gradients."""
    cfg = FAMILIES["llama"]
    model = build(cfg, "cpu", seed=0).to(dev())
    ids, targets, seg = packed(cfg)
    want = loss_and_grads(model, ids, targets, seg)
    compiled = torch.compile(model)
    model.zero_grad(set_to_none=True)
    s, n = compiled(ids, segment_ids=seg, targets=targets)
    (s / n).backward()
    torch.testing.assert_close((s / n).detach().float(), want[0], rtol=1e-4, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad.float(), want[1][k], rtol=2e-3, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_the_optimizer_is_fused_adamw_and_steps_as_the_reference():
    """slm's optimizer is torch's fused AdamW (one kernel for all parameters) with decay on matrices only; a step
    equals the for-each implementation's."""
    cfg = FAMILIES["stablelm"]
    t = TrainSettings(lr_peak=1e-3)
    model = build(cfg, "cpu", seed=0).to(dev())
    twin = copy.deepcopy(model)
    opt = engine.make_optimizer(model, t)
    assert all(g.get("fused") for g in opt.param_groups)
    ref = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                              "params": [dict(twin.named_parameters())[n] for n in names], "fused": False,
                              "foreach": True}
                             for g, names in zip(opt.param_groups, _group_names(model, opt))])
    ids, targets, seg = packed(cfg)
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(2):
            loss_and_grads(m, ids, targets, seg)
            o.step()
    for (k, a), b in zip(model.named_parameters(), twin.parameters()):
        # the two round differently: within 1% of one step's size (lr 1e-3)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _group_names(model, opt) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


@pytest.mark.parametrize("compile", [False, True, "reduce-overhead"], ids=["eager", "compiled", "cudagraphs"])
def test_static_cache_decoder_equals_the_full_forward(compile):
    """`slm generate` / `slm bench`'s decoder (a fixed-size KV cache, compiled once; "reduce-overhead" replays the
    step as a CUDA graph on a GPU): the logits of every new token equal a full forward over the whole sequence, and
    a step's logits stay as they were after the next step (a graph's replay reuses its output memory)."""
    from slm.model.decode import StaticDecoder

    cfg = FAMILIES["llama"]
    model = build(cfg, "cpu", seed=0).to(dev()).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1)).to(dev())
    dec = StaticDecoder(model, batch=1, max_len=40, compile=compile)
    ids = prompt
    kept = []
    with torch.no_grad():
        logits = dec.prefill(prompt)
        for _ in range(8):
            full = model(ids)[:, -1].float()
            torch.testing.assert_close(logits.float(), full, rtol=1e-4, atol=1e-4)
            kept.append((logits, full))
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits = dec.step(nxt)
    for old, full in kept:
        torch.testing.assert_close(old.float(), full, rtol=1e-4, atol=1e-4)


def test_a_resumed_run_is_bit_exact_in_deterministic_mode(tmp_path, train_data):
    """train.deterministic on the run's device: 4 steps at once and 2 + 2 (stopped, resumed) give the same losses and
    weights, bit for bit."""
    from slm.formats.checkpoint import Checkpoint
    from slm.train.metrics import read_metrics

    def pretrain(out, steps):
        proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", out,
                       "--steps", str(steps), "--device", DEVICE, "--set", "train.deterministic=true",
                       "--set", "train.save_every=2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return Path(proc.stdout.strip())

    whole = pretrain(tmp_path / "whole", 4)
    pretrain(tmp_path / "split", 2)
    resumed = pretrain(tmp_path / "split", 4)
    assert [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r] == \
        [r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    a, b = Checkpoint(whole).hf_state_dict(), Checkpoint(resumed).hf_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    config = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert config["config"]["train"]["deterministic"] is True
