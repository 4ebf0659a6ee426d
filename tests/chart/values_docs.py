#!/usr/bin/env python3
"""Checks that every value in the chart's values.yaml is documented.

    values_docs.py VALUES_YAML README_MD

A key is documented when a comment line stands right above it. A key whose comment block starts
with `# --` is documented as a whole (its sub-keys and list items need no comments of their own);
any other key with keys below it (a section) needs every key below it documented. README_MD must
name every documented key, sections aside, by its dotted path in backticks (the values tables). Exit status 1 when either fails.
"""

import re
import sys

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?:\s|$)")


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    lines = open(argv[1]).read().splitlines()
    readme = open(argv[2]).read()
    problems = []
    documented = []
    stack = []  # (indent, path, covered-as-a-whole)
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m:
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([s[1] for s in stack] + [m.group("key")])
        covered = bool(stack) and stack[-1][2]
        prev = lines[i - 1].strip() if i > 0 else ""
        commented = prev.startswith("#")
        whole = covered or (commented and prev.startswith("# --")) or _comment_block_starts_with_dashes(lines, i)
        value = line[m.end():].strip()
        has_children = not value and _next_key_is_deeper(lines, i, indent)
        if not covered:
            if commented and (whole or not has_children):
                documented.append(path)
            elif not commented and not has_children:
                problems.append(f"values.yaml:{i + 1}: {path} has no comment")
        stack.append((indent, m.group("key"), whole))
    for path in documented:
        if f"`{path}`" not in readme:
            problems.append(f"README.md does not describe `{path}`")
    for p in problems:
        print(p)
    print(f"{len(documented)} documented values, {len(problems)} problems")
    return 1 if problems else 0


def _comment_block_starts_with_dashes(lines, i):
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("#"):
        j -= 1
    return j + 1 < i and lines[j + 1].strip().startswith("# --")


def _next_key_is_deeper(lines, i, indent):
    for line in lines[i + 1:]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        return len(line) - len(line.lstrip()) > indent
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv))
