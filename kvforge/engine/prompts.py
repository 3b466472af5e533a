"""Prompts and sampling params as the engine accepts them, checked before anything is queued.

A prompt is text (the engine's tokenizer encodes it) or token ids: a list or
tuple of ints (numpy ints too), or a 1-D integer numpy array or torch tensor.
:func:`prompt_list` tells one prompt from a list of prompts (a 2-D array is
one prompt per row). Every failure is a :class:`~kvforge.errors.ConfigError`.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from kvforge.engine.sampling import SamplingParams
from kvforge.errors import ConfigError

__all__ = ["Prompt", "check_params", "is_token_ids", "prompt_list", "token_ids"]

#: A prompt: text (needs a tokenizer) or token ids (a list, or a 1-D integer
#: numpy array or torch tensor).
Prompt = str | Seq[int] | np.ndarray | torch.Tensor


def check_params(params: Any, what: str) -> SamplingParams:
    """``params`` itself, default params for None; ``what`` names it in the error."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ConfigError(f"{what} must be SamplingParams, got {type(params).__name__} {params!r:.60}")
    return params


def is_token_ids(prompt: Any) -> bool:
    """Whether ``prompt`` is one token-id prompt (not a list of prompts)."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        return prompt.ndim <= 1
    if isinstance(prompt, Seq) and not isinstance(prompt, str) and len(prompt) > 0:
        first = prompt[0]
        return isinstance(first, (numbers.Integral, np.integer)) or (
            isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 0)
    return False


def prompt_list(prompts: Any) -> list[Any]:
    """One prompt (text, token ids, 1-D array or tensor) or an iterable of them, as a list."""
    if isinstance(prompts, str) or is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise ConfigError(f"prompts must be text, token ids or a list of them, got {type(prompts).__name__}")
    return list(prompts)


def token_ids(prompt: Any) -> list[int]:
    """Token ids of a list/tuple of ints (numpy ints too) or a 1-D integer array or tensor."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        is_int = (prompt.dtype.kind in "iu" if isinstance(prompt, np.ndarray)
                  else not (prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool))
        if prompt.ndim != 1 or not is_int:
            raise ConfigError(f"a token id prompt must be a 1-D integer array, got shape {tuple(prompt.shape)} "
                              f"of {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Iterable):
        raise ConfigError(f"a prompt must be text or a sequence of token ids, got {type(prompt).__name__}")
    try:
        items = list(prompt)
        if any(isinstance(t, (bool, np.bool_)) for t in items):
            raise TypeError
        return [operator.index(t) for t in items]
    except TypeError:
        raise ConfigError(f"a prompt must be text or a sequence of token ids, got {prompt!r:.80}") from None
