"""Each check exists once (issue #23): no validation rule's message is written in two modules.

Every module under ``src/prefalign`` is parsed with :mod:`ast` (nothing is imported).
The messages of ``PrefalignError(...)`` (and its subclasses), ``typer.BadParameter(...)``
and the server's ``APIError(status, ...)`` are collected, an f-string's placeholders
written as ``{}``. A message's *rule* is its first clause (up to the first ``;``, ``:``,
``(`` or ``,`` after a word), lower-cased, with option dashes, a leading ``--option:``,
``ClassName.`` or ``{value} is`` dropped and spaces collapsed. Two modules holding the same rule (at least
three literal words: ``{} must be ≥ {}`` says nothing on its own) copy one check: move it
where both can call it (``prefalign/rules.py`` for the faces' shared rules).

Duplicates in files that another change is rewriting are listed in :data:`ALLOWED`, each
with the follow-up that removes it; an allowed duplicate that disappears fails the test
too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "prefalign"

#: Calls whose message states a rule: the error classes (prefalign.errors and the server's).
ERRORS = {
    "PrefalignError", "UnknownNameError", "ModelLoadError", "TemplateError", "TokenizerMismatchError",
    "ContextLengthError", "BadParameter",
}
STATUS_FIRST = {"APIError"}  # APIError(status, message, ...)

#: rule → the modules allowed to hold it, and why (the follow-up that removes the copy).
ALLOWED: dict[str, tuple[set[str], str]] = {}


def _message(node: ast.expr) -> str | None:
    """The literal text of a message: a string, an f-string ({} for each value), or a
    concatenation of those; None if it is built otherwise (a variable, a call)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        return None if left is None or right is None else left + right
    return None


def _called(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def messages(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, message)`` of every error raised or built in a module."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _called(node)
        index = 1 if name in STATUS_FIRST else 0 if name in ERRORS else None
        if index is None:
            continue
        arg = node.args[index] if len(node.args) > index else next((k.value for k in node.keywords if k.arg in ("message", "detail")), None)
        text = _message(arg) if arg is not None else None
        if text:
            out.append((node.lineno, text))
    return out


def rule_of(message: str) -> str:
    """The first clause of a message, normalised (see the module's docstring)."""
    text = " ".join(message.split()).lower()
    text = re.sub(r"^--[\w-]+:\s*", "", text)  # "--resume: no checkpoint" is "no checkpoint"
    text = re.sub(r"^(--|[a-z_]+config\.)", "", text)
    text = re.sub(r"^\{\} (is|has) ", "", text)  # "{path} is not a PRM directory" is "not a prm directory"
    text = re.sub(r"(?<![\w])--(?=\w)", "", text)  # "--backend must" is "backend must"
    text = re.split(r"(?<=[\w'}\)])\s*[;:(,]", text, maxsplit=1)[0]
    return text.strip(" .")


def _literal_words(rule: str) -> int:
    return len([w for w in re.sub(r"\{\}", " ", rule).split() if re.search(r"[a-z]", w)])


def duplicated_rules() -> dict[str, dict[str, list[int]]]:
    """``{rule: {module: [lines]}}`` for every rule written in more than one module."""
    where: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        module = str(path.relative_to(ROOT))
        for line, text in messages(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            rule = rule_of(text)
            if _literal_words(rule) >= 3:
                where[rule][module].append(line)
    return {rule: dict(mods) for rule, mods in where.items() if len(mods) > 1}


def test_the_checker_finds_copies():
    tree = ast.parse(
        'raise PrefalignError(f"method {name!r} needs a preference: add -p", field="preference")\n'
        'raise APIError(400, "at most {n} stop sequences are allowed")\n'
        "raise typer.BadParameter('give at least one preference, e.g. concise')\n"
    )
    found = [rule_of(m) for _, m in messages(tree)]
    assert found == ["method {} needs a preference", "at most {n} stop sequences are allowed", "give at least one preference"]
    assert rule_of("--backend must be one of {}: {}") == rule_of("backend must be one of {}, got {}")
    assert rule_of("PairsConfig.template must be pad or default") == "template must be pad or default"
    assert rule_of("--resume: no checkpoint at {}; run without") == rule_of("--resume: no checkpoint at {}")
    assert rule_of("{} is not a PRM directory: it has no {}") == rule_of("not a PRM directory (no {}): {}")


def test_each_rule_is_written_once():
    duplicates = duplicated_rules()
    unexpected = {
        rule: mods for rule, mods in duplicates.items()
        if rule not in ALLOWED or not set(mods) <= ALLOWED[rule][0]
    }
    assert not unexpected, "the same check in several modules; move it where both can call it:\n" + "\n".join(
        f"  {rule!r}: " + ", ".join(f"{m}:{','.join(map(str, lines))}" for m, lines in mods.items())
        for rule, mods in sorted(unexpected.items())
    )
    gone = sorted(set(ALLOWED) - set(duplicates))
    assert not gone, f"allowed duplicates that are gone (remove them from ALLOWED): {gone}"
