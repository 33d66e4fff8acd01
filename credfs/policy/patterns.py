"""Path patterns of policy rules, compiled to regular expressions.

A pattern is a path relative to the mount root, "/"-separated, no leading
slash ("" or "." is the root itself). Per segment:

  literal     matches itself
  * ? [abc]   shell wildcards within one segment (never across "/")
  **          any number of segments, zero included; a trailing "/**" so also
              matches the directory itself ("a/**" matches "a" and all below)
  {name}      one whole segment, bound to the placeholder name; the rule then
              applies only when the bound value is the caller's (see PLACEHOLDERS)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Placeholders a pattern may bind, and what the bound segment is compared to.
PLACEHOLDERS = {
    "uid": "the caller's uid, in decimal",
    "user": "the caller's user name (passwd database)",
    "package": "a package name of the caller's app (the app list)",
}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PatternError(ValueError):
    """The pattern is malformed: the message says where and why."""


@dataclass(frozen=True, slots=True)
class PathPattern:
    text: str
    regex: re.Pattern[str]
    placeholders: tuple[str, ...]
    # The first segment when it is a literal: rules are indexed by it.
    first_literal: str | None

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(path)
        return None if m is None else m.groupdict()


def _segment_regex(seg: str, where: str) -> str:
    out = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = seg.find("]", i + 2 if seg[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise PatternError(f"{where}: unclosed '[' in segment {seg!r}")
            body = seg[i + 1:end]
            neg = body[:1] in ("!", "^")
            if neg:
                body = body[1:]
            if "/" in body:
                raise PatternError(f"{where}: '/' inside [...] in segment {seg!r}")
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = end
        elif c in "{}":
            raise PatternError(f"{where}: a placeholder must be a whole segment, like "
                               f"'{{package}}', not {seg!r}")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(text: str, where: str = "path") -> PathPattern:
    if not isinstance(text, str):
        raise PatternError(f"{where}: expected a string")
    if text.startswith("/"):
        raise PatternError(f"{where}: {text!r}: patterns are relative to the mount root; "
                           "drop the leading '/'")
    if text in ("", "."):
        return PathPattern(text, re.compile(""), (), None)
    segments = text.split("/")
    names: list[str] = []
    parts: list[str] = []  # regex per segment, "**" kept as a marker
    for seg in segments:
        if seg == "":
            raise PatternError(f"{where}: {text!r}: empty segment (double or trailing '/')")
        if seg in (".", ".."):
            raise PatternError(f"{where}: {text!r}: '.' and '..' segments are not allowed")
        if seg == "**":
            parts.append("**")
            continue
        if "**" in seg:
            raise PatternError(f"{where}: {text!r}: '**' must be a whole segment")
        m = _PLACEHOLDER.fullmatch(seg)
        if m:
            name = m.group(1)
            if name not in PLACEHOLDERS:
                raise PatternError(f"{where}: {text!r}: unknown placeholder {{{name}}}; "
                                   f"expected one of {', '.join(sorted(PLACEHOLDERS))}")
            if name in names:
                raise PatternError(f"{where}: {text!r}: placeholder {{{name}}} used twice")
            names.append(name)
            parts.append(f"(?P<{name}>[^/]+)")
        else:
            parts.append(_segment_regex(seg, f"{where}: {text!r}"))
    # Join: "**" absorbs its neighbouring slash so that it may match nothing.
    regex = ""
    for i, part in enumerate(parts):
        if part == "**":
            if i == 0:
                regex += "(?:[^/]+/)*" if len(parts) > 1 else ".*"
            else:
                regex += "(?:/[^/]+)*"
        else:
            regex += ("" if i == 0 or (parts[i - 1] == "**" and i == 1) else "/") + part
    first = segments[0]
    literal = first if _segment_regex(first, "") == re.escape(first) and first != "**" \
        and not _PLACEHOLDER.fullmatch(first) else None
    return PathPattern(text, re.compile(regex, re.DOTALL), tuple(names), literal)
