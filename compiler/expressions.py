"""The small expression language of specs: integer sizes and boolean conditions.

Specs are data, so expressions are limited to names already defined, integer
literals and `+ - * //` (sizes), or a flag and `not flag` (conditions). Anything
else is refused, which also makes it safe to emit them verbatim into Python.
"""

from __future__ import annotations

import ast

_INT_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//"}


class ExpressionError(ValueError):
    pass


def int_expression(text: str, int_names: set[str]) -> str:
    """Check a size expression and return it normalised, with names as `cfg` locals."""
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        raise ExpressionError(f"{text!r} is not an expression") from None
    code = _int_node(tree.body, int_names, text)
    return code[1:-1] if isinstance(tree.body, ast.BinOp) else code


def _int_node(node: ast.AST, names: set[str], text: str) -> str:
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        return str(node.value)
    if isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none yet"
            raise ExpressionError(f"{node.id!r} in {text!r} is not an integer defined above (known: {known})")
        return node.id
    if isinstance(node, ast.BinOp) and type(node.op) in _INT_OPS:
        left = _int_node(node.left, names, text)
        right = _int_node(node.right, names, text)
        return f"({left} {_INT_OPS[type(node.op)]} {right})"
    raise ExpressionError(f"{text!r}: only integer names, literals and + - * // are allowed")


def condition(text: str, bool_names: set[str]) -> tuple[str, bool]:
    """Check a `when` condition: `flag` or `not flag`. Returns (flag, negated)."""
    words = str(text).split()
    negated = len(words) == 2 and words[0] == "not"
    flag = words[-1] if words else ""
    if not (len(words) == 1 or negated) or flag not in bool_names:
        known = ", ".join(sorted(bool_names)) or "none"
        raise ExpressionError(f"expected a boolean config name or 'not NAME' (known: {known}), got {text!r}")
    return flag, negated

