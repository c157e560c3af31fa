"""The four models of RLHF and the forward passes the trainer needs.

* **policy**: a Hugging Face causal LM (``--model PATH`` or a tiny Llama / GPT-2 built from a
  config; nothing is ever downloaded).
* **reference**: a frozen copy of the policy after SFT (the KL anchor).
* **reward model**: :class:`ScalarModel`, the SFT policy's transformer body plus a linear head
  read at the last real token; trained with the Bradley-Terry loss, then its head is rescaled so
  that its scores on SFT samples have mean 0 and std 1 (reward normalisation).
* **value model (critic)**: a *separate* :class:`ScalarModel` initialised from the trained reward
  model (as in InstructGPT and the "N+ implementation details" TL;DR study), read at every
  position.  Why separate rather than a value head on the policy: (1) the reward model already
  knows what is valuable, so the critic starts with a useful signal instead of a zero head and
  explained variance is positive from the first steps; (2) value-loss gradients never pull on the
  policy's features, so the policy loss needs no value coefficient to balance the two; (3) it has
  its own optimizer, learning rate and gradient clipping.  The cost, a second transformer, is
  negligible at the built-in size; with ``--model`` it doubles the trainable memory.

Dropout is switched off everywhere (config fields and modules set to 0, models kept in
``eval()``), so the log-probs of the rollout and of the update come from the same function.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .distributed import Runtime
from .task import EOS, PAD
from .vocab_parallel import sample_tokens, vocab_shard

__all__ = ["build_policy", "ScalarModel", "reward_model_from", "disable_dropout", "freeze",
           "generate", "response_mask", "model_inputs", "policy_logits", "position_values",
           "last_token_scores", "PackedBatch", "pack_rows", "pack_batch", "packed_policy_logits",
           "packed_position_values"]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (config, ``nn.Dropout`` modules, functional ones) and
    put the model in eval mode for good."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in list(vars(cfg).items()):
            if isinstance(v, float) and ("dropout" in k or "pdrop" in k):
                setattr(cfg, k, 0.0)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "resid_dropout_p", "attn_dropout_p"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_policy(cfg, vocab_size: int, max_positions: int) -> nn.Module:
    """The policy: ``cfg.model`` loaded from disk, or a tiny model built from ``cfg.arch``."""
    import transformers

    if cfg.model is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True)
        model = model.float()
        n_vocab = model.get_input_embeddings().num_embeddings
        if n_vocab < vocab_size:
            raise ValueError(f"TrainConfig.model={cfg.model!r} has a vocabulary of {n_vocab} ids; "
                             f"the built-in task needs at least {vocab_size}")
        n_pos = getattr(model.config, "max_position_embeddings", None) or \
            getattr(model.config, "n_positions", None)
        if n_pos is not None and n_pos < max_positions:
            raise ValueError(f"TrainConfig.model={cfg.model!r} handles {n_pos} positions; "
                             f"prompt + response need {max_positions}")
    elif cfg.arch == "llama":
        conf = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=max(32, max_positions), attention_dropout=0.0,
            tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
        model = transformers.LlamaForCausalLM(conf)
    else:
        conf = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=max(32, max_positions), n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
        model = transformers.GPT2LMHeadModel(conf)
    return disable_dropout(model)


class ScalarModel(nn.Module):
    """A transformer body plus a linear head: one scalar per position, ``[B, T] -> [B, T]``.

    The head starts as N(0, 1/sqrt(H + 1)) weights and a zero bias (the reward-head init of
    OpenAI's lm-human-preferences); :meth:`normalize` folds a gain and bias into it.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
            self.head.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                position_ids: Optional[Tensor] = None) -> Tensor:
        kw = {}
        if position_ids is not None:   # packed row (see pack_batch): no cache, so HF detects it
            kw = {"position_ids": position_ids, "use_cache": False}
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          **kw).last_hidden_state
        with torch.autocast(h.device.type, enabled=False):         # the head stays in fp32
            return self.head(h.float()).squeeze(-1)                 # [B, T] float32

    @torch.no_grad()
    def normalize(self, mean: float, std: float) -> None:
        """Make outputs ``(old - mean) / std`` by rescaling the head."""
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)


def reward_model_from(policy: nn.Module) -> ScalarModel:
    """A reward model whose body is a copy of ``policy``'s transformer (``base_model``)."""
    return disable_dropout(ScalarModel(copy.deepcopy(policy.base_model)))


# ------------------------------------------------------------------------------------------------
# forward passes over [prompt | response]
# ------------------------------------------------------------------------------------------------

def response_mask(responses: Tensor) -> Tuple[Tensor, Tensor]:
    """``(mask [B, R] float32, has_eos [B] bool)``: 1 for tokens up to and including the first
    EOS (every token when there is none), 0 for the padding after it."""
    is_eos = responses == EOS
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0           # [B, R]
    return (~after_eos).float(), is_eos.any(dim=1)


def model_inputs(query: Tensor, response: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(input_ids [B, P+R], attention_mask [B, P+R])`` with the padding masked out."""
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([torch.ones_like(query), mask.long()], dim=1)
    return input_ids, attention_mask


def autocast(rt: Runtime, bf16: bool):
    if bf16 and rt.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def policy_logits(policy: nn.Module, query: Tensor, response: Tensor, mask: Tensor) -> Tensor:
    """Logits that predict each response token, ``[B, R, V]`` (a strided view, not a copy):
    position ``P - 1 + t`` of ``[prompt | response]`` predicts response token ``t``."""
    P = query.shape[1]
    input_ids, attention_mask = model_inputs(query, response, mask)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits     # [B, P+R, V]
    return logits[:, P - 1:-1]                                                      # [B, R, V]


def position_values(critic: nn.Module, query: Tensor, response: Tensor, mask: Tensor) -> Tensor:
    """``V(s_t)`` for the state before each response token, ``[B, R]`` float32."""
    P = query.shape[1]
    input_ids, attention_mask = model_inputs(query, response, mask)
    return critic(input_ids, attention_mask)[:, P - 1:-1]                           # [B, R]


def last_token_scores(reward_model: nn.Module, query: Tensor, response: Tensor, mask: Tensor
                      ) -> Tensor:
    """The reward model's score at the last real token (the EOS, or the last token when the
    response has none), ``[B]`` float32."""
    P = query.shape[1]
    input_ids, attention_mask = model_inputs(query, response, mask)
    out = reward_model(input_ids, attention_mask)                                    # [B, P+R]
    last = P - 1 + mask.sum(dim=1).long()                                            # [B]
    return out.gather(1, last[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------
# packed (padding-free) forward passes: TrainConfig.packed
# ------------------------------------------------------------------------------------------------

class PackedBatch(NamedTuple):
    """``S`` sequences ``[prompt | real response tokens]`` concatenated into one row, no padding.

    ``L_s = P + n_s`` tokens per sequence (``n_s`` = real response tokens, EOS included);
    ``total = sum_s L_s``, ``total_resp = N = sum_s n_s``.
    """

    input_ids: Tensor      # [1, total]      int64
    position_ids: Tensor   # [1, total]      int64  0, 1, ..., L_s - 1 for every sequence
    resp_index: Tensor     # [total_resp]    int64  row position whose output predicts/values
                           #                        each real response token, sequence by sequence
    cu_seqlens: Tensor     # [S + 1]         int64  boundaries of the response segments in
                           #                        [1, total_resp] (0, n_0, n_0 + n_1, ...)


def pack_rows(x: Tensor, mask: Tensor) -> Tensor:
    """Padded ``[S, R]`` -> packed ``[1, total_resp]``: the entries where ``mask`` is set, row
    by row (the order of :class:`PackedBatch`'s response segments)."""
    return x[mask.bool()].unsqueeze(0)


def pack_batch(query: Tensor, response: Tensor, mask: Tensor) -> PackedBatch:
    """Pack ``query [S, P]`` + ``response [S, R]`` (real tokens: ``mask [S, R]``) into one row.

    The position ids restart at 0 for every sequence.  Given no attention mask *and no KV cache*
    (``use_cache=False``: with a cache, transformers skips the detection and the row is one long
    sequence), transformers 5.x's masking utils detect the packed layout from the position ids
    and build a block-diagonal causal mask, so every sequence sees only its own tokens: the
    outputs equal the padded forward's at the real positions (to ~1e-7 in float32, verified with
    sdpa and eager attention on the built-in Llama and GPT-2; tests/test_trainer.py checks it).
    """
    S, P = query.shape
    dev = query.device
    n = mask.sum(dim=1).long()                                                      # [S]
    lens = P + n                                                                    # [S]
    real = torch.cat([torch.ones_like(query, dtype=torch.bool), mask.bool()], 1)   # [S, P+R]
    input_ids = torch.cat([query, response], dim=1)[real].unsqueeze(0)             # [1, total]
    starts = torch.cumsum(lens, 0) - lens                                           # [S]
    pos = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(starts, lens)
    # response token t of sequence s is predicted at row position start_s + P - 1 + t
    t = torch.arange(mask.shape[1], device=dev).expand(S, -1)                       # [S, R]
    resp_index = (starts[:, None] + P - 1 + t)[mask.bool()]                         # [total_resp]
    cu = torch.zeros(S + 1, dtype=torch.long, device=dev)
    cu[1:] = torch.cumsum(n, 0)
    return PackedBatch(input_ids, pos.unsqueeze(0), resp_index, cu)


def packed_policy_logits(policy: nn.Module, pb: PackedBatch) -> Tensor:
    """Logits that predict each real response token, packed: ``[1, total_resp, V]``."""
    logits = policy(input_ids=pb.input_ids, position_ids=pb.position_ids,
                    use_cache=False).logits                                     # [1, total, V]
    return logits[:, pb.resp_index]                                             # [1, N, V]


def packed_position_values(critic: nn.Module, pb: PackedBatch) -> Tensor:
    """``V(s_t)`` before each real response token, packed: ``[1, total_resp]`` float32."""
    return critic(pb.input_ids, None, pb.position_ids)[:, pb.resp_index]        # [1, N]


@torch.no_grad()
def generate(policy: nn.Module, queries: Tensor, max_new_tokens: int, temperature: float,
             generator: torch.Generator, rt: Runtime) -> Tensor:
    """Sample responses ``[B, max_new_tokens]`` from ``softmax(logits / temperature)`` (no top-k,
    no top-p), PAD after the first EOS.

    A vocab-parallel policy returns only its slice of the logits: the token is then drawn by
    :func:`~fastrlhf.trainer.vocab_parallel.sample_tokens` (Gumbel-max per slice, one
    ``[2, B]`` all-gather), and every rank of the group gets the same token.  ``generator``
    must then differ between the ranks of the group (independent noise per slice).

    A plain loop without a KV cache: the sequences here are a few dozen tokens, and the same
    code works for every architecture and under FSDP2.  Stops early once every sequence on
    every rank has produced EOS (the ranks agree, so collective forwards stay in step).
    """
    shard = vocab_shard(policy)
    # only the last position's logits: [B, 1, V] per step instead of [B, t, V]
    last_only = ({"logits_to_keep": 1}
                 if "logits_to_keep" in inspect.signature(policy.forward).parameters else {})
    B = queries.shape[0]
    seq = queries                                                                   # [B, P+t]
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=queries.device)
    done = torch.zeros(B, dtype=torch.bool, device=queries.device)
    for t in range(max_new_tokens):
        logits = policy(input_ids=seq, **last_only).logits[:, -1].float()          # [B, V]
        if shard is None:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)      # [B]
        else:                                                       # logits: [B, V / P]
            nxt = sample_tokens(logits, temperature, generator, shard)             # [B]
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out[:, t] = nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == EOS)
        if int(rt.all_reduce_min(done.all().int())) == 1:
            break
    return out
