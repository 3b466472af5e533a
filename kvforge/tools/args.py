"""What every subcommand's parser shares, importable without torch.

``kvforge --help`` and ``kvforge <cmd> --help`` build every parser, so the
modules that register subcommands import nothing heavy at module level
(torch, triton, matplotlib, the engine): they import it inside the command
function. What the help texts need from heavier modules lives here instead:
the built-in model names (the keys of
:data:`kvforge.model_shapes.MODEL_SHAPES`, which imports torch; a test holds
the two equal) and the help formatter that shows each option's default.
"""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "MODEL_NAMES"]

#: the names of :data:`kvforge.model_shapes.MODEL_SHAPES`, in its order
MODEL_NAMES: tuple[str, ...] = (
    "tinyllama-1.1b", "llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2-7b", "qwen2.5-7b",
)


class HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default: ``(default: X)`` is appended to the help
    of each option whose default is not None and whose help does not already
    state it (``%(default)s``, or the word ``default``). An option defaulting to
    None says in its own words what happens when it is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if "%(default)" in text or "default" in text:
            return text
        return f"{text} (default: %(default)s)"
