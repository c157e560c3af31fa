"""Public ops, one module per family (argument checks, torch.library registration, autograd,
backend choice)."""

from .logprobs import token_entropy, token_logprobs

__all__ = ["token_logprobs", "token_entropy"]
