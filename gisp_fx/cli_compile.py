"""Flags of `gisp-fx compile` and `gisp-fx materialize` (filled in with the compile pipeline)."""

from __future__ import annotations


def add_compile_commands(sub) -> None:
    return None
