"""Help-text formatting shared by the command lines (``fastrlhf`` and ``fastrlhf train``).

A leaf module (standard library only), so both command lines import it without importing each
other or torch.
"""

from __future__ import annotations

import argparse
import re
import textwrap

__all__ = ["plain", "HelpFormatter"]

_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``(.+?)``")


def plain(text: str) -> str:
    """Docstring text without reST markup, for --help: ``x`` -> x, :class:`~a.B` -> a.B."""
    return _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(r"\1", text))


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but never breaks a line inside a flag such as --no-progress."""

    def _split_lines(self, text, width):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)
