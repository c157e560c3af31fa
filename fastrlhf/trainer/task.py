"""The built-in task: a tiny synthetic language and a hidden "human preference" oracle.

Vocabulary (33 ids): ``<pad>=0 <bos>=1 <eos>=2`` and 30 words, 8 "positive" (good, great, ...),
8 "negative" (bad, awful, ...) and 14 neutral ones (the, cat, sun, ...), in alphabetical order so
that ids carry no hint of the sentiment.

* Prompt: ``<bos>`` + ``prompt_len`` words drawn uniformly.
* Demonstrations (SFT data, and the responses of the preference pairs): ``n`` words with ``n``
  uniform in ``[sft_min_words, sft_max_words]``, each copied from a random prompt word with
  probability 0.3 and otherwise uniform over the 30 words, then ``<eos>``.  Sentiment-neutral on
  average, so the SFT policy scores about 0.
* Oracle (the hidden "human"): the response up to its first ``<eos>`` scores
  ``(#positive words - #negative words) / #words`` in ``[-1, 1]``; a response without ``<eos>``, or
  with no words before it, scores -1.  Only used to label preference pairs and to report the
  ``score`` metric, never seen by the policy.

PPO can raise the score by shifting probability mass from negative and neutral words to positive
ones, a change a tiny transformer learns within a few dozen steps, while the KL to the SFT
reference measures how far it went.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["PAD", "BOS", "EOS", "VOCAB", "POSITIVE", "NEGATIVE", "SyntheticTask"]

PAD, BOS, EOS = 0, 1, 2
POSITIVE = ("good", "great", "nice", "happy", "love", "fun", "kind", "bright")
NEGATIVE = ("bad", "awful", "sad", "ugly", "hate", "boring", "mean", "dark")
NEUTRAL = ("the", "a", "cat", "dog", "sun", "tree", "is", "was", "and", "very", "today", "we",
           "it", "so")
WORDS = tuple(sorted(POSITIVE + NEGATIVE + NEUTRAL))
VOCAB = ("<pad>", "<bos>", "<eos>") + WORDS
COPY_PROB = 0.3


class SyntheticTask:
    """Prompts, demonstrations, preference pairs and the oracle of the built-in task.

    Every sampler takes an explicit ``torch.Generator`` (CPU) so that data streams are
    reproducible and independent of the global RNG; tensors are returned on CPU.
    """

    vocab_size = len(VOCAB)
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, prompt_len: int, response_length: int, min_words: int, max_words: int):
        self.prompt_len = prompt_len
        self.response_length = response_length
        self.min_words = min_words
        self.max_words = max_words
        self.first_word = len(VOCAB) - len(WORDS)
        # sentiment[id] in {-1, 0, +1}: +1 positive, -1 negative, 0 neutral / special / unknown
        self.sentiment = torch.zeros(len(VOCAB))
        for i, w in enumerate(VOCAB):
            self.sentiment[i] = 1.0 if w in POSITIVE else (-1.0 if w in NEGATIVE else 0.0)

    @property
    def query_len(self) -> int:
        """Tokens per prompt, BOS included."""
        return 1 + self.prompt_len

    # ------------------------------------------------------------------ sampling
    def _words(self, shape, g: torch.Generator) -> Tensor:
        return torch.randint(self.first_word, len(VOCAB), shape, generator=g)

    def sample_prompts(self, n: int, g: torch.Generator) -> Tensor:
        """``[n, 1 + prompt_len]`` int64: BOS then uniform words."""
        bos = torch.full((n, 1), BOS, dtype=torch.long)
        return torch.cat([bos, self._words((n, self.prompt_len), g)], dim=1)

    def sample_queries(self, n: int, g: torch.Generator) -> Tuple[Tensor, Tensor, None]:
        """:meth:`sample_prompts` in the trainer's prompt-batch form ``(ids [n, P], mask [n, P],
        texts)``: no padding (mask all ones), no texts."""
        ids = self.sample_prompts(n, g)
        return ids, torch.ones_like(ids), None

    def hf_tokenizer(self):
        """A Hugging Face tokenizer of this vocabulary (word level, whitespace-separated), saved
        with the trained policy so that ``AutoTokenizer`` reloads it."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       bos_token="<bos>", eos_token="<eos>")

    def sample_demonstrations(self, prompts: Tensor, g: torch.Generator) -> Tensor:
        """``[n, response_length]`` int64 demonstration responses: words, EOS, then PAD."""
        n, R = prompts.shape[0], self.response_length
        lengths = torch.randint(self.min_words, self.max_words + 1, (n,), generator=g)  # [n]
        uniform = self._words((n, R), g)                                               # [n, R]
        pick = torch.randint(1, prompts.shape[1], (n, R), generator=g)                 # [n, R]
        copied = prompts.gather(1, pick)                                               # [n, R]
        use_copy = torch.rand((n, R), generator=g) < COPY_PROB
        words = torch.where(use_copy, copied, uniform)
        pos = torch.arange(R).unsqueeze(0)                                             # [1, R]
        out = torch.where(pos < lengths[:, None], words, torch.full_like(words, PAD))
        return torch.where(pos == lengths[:, None], torch.full_like(out, EOS), out)

    def sample_pairs(self, n: int, g: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
        """``n`` labelled preference pairs ``(prompts [n, P], chosen [n, R], rejected [n, R])``.

        Two demonstrations per prompt, ordered by the oracle; ties are re-drawn so that every
        pair carries a preference.
        """
        prompts, chosen, rejected = [], [], []
        have = 0
        while have < n:
            m = 2 * (n - have) + 8
            p = self.sample_prompts(m, g)
            a, b = self.sample_demonstrations(p, g), self.sample_demonstrations(p, g)
            sa, sb = self.oracle(a), self.oracle(b)
            keep = sa != sb
            a_wins = (sa > sb)[keep, None]
            p, a, b = p[keep], a[keep], b[keep]
            prompts.append(p)
            chosen.append(torch.where(a_wins, a, b))
            rejected.append(torch.where(a_wins, b, a))
            have += int(keep.sum())
        cat = lambda xs: torch.cat(xs)[:n]  # noqa: E731
        return cat(prompts), cat(chosen), cat(rejected)

    # ------------------------------------------------------------------ the hidden preference
    def oracle(self, responses: Tensor) -> Tensor:
        """Score ``[n]`` float32 of responses ``[n, R]`` (ids; anything after the first EOS is
        ignored): ``(#positive - #negative) / #words``, -1 without EOS or without words."""
        r = responses.detach().cpu().long()
        is_eos = r == EOS
        has_eos = is_eos.any(dim=1)                                                    # [n]
        before_eos = torch.cumsum(is_eos.long(), dim=1) == 0                           # [n, R]
        n_words = before_eos.sum(dim=1)                                                # [n]
        sent = self.sentiment[r.clamp(0, len(VOCAB) - 1)]
        sent = torch.where(r < len(VOCAB), sent, torch.zeros_like(sent))  # foreign ids: neutral
        total = (sent * before_eos).sum(dim=1)
        score = total / n_words.clamp(min=1)
        return torch.where(has_eos & (n_words > 0), score, torch.full_like(score, -1.0)).float()

    # ------------------------------------------------------------------ display
    @staticmethod
    def decode(ids) -> str:
        """Words of a token sequence: a leading BOS is dropped, output stops after the first EOS."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if ids and ids[0] == BOS:
            ids = ids[1:]
        out: List[str] = []
        for i in ids:
            out.append(VOCAB[i] if 0 <= i < len(VOCAB) else f"<{i}>")
            if i == EOS:
                break
        return " ".join(out)
