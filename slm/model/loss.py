"""Cross-entropy of the output layer, fused and chunked.

For rows of hidden states h and the output matrix W, the loss sum_i (logsumexp(W h_i) - (W h_i)[t_i]) has the
gradient (softmax(W h_i) - onehot(t_i)) with respect to the logits. Computing it chunk by chunk in the forward pass,
and going straight to the gradients of h and W, never holds the [tokens x vocabulary] logits for the backward pass
and skips the separate softmax-backward and zero-fill passes that autograd would run. The result and the gradients
are those of F.cross_entropy(h @ W.T, t, reduction="sum") (a test compares them).
"""

from __future__ import annotations

import torch

# Logits held at a time (a chunk of rows x the vocabulary). Each chunk adds its share of the output matrix's
# gradient into one fp32 [V, H] sum, which reads and writes that whole sum: with small chunks this traffic, not the
# products, sets the speed. At StableLM 2's vocabulary (100,352) and width (2,048) the sum is 822 MB; 2^23 logits
# (83 rows) would move ~2 GB per 34 GFLOP chunk, ten times the product's time on an H100-class GPU. 2^27 (1,337
# rows there, 0.5 GiB of fp32 logits) keeps it to a few percent of the layer; on CPUs 2^25 (128 MiB) measured 7%
# faster than 2^23 for SmolLM2-135M's layer (49,152 x 576, 4,096 tokens; 2 cores). cost.py counts the chunk.
CHUNK_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 25}


def default_chunk_elements(device: torch.device) -> int:
    """How many logits the fused losses hold at a time on DEVICE (CHUNK_ELEMENTS; other devices as CUDA)."""
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        # Pre-training has no ignored targets: skip the masking pass then (checked once; never on a GPU, where it
        # would cost a host sync, nor under torch.compile, where reading the answer would break the graph).
        mask_needed = targets.is_cuda or torch.compiler.is_compiling() or bool((targets == -100).any())
        # Under torch.autocast the products below run in bf16 (and come out in bf16): fast, as autocast means them
        # to be; the gradient of the output matrix is then summed over chunks in fp32.
        autocast = torch.is_autocast_enabled(h.device.type)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ w.t()).float()
            valid = tc != -100
            tgt = torch.where(valid, tc, torch.zeros_like(tc))
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()  # exp(logits - max), in place: one exp pass for the loss and the gradient
            total = e.sum(dim=-1)
            lse = top.squeeze(1) + total.log()
            loss += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_h or need_w:
                g = e.div_(total[:, None])  # softmax
                g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
                if mask_needed:
                    g.mul_(valid[:, None])
                g = g.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w and autocast:  # bf16 products (autocast), accumulated in fp32
                    part = g.t() @ hc
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)
                elif need_w:  # the first chunk allocates, the others accumulate (no zero fill)
                    part = g.t().float() @ hc.float() if grad_w is None else None
                    grad_w = part if grad_w is None else grad_w.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """sum over tokens of cross_entropy(h @ weight.T, targets), ignoring targets == -100.

    h [N, H], weight [V, H], targets [N]; chunks of about CHUNK_ELEMENTS logits at a time (None: the device's)."""
    chunk = max(16, (chunk_elements or default_chunk_elements(h.device)) // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(h_i W^T)[t_i] for each row, chunked; the backward recomputes each chunk's logits instead of
    keeping them (the output's gradient is per token, so it cannot be folded in ahead as for the summed loss)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        w = weight.to(h.dtype)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        lse_all = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ w.t()).float()
            valid = tc != -100
            tgt = torch.where(valid, tc, torch.zeros_like(tc))
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[s:s + chunk] = lse
            out[s:s + chunk] = torch.where(valid, logits.gather(1, tgt[:, None]).squeeze(1) - lse,
                                           torch.zeros_like(lse))
        ctx.save_for_backward(h, weight, targets, lse_all)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, targets, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, tc = h[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            valid = tc != -100
            tgt = torch.where(valid, tc, torch.zeros_like(tc))
            # d logp_t / d logits = onehot(t) - softmax, scaled by the incoming gradient of each token
            g = ((hc @ w.t()).float() - lse_all[s:s + ctx.chunk, None]).exp_().neg_()
            g[torch.arange(g.shape[0], device=g.device), tgt] += 1.0
            g.mul_((grad_out[s:s + ctx.chunk] * valid)[:, None])
            g = g.to(h.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = g @ w
            if need_w:
                part = (g.t() @ hc).float()
                grad_w = part if grad_w is None else grad_w.add_(part)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """Per row of h [N, H]: log softmax(h @ weight.T)[target], 0 where the target is -100; differentiable,
    never holding more than CHUNK_ELEMENTS logits (None: the device's; DPO's sequence log-probabilities)."""
    chunk = max(16, (chunk_elements or default_chunk_elements(h.device)) // weight.shape[0])
    return _LinearTokenLogprobs.apply(h, weight, targets, chunk)
