#!/usr/bin/env python3
"""Writes the inputs and outputs tables of each Terraform module's README
(between the `<!-- BEGIN TF DOCS -->` and `<!-- END TF DOCS -->` markers)
from its variables.tf and outputs.tf.

    scripts/terraform-docs.py           rewrite the tables
    scripts/terraform-docs.py --check   fail if a README is out of date
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "terraform"
BEGIN, END = "<!-- BEGIN TF DOCS -->", "<!-- END TF DOCS -->"


def blocks(text, kind):
    """(name, body) of each top-level `kind "name" { ... }` block."""
    out = []
    for m in re.finditer(r'^%s "([^"]+)" \{\n' % kind, text, re.M):
        depth, i = 1, m.end()
        while depth:
            c = text[i]
            depth += c == "{"
            depth -= c == "}"
            i += 1
        out.append((m.group(1), text[m.end() : i - 1]))
    return out


def attr(body, name):
    """The value of a top-level `name = ...` line of a block (one line, or
    a bracketed value over several)."""
    m = re.search(r"^  %s\s*=\s*(.*)$" % name, body, re.M)
    if not m:
        return None
    value = m.group(1).strip()
    if value.endswith(("{", "[")) and not value.endswith(("{}", "[]")):
        rest = body[m.end() :]
        close = "}" if value.endswith("{") else "]"
        end = re.search(r"^  \%s" % close, rest, re.M)
        value += " " + " ".join(rest[: end.end()].split())
    return value


def cell(s):
    return (s or "").replace("|", "\\|").strip('"')


def tables(module):
    lines = ["## Inputs", "", "| name | description | type | default |", "| --- | --- | --- | --- |"]
    for name, body in blocks((module / "variables.tf").read_text(), "variable"):
        default = attr(body, "default")
        lines.append(
            "| `%s` | %s | `%s` | %s |"
            % (
                name,
                cell(attr(body, "description")),
                attr(body, "type"),
                "required" if default is None else "`%s`" % default,
            )
        )
    lines += ["", "## Outputs", "", "| name | description |", "| --- | --- |"]
    for name, body in blocks((module / "outputs.tf").read_text(), "output"):
        lines.append("| `%s` | %s |" % (name, cell(attr(body, "description"))))
    return "\n".join(lines)


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for module in sorted(p.parent for p in ROOT.glob("*/*/variables.tf")):
        readme = module / "README.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            sys.exit(f"{readme}: no {BEGIN} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = f"{head}{BEGIN}\n{tables(module)}\n{END}{tail}"
        if new != text:
            stale.append(str(readme.relative_to(ROOT.parent)))
            if not check:
                readme.write_text(new)
    if check and stale:
        sys.exit("out of date (run scripts/terraform-docs.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
