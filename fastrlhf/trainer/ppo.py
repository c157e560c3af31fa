"""RLHF with PPO, top to bottom: SFT warm start -> reward model -> PPO.

Read :func:`train` from the top.  Each stage is a small module of its own:

* ``sft.py``: the SFT warm start (built-in task);
* ``reward_model.py``: Bradley-Terry reward model and its normalisation (built-in task);
* ``rollout.py``: sampling, scoring, per-token rewards, advantages (:class:`Rollout`), the KL
  controller and the rollout metrics;
* ``update.py``: the :class:`Learner` (optimizers, shuffled minibatch PPO / GRPO updates);
* ``checkpoint.py``: the run directory, exact-resume checkpoints, the exported ``final/policy``;
* ``evaluation.py``: printed samples and the held-out score;
* ``reference_policy.py``: the reference without a second model on the device
  (``--reference lora`` or ``offload``).

The models are in ``models.py``, the loss math in ``losses.py`` (all on the public ``fastrlhf``
ops), the data in ``task.py`` / ``data.py`` / ``rewards.py``, data parallelism in
``distributed.py`` and vocab parallelism in ``vocab_parallel.py``.

The "N implementation details of RLHF with PPO" (Huang et al. 2023) this follows:

1. Sampling is pure: ``softmax(logits / temperature)``, no top-k / top-p; the update computes
   log-probs at the **same temperature** (``losses.logprobs``).
2. Responses are **truncated after the first EOS**: later tokens become padding, masked out of
   log-probs, values, KL, advantages and losses (``models.response_mask``).
3. A response **without EOS** gets ``missing_eos_penalty`` instead of the reward model's score.
4. The reward model scores the **last real token** (the EOS); its head starts at
   N(0, 1/sqrt(H+1)) and its scores are **normalised** to mean 0 / std 1 on SFT samples.
5. The per-token reward is ``-beta * KL_t`` plus the score at the last token; beta is **adaptive**
   (or fixed); KL can go in the loss instead (``kl_in_loss``).
6. **GAE** over the response tokens only; advantages **whitened** over the batch; optional reward
   whitening.
7. Old log-probs and values are **recomputed** by a forward pass after generation, not taken from
   the sampling loop.
8. **Dropout off** in every model; the value model is a separate critic **initialised from the
   reward model** (see ``models.py`` for why).
9. Several **epochs of shuffled minibatch** updates, clipped policy and value losses, entropy
   bonus, **gradient clipping**, linear / cosine **LR decay**, Adam eps 1e-5.

With ``prompts`` (your model, prompts and reward; ``data.py``, ``rewards.py``) there is no SFT
or reward-model phase: the loaded model is the policy and the reference, prompts come
left-padded, and the score is the reward function's and / or the reward model's.  With ``algo``
grpo / dr_grpo / rloo there is no critic: each prompt is sampled ``group_size`` times and the
advantages are group-relative (``losses.group_advantages``), with the KL in the loss.

With ``packed`` the update's forward passes and losses run padding-free
(``Learner._packed_loss``); everything else is unchanged.  With ``vocab_parallel`` the policy
and reference hold one vocab slice per rank (``vocab_parallel.py``): their logits are local
slices, every op that reads them gets ``vp = op_kwargs(policy)``, sampling is vocab-parallel,
and batch splits / loss normalisation / metrics use the data-parallel size ``rt.dp_world``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import (dump_first_update, load_checkpoint, load_model_state, model_state,
                         open_run_dir, rng_state, save_checkpoint, save_policy, set_rng_state)
from .config import TrainConfig, stream_seed
from .data import PromptTask, load_prompts, load_tokenizer
from .distributed import PeakMemory, Runtime, setup_runtime, unwrap, wrap_model
from .evaluation import evaluate, show_samples
from .models import ValueHead, build_policy, freeze, reward_model_from
from .reference_policy import AdaptersDisabled, attach_lora, merged_lora_state
from .report import MetricsLog, plot_curves
from .reward_model import normalize_reward_model, train_reward_model
from .rewards import HFRewardModel, TextScorer, load_reward_fn
from .rollout import (ROLLOUT_SUMS, KLController, Rollout, collect_rollout, reduce_sums,
                      rollout_metrics)
from .sft import supervised_warm_start
from .task import SyntheticTask
from .update import Learner, lr_lambda
from .vocab_parallel import shard_vocab

__all__ = ["train", "Models", "build_models",
           # the stages' public names, importable from here as before the split
           "Rollout", "Learner", "KLController", "collect_rollout", "rollout_metrics",
           "ROLLOUT_SUMS", "lr_lambda", "stream_seed"]


def train(cfg: TrainConfig, *, resume: Optional[str] = None) -> Dict:
    """Run SFT, reward modelling and PPO as configured (or continue the run in ``resume``).

    Returns a summary dict (on every rank; rank 0 also writes it to ``OUT/summary.json``):
    ``out``, ``steps``, ``rm_accuracy``, ``score_first``, ``score_last``, ``kl_last``,
    ``time_s``, ``world``, ``vocab_parallel``, ``peak_memory_mib`` (whole run) and
    ``ppo_peak_memory_mib`` (the PPO steps' rollout + update, checkpoints excluded), each the
    largest over ranks (:class:`~fastrlhf.trainer.distributed.PeakMemory`: allocated CUDA
    memory, or the process's peak RSS on CPU).
    """
    rt = setup_runtime(cfg.device, cfg.parallel, cfg.vocab_parallel)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, rt, resume)
    finally:
        torch.set_num_threads(threads)
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, resume: Optional[str]) -> Dict:
    t_start = time.perf_counter()
    cfg.check_world(rt.world)
    cfg.check_backend(rt.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    say = _printer(rt)
    # ---- the run directory: validated before anything is written (checkpoint.py) -------------
    ckpt, finished = open_run_dir(cfg, rt, resume, say)
    if finished is not None:
        return finished

    # ---- 0. seeds (identical on every rank, so that the models start identical) ---------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    torch.manual_seed(cfg.seed)
    # shared data; prompts: one stream per data-parallel rank (the ranks of a vocab-parallel
    # group share them); sampling noise: one per rank
    gens = {"data": torch.Generator().manual_seed(stream_seed(cfg.seed, 1)),
            "prompt": torch.Generator().manual_seed(stream_seed(cfg.seed, 2, rt.dp_rank)),
            "sample": torch.Generator(device=rt.device).manual_seed(
                stream_seed(cfg.seed, 3, rt.rank))}

    # ---- 1. the task and the models --------------------------------------------------------
    task, m = build_models(cfg, rt, say)

    rm_accuracy = float("nan")
    start_step = 0
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    eval_before = float("nan")
    if ckpt is None and m.scorer is None:
        # ---- 2-4. built-in task: SFT, reward model, value model from the reward model -------
        rm_accuracy = _warm_start(cfg, task, m, rt, gens, say)
    elif ckpt is None:
        # ---- 2-4 with --prompts: the loaded model is the policy and the reference; no SFT, no
        # reward-model training; the critic is the policy's body with a fresh head -----------
        say(f"--prompts: {len(task.train_texts)} training prompts, {len(task.eval_texts)} "
            f"held out; reward: " + " + ".join(
                ([f"{cfg.reward_fn_weight:g} x {cfg.reward_fn}"] if cfg.reward_fn else [])
                + ([f"{cfg.reward_model_weight:g} x {cfg.reward_model}"]
                   if cfg.reward_model else [])))
        eval_before = evaluate(cfg, task, m.policy, m.scorer, rt)
        show_samples(cfg, task, m.policy, rt, "before training", say, m.scorer)
    if m.reward_model is not None:
        freeze(unwrap(m.reward_model))
    if cfg.reference == "lora":     # adapters (starting at 0) on the SFT / loaded weights
        attach_lora(unwrap(m.policy), cfg)
    learner = Learner(cfg, m.policy, m.critic, rt)
    if ckpt is not None:
        payload, rng = load_checkpoint(ckpt, rt)
        for model, k in ((m.policy, "policy"), (m.critic, "critic"), (m.ref, "ref"),
                         (m.reward_model, "reward_model")):
            if model is not None:
                load_model_state(model, payload[k])
        learner.load_state_dict(payload["learner"])
        kl_ctl.load_state_dict(payload["kl_ctl"])
        start_step, rm_accuracy = payload["step"], payload["rm_accuracy"]
        eval_before = payload.get("eval_before", float("nan"))
        set_rng_state(rng, gens)
        say(f"resumed from {ckpt} at step {start_step}")
        show_samples(cfg, task, m.policy, rt, f"at step {start_step} (resumed)", say, m.scorer)

    # ---- 5. PPO --------------------------------------------------------------------------------
    log = MetricsLog(cfg.out, rt.is_main, resume_step=start_step)
    bar = _progress(cfg, rt, start_step)
    last: Dict[str, float] = {}
    first_score: Optional[float] = None
    mem = PeakMemory(rt.device)
    try:
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            mem.start()              # the PPO steps' peak: rollout + update, no checkpoints
            kl_coef = kl_ctl.value
            # 5a. experience: sample, score, KL-penalised rewards, GAE, whitened advantages
            batch, sums = collect_rollout(cfg, task, m.policy, m.ref, m.critic,
                                          m.reward_model if m.scorer is None else m.scorer, rt,
                                          kl_coef, gens["prompt"], gens["sample"])
            ro = rollout_metrics(reduce_sums(rt, sums))
            if cfg.dump_first_update and step == 1:
                pre = {"policy": model_state(m.policy),
                       "critic": {} if m.critic is None else model_state(m.critic)}
            # 5b. ppo_epochs x num_minibatches clipped updates of policy and value model
            up = learner.update(batch, kl_coef)
            mem.stop()
            if cfg.dump_first_update and step == 1:
                dump_first_update(cfg, rt, batch, kl_coef, pre, m.policy, m.critic)
            # 5c. adapt beta to the KL of this batch
            kl_ctl.update(ro["kl"], cfg.rollout_batch_size)
            dt = time.perf_counter() - t0
            row = {"step": step, **{k: v for k, v in ro.items() if k != "tokens"}, **up,
                   "kl_coef": kl_coef, "tokens_per_s": ro["tokens"] / dt,
                   "time_s": time.perf_counter() - t_start}
            log.write(row)
            last = row
            first_score = row["score"] if first_score is None else first_score
            if bar is not None:
                bar.update(1)
                bar.set_postfix(score=f"{row['score']:+.3f}", kl=f"{row['kl']:.2f}",
                                beta=f"{kl_coef:.3f}")
            # 5d. checkpoint
            if step == cfg.total_steps or (cfg.checkpoint_every
                                           and step % cfg.checkpoint_every == 0):
                payload = {"step": step, "config": cfg.to_dict(), "rm_accuracy": rm_accuracy,
                           "policy": model_state(m.policy),
                           "critic": None if m.critic is None else model_state(m.critic),
                           "ref": model_state(m.ref), "learner": learner.state_dict(),
                           "kl_ctl": kl_ctl.state_dict(), "eval_before": eval_before,
                           # the built-in task's trained reward model (a --reward-model is
                           # reloaded from its directory)
                           "reward_model": None if m.reward_model is None
                           else model_state(m.reward_model)}
                save_checkpoint(cfg.out, step, payload if rt.is_main else {}, rng_state(gens),
                                rt, cfg.keep_checkpoints)
    finally:               # also on Ctrl-C / SIGTERM: leave the terminal tidy
        if bar is not None:
            bar.close()

    # ---- 6. results ----------------------------------------------------------------------------
    return _finish(cfg, task, m, rt, say, mem, last, first_score, rm_accuracy, eval_before,
                   t_start)


# ================================================================================================
# 1. the models
# ================================================================================================

@dataclass
class Models:
    """The models of a run, already on the device and DDP / FSDP-wrapped where they train."""

    policy: nn.Module                     # the causal LM being trained
    ref: nn.Module                        # frozen reference policy (the KL anchor)
    critic: Optional[nn.Module]           # value model, shared ValueHead, or None (GRPO family)
    reward_model: Optional[nn.Module]     # the built-in task's trained ScalarModel
    scorer: Optional[TextScorer]          # --prompts: reward function and / or reward model


def build_models(cfg: TrainConfig, rt: Runtime, say):
    """``(task, Models)``: the built-in :class:`SyntheticTask` with a fresh policy, reward model
    and critic, or a ``--prompts`` :class:`PromptTask` with the loaded model and a
    :class:`TextScorer`.  Draws the models' initial weights from torch's global RNG."""
    scorer = None                        # --prompts: reward function and / or reward model
    if cfg.prompts is None:              # the built-in task: four models
        task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                             cfg.sft_max_words)
        policy = build_policy(cfg, task.vocab_size, task.query_len + cfg.response_length,
                              rt.device.type)                                   # causal LM
        reward_model = reward_model_from(policy)                                # body + head
    else:                                # your model, prompts and reward
        task = PromptTask(*load_prompts(cfg.prompts, cfg.prompt_column), load_tokenizer(cfg.model),
                          eval_prompts=cfg.eval_prompts, max_prompt_tokens=cfg.max_prompt_tokens,
                          chat_template=cfg.chat_template, seed=cfg.seed)
        policy = build_policy(cfg, None, task.query_len + cfg.response_length, rt.device.type)
        reward_model = None
    loaded = getattr(policy, "loaded_dtype", torch.float32)
    if loaded != torch.float32:
        if rt.device.type == "cuda":
            rt.amp_dtype = loaded
            say(f"--model: {loaded} weights kept in {loaded}; forwards under autocast({loaded})")
        else:
            say(f"--model: {loaded} weights cast to float32 on {rt.device} (bf16 / fp16 "
                "training is kept for CUDA; on CPU it is slow and lossy)")
    # the value model: PPO only (GRPO / Dr. GRPO / RLOO compare each sample with its group)
    critic = reward_model_from(policy) if cfg.algo == "ppo" else None           # body + head
    if cfg.value_head == "shared":          # ... or a head on the policy's own body
        critic = ValueHead(policy.config.hidden_size)
    if rt.tp > 1:       # after the reward / value models took their full copies of the body
        shard_vocab(policy, rt.tp_group, rt.tp, rt.tp_rank)
    # the reference: a frozen copy (on the device, or in CPU memory with --reference offload),
    # or the policy itself with its LoRA adapters off (attached after the warm start)
    ref = AdaptersDisabled(policy) if cfg.reference == "lora" else copy.deepcopy(policy)
    policy = policy.to(rt.device)
    ref = ref.to("cpu" if cfg.reference == "offload" else rt.device)
    policy = wrap_model(policy, rt, trainable=True)
    if critic is not None:
        critic = critic.to(rt.device)
        if not isinstance(critic, ValueHead):   # a shared head's gradients: see the Learner
            critic = wrap_model(critic, rt, trainable=True)
    ref = wrap_model(freeze(ref), rt, trainable=False)
    if reward_model is not None:
        reward_model = wrap_model(reward_model.to(rt.device), rt, trainable=True)
    else:
        hf_rm = None
        if cfg.reward_model is not None:
            hf_rm = HFRewardModel(cfg.reward_model, task.tokenizer,
                                  rt.amp_dtype or torch.float32).to(rt.device)
        scorer = TextScorer(task, load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None,
                            cfg.reward_fn_weight, hf_rm, cfg.reward_model_weight)
    mode = rt.parallel if rt.distributed else "single"
    if rt.tp > 1:
        mode += f", vocab-parallel {rt.tp} x data-parallel {rt.dp_world}"
    say(f"fastrlhf train: world {rt.world} ({mode}), "
        f"device {rt.device}, backend {cfg.backend}, policy "
        f"{sum(p.numel() for p in policy.parameters()) / 1e3:.0f}k params"
        + (f" (x{rt.world} shards)" if rt.parallel == "fsdp2" and rt.distributed else "")
        + (" on this rank (vocab rows sharded)" if rt.tp > 1 else ""))
    return task, Models(policy, ref, critic, reward_model, scorer)


# ================================================================================================
# 2-4. the built-in task's warm start
# ================================================================================================

def _warm_start(cfg: TrainConfig, task: SyntheticTask, m: Models, rt: Runtime,
                gens: Dict[str, torch.Generator], say) -> float:
    """SFT (``sft.py``), then the reward model on the SFT body (``reward_model.py``), then the
    critic from the reward model; returns the reward model's held-out accuracy."""
    # ---- 2. SFT warm start; the reference is the frozen SFT policy ---------------------------
    if cfg.sft_steps:
        supervised_warm_start(cfg, task, m.policy, rt, gens["data"], say)
    sft_state = model_state(m.policy)
    if cfg.reference != "lora":     # lora: the reference is the policy's own base weights
        load_model_state(m.ref, sft_state)
    # ---- 3. reward model: SFT body + new head, Bradley-Terry on oracle preferences -----------
    rm_state = model_state(m.reward_model)
    prefix = unwrap(m.policy).base_model_prefix + "."
    rm_state.update({"backbone." + k[len(prefix):]: v for k, v in sft_state.items()
                     if k.startswith(prefix)})
    load_model_state(m.reward_model, rm_state)
    rm_accuracy = train_reward_model(cfg, task, m.reward_model, rt, gens["data"], say)
    normalize_reward_model(cfg, task, m.policy, m.reward_model, rt, gens["data"],
                           gens["sample"], say)
    # ---- 4. value model initialised from the reward model ------------------------------------
    if m.critic is not None and not isinstance(m.critic, ValueHead):
        load_model_state(m.critic, model_state(m.reward_model))
    show_samples(cfg, task, m.policy, rt, "before PPO (SFT policy)", say)
    return rm_accuracy


# ================================================================================================
# 6. results
# ================================================================================================

def _finish(cfg: TrainConfig, task, m: Models, rt: Runtime, say, mem: PeakMemory,
            last: Dict[str, float], first_score: Optional[float], rm_accuracy: float,
            eval_before: float, t_start: float) -> Dict:
    """Final samples, ``final/policy``, ``curves.png`` and ``summary.json``; returns the
    summary."""
    show_samples(cfg, task, m.policy, rt, f"after PPO (step {cfg.total_steps})", say, m.scorer)
    eval_after = (evaluate(cfg, task, m.policy, m.scorer, rt) if m.scorer is not None
                  else float("nan"))
    final_state = model_state(m.policy)
    if cfg.reference == "lora":     # an ordinary model: adapters merged into the weights
        final_state = merged_lora_state(unwrap(m.policy), final_state)
    if rt.is_main:
        save_policy(cfg, task, unwrap(m.policy), final_state,
                    os.path.join(cfg.out, "final", "policy"))
        plot_curves(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "curves.png"))
    rt.barrier()
    rows = MetricsLog.read(os.path.join(cfg.out, "metrics.jsonl")) if rt.is_main else []
    peak, ppo_peak = rt.all_reduce_max(torch.tensor([mem.total(), mem.section],
                                                    device=rt.device)).tolist()
    summary = {"out": cfg.out, "steps": cfg.total_steps, "rm_accuracy": rm_accuracy,
               "score_first": rows[0]["score"] if rows else first_score,
               "score_last": last.get("score"), "kl_last": last.get("kl"),
               "time_s": time.perf_counter() - t_start, "world": rt.world,
               "vocab_parallel": rt.tp, "peak_memory_mib": peak, "ppo_peak_memory_mib": ppo_peak,
               "peak_memory_kind": "cuda_allocated" if rt.device.type == "cuda" else "cpu_rss"}
    if m.scorer is not None:
        summary.update(eval_score_before=eval_before, eval_score_after=eval_after,
                       eval_prompts=len(task.eval_texts))
    if rt.is_main:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if last:
        quality = (f"reward-model accuracy {rm_accuracy:.3f}" if m.scorer is None else
                   f"held-out score {eval_before:+.3f} -> {eval_after:+.3f}")
        say(f"done: score {summary['score_first']:+.3f} -> {summary['score_last']:+.3f}, "
            f"KL {summary['kl_last']:.2f} nats, {quality}, "
            f"{summary['time_s']:.0f}s, peak memory {peak:.0f} MiB per rank; outputs in "
            f"{cfg.out}")
    return summary


def _printer(rt: Runtime):
    def say(msg: str) -> None:
        if rt.is_main:
            try:
                from tqdm import tqdm
                tqdm.write(msg)
            except ImportError:
                print(msg, flush=True)
    return say


def _progress(cfg: TrainConfig, rt: Runtime, start: int):
    if not (cfg.progress and rt.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.total_steps, initial=start, desc="PPO", unit="step", dynamic_ncols=True)
