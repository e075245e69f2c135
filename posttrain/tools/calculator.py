"""The `calculator` tool: exact arithmetic on integers and decimals, by walking Python's `ast`.

    evaluate("347*829") == "287663"       evaluate("2**0.5") == "1.4142135623730951"
    evaluate("7/0")     -> ToolError("division by zero")

Never `eval`: the expression is parsed, and only number literals, + - * / // % **, unary minus
and plus, and parentheses are evaluated. The work is bounded, so the call runs in the caller's
thread without a timeout: the expression is at most MAX_EXPRESSION_CHARS long, every integer
result is checked against `max_digits`, and a power is refused before it is computed when its
result would pass that bound. Integers print exactly; floats print as Python's `repr` does.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from posttrain.tools.base import Tool, ToolError

MAX_EXPRESSION_CHARS = 2000

BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
ALLOWED = "numbers, + - * / // % **, unary minus and parentheses"


def evaluate(expression: str, max_digits: int = 1000) -> str:
    """The value of the arithmetic `expression` as text; raises ToolError when it is not one or
    its result would have more than `max_digits` digits."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"expression too long: {len(expression)} chars, at most {MAX_EXPRESSION_CHARS}"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"invalid expression: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise ToolError(f"invalid expression: {type(e).__name__}") from None
    max_bits = math.ceil(max_digits * math.log2(10))
    try:
        value = _evaluate(tree.body, max_digits, max_bits)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("result too large for a float") from None
    except RecursionError:
        raise ToolError("expression too deeply nested") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result is not a finite number")
        return repr(value)
    return str(value)


def _evaluate(node: ast.AST, max_digits: int, max_bits: int) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool is an int subclass: not a number here
            raise ToolError(f"unsupported literal {node.value!r}; allowed: {ALLOWED}")
        return _checked(node.value, max_digits, max_bits)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand, max_digits, max_bits))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left = _evaluate(node.left, max_digits, max_bits)
        right = _evaluate(node.right, max_digits, max_bits)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right, max_digits, max_bits)
        value = BINARY[type(node.op)](left, right)
        if isinstance(value, complex):  # (-8) ** (1/3)
            raise ToolError("result is a complex number")
        return _checked(value, max_digits, max_bits)
    raise ToolError(_refusal(node))


def _check_power(base: int | float, exponent: int | float, max_digits: int, max_bits: int) -> None:
    """Refuse an integer power whose result would pass `max_digits`, before computing it (a float
    power overflows into OverflowError by itself, quickly)."""
    if not (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1):
        return
    if exponent * math.log2(abs(base)) > max_bits:
        raise ToolError(f"result too large: more than {max_digits} digits")


def _checked(value: int | float, max_digits: int, max_bits: int) -> int | float:
    # bit_length first: str() of the few integers near the bound only.
    if (
        isinstance(value, int)
        and value.bit_length() > max_bits - 4
        and len(str(abs(value))) > max_digits
    ):
        raise ToolError(f"result too large: more than {max_digits} digits")
    return value


def _refusal(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"unknown name '{node.id}'; allowed: {ALLOWED}"
    if isinstance(node, ast.Call):
        return f"function calls are not allowed; allowed: {ALLOWED}"
    if isinstance(node, ast.Attribute):
        return f"attribute access is not allowed; allowed: {ALLOWED}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "unsupported operator '^': write powers as a ** b"
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"unsupported operator {type(node.op).__name__}; allowed: {ALLOWED}"
    return f"unsupported expression ({type(node).__name__}); allowed: {ALLOWED}"


def calculator(max_digits: int = 1000) -> Tool:
    """The calculator tool; `max_digits` bounds the integers it computes."""
    # Python refuses str() of integers past 4300 digits (sys.set_int_max_str_digits).
    if (
        not isinstance(max_digits, int)
        or isinstance(max_digits, bool)
        or not 1 <= max_digits <= 4000
    ):
        raise ValueError(f"max_digits: expected an integer from 1 to 4000, got {max_digits!r}")
    return Tool(
        name="calculator",
        description=(
            "Evaluate an arithmetic expression exactly: integers and decimals with + - * / // % "
            "** and parentheses. Example: 347*829"
        ),
        parameters={
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "for example (2+3)*4**2/7"}
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        run=lambda arguments, timeout_s, max_chars: evaluate(arguments["expression"], max_digits),
    )
