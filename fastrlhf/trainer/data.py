"""Your prompts: ``--prompts FILE`` with ``--model DIR`` (its tokenizer) for RLHF on real text.

Accepted sources (the text column is ``--prompt-column``, ``prompt`` by default):

* a JSON Lines file (``.jsonl`` / ``.json``): one object per line;
* a Parquet file (``.parquet``);
* a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose ``train`` split is trained on and whose ``test`` / ``validation`` split, if any, is the
  held-out set).

Held-out split: ``eval_prompts`` prompts never used for training (the dataset's own test split
when it has one, else a seeded random subset of the file), used for the sample generations
printed before / after training and for ``eval_score_before`` / ``eval_score_after`` in
``summary.json``.

:class:`PromptTask` tokenizes every prompt once (``--chat-template``: as the user turn of the
tokenizer's chat template, with the generation prompt), and serves batches **left-padded** with
their attention masks, so that every prompt ends right before the first response token.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["load_prompts", "load_tokenizer", "PromptTask"]


def load_prompts(path: str, column: str = "prompt") -> Tuple[List[str], Optional[List[str]]]:
    """``(train prompts, held-out prompts or None)`` from a JSONL / Parquet file or a
    ``save_to_disk`` directory; raises ``ValueError`` naming the problem."""
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError as e:
            raise ValueError(f"--prompts {path!r} is a directory: reading it needs the "
                             "`datasets` package") from e
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 (datasets raises several kinds)
            raise ValueError(f"--prompts {path!r}: not a datasets save_to_disk directory ({e})"
                             ) from None
        held = None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"--prompts {path!r}: a DatasetDict without a 'train' split "
                                 f"(splits: {', '.join(ds)})")
            for name in ("test", "validation"):
                if name in ds:
                    held = _column(ds[name].to_dict(), column, f"{path} [{name}]")
                    break
            ds = ds["train"]
        return _column(ds.to_dict(), column, path), held
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return _column(pq.read_table(path).to_pydict(), column, path), None
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts {path!r} line {i}: not JSON ({e}); expected "
                                     "JSON Lines, Parquet or a save_to_disk directory") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"--prompts {path!r}: every line must be a JSON object")
    missing = [i for i, r in enumerate(rows, 1) if column not in r]
    if missing:
        raise ValueError(f"--prompts {path!r}: line {missing[0]} has no {column!r} field")
    return _column({column: [r[column] for r in rows]}, column, path), None


def _column(table: dict, column: str, where: str) -> List[str]:
    if column not in table:
        raise ValueError(f"--prompts {where!r} has no column {column!r} (columns: "
                         f"{', '.join(table)}); choose one with --prompt-column")
    texts = table[column]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"--prompts {where!r}: row {bad[0]} of column {column!r} is not a "
                         f"non-empty string: {texts[bad[0]]!r}")
    if not texts:
        raise ValueError(f"--prompts {where!r} holds no prompts")
    return list(texts)


def load_tokenizer(model_dir: str):
    """The model directory's tokenizer (``AutoTokenizer``, local files only), with a pad token
    (the EOS when it has none: padding is always masked out) and an EOS required."""
    import transformers
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"TrainConfig.model={model_dir!r}: --prompts needs the model's "
                         f"tokenizer in that directory (AutoTokenizer failed: {e})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_dir!r} has no EOS token: responses could "
                         "never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class PromptTask:
    """Prompts of a file, tokenized, served as left-padded batches (see the module docstring).

    The same interface as :class:`~fastrlhf.trainer.task.SyntheticTask` where the trainer
    needs it: ``pad_id`` / ``eos_id`` / ``bos_id``, :meth:`sample_queries`, :meth:`decode`.
    """

    def __init__(self, train: List[str], held_out: Optional[List[str]], tokenizer, *,
                 eval_prompts: int, max_prompt_tokens: int, chat_template: bool, seed: int):
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        if held_out is None:           # a seeded random subset of the file
            if eval_prompts >= len(train):
                raise ValueError(f"TrainConfig.eval_prompts={eval_prompts} leaves no training "
                                 f"prompts of the {len(train)} in the file")
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            held_out = [train[i] for i in perm[:eval_prompts].tolist()]
            train = [train[i] for i in sorted(perm[eval_prompts:].tolist())]
        self.train_texts = train
        self.eval_texts = held_out[:eval_prompts]
        if chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("TrainConfig.chat_template: the tokenizer has no chat template")
        self.chat_template = chat_template
        self.train_ids = [self._encode(t) for t in self.train_texts]
        self.eval_ids = [self._encode(t) for t in self.eval_texts]
        too_long = sum(len(x) > max_prompt_tokens for x in self.train_ids + self.eval_ids)
        if too_long:
            raise ValueError(f"{too_long} prompt(s) are longer than TrainConfig."
                             f"max_prompt_tokens={max_prompt_tokens} tokens (the longest has "
                             f"{max(map(len, self.train_ids + self.eval_ids))})")
        self.query_len = max(map(len, self.train_ids + self.eval_ids))   # longest prompt

    def _encode(self, text: str) -> List[int]:
        tok = self.tokenizer
        if self.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok(text)["input_ids"])

    def _batch(self, ids: List[List[int]]) -> Tuple[Tensor, Tensor]:
        """Left-padded ``(ids [n, P], mask [n, P])`` with ``P`` the longest of the batch."""
        P = max(map(len, ids))
        out = torch.full((len(ids), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), P), dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                out[i, P - len(x):] = torch.tensor(x)
                mask[i, P - len(x):] = 1
        return out, mask

    def sample_queries(self, n: int, g: torch.Generator) -> Tuple[Tensor, Tensor, List[str]]:
        """``n`` training prompts drawn uniformly (with replacement): ``(ids [n, P], mask
        [n, P], texts)``."""
        idx = torch.randint(len(self.train_ids), (n,), generator=g).tolist()
        ids, mask = self._batch([self.train_ids[i] for i in idx])
        return ids, mask, [self.train_texts[i] for i in idx]

    def eval_queries(self, n: int) -> Tuple[Tensor, Tensor, List[str]]:
        """The first ``n`` held-out prompts."""
        n = min(n, len(self.eval_ids))
        ids, mask = self._batch(self.eval_ids[:n])
        return ids, mask, self.eval_texts[:n]

    def completions(self, responses: Tensor, mask: Tensor) -> List[str]:
        """Response texts: the real tokens before EOS, special tokens dropped."""
        out = []
        for r, m in zip(responses.tolist(), mask.tolist()):
            toks = [t for t, keep in zip(r, m) if keep and t != self.eos_id]
            out.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return out

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id) + 1]
        return self.tokenizer.decode([i for i in ids if i != self.pad_id or i == self.eos_id])
