r"""The expression language of process definitions: `${...}` inside the strings of a step's
`with`, and the whole of a condition step's `if` (which may also be wrapped as `${ ... }`).

Definitions come from users, so expressions are read by a hand-written tokenizer and
recursive-descent parser into a tree of frozen dataclasses and evaluated by walking that tree;
nothing here hands text to Python's own evaluator. From loosest to tightest binding:

    or, and           short-circuit; the result is a bool (by Python truthiness)
    not               prefix
    == != < <= > >=   and `in` / `not in` (an item of a list, a substring, a key of a dict);
                      comparisons do not chain: `a < b < c` is a parse error
    + -   * / %       left-associative; `/` is true division, the rest keep ints ints
    -                 prefix
    .name  [key]      access; a list takes an int index (negative counts from the end),
                      a dict a string key
    primaries         3, 2.5, 'text' or "text" (escapes \\ \' \" \n \t), true, false, null,
                      [a, b], (a), and the root names `inputs` and `steps`, which are the only
                      names there are

Expressions see `{"inputs": {...}, "steps": {"<id>": {"output": ...}}}`; definitions also let
them start from `trigger` (how the instance was started: definitions.py, "Triggers"), and a
wait's `when` from `signal`: `parse`, `compile_template` and `compile_fields` take the names
allowed as `roots`. Access is null-safe: a missing key, an index out of range, or any access on
null gives null, because a step in a branch not taken has no entry in `steps` (and an instance
started through the API has no `trigger`). Otherwise types are strict: booleans are not numbers
(`true == 1` is false), `+` never converts to text, and ordering needs two numbers or two
strings; anything else raises EvaluationError naming the operation and the types.

In a template, a string that is exactly one `${...}` becomes that value, of whatever type; any
other string with expressions becomes text, with true/false/null spelled so and lists and dicts
as compact JSON. `$${` is a literal `${`.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ROOT_NAMES",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Template",
    "TemplateError",
    "compile_fields",
    "compile_template",
    "expression_too_long",
    "parse",
]

ROOT_NAMES = ("inputs", "steps")
# Bounds that keep recursion (parsing ~16 frames per bracket level, evaluation one per tree
# level) far from Python's limit of 1000 frames whatever a user writes.
_MAX_NESTING = 20
_MAX_DEPTH = 100


class ExpressionError(ValueError):
    """An expression that cannot be parsed; `position` is a 0-based offset into the source."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.message = message
        self.position = position

    def __reduce__(self) -> tuple[Any, ...]:  # the default would call __init__ with str(self)
        return (type(self), (self.message, self.position))


class EvaluationError(ValueError):
    """An expression that parsed but failed on the values it met."""


class TemplateError(ValueError):
    """Every problem found in a value given to compile_template, as (path, message) pairs."""

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{path}: {message}" for path, message in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


# --- values --------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float, str)):
        return {int: "int", float: "float", str: "string"}.get(type(value), type(value).__name__)
    if isinstance(value, (list, tuple)):
        return "list"
    return "dict" if isinstance(value, Mapping) else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # Python's True == 1 is exactly what the language rules out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _mismatch(op: str, a: Any, b: Any, why: str = "") -> EvaluationError:
    reason = f": {why}" if why else ""
    return EvaluationError(f"cannot apply '{op}' to {_type_name(a)} and {_type_name(b)}{reason}")


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "%": operator.mod,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _contains(op: str, item: Any, container: Any) -> bool:
    if isinstance(container, (list, tuple)):
        return any(_equal(item, x) for x in container)
    if isinstance(container, (str, Mapping)) and isinstance(item, str):
        return item in container
    if isinstance(container, (str, Mapping)):
        raise _mismatch(op, item, container, f"only a string can be in a {_type_name(container)}")
    raise _mismatch(op, item, container, "the right side must be a list, string or dict")


def _binary(op: str, a: Any, b: Any) -> Any:
    if op in ("==", "!="):
        return _equal(a, b) == (op == "==")
    if op in ("in", "not in"):
        return _contains(op, a, b) == (op == "in")
    numbers = _is_number(a) and _is_number(b)
    if op in ("<", "<=", ">", ">="):
        if numbers or (isinstance(a, str) and isinstance(b, str)):
            return bool(_OPERATORS[op](a, b))
        raise _mismatch(op, a, b, "ordering needs two numbers or two strings")
    if numbers:
        try:
            return _OPERATORS[op](a, b)
        except ZeroDivisionError:
            raise _mismatch(op, a, b, "division by zero") from None
        except OverflowError:  # int/float mixes beyond the float range
            raise _mismatch(op, a, b, "result out of range") from None
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return a + b
    if op == "+" and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [*a, *b]
    raise _mismatch(op, a, b)


def _access(base: Any, key: Any) -> Any:
    if base is None:
        return None
    if isinstance(base, Mapping) and isinstance(key, str):
        return base.get(key)
    is_int = isinstance(key, int) and not isinstance(key, bool)
    if isinstance(base, (list, tuple)) and is_int:
        return base[key] if -len(base) <= key < len(base) else None
    shown = repr(key) if is_int or isinstance(key, str) else _type_name(key)
    why = {"dict": ": its keys are strings", "list": ": its indices are ints"}
    kind = _type_name(base)
    raise EvaluationError(f"cannot access {shown} on {kind}{why.get(kind, '')}")


# --- the tree --------------------------------------------------------------------------------


class _Node:
    __slots__ = ()

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def children(self) -> tuple[_Node, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class _Const(_Node):
    value: Any

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class _Root(_Node):
    name: str

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        return ctx.get(self.name)


@dataclass(frozen=True, slots=True)
class _Access(_Node):
    """`target[key]`; `target.name` is the same with a constant string key."""

    target: _Node
    key: _Node

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        return _access(self.target.evaluate(ctx), self.key.evaluate(ctx))

    def children(self) -> tuple[_Node, ...]:
        return (self.target, self.key)


@dataclass(frozen=True, slots=True)
class _List(_Node):
    items: tuple[_Node, ...]

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        return [item.evaluate(ctx) for item in self.items]

    def children(self) -> tuple[_Node, ...]:
        return self.items


@dataclass(frozen=True, slots=True)
class _Unary(_Node):
    op: str  # "-" | "not"
    operand: _Node

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        value = self.operand.evaluate(ctx)
        if self.op == "not":
            return not value
        if _is_number(value):
            return -value
        raise EvaluationError(f"cannot apply unary '-' to {_type_name(value)}")

    def children(self) -> tuple[_Node, ...]:
        return (self.operand,)


@dataclass(frozen=True, slots=True)
class _Binary(_Node):
    op: str
    left: _Node
    right: _Node

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        if self.op == "and":
            return bool(self.left.evaluate(ctx)) and bool(self.right.evaluate(ctx))
        if self.op == "or":
            return bool(self.left.evaluate(ctx)) or bool(self.right.evaluate(ctx))
        return _binary(self.op, self.left.evaluate(ctx), self.right.evaluate(ctx))

    def children(self) -> tuple[_Node, ...]:
        return (self.left, self.right)


# --- tokenizer and parser --------------------------------------------------------------------

_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<num>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>==|!=|<=|>=|[<>+\-*/%.\[\](),])",
    re.ASCII,
)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}
_HINTS = {
    "=": " (did you mean '=='?)",
    "!": " (use 'not' or '!=')",
    "&": " (use 'and')",
    "|": " (use 'or')",
    "$": " ('${' cannot appear inside an expression)",
}
_CONSTANTS = {"true": True, "false": False, "null": None}
_PYTHONISMS = {"True": "true", "False": "false", "None": "null"}
_KEYWORDS = frozenset({"and", "or", "not", "in", *_CONSTANTS})


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "num" | "str" | "name" | "op" | "end"
    text: str
    pos: int
    value: Any = None

    def describe(self) -> str:
        return "the end of the expression" if self.kind == "end" else repr(self.text)


def _read_string(src: str, start: int, end: int) -> tuple[str, int]:
    quote, out, i = src[start], [], start + 1
    while i < end and src[i] != quote:
        if src[i] != "\\":
            out.append(src[i])
            i += 1
        elif i + 1 < end and src[i + 1] in _ESCAPES:
            out.append(_ESCAPES[src[i + 1]])
            i += 2
        elif i + 1 < end:
            raise ExpressionError(f"unknown escape '\\{src[i + 1]}' in a string", i)
        else:
            i = end  # a backslash last escapes the end itself
    if i >= end:
        raise ExpressionError("unterminated string", start)
    return "".join(out), i + 1


def _number(text: str, pos: int) -> int | float:
    try:
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:  # Python refuses to convert ints of more than 4300 digits
        raise ExpressionError("number is too long", pos) from None
    if value == float("inf"):
        raise ExpressionError("number is out of range", pos)
    return value


def _tokenize(src: str, start: int, end: int) -> list[_Token]:
    tokens: list[_Token] = []
    i = start
    while i < end:
        if src[i] in "'\"":
            value, after = _read_string(src, i, end)
            tokens.append(_Token("str", src[i:after], i, value))
            i = after
            continue
        match = _TOKEN.match(src, i, end)
        if match is None:
            raise ExpressionError(f"unexpected character {src[i]!r}{_HINTS.get(src[i], '')}", i)
        kind, text, i = match.lastgroup or "", match.group(), match.end()
        if kind == "num":
            if i < end and (src[i].isalnum() or src[i] == "_"):
                raise ExpressionError(f"invalid number {text + src[i]!r}", match.start())
            tokens.append(_Token(kind, text, match.start(), _number(text, match.start())))
        elif kind != "ws":
            tokens.append(_Token(kind, text, match.start()))
    tokens.append(_Token("end", "", end))
    return tokens


class _Parser:
    def __init__(self, src: str, start: int, end: int, roots: tuple[str, ...] = ROOT_NAMES) -> None:
        self.roots = roots
        self.tokens = _tokenize(src, start, end)
        self.at = 0
        self.nesting = 0
        self.start = start

    def parse(self) -> _Node:
        node = self.or_()
        if (tok := self.peek()).kind != "end":
            raise ExpressionError(
                f"expected the end of the expression, found {tok.describe()}", tok.pos
            )
        # Long left-associative chains (1+1+...) make deep trees without deep parsing.
        stack = [(node, 1)]
        while stack:
            current, depth = stack.pop()
            if depth > _MAX_DEPTH:
                raise ExpressionError("expression is too deeply nested", self.start)
            stack.extend((child, depth + 1) for child in current.children())
        return node

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.peek()
        self.at = min(self.at + 1, len(self.tokens) - 1)
        return tok

    def accept(self, *texts: str) -> str | None:
        tok = self.peek()
        if tok.kind in ("op", "name") and tok.text in texts:
            self.at += 1
            return tok.text
        return None

    def expect(self, text: str, opener: _Token) -> None:
        if self.accept(text) is None:
            tok = self.peek()
            raise ExpressionError(
                f"expected {text!r} to close {opener.text!r} at position "
                f"{opener.pos}, found {tok.describe()}",
                tok.pos,
            )

    def nested(self, opener: _Token) -> _Node:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise ExpressionError("expression is too deeply nested", opener.pos)
        node = self.or_()
        self.nesting -= 1
        return node

    def chain(self, ops: tuple[str, ...], operand: Callable[[], _Node]) -> _Node:
        node = operand()
        while op := self.accept(*ops):
            node = _Binary(op, node, operand())
        return node

    def prefixed(self, op: str, operand: Callable[[], _Node]) -> _Node:
        count = 0  # counted, not recursed, so `not not ... x` cannot exhaust the stack
        while self.accept(op):
            count += 1
        node = operand()
        for _ in range(count):
            # Folding keeps `xs[-1]` a constant key, so references() can see it.
            if op == "-" and isinstance(node, _Const) and _is_number(node.value):
                node = _Const(-node.value)
            else:
                node = _Unary(op, node)
        return node

    def or_(self) -> _Node:
        return self.chain(("or",), self.and_)

    def and_(self) -> _Node:
        return self.chain(("and",), self.not_)

    def not_(self) -> _Node:
        return self.prefixed("not", self.comparison)

    def comparison_op(self) -> str | None:
        tok, after = self.peek(), self.peek(1)
        if tok.kind == "op" and tok.text in ("==", "!=", "<", "<=", ">", ">="):
            return tok.text
        if tok.kind == "name" and tok.text == "not" and after.kind == "name" and after.text == "in":
            return "not in"
        return "in" if tok.kind == "name" and tok.text == "in" else None

    def comparison(self) -> _Node:
        left = self.sum()
        if (op := self.comparison_op()) is None:
            return left
        self.at += len(op.split())
        right = self.sum()
        if self.comparison_op() is not None:
            raise ExpressionError(
                "comparisons cannot be chained; join them with 'and'", self.peek().pos
            )
        return _Binary(op, left, right)

    def sum(self) -> _Node:
        return self.chain(("+", "-"), self.product)

    def product(self) -> _Node:
        return self.chain(("*", "/", "%"), self.unary)

    def unary(self) -> _Node:
        return self.prefixed("-", self.postfix)

    def postfix(self) -> _Node:
        node = self.primary()
        while True:
            if self.accept("."):
                tok = self.take()
                if tok.kind != "name":  # keywords are fine here: `inputs.in` is unambiguous
                    raise ExpressionError(
                        f"expected a name after '.', found {tok.describe()}", tok.pos
                    )
                node = _Access(node, _Const(tok.text))
            elif self.peek().kind == "op" and self.peek().text == "[":
                opener = self.take()
                node = _Access(node, self.nested(opener))
                self.expect("]", opener)
            else:
                return node

    def primary(self) -> _Node:
        tok = self.take()
        if tok.kind in ("num", "str"):
            return _Const(tok.value)
        if tok.kind == "name" and tok.text in _CONSTANTS:
            return _Const(_CONSTANTS[tok.text])
        if tok.kind == "name" and tok.text in self.roots:
            return _Root(tok.text)
        if tok.kind == "name" and tok.text not in _KEYWORDS:
            hint = f" (did you mean {_PYTHONISMS[tok.text]!r}?)" if tok.text in _PYTHONISMS else ""
            if len(self.roots) == 1:
                only = f"the only name is {self.roots[0]}"
            else:
                only = "the only names are " + ", ".join(self.roots[:-1])
                only += f" and {self.roots[-1]}"
            raise ExpressionError(f"unknown name {tok.text!r}{hint}; {only}", tok.pos)
        if tok.kind == "op" and tok.text == "(":
            node = self.nested(tok)
            self.expect(")", tok)
            return node
        if tok.kind == "op" and tok.text == "[":
            items: list[_Node] = []
            while self.accept("]") is None:
                items.append(self.nested(tok))
                if self.accept(",") is None:
                    self.expect("]", tok)
                    break
            return _List(tuple(items))
        raise ExpressionError(f"expected an expression, found {tok.describe()}", tok.pos)


def _collect_references(node: _Node, out: set[tuple[str, ...]]) -> None:
    if not isinstance(node, (_Root, _Access)):
        for child in node.children():
            _collect_references(child, out)
        return
    chain: list[_Access] = []
    base: _Node = node
    while isinstance(base, _Access):
        chain.append(base)
        base = base.target
    if isinstance(base, _Root):
        path = [base.name]
        for link in reversed(chain):  # the path stops at the first key known only at run time
            if not (isinstance(link.key, _Const) and type(link.key.value) in (str, int)):
                break
            path.append(str(link.key.value))
        out.add(tuple(path))
    else:
        _collect_references(base, out)
    for link in chain:
        _collect_references(link.key, out)


def _find_close(src: str, i: int) -> int:
    """The index of the `}` that ends a `${` whose body starts at i, or -1; skips strings."""
    while i < len(src):
        if src[i] == "}":
            return i
        if src[i] in "'\"":
            quote, i = src[i], i + 1
            while i < len(src) and src[i] != quote:
                i += 2 if src[i] == "\\" else 1
        i += 1
    return -1


@dataclass(frozen=True)
class Expression:
    """A parsed expression; build one with parse()."""

    source: str
    _node: _Node = field(repr=False, compare=False)
    _references: frozenset[tuple[str, ...]] = field(repr=False, compare=False)

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        return self._node.evaluate(context)

    def references(self) -> frozenset[tuple[str, ...]]:
        return self._references


def _compile(
    src: str, start: int, end: int, roots: tuple[str, ...] = ROOT_NAMES
) -> tuple[_Node, frozenset[tuple[str, ...]]]:
    node = _Parser(src, start, end, roots).parse()
    refs: set[tuple[str, ...]] = set()
    _collect_references(node, refs)
    return node, frozenset(refs)


def parse(source: str, roots: tuple[str, ...] = ROOT_NAMES) -> Expression:
    """Parse an expression; one wrapped whole as `${ ... }` is unwrapped first. `roots`: the
    names it may start from (a wait's `when` also sees `signal`)."""
    if not isinstance(source, str):
        raise ExpressionError(f"an expression is a string, not {_type_name(source)}", 0)
    start, end = 0, len(source)
    lo, hi = len(source) - len(source.lstrip()), len(source.rstrip())
    if source.startswith("${", lo) and _find_close(source, lo + 2) == hi - 1:
        start, end = lo + 2, hi - 1
    return Expression(source, *_compile(source, start, end, roots))


# --- templates -------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    try:
        if _is_number(value):
            return str(value)
        if isinstance(value, (list, tuple, Mapping)):
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:  # unserialisable members; ints beyond 4300 digits
        raise EvaluationError(f"cannot render {_type_name(value)} as text: {exc}") from None
    raise EvaluationError(f"cannot render {_type_name(value)} as text")


class _TNode:
    __slots__ = ()

    def render(self, ctx: Mapping[str, Any]) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _TConst(_TNode):
    value: Any  # a scalar only, so sharing it between renders is safe

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class _TList(_TNode):
    items: tuple[_TNode, ...]

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return [item.render(ctx) for item in self.items]


@dataclass(frozen=True, slots=True)
class _TDict(_TNode):
    items: tuple[tuple[str, _TNode], ...]

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return {key: item.render(ctx) for key, item in self.items}


@dataclass(frozen=True, slots=True)
class _TString(_TNode):
    """A string holding expressions: one alone keeps its value's type; otherwise text."""

    parts: tuple[str | _Node, ...]
    path: str
    source: str

    def render(self, ctx: Mapping[str, Any]) -> Any:
        try:
            if len(self.parts) == 1 and isinstance(node := self.parts[0], _Node):
                return node.evaluate(ctx)
            return "".join(
                part if isinstance(part, str) else _as_text(part.evaluate(ctx))
                for part in self.parts
            )
        except EvaluationError as exc:
            raise EvaluationError(f"{self.path}: {exc} (in {self.source!r})") from None


@dataclass(frozen=True)
class Template:
    """A JSON value with `${...}` inside its strings; build one with compile_template()."""

    path: str
    _root: _TNode = field(repr=False)
    _references: frozenset[tuple[str, ...]] = field(repr=False, compare=False)
    _static: bool = field(repr=False, compare=False)

    def render(self, context: Mapping[str, Any]) -> Any:
        """A fresh JSON value (values taken from the context are not copied)."""
        return self._root.render(context)

    def references(self) -> frozenset[tuple[str, ...]]:
        return self._references

    @property
    def is_static(self) -> bool:
        return self._static


_PLAIN_KEY = re.compile(r"[^.\[\]\s'\"]+")


def expression_too_long(length: int, limit: int) -> str:
    """The problem of an expression over a length limit (definitions set the limit)."""
    return f"an expression of {length} characters: the limit is {limit} characters"


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{json.dumps(key)}]"


class _TemplateCompiler:
    def __init__(
        self, max_expression_length: int | None = None, roots: tuple[str, ...] = ROOT_NAMES
    ) -> None:
        self.problems: list[tuple[str, str]] = []
        self.references: set[tuple[str, ...]] = set()
        self.static = True
        self.max_expression_length = max_expression_length
        self.roots = roots

    def value(self, value: Any, path: str) -> _TNode:
        if isinstance(value, str):
            return self.string(value, path)
        if value is None or isinstance(value, (bool, int, float)):
            return _TConst(value)
        if isinstance(value, (list, tuple)):
            return _TList(tuple(self.value(item, f"{path}[{i}]") for i, item in enumerate(value)))
        if isinstance(value, Mapping):
            items = []
            for key, item in value.items():
                key_text = str(key)
                where = _key_path(path, key_text)
                if not isinstance(key, str):
                    self.problems.append((where, f"a key must be a string, not {_type_name(key)}"))
                items.append((key_text, self.value(item, where)))
            return _TDict(tuple(items))
        self.problems.append((path, f"not a JSON value: {_type_name(value)}"))
        return _TConst(None)

    def string(self, text: str, path: str) -> _TNode:
        parts: list[str | _Node] = []
        literal: list[str] = []
        i = 0
        while (opening := text.find("${", i)) >= 0:
            if opening > i and text[opening - 1] == "$":  # `$${` is a literal `${`
                literal.append(text[i : opening - 1] + "${")
                i = opening + 2
                continue
            literal.append(text[i:opening])
            close = _find_close(text, opening + 2)
            if close < 0:
                self.problems.append((path, f"unterminated '${{' (at position {opening})"))
                return _TConst(text)
            limit = self.max_expression_length
            if limit is not None and close - opening - 2 > limit:
                message = expression_too_long(close - opening - 2, limit)
                self.problems.append((path, f"{message} (at position {opening})"))
                i = close + 1
                continue
            try:
                node, refs = _compile(text, opening + 2, close, self.roots)
            except ExpressionError as exc:
                self.problems.append((path, str(exc)))
            else:
                self.references |= refs
                if any(literal):
                    parts.append("".join(literal))
                literal = []
                parts.append(node)
            i = close + 1
        literal.append(text[i:])
        if not any(isinstance(part, _Node) for part in parts):
            return _TConst("".join(literal))
        if any(literal):
            parts.append("".join(literal))
        self.static = False
        return _TString(tuple(parts), path, text)


def compile_template(
    value: Any,
    path: str = "with",
    *,
    max_expression_length: int | None = None,
    roots: tuple[str, ...] = ROOT_NAMES,
) -> Template:
    """Compile a JSON value's `${...}` ahead of time, or raise TemplateError with every problem.

    Dict keys are not templated. `$${` stands for a literal `${`. An expression (what one
    `${...}` holds) longer than `max_expression_length` characters is a problem. `roots`: the
    names its expressions may start from.
    """
    compiler = _TemplateCompiler(max_expression_length, roots)
    root = compiler.value(value, path)
    if compiler.problems:
        raise TemplateError(compiler.problems)
    return Template(path, root, frozenset(compiler.references), compiler.static)


def compile_fields(
    value: Mapping[str, Any],
    path: str = "with",
    *,
    max_expression_length: int | None = None,
    roots: tuple[str, ...] = ROOT_NAMES,
) -> tuple[Template | None, dict[str, frozenset[tuple[str, ...]]], list[tuple[str, str]]]:
    """`compile_template` of an object, in one pass, keeping each field's references apart.

    Returns the template (None when there is any problem), the references of each field that
    compiled without a problem, and every problem (never raises)."""
    compiler = _TemplateCompiler(max_expression_length, roots)
    fields: dict[str, frozenset[tuple[str, ...]]] = {}
    items: list[tuple[str, _TNode]] = []
    everything: set[tuple[str, ...]] = set()
    for key, item in value.items():
        key_text = str(key)
        where = _key_path(path, key_text)
        problems_before = len(compiler.problems)
        if not isinstance(key, str):
            compiler.problems.append((where, f"a key must be a string, not {_type_name(key)}"))
        compiler.references = set()
        items.append((key_text, compiler.value(item, where)))
        if len(compiler.problems) == problems_before:
            fields[key_text] = frozenset(compiler.references)
        everything |= compiler.references
    if compiler.problems:
        return None, fields, compiler.problems
    template = Template(path, _TDict(tuple(items)), frozenset(everything), compiler.static)
    return template, fields, []
