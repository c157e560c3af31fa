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
  ``--value-head shared`` takes the other road: :class:`ValueHead` on the policy's own body.

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

from .distributed import Runtime, unwrap
from .task import EOS, PAD
from .vocab_parallel import sample_tokens, vocab_shard

__all__ = ["build_policy", "ScalarModel", "ValueHead", "policy_logits_and_values",
           "hidden_instead_of_logits", "check_linear_head",
           "reward_model_from", "disable_dropout", "freeze",
           "generate", "response_mask", "positions",
           "model_inputs", "policy_logits", "position_values",
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


def build_policy(cfg, vocab_size: Optional[int], max_positions: int,
                 device_type: str = "cpu") -> nn.Module:
    """The policy: ``cfg.model`` loaded from disk, or a tiny model built from ``cfg.arch``.

    A loaded model keeps its saved dtype on CUDA (``model.loaded_dtype`` records it; the
    trainer then runs forwards under autocast in that dtype); on any other device bf16 / fp16
    weights are cast to float32, since training in those dtypes on CPU is slow and lossy.
    ``vocab_size``: the built-in task's (the model must cover it), None with ``--prompts``.
    """
    import transformers

    if cfg.model is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True,
                                                                  dtype="auto")
        loaded = next(model.parameters()).dtype
        if device_type != "cuda" or loaded not in (torch.bfloat16, torch.float16):
            model = model.float()
        model.loaded_dtype = loaded
        n_vocab = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and n_vocab < vocab_size:
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
        if position_ids is not None:   # packed row (see pack_batch): no cache, so HF detects it;
            kw = {"position_ids": position_ids, "use_cache": False}     # or left-padded prompts
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          **kw).last_hidden_state
        with torch.autocast(h.device.type, enabled=False):         # the head stays in fp32
            return self.head(h.float()).squeeze(-1)                 # [B, T] float32

    @torch.no_grad()
    def normalize(self, mean: float, std: float) -> None:
        """Make outputs ``(old - mean) / std`` by rescaling the head."""
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)


class ValueHead(nn.Module):
    """``--value-head shared``: the value model as a linear head on the *policy's* last hidden
    state, ``[B, T, H] -> [B, T]`` float32 (same init as :class:`ScalarModel`'s head).

    The alternative to the separate critic (see the module docstring): one transformer instead
    of two, at the price of value-loss gradients flowing into the policy's body, weighted by
    ``value_coef``.  It is kept out of the policy module (own optimizer, gradients averaged over
    the data-parallel ranks by the trainer), so the policy saves as a plain causal LM."""

    def __init__(self, hidden: int):
        super().__init__()
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
            self.head.bias.zero_()

    def forward(self, hidden_states: Tensor) -> Tensor:
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.head(hidden_states.float()).squeeze(-1)


def policy_logits_and_values(policy: nn.Module, head: ValueHead, query: Tensor,
                             response: Tensor, mask: Tensor, query_mask: Optional[Tensor] = None
                             ) -> Tuple[Tensor, Tensor]:
    """One policy forward, two outputs (``--value-head shared``): the logits that predict each
    response token ``[B, R, V]`` and ``V(s_t)`` from the same hidden states ``[B, R]``."""
    P = query.shape[1]
    input_ids, attention_mask, pos = model_inputs(query, response, mask, query_mask)
    out = policy(input_ids=input_ids, output_hidden_states=True,
                 **_forward_kw(attention_mask, pos))
    return out.logits[:, P - 1:-1], head(out.hidden_states[-1])[:, P - 1:-1]


@contextlib.contextmanager
def hidden_instead_of_logits(policy: nn.Module):
    """``--fused-linear``: inside this block the policy's forward returns its final hidden
    states ``[B, T, H]`` in place of the logits (the lm_head is swapped for an identity), and
    the block yields ``(weight [V, H], bias [V] or None)`` of the real lm_head, for
    ``fastrlhf.fused_linear_ppo_loss``.  The forward still goes through the DDP wrapper, so
    gradient synchronisation is unchanged; the lm_head's parameters get their gradient from the
    fused loss.  :func:`check_linear_head` verifies the model computes ``logits = lm_head(h)``."""
    m = unwrap(policy)
    head = m.get_output_embeddings()
    m.set_output_embeddings(nn.Identity())
    try:
        yield head.weight, getattr(head, "bias", None)
    finally:
        m.set_output_embeddings(head)


@torch.no_grad()
def check_linear_head(policy: nn.Module) -> None:
    """Raise ``ValueError`` unless the model's logits are exactly its lm_head applied to what
    :func:`hidden_instead_of_logits` returns (no soft-capping or logit scaling after it)."""
    m = unwrap(policy)
    ids = torch.arange(4, device=next(m.parameters()).device)[None] % m.config.vocab_size
    logits = m(input_ids=ids).logits
    with hidden_instead_of_logits(m) as (w, b):
        h = m(input_ids=ids).logits
    want = torch.nn.functional.linear(h.to(w.dtype), w, b)
    if h.shape[-1] != w.shape[1] or not torch.allclose(want.float(), logits.float(), atol=1e-4,
                                                        rtol=1e-4):
        raise ValueError(f"TrainConfig.fused_linear: {type(m).__name__}'s logits are not "
                         "lm_head(final hidden state); use --fused-loss instead")


def reward_model_from(policy: nn.Module) -> ScalarModel:
    """A reward model whose body is a copy of ``policy``'s transformer (``base_model``)."""
    return disable_dropout(ScalarModel(copy.deepcopy(policy.base_model)))


# ------------------------------------------------------------------------------------------------
# forward passes over [prompt | response]
# ------------------------------------------------------------------------------------------------

def response_mask(responses: Tensor, eos_id: int = EOS) -> Tuple[Tensor, Tensor]:
    """``(mask [B, R] float32, has_eos [B] bool)``: 1 for tokens up to and including the first
    EOS (every token when there is none), 0 for the padding after it."""
    is_eos = responses == eos_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0           # [B, R]
    return (~after_eos).float(), is_eos.any(dim=1)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (0 on the left
    padding too, which nothing attends to)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def model_inputs(query: Tensor, response: Tensor, mask: Tensor,
                 query_mask: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(input_ids [B, P+R], attention_mask [B, P+R], position_ids [B, P+R] or None)`` with
    the padding masked out: the response's after EOS, and the prompts' left padding when
    ``query_mask [B, P]`` has any (position ids then count real tokens only)."""
    input_ids = torch.cat([query, response], dim=1)
    qm = torch.ones_like(query) if query_mask is None else query_mask.long()
    attention_mask = torch.cat([qm, mask.long()], dim=1)
    left_padded = query_mask is not None and not bool(query_mask.all())
    return input_ids, attention_mask, positions(attention_mask) if left_padded else None


def autocast(rt: Runtime, bf16: bool):
    """Autocast of the model forwards: ``rt.amp_dtype`` (a bf16 / fp16 ``--model`` on CUDA),
    else bfloat16 when ``bf16`` on CUDA, else none."""
    dtype = getattr(rt, "amp_dtype", None) or (torch.bfloat16 if bf16 else None)
    if dtype is not None and rt.device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _forward_kw(attention_mask: Tensor, position_ids: Optional[Tensor]) -> dict:
    kw = {"attention_mask": attention_mask}
    if position_ids is not None:
        kw["position_ids"] = position_ids
    return kw


def policy_logits(policy: nn.Module, query: Tensor, response: Tensor, mask: Tensor,
                  query_mask: Optional[Tensor] = None) -> Tensor:
    """Logits that predict each response token, ``[B, R, V]`` (a strided view, not a copy):
    position ``P - 1 + t`` of ``[prompt | response]`` predicts response token ``t``."""
    P = query.shape[1]
    input_ids, attention_mask, pos = model_inputs(query, response, mask, query_mask)
    logits = policy(input_ids=input_ids, **_forward_kw(attention_mask, pos)).logits  # [B,P+R,V]
    return logits[:, P - 1:-1]                                                      # [B, R, V]


def position_values(critic: nn.Module, query: Tensor, response: Tensor, mask: Tensor,
                    query_mask: Optional[Tensor] = None) -> Tensor:
    """``V(s_t)`` for the state before each response token, ``[B, R]`` float32."""
    P = query.shape[1]
    input_ids, attention_mask, pos = model_inputs(query, response, mask, query_mask)
    return critic(input_ids, attention_mask, pos)[:, P - 1:-1]                      # [B, R]


def last_token_scores(reward_model: nn.Module, query: Tensor, response: Tensor, mask: Tensor,
                      query_mask: Optional[Tensor] = None) -> Tensor:
    """The reward model's score at the last real token (the EOS, or the last token when the
    response has none), ``[B]`` float32."""
    P = query.shape[1]
    input_ids, attention_mask, pos = model_inputs(query, response, mask, query_mask)
    out = reward_model(input_ids, attention_mask, pos)                               # [B, P+R]
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


def pack_batch(query: Tensor, response: Tensor, mask: Tensor,
               query_mask: Optional[Tensor] = None) -> PackedBatch:
    """Pack ``query [S, P]`` (real tokens: ``query_mask``, default all; left-padded) +
    ``response [S, R]`` (real tokens: ``mask [S, R]``) into one row.

    The position ids restart at 0 for every sequence.  Given no attention mask *and no KV cache*
    (``use_cache=False``: with a cache, transformers skips the detection and the row is one long
    sequence), transformers 5.x's masking utils detect the packed layout from the position ids
    and build a block-diagonal causal mask, so every sequence sees only its own tokens: the
    outputs equal the padded forward's at the real positions (to ~1e-7 in float32, verified with
    sdpa and eager attention on the built-in Llama and GPT-2; tests/test_trainer.py checks it).
    """
    S, P = query.shape
    dev = query.device
    qm = torch.ones_like(query, dtype=torch.bool) if query_mask is None else query_mask.bool()
    n = mask.sum(dim=1).long()                                                      # [S]
    qn = qm.sum(dim=1).long()                                                       # [S]
    lens = qn + n                                                                   # [S]
    real = torch.cat([qm, mask.bool()], 1)                                          # [S, P+R]
    input_ids = torch.cat([query, response], dim=1)[real].unsqueeze(0)             # [1, total]
    starts = torch.cumsum(lens, 0) - lens                                           # [S]
    pos = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(starts, lens)
    # response token t of sequence s is predicted at row position start_s + qn_s - 1 + t
    t = torch.arange(mask.shape[1], device=dev).expand(S, -1)                       # [S, R]
    resp_index = (starts[:, None] + qn[:, None] - 1 + t)[mask.bool()]              # [total_resp]
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
             generator: torch.Generator, rt: Runtime, *, query_mask: Optional[Tensor] = None,
             eos_id: int = EOS, pad_id: int = PAD, kv_cache: bool = False) -> Tensor:
    """Sample responses ``[B, max_new_tokens]`` from ``softmax(logits / temperature)`` (no top-k,
    no top-p), ``pad_id`` after the first ``eos_id``.

    ``query_mask [B, P]``: left-padded prompts (0 on the padding); the attention mask and the
    position ids then skip the padding, so each row is generated as if it were alone.

    ``kv_cache``: the prompt runs once, then each step feeds only the new token with the cached
    keys and values (transformers' ``cache``), so a token costs the same at any response length;
    without it every step re-runs the whole prefix.  Both draw the same tokens from the same
    generator (tested): the logits agree to rounding.

    A vocab-parallel policy returns only its slice of the logits: the token is then drawn by
    :func:`~fastrlhf.trainer.vocab_parallel.sample_tokens` (Gumbel-max per slice, one
    ``[2, B]`` all-gather), and every rank of the group gets the same token.  ``generator``
    must then differ between the ranks of the group (independent noise per slice).
    Stops early once every sequence on every rank has produced EOS (the ranks agree, so
    collective forwards stay in step).
    """
    shard = vocab_shard(policy)
    # only the last position's logits: [B, 1, V] per step instead of [B, t, V]
    last_only = ({"logits_to_keep": 1}
                 if "logits_to_keep" in inspect.signature(policy.forward).parameters else {})
    # the cache's name: ``cache`` in transformers >= 5.2x, ``past_key_values`` before
    cache_kw = ("cache" if "cache" in inspect.signature(policy.forward).parameters
                else "past_key_values")
    B = queries.shape[0]
    seq = queries                                                                   # [B, P+t]
    att = None if query_mask is None else query_mask.long()                        # [B, P+t]
    left_padded = att is not None and not bool(att.all())
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=queries.device)
    done = torch.zeros(B, dtype=torch.bool, device=queries.device)
    past = None
    nxt = None
    for t in range(max_new_tokens):
        kw = dict(last_only)
        if att is not None:
            kw["attention_mask"] = att
        if kv_cache:
            kw["use_cache"] = True
            if past is None:                                    # the prompt, once
                inp = seq
                if left_padded:
                    kw["position_ids"] = positions(att)
            else:                                               # one new token per step
                inp = nxt[:, None]
                kw[cache_kw] = past
                if left_padded:
                    kw["position_ids"] = att.sum(dim=1, keepdim=True) - 1
            res = policy(input_ids=inp, **kw)
            past = res.cache if hasattr(res, "cache") else res.past_key_values
        else:
            if left_padded:
                kw["position_ids"] = positions(att)
            res = policy(input_ids=seq, **kw)
        logits = res.logits[:, -1].float()                                         # [B, V]
        if shard is None:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)      # [B]
        else:                                                       # logits: [B, V / P]
            nxt = sample_tokens(logits, temperature, generator, shard)             # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if att is not None:
            att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
        done = done | (nxt == eos_id)
        if int(rt.all_reduce_min(done.all().int())) == 1:
            break
    return out
