"""A calculator tool: integer arithmetic evaluated exactly, without ``eval``.

``calculator("123*45")`` → ``"5535"``. The call may also be Hermes JSON,
``{"name": "calculator", "arguments": {"expression": "123*45"}}``. Only numbers, ``+ - * // %``,
unary minus and parentheses are accepted (``/`` is integer division when exact, else an error), and
the numbers are capped (``MAX_DIGITS``) so that a policy cannot make the host compute 9**9**9.
"""

from __future__ import annotations

import ast
import json
import operator

MAX_DIGITS = 30

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        a, b = _value(node.left), _value(node.right)
        if b == 0 or a % b:
            raise ValueError(f"{a}/{b} is not a whole number")
        return a // b
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _value(node.left), _value(node.right)
        if b == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            raise ValueError("division by zero")
        result = _BINARY[type(node.op)](a, b)
        if len(str(abs(result))) > MAX_DIGITS:
            raise ValueError(f"result longer than {MAX_DIGITS} digits")
        return result
    raise ValueError(f"not integer arithmetic: {ast.unparse(node)!r}")


def expression_of(call: str) -> str:
    """The arithmetic of a call: the text itself, or a Hermes JSON call's first argument."""
    text = call.strip()
    if text.startswith("{"):
        arguments = json.loads(text).get("arguments", {})
        if isinstance(arguments, dict):
            return str(next(iter(arguments.values()), ""))
        return str(arguments)
    return text


def calculator(call: str) -> str:
    """Evaluate integer arithmetic → its decimal value (raises ValueError on anything else)."""
    expression = expression_of(call)
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse {expression!r}") from err
    return str(_value(tree.body))
