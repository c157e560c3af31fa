"""Your reward (with ``--prompts``): ``--reward-fn module:function`` and / or ``--reward-model``.

* **Reward function** (verifiable rewards): ``function(prompts: list[str], completions:
  list[str]) -> list[float]`` (any sequence of numbers, or a tensor), one finite score per
  completion.  ``module`` is an importable module (``my_pkg.rewards:exact_match``) or a path to
  a Python file (``./reward.py:score``).  Completions are the decoded response tokens before EOS,
  special tokens dropped; prompts are the texts of the prompt file (before any chat template).
* **Reward model**: a local ``AutoModelForSequenceClassification`` (one label), scored at the
  **last real token** of ``prompt + response`` (the EOS when there is one), from its
  transformer's hidden state and its ``score`` (or ``classifier``) head, so the pad-token
  heuristics of the pooled output never apply.  With the policy's own vocabulary the token ids
  go in as they are; a reward model with another tokenizer gets the decoded text re-tokenized
  by its own tokenizer.
* Both: ``score = reward_fn_weight * fn + reward_model_weight * rm``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["load_reward_fn", "call_reward_fn", "HFRewardModel", "TextScorer"]


def load_reward_fn(spec: str) -> Callable:
    """Resolve ``module:function`` or ``path/to/file.py:function``; raises ``ValueError``."""
    if ":" not in spec:
        raise ValueError(f"TrainConfig.reward_fn must be 'module:function' or "
                         f"'file.py:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py") or os.path.sep in mod_name:
            if not os.path.isfile(mod_name):
                raise ValueError(f"TrainConfig.reward_fn: file {mod_name!r} does not exist")
            s = importlib.util.spec_from_file_location(
                "fastrlhf_reward_" + os.path.basename(mod_name)[:-3], mod_name)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"TrainConfig.reward_fn={spec!r}: cannot import {mod_name!r} ({e})"
                         ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"TrainConfig.reward_fn={spec!r}: {mod_name!r} has no callable "
                         f"{fn_name!r}")
    return fn


def call_reward_fn(fn: Callable, prompts: List[str], completions: List[str]) -> Tensor:
    """``fn(prompts, completions)`` as a float64 tensor ``[B]``; checks length and finiteness."""
    out = fn(list(prompts), list(completions))
    try:
        scores = torch.as_tensor([float(x) for x in out], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"the reward function must return one number per completion, got "
                         f"{type(out).__name__}") from None
    if scores.shape != (len(completions),):
        raise ValueError(f"the reward function returned {scores.numel()} scores for "
                         f"{len(completions)} completions")
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"the reward function returned {float(scores[bad])} for completion "
                         f"{bad}: {completions[bad]!r}")
    return scores


class HFRewardModel(nn.Module):
    """A local ``AutoModelForSequenceClassification`` read at the last real token (see the module
    docstring).  Frozen; :meth:`forward` returns ``[B]`` float32 scores."""

    def __init__(self, path: str, policy_tokenizer, dtype: Optional[torch.dtype]):
        super().__init__()
        import transformers
        kw = {"dtype": dtype} if dtype is not None else {}
        try:
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"TrainConfig.reward_model={path!r}: not a local "
                             f"AutoModelForSequenceClassification ({e})") from None
        self.head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
        if not isinstance(self.head, nn.Linear) or self.head.out_features != 1:
            raise ValueError(f"TrainConfig.reward_model={path!r}: needs a one-label linear "
                             "'score' (or 'classifier') head")
        self.body = getattr(self.model, self.model.base_model_prefix)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path,
                                                                        local_files_only=True)
        except Exception:  # noqa: BLE001  (no tokenizer saved: assume the policy's)
            self.tokenizer = policy_tokenizer
        self.same_vocab = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.policy_tokenizer = policy_tokenizer
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, query: Tensor, query_mask: Tensor, response: Tensor, mask: Tensor
                ) -> Tensor:
        """Scores ``[B]`` of ``[left-padded prompt | response]`` (real response tokens:
        ``mask``)."""
        if self.same_vocab:
            ids = torch.cat([query, response], dim=1)
            att = torch.cat([query_mask.long(), mask.long()], dim=1)
        else:
            tok, ptok = self.tokenizer, self.policy_tokenizer
            texts = []
            for q, qm, r, m in zip(query.tolist(), query_mask.tolist(), response.tolist(),
                                   mask.tolist()):
                real = [t for t, k in zip(q, qm) if k] + [t for t, k in zip(r, m) if k]
                texts.append(ptok.decode(real, skip_special_tokens=True))
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="right")
            ids, att = enc["input_ids"].to(query.device), enc["attention_mask"].to(query.device)
        pos = (att.cumsum(dim=1) - 1).clamp(min=0)
        h = self.body(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
        last = att.shape[1] - 1 - att.flip(1).argmax(dim=1)             # last attended index
        h_last = h[torch.arange(len(h), device=h.device), last]       # [B, H]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1).float()


class TextScorer:
    """The score of a batch in the ``--prompts`` mode: weighted sum of the reward function and
    the reward model (either may be absent)."""

    def __init__(self, task, reward_fn: Optional[Callable], fn_weight: float,
                 reward_model: Optional[HFRewardModel], rm_weight: float):
        self.task, self.fn, self.fn_weight = task, reward_fn, fn_weight
        self.rm, self.rm_weight = reward_model, rm_weight

    def __call__(self, query: Tensor, query_mask: Tensor, texts: List[str], response: Tensor,
                 mask: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(score [B] float32, parts)``; parts: ``reward_fn`` and / or ``rm_reward`` [B]."""
        parts: Dict[str, Tensor] = {}
        score = torch.zeros(len(query), dtype=torch.float64, device=query.device)
        if self.fn is not None:
            comp = self.task.completions(response.cpu(), mask.cpu())
            s = call_reward_fn(self.fn, texts, comp).to(query.device)
            parts["reward_fn"] = s.float()
            score = score + self.fn_weight * s
        if self.rm is not None:
            s = self.rm(query, query_mask, response, mask)
            parts["rm_reward"] = s
            score = score + self.rm_weight * s.double()
        return score.float(), parts
