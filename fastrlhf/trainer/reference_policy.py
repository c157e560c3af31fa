"""The reference policy (the KL anchor) without a second model on the device: ``--reference``.

* ``copy`` (default): a frozen copy of the starting policy on the device, as in most PPO code.
* ``lora``: the policy trains LoRA adapters (``peft``) on its frozen weights, and the reference is
  the same model with the adapters switched off (:class:`AdaptersDisabled`): no second copy of
  the weights at all, and Adam moments only for the adapters.  At the start the adapters are
  zero (LoRA's B matrix starts at 0), so policy == reference exactly, as with a copy.
* ``offload``: a frozen copy kept in CPU memory; :func:`reference_on_device` moves it to the
  device for the rollout's scoring pass (the only place the reference runs: its log-probs are
  computed once per rollout and stored in the :class:`~.rollout.Rollout`) and back afterwards,
  so the update (optimizer state, gradients, activations: the peak) never has it on the device.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["attach_lora", "AdaptersDisabled", "adapters_disabled", "reference_on_device",
           "merged_lora_state", "lora_layers"]


def _peft():
    try:
        import peft  # lazy: optional dependency (the [integrations] extra), --reference lora only
    except ImportError:
        raise ValueError("TrainConfig.reference='lora' needs the peft package: pip install "
                         "'fastrlhf[integrations]' (or pip install peft)") from None
    return peft


def attach_lora(policy: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Inject LoRA adapters (rank ``cfg.lora_r``, scale ``lora_alpha / lora_r``, no dropout) into
    ``policy``'s linear layers named by ``cfg.lora_target_modules`` (in place) and freeze every
    other weight; returns ``policy``.  Its class, ``generate`` and forward signature are those of
    the original model."""
    peft = _peft()
    targets = cfg.lora_target_modules
    if targets == "all-linear":   # every linear layer (GPT-2: Conv1D) but the output head
        from transformers.pytorch_utils import Conv1D  # lazy: transformers loads with the model
        head = policy.get_output_embeddings()
        names = sorted({name.rsplit(".", 1)[-1] for name, m in policy.named_modules()
                        if isinstance(m, (nn.Linear, Conv1D)) and m is not head})
    else:
        names = [t.strip() for t in targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()}
    if not names or not set(names) <= present:
        raise ValueError(f"TrainConfig.lora_target_modules={targets!r} must name layers of the "
                         f"{type(policy).__name__} (missing: "
                         f"{', '.join(sorted(set(names) - present)) or 'any linear layer'})")
    conv1d = any(type(m).__name__ == "Conv1D" for name, m in policy.named_modules()
                 if name.rsplit(".", 1)[-1] in names)     # GPT-2 stores W transposed
    conf = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                           target_modules=names, fan_in_fan_out=conv1d)
    peft.inject_adapter_in_model(conf, policy)
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name)
    return policy


def lora_layers(model: nn.Module):
    """The modules of ``model`` that carry LoRA adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: optional dependency
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base weights alone (every LoRA adapter off) inside the block."""
    layers = lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class AdaptersDisabled(nn.Module):
    """The reference of ``--reference lora``: calls the policy with its adapters switched off.

    Holds the policy without registering it as a submodule, so it has no parameters or state of
    its own (a checkpoint's ``ref`` entry is empty) and ``freeze`` / ``.to`` leave the policy
    alone."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", policy)

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


@contextlib.contextmanager
def reference_on_device(ref: nn.Module, device: torch.device, offload: bool) -> Iterator[None]:
    """``--reference offload``: ``ref`` (kept on the CPU) is on ``device`` inside the block and
    back on the CPU after it (a no-op on a CPU run); without ``offload`` nothing moves."""
    if not offload or device.type == "cpu":
        yield
        return
    ref.to(device)
    try:
        yield
    finally:
        ref.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def merged_lora_state(policy: nn.Module, state: Dict[str, torch.Tensor]
                      ) -> Dict[str, torch.Tensor]:
    """The plain model's state dict of a LoRA policy: each adapted weight becomes
    ``W + (alpha / r) B A`` under its original name, and the adapter tensors are dropped, so
    ``AutoModelForCausalLM.from_pretrained`` loads it as an ordinary model (``final/policy``)."""
    merged = copy.deepcopy(policy).cpu()
    merged.load_state_dict(state)
    for m in lora_layers(merged):
        m.merge()
    out = {}
    for k, v in merged.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
