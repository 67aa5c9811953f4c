"""The developer agent's tools as the model sees them, and the dispatch of its calls to a Sandbox.

:data:`TOOLS` are the Anthropic tool definitions (name, description, JSON schema). :func:`execute`
is the tool loop's single entry point: it checks a call's input against the schema and never
raises for a bad call (the model gets the message with ``is_error``); only cancellation
propagates. The ``finish`` tool is the loop's business and is not executed here.
"""

from __future__ import annotations

from typing import Any

from casperd.agents.sandbox import LIST_CAP, Sandbox
from casperd.agents.search import SEARCH_CAP
from casperd.errors import CasperError, TaskError


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_PATH = {"type": "string", "description": "Path relative to the worktree root, e.g. 'src/app.py'."}

TOOLS: list[dict[str, Any]] = [
    {
        "name": "read_file",
        "description": "Read a text file of the worktree. Optionally only lines start_line..end_line (1-based, "
        "inclusive). Long files are truncated with a note saying how to read on; binary files are "
        "described, not shown.",
        "input_schema": _schema(
            {
                "path": _PATH,
                "start_line": {"type": "integer", "minimum": 1, "description": "First line to show (1-based)."},
                "end_line": {"type": "integer", "minimum": 1, "description": "Last line to show (inclusive)."},
            },
            ["path"],
        ),
    },
    {
        "name": "write_file",
        "description": "Create a file or overwrite it entirely with the given content. Missing parent "
        "directories are created. Prefer replace_in_file for small edits of existing files.",
        "input_schema": _schema(
            {
                "path": _PATH,
                "content": {"type": "string", "description": "The complete new content of the file."},
            },
            ["path", "content"],
        ),
    },
    {
        "name": "replace_in_file",
        "description": "Replace an exact piece of text in a file. 'old' must occur exactly once (include enough "
        "surrounding lines to make it unique), unless replace_all is true. Whitespace and "
        "indentation must match the file exactly.",
        "input_schema": _schema(
            {
                "path": _PATH,
                "old": {"type": "string", "description": "The exact text to replace, copied from the file."},
                "new": {"type": "string", "description": "The text to put in its place."},
                "replace_all": {"type": "boolean", "description": "Replace every occurrence (default false)."},
            },
            ["path", "old", "new"],
        ),
    },
    {
        "name": "list_files",
        "description": f"List files under a directory of the worktree, recursively and sorted (.git excluded, at "
        f"most {LIST_CAP} entries). An optional glob pattern filters by file name or relative path.",
        "input_schema": _schema(
            {
                "path": {"type": "string", "description": "Directory relative to the worktree root (default '.')."},
                "pattern": {"type": "string", "description": "Glob such as '*.py' or 'tests/*'."},
            },
            [],
        ),
    },
    {
        "name": "search",
        "description": f"Search text files for a Python regular expression, line by line. Returns "
        f"'path:line: text' for each match (at most {SEARCH_CAP}); binary files, files over 1 MB "
        f"and .git are skipped.",
        "input_schema": _schema(
            {
                "pattern": {"type": "string", "description": "Python regular expression, e.g. 'def \\w+_handler'."},
                "path": {"type": "string", "description": "Directory or file to search (default '.')."},
                "glob": {"type": "string", "description": "Only files whose name or path matches, e.g. '*.py'."},
            },
            ["pattern"],
        ),
    },
    {
        "name": "run_command",
        "description": "Run a shell command (/bin/sh -c) in the worktree root, e.g. to run tests. No network "
        "credentials, no input. Returns the end of the combined stdout/stderr and the exit code. "
        "Commands are killed at the timeout; background processes are killed when it exits.",
        "input_schema": _schema(
            {
                "command": {"type": "string", "description": "The shell command line."},
                "timeout_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Timeout in seconds (capped at the node's limit).",
                },
            },
            ["command"],
        ),
    },
    {
        "name": "finish",
        "description": "Call when the task is done (or cannot be done): give a short summary of what you changed "
        "and why, or of what blocked you. Your changes to the worktree are collected as the result.",
        "input_schema": _schema(
            {
                "summary": {"type": "string", "description": "What was done, for the reviewer."},
            },
            ["summary"],
        ),
    },
]

_BY_NAME = {t["name"]: t for t in TOOLS}
_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


def _check_input(name: str, tool_input: Any) -> dict[str, Any]:
    if not isinstance(tool_input, dict):
        raise TaskError(f"{name}: the input must be an object", hint="pass the arguments as named fields")
    schema = _BY_NAME[name]["input_schema"]
    props: dict[str, Any] = schema["properties"]
    missing = [k for k in schema["required"] if k not in tool_input]
    if missing:
        raise TaskError(
            f"{name}: missing required argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
            hint=f"{name} takes {', '.join(props)} ({', '.join(schema['required'])} required)",
        )
    unknown = [k for k in tool_input if k not in props]
    if unknown:
        raise TaskError(
            f"{name}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}",
            hint=f"{name} takes {', '.join(props)}",
        )
    for key, value in tool_input.items():
        want = props[key]["type"]
        ok = isinstance(value, _TYPES[want]) and (want == "boolean" or not isinstance(value, bool))
        if value is None and key not in schema["required"]:
            continue
        if not ok:
            raise TaskError(
                f"{name}: argument {key} must be a {want}, not {type(value).__name__}",
                hint=f"pass {key} as a JSON {want}",
            )
    return {k: v for k, v in tool_input.items() if v is not None}


async def execute(sandbox: Sandbox, name: str, tool_input: dict[str, Any]) -> tuple[str, bool]:
    """Run one tool call: (text for the tool_result, is_error). Bad input, sandbox refusals and
    failures come back as (message, True); only cancellation propagates. ``finish`` is the tool
    loop's to handle: asking for it here raises ValueError."""
    if name == "finish":
        raise ValueError("the finish tool is handled by the tool loop, not executed by the sandbox")
    if name not in _BY_NAME:
        return (f"unknown tool {name!r}; the tools are {', '.join(_BY_NAME)}", True)
    try:
        args = _check_input(name, tool_input)
        method = getattr(sandbox, name)
        return (await method(**args), False)
    except CasperError as exc:
        return (exc.message + (f"\nhint: {exc.hint}" if exc.hint else ""), True)
    except OSError as exc:
        return (f"{name} failed: {exc.strerror or exc}", True)
    except Exception as exc:
        return (f"{name} failed: {type(exc).__name__}: {exc}", True)
