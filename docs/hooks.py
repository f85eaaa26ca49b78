"""MkDocs hook: the jobs' option tables, generated from the project's own argparse parsers at
build time (a page holds ``<!-- flags: train -->`` and gets pneumo-train's options there), so
a renamed or new flag changes the manual with it."""

from __future__ import annotations

import argparse
import re

MARKER = re.compile(r"<!-- flags: (\w+) -->")


def _parser(job: str) -> argparse.ArgumentParser:
    from pneumo_ray import cli

    return getattr(cli, f"{job}_parser")(f"pneumo-{job}")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def flag_table(job: str) -> str:
    """One table per argument group of the job's parser: flag, default, what it does."""
    parser = _parser(job)
    parts = [f"```text\n{parser.format_usage().strip()}\n```\n"]
    for group in parser._action_groups:  # argparse keeps its groups here
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = "options" if group.title in ("optional arguments", "options") else group.title
        parts.append(f"**{title}**\n")
        parts.append("| flag | default | what it does |\n|---|---|---|")
        for action in actions:
            flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
            if action.metavar and action.option_strings and action.nargs != 0:
                flags += f" `{action.metavar}`"
            default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
            required = " (required)" if action.required else ""
            parts.append(f"| {flags}{required} | {_cell(default)} | {_cell(action.help or '')} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_kwargs) -> str:
    return MARKER.sub(lambda match: flag_table(match.group(1)), markdown)
