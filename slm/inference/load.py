"""A checkpoint's model, ready for inference, and the device it runs on."""

from __future__ import annotations

import torch

from slm.formats.checkpoint import Checkpoint
from slm.model.transformer import Rotary, Transformer, build, load_state


def device_for(name: str) -> torch.device:
    """'auto' is cuda when there is one, else cpu; any other name is torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt: Checkpoint, device: torch.device) -> Transformer:
    """The checkpoint's model in fp32 on DEVICE, in eval mode (built on the meta device: nothing initialised)."""
    model = build(ckpt.model_config, "meta").to_empty(device=device)
    load_state(model, ckpt.state_dict(), str(ckpt.dir))
    model.rotary = Rotary(ckpt.model_config).to(device)  # its table is not in the checkpoint
    return model.eval()
