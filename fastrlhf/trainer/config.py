"""The trainer's configuration: one dataclass, a docstring under every field.

Values come, in increasing priority, from the defaults below, a config file (``--config FILE``:
JSON, or TOML on Python >= 3.11), the checkpoint being resumed, and command-line flags
(``--field-name VALUE``, generated from this class).  Every value is checked when the object is
built (:meth:`TrainConfig.__post_init__`): a bad one raises ``ValueError`` naming the field, the
value and what is allowed, before any model is built.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["TrainConfig", "field_docs", "load_config_file", "stream_seed"]

BACKENDS = ("auto", "triton", "native", "reference")
ARCHS = ("llama", "gpt2")
PARALLEL = ("ddp", "fsdp2")
SCHEDULES = ("linear", "cosine", "constant")
LOSS_AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
ALGOS = ("ppo", "grpo", "dr_grpo", "rloo")
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
REFERENCES = ("copy", "lora", "offload")


def stream_seed(seed: int, stream: int, rank: int = 0) -> int:
    """Independent seeds for the random streams (stream id) of each rank: 1 shared data, 2 prompts
    (per data-parallel rank), 3 rollout sampling, 4 minibatch shuffles, 7 / 8 printed samples,
    9 held-out evaluation."""
    return (seed * 1_000_003 + stream * 10_007 + rank) % (2 ** 63)


@dataclass
class TrainConfig:
    """Configuration of one ``fastrlhf train`` run (SFT warm start -> reward model -> PPO)."""

    # ---------------------------------------------------------------- run
    seed: int = 1
    """Seed of every random stream: model init, data, rollout sampling, minibatch shuffles."""
    out: str = "runs/ppo"
    """Output directory: metrics.jsonl, curves.png, checkpoints/, final/ (the trained policy)."""
    overwrite: bool = False
    """Start a fresh run even if ``out`` already holds checkpoints of an earlier run (they are
    deleted); without it such a start is refused (use --resume to continue that run)."""
    model: Optional[str] = None
    """Local Hugging Face causal-LM directory that initialises the policy (and the backbones of
    the reward and value models); never downloads.  None: build the tiny built-in model below.
    Without --prompts the built-in task is trained on it (token ids [0, 33) as its words: the
    vocabulary must be at least that); with --prompts its tokenizer is used (pad / eos / bos ids,
    optional chat template).  bf16 / fp16 weights keep their dtype on CUDA (forwards under
    autocast in that dtype); on CPU they are cast to float32 (said at start-up)."""
    prompts: Optional[str] = None
    """Your prompts (needs --model with a tokenizer, and --reward-fn and / or --reward-model): a
    JSONL or Parquet file with a text column (--prompt-column), or a datasets save_to_disk
    directory (its test / validation split, if any, is the held-out set).  No SFT or reward-model
    phase then: the loaded model is the starting policy and the reference.  None: the built-in
    task."""
    prompt_column: str = "prompt"
    """Column (field) of --prompts that holds the prompt text."""
    eval_prompts: int = 16
    """Held-out prompts (never trained on) for the samples printed before / after training and
    summary.json's eval_score_before / eval_score_after (--prompts only)."""
    max_prompt_tokens: int = 256
    """Longest prompt in tokens (--prompts only); a longer one is an error at start-up."""
    chat_template: bool = False
    """Wrap each prompt as the user turn of the tokenizer's chat template, with the generation
    prompt (--prompts only)."""
    reward_fn: Optional[str] = None
    """Verifiable reward (--prompts only): 'module:function' or 'file.py:function', called as
    function(prompts: list[str], completions: list[str]) -> list[float]."""
    reward_fn_weight: float = 1.0
    """Weight of --reward-fn in the score (score = w_fn * fn + w_rm * reward model)."""
    reward_model: Optional[str] = None
    """Local AutoModelForSequenceClassification directory (one label), scored at the last real
    token of prompt + response (--prompts only)."""
    reward_model_weight: float = 1.0
    """Weight of --reward-model in the score."""
    backend: str = "auto"
    """fastrlhf op backend for all loss math: auto (triton on CUDA; on CPU the native C++ ops
    where built, else the references) | triton (on CPU: Triton's interpreter, slow) | native
    (CPU only: the C++ ops, required to be built; ops without a C++ implementation keep their
    automatic choice) | reference (the eager PyTorch definitions)."""
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda | cuda:N.  Under torchrun each rank uses
    cuda:LOCAL_RANK."""
    parallel: str = "ddp"
    """Data-parallel strategy when launched with torchrun (WORLD_SIZE > 1): ddp | fsdp2 (sharded
    parameters, gradients, optimizer state).  gloo on CPU, NCCL on GPU; fsdp2 is tested on CPU
    only (see distributed.py)."""
    vocab_parallel: int = 1
    """Vocab (tensor) parallelism of the policy under torchrun: groups of this many ranks share
    the rollouts, and each holds one slice of the vocabulary in the policy's and reference's
    input embedding and lm_head (Megatron-style; a tied lm_head stays tied), so logits, their
    gradient and every vocab-sized weight, gradient and Adam moment are divided by it; the log-
    probs, entropy, losses and sampling exchange only [tokens]-sized partials (fastrlhf's ops
    with process_group=), plus one [tokens, hidden] all-reduce per embedding forward and per
    lm_head backward.  WORLD_SIZE = data-parallel size x vocab_parallel; parallel=ddp only.
    The transformer body is replicated and recomputed on every rank of a group, so it pays
    only where vocabulary-sized memory is the limit (vocabularies of 128k-256k, long responses,
    small bodies): it lets a micro-batch fit, at the cost of repeated body compute; it never
    pays on the built-in task (33 ids).  1 = off."""
    num_threads: int = 1
    """torch intra-op CPU threads per process (tiny models run fastest on one; 0 = torch's
    default)."""
    bf16: bool = False
    """Run model forwards under bfloat16 autocast (CUDA only); log-probs and losses stay fp32."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many PPO steps (and always after the last one); 0 = only
    after the last."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones are deleted); >= 1."""
    num_print_samples: int = 4
    """Sample generations printed before and after PPO (same prompts both times)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    dump_first_update: bool = False
    """Debug: write OUT/debug/ with each rank's first PPO batch and the weights before and after
    the first update (the DDP-equivalence test uses it)."""

    # ---------------------------------------------------------------- task
    prompt_len: int = 4
    """Words per prompt (after the BOS token)."""
    response_length: int = 12
    """Maximum sampled response tokens (EOS included); sampling stops there."""
    sft_min_words: int = 2
    """Shortest response (in words, before EOS) in the SFT data and preference pairs."""
    sft_max_words: int = 8
    """Longest response (in words, before EOS) in the SFT data; < response_length."""

    # ---------------------------------------------------------------- built-in model
    arch: str = "llama"
    """Architecture of the built-in model (ignored with --model): llama | gpt2."""
    hidden_size: int = 64
    """Width of the built-in model."""
    num_layers: int = 2
    """Transformer blocks of the built-in model."""
    num_heads: int = 4
    """Attention heads of the built-in model (divides hidden_size)."""

    # ---------------------------------------------------------------- SFT warm start
    sft_steps: int = 150
    """Supervised steps on the task's demonstration data before RLHF (0 = skip)."""
    sft_batch_size: int = 64
    """Global batch size (sequences) of SFT."""
    sft_lr: float = 3e-3
    """AdamW learning rate of SFT."""

    # ---------------------------------------------------------------- reward model
    rm_train_pairs: int = 2048
    """Preference pairs (labelled by the hidden oracle) the reward model is trained on."""
    rm_eval_pairs: int = 512
    """Held-out pairs for the reported reward-model accuracy."""
    rm_epochs: int = 2
    """Passes over the training pairs."""
    rm_batch_size: int = 64
    """Global batch size (pairs) of reward-model training."""
    rm_lr: float = 1e-3
    """AdamW learning rate of reward-model training."""
    rm_norm_samples: int = 256
    """SFT-policy samples used to normalise the reward model's scores to mean 0, std 1."""

    # ---------------------------------------------------------------- PPO
    algo: str = "ppo"
    """ppo (GAE on a value model, KL in the reward by default) | grpo | dr_grpo | rloo: the
    critic-free family: group_size samples per prompt, advantages from fastrlhf.group_advantages
    (grpo: (x - mean) / std of the group; dr_grpo: x - mean; rloo: leave-one-out baseline), no
    value model, the KL to the reference always in the loss (kl_loss_kind, k3 by default), the
    clipped surrogate aggregated with loss_agg (the papers: grpo seq-mean-token-mean, dr_grpo
    seq-mean-token-sum-norm)."""
    group_size: int = 4
    """Samples per prompt of grpo / dr_grpo / rloo (>= 2; divides the per-rank rollout batch);
    rollout_batch_size counts samples, so a step sees rollout_batch_size / group_size prompts."""
    value_head: str = "separate"
    """Where PPO's value model lives: separate (its own transformer, initialised from the reward
    model on the built-in task) | shared (a linear head on the policy's last hidden state: one
    transformer, the value loss also trains the policy's body, weighted by value_coef)."""
    value_coef: float = 0.1
    """Weight of the value loss in the policy's loss with value_head=shared."""
    total_steps: int = 100
    """PPO steps (each: one rollout batch, then ppo_epochs passes of minibatch updates)."""
    rollout_batch_size: int = 64
    """Global prompts per PPO step (split evenly over ranks)."""
    kv_cache: bool = True
    """Generate with a KV cache (each new token runs alone against the cached keys / values, so
    its cost does not grow with the response so far); --no-kv-cache re-runs the whole prefix
    every step.  Both sample the same tokens (tested)."""
    temperature: float = 1.0
    """Sampling temperature; the same value is used for log-probs in the update."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per pass (one optimizer step each); divides the per-rank batch."""
    micro_batch_size: int = 0
    """Per-rank sequences per forward/backward inside a minibatch (gradient accumulation), and
    per scoring forward of the rollout (old / reference log-probs, values, rewards), so that
    at most [micro_batch_size, response_length, vocab] logits exist at once; 0 = the whole
    minibatch (and the whole rollout batch) at once."""
    lr: float = 1e-3
    """AdamW learning rate of the policy."""
    critic_lr: float = 3e-3
    """AdamW learning rate of the value model."""
    lr_schedule: str = "linear"
    """Decay of both learning rates over all optimizer steps: linear | cosine | constant."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (policy and value model)."""
    adam_eps: float = 1e-5
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm, per model); 0 = off."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    clip_low: float = 0.2
    """PPO ratio clip below: ratio >= 1 - clip_low."""
    clip_high: Optional[float] = None
    """PPO ratio clip above: ratio <= 1 + clip_high (None = clip_low)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (None = off)."""
    value_clip: Optional[float] = 0.2
    """Value-loss clip range around the rollout values (None = plain MSE)."""
    entropy_coef: float = 0.01
    """Entropy bonus coefficient (loss -= entropy_coef * mean entropy)."""
    loss_agg: str = "token-mean"
    """Loss aggregation (fastrlhf.agg_loss): token-mean | token-sum | seq-mean-token-sum |
    seq-mean-token-mean | seq-mean-token-sum-norm."""
    kl_coef: float = 0.05
    """Initial KL coefficient (beta)."""
    adaptive_kl: bool = True
    """Adapt beta towards kl_target (Ziegler et al. 2019); False keeps it fixed."""
    kl_target: float = 4.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 1000
    """Horizon (in samples) of the adaptive controller."""
    kl_in_loss: bool = False
    """Put the KL to the reference in the policy loss (GRPO style) instead of in the reward
    (always on, and set so, with algo != ppo)."""
    kl_reward_kind: str = "k1"
    """KL estimator for the per-token reward penalty (fastrlhf.kl_penalty kind), or full: the
    exact KL(pi || pi_ref) over the whole vocabulary at each position (fastrlhf.full_kl on the
    policy's and the reference's logits: no sampling noise, at the cost of holding both
    [micro, R, V] logits at once); logged as kl_full next to the sampled k1 kl."""
    reference: str = "copy"
    """The reference policy (the KL anchor): copy (a frozen copy of the starting policy on the
    device) | lora (the policy trains LoRA adapters, via peft, on its frozen weights and the
    reference is the same model with the adapters off: no second model, Adam moments for the
    adapters only; needs peft; single process, not with vocab_parallel, packed, fused_linear
    or value_head=shared) | offload (a frozen copy kept in CPU memory, moved to the device only
    while the rollout computes the reference log-probs, once per rollout; not with fsdp2)."""
    lora_r: int = 8
    """Rank of the LoRA adapters (reference=lora)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapters add (lora_alpha / lora_r) B A (reference=lora)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names that get LoRA adapters (e.g. q_proj,v_proj), or all-linear:
    every linear layer but the output head (reference=lora)."""
    kl_loss_kind: str = "k3"
    """KL estimator for the loss term when kl_in_loss (fastrlhf.kl_penalty kind)."""
    fused_loss: bool = False
    """Compute the policy loss with fastrlhf.fused_ppo_loss (log-probs, entropy, KL, clipped
    surrogate and their gradient in one pass over the logits) instead of the separate ops."""
    fused_linear: bool = False
    """Compute the policy loss from the policy's final hidden states and its lm_head weight with
    fastrlhf.fused_linear_ppo_loss (log-probs, entropy, KL, clipped surrogate), never forming the
    [B, R, V] logits of the update nor their gradient.  Models whose logits are lm_head(hidden)
    (checked at start-up); single process or ddp, not with vocab_parallel, packed or
    value_head=shared."""
    packed: bool = False
    """Padding-free PPO updates: each (micro-)batch's sequences (prompt + response up to EOS)
    run through the policy and value model as one packed row (position ids restart per
    sequence; transformers attends block-diagonally), and the losses use the fastrlhf ops'
    cu_seqlens on the response tokens only; same losses and gradients as the padded update.
    Pays with long, uneven responses, where padding wastes model FLOPs and [B, R, V] logits
    memory; on the tiny built-in task it mostly demonstrates the path.  Rollout generation,
    rewards and GAE stay padded.  Works with ddp / fsdp2, micro-batches, fused_loss and
    every loss_agg; a --model must be a transformers model whose attention honours packed
    position_ids (verified for the built-in Llama and GPT-2 with sdpa and eager attention)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (without shifting the mean) before GAE."""
    missing_eos_penalty: Optional[float] = -1.0
    """Score given instead of the reward model's when a response has no EOS (None = off)."""

    # ------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on the first bad value (types are coerced, ranges checked)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def choice(name: str, allowed) -> None:
            need(getattr(self, name) in allowed, name, "one of " + ", ".join(allowed))

        for name in ("prompt_len", "response_length", "sft_min_words", "sft_max_words",
                     "hidden_size", "num_layers", "num_heads", "sft_batch_size", "rm_train_pairs",
                     "rm_eval_pairs", "rm_epochs", "rm_batch_size", "rm_norm_samples",
                     "total_steps", "rollout_batch_size", "ppo_epochs", "num_minibatches",
                     "kl_horizon", "keep_checkpoints", "vocab_parallel"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("sft_steps", "checkpoint_every", "num_print_samples", "num_threads",
                     "micro_batch_size", "warmup_steps"):
            need(getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("sft_lr", "rm_lr", "lr", "critic_lr", "temperature", "kl_target", "clip_low",
                     "adam_eps"):
            need(getattr(self, name) > 0, name, "a finite number > 0")
        for name in ("weight_decay", "max_grad_norm", "entropy_coef", "kl_coef"):
            need(getattr(self, name) >= 0, name, "a finite number >= 0")
        need(0.0 < self.gamma <= 1.0, "gamma", "in (0, 1]")
        need(0.0 <= self.lam <= 1.0, "lam", "in [0, 1]")
        need(self.clip_low < 1.0, "clip_low", "in (0, 1)")
        need(self.clip_high is None or self.clip_high > 0, "clip_high", "None or > 0")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip", "None or > 1")
        need(self.value_clip is None or self.value_clip > 0, "value_clip", "None or > 0")
        choice("backend", BACKENDS)
        choice("arch", ARCHS)
        choice("parallel", PARALLEL)
        choice("lr_schedule", SCHEDULES)
        choice("loss_agg", LOSS_AGGS)
        choice("kl_reward_kind", KL_KINDS + ("full",))
        choice("kl_loss_kind", KL_KINDS)
        choice("algo", ALGOS)
        choice("value_head", ("separate", "shared"))
        choice("reference", REFERENCES)
        if self.reference == "lora":
            need(self.lora_r >= 1, "lora_r", "an integer >= 1")
            need(self.lora_alpha > 0, "lora_alpha", "a finite number > 0")
            need(bool(self.lora_target_modules.strip()), "lora_target_modules",
                 "all-linear or comma-separated module names")
            need(not (self.vocab_parallel > 1 or self.packed or self.fused_linear
                      or self.value_head == "shared"), "reference",
                 "copy or offload with vocab_parallel > 1, packed, fused_linear or "
                 "value_head=shared (lora is not supported together with them)")
            try:
                import peft  # noqa: F401  # lazy: optional dependency, checked for lora only
            except ImportError:
                raise ValueError("TrainConfig.reference='lora' needs the peft package: pip "
                                 "install 'fastrlhf[integrations]' (or pip install peft)") from None
        if self.reference == "offload":
            need(self.parallel != "fsdp2", "reference",
                 "copy with parallel=fsdp2 (its reference is already sharded)")
        if self.fused_linear:
            need(not (self.packed or self.fused_loss or self.value_head == "shared"
                      or self.vocab_parallel > 1 or self.parallel == "fsdp2"), "fused_linear",
                 "False with packed, fused_loss, value_head=shared, vocab_parallel > 1 or "
                 "parallel=fsdp2 (not supported together)")
        need(self.value_coef >= 0, "value_coef", "a finite number >= 0")
        if self.value_head == "shared":
            need(self.algo == "ppo", "value_head", "separate with a critic-free algo (no value "
                 "model at all)")
            need(not self.packed, "value_head", "separate with packed (not supported yet)")
        if self.algo != "ppo":
            need(self.group_size >= 2, "group_size", f"an integer >= 2 with algo={self.algo!r}")
            self.kl_in_loss = True     # no per-token reward shaping without a critic
        need(self.kl_reward_kind != "full" or not self.kl_in_loss, "kl_reward_kind",
             "a sampled estimator with the KL in the loss (full is a reward penalty)")
        need(self.device == "auto" or self.device == "cpu" or self.device == "cuda"
             or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
             "device", "auto, cpu, cuda or cuda:N")
        need(self.hidden_size % self.num_heads == 0, "hidden_size",
             f"divisible by num_heads={self.num_heads}")
        need(self.sft_min_words <= self.sft_max_words, "sft_min_words",
             f"<= sft_max_words={self.sft_max_words}")
        need(self.sft_max_words < self.response_length or self.prompts is not None,
             "sft_max_words",
             f"< response_length={self.response_length} (the SFT data must fit with its EOS)")
        need(self.rollout_batch_size % self.num_minibatches == 0, "rollout_batch_size",
             f"divisible by num_minibatches={self.num_minibatches}")
        need(self.vocab_parallel == 1 or self.parallel == "ddp", "vocab_parallel",
             f"1 with parallel={self.parallel!r} (vocab parallelism combines with ddp only)")
        if self.fused_loss:
            import fastrlhf  # lazy: the config module stays importable on its own
            need(hasattr(fastrlhf, "fused_ppo_loss"), "fused_loss",
                 "False: this fastrlhf build has no fused_ppo_loss")
        if self.model is not None:
            need(os.path.isdir(self.model), "model", "an existing local directory")
        need(self.eval_prompts >= 0, "eval_prompts", "an integer >= 0")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", "an integer >= 1")
        if self.prompts is not None:
            need(os.path.exists(self.prompts), "prompts", "an existing file or directory")
            need(self.model is not None, "prompts",
                 "used with --model (a local model directory with its tokenizer)")
            need(self.reward_fn is not None or self.reward_model is not None, "prompts",
                 "used with --reward-fn and / or --reward-model (what scores the completions)")
        else:
            for name in ("reward_fn", "reward_model"):
                need(getattr(self, name) is None, name,
                     "None without --prompts (the built-in task trains its own reward model)")
        if self.reward_model is not None:
            need(os.path.isdir(self.reward_model), "reward_model", "an existing local directory")

    def check_world(self, world: int) -> None:
        """Batch sizes that must split evenly over the data-parallel ranks (``world`` processes
        in groups of ``vocab_parallel``)."""
        vp = self.vocab_parallel
        if world % vp:
            raise ValueError(f"TrainConfig.vocab_parallel={vp} must divide the world size {world}"
                             + (" (launch with torchrun)" if world == 1 else ""))
        if self.reference == "lora" and world > 1:
            raise ValueError(f"TrainConfig.reference='lora' runs in a single process (world size "
                             f"{world}); use reference=copy or offload with torchrun")
        dp = world // vp
        what = f"world size {world}" if vp == 1 else f"data-parallel size {dp}"
        for name, div in (("rollout_batch_size", dp * self.num_minibatches),
                          ("sft_batch_size", dp), ("rm_batch_size", dp)):
            if getattr(self, name) % div:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be divisible by "
                                 f"{div} ({what}"
                                 + (f" x num_minibatches {self.num_minibatches})"
                                    if name == "rollout_batch_size" else ")"))
        if self.algo != "ppo" and (self.rollout_batch_size // dp) % self.group_size:
            raise ValueError(f"TrainConfig.group_size={self.group_size} must divide the per-rank "
                             f"rollout batch ({self.rollout_batch_size // dp} samples)")
        if self.micro_batch_size:
            local_mb = self.rollout_batch_size // (dp * self.num_minibatches)
            if local_mb % self.micro_batch_size:
                raise ValueError(f"TrainConfig.micro_batch_size={self.micro_batch_size} must "
                                 f"divide the per-rank minibatch ({local_mb} sequences)")

    @property
    def op_backend(self) -> str:
        """The ``backend=`` passed to the ops: ``native`` becomes ``auto``, which on CPU picks the
        C++ implementation of every op that has one (checked by :meth:`check_backend`) and the
        reference for the others, as ``FASTRLHF_BACKEND=native`` does."""
        return "auto" if self.backend == "native" else self.backend

    def check_backend(self, device) -> None:
        """``backend="native"``: a CPU run, the C++ extension built, no conflicting
        ``FASTRLHF_BACKEND``; raises ``ValueError`` otherwise."""
        if self.backend != "native":
            return
        if device.type != "cpu":
            raise ValueError(f"TrainConfig.backend='native' is the CPU backend; the run is on "
                             f"{device} (use auto or triton there)")
        env = os.environ.get("FASTRLHF_BACKEND", "").strip().lower()
        if env not in ("", "auto", "native"):
            raise ValueError(f"TrainConfig.backend='native' conflicts with FASTRLHF_BACKEND={env}")
        import torch

        import fastrlhf  # lazy: the config module stays importable without the ops
        try:
            fastrlhf.token_logprobs(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                                    backend="native")
        except RuntimeError as e:
            raise ValueError(f"TrainConfig.backend='native' needs the C++ extension: {e}") from None

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """``base`` (or the defaults) with the keys of ``d`` replaced; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        merged = base.to_dict() if base is not None else {}
        merged.update(d)
        return cls(**merged)


def _coerce(name: str, value, hint):
    """Check/convert one value against its annotation (int, float, bool, str, Optional[...])."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"TrainConfig.{name} must not be None")
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on",
                                                                    "0", "false", "no", "off"):
                return value.strip().lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be finite, got {value!r}")
            return v
        if base is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("TrainConfig."):
            raise
        raise ValueError(f"TrainConfig.{name} must be {'None or ' if optional else ''}"
                         f"{base.__name__}, got {value!r}") from None
    return value


def field_docs() -> Dict[str, str]:
    """The docstring written under each field of :class:`TrainConfig` (for --help)."""
    try:
        src = textwrap.dedent(inspect.getsource(TrainConfig))
    except (OSError, TypeError):  # no source shipped (e.g. a zipped install): no help texts
        return {}
    body = ast.parse(src).body[0].body
    docs: Dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a JSON (``.json``) or TOML (``.toml``, Python >= 3.11) file of TrainConfig fields."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError as e:  # Python < 3.11
            raise ValueError("TOML config files need Python >= 3.11; use JSON") from e
        with open(path, "rb") as f:
            data = tomllib.load(f)
    else:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a table/object of fields")
    return data
