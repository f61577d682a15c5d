"""Fusion rules: boolean expressions over prompt masks, parsed safely (no ``eval``).

A rule such as ``(artificial buildings & structures) | trees`` combines the binary masks that a
vision foundation model produced for each text prompt into one class mask. Grammar, loosest
binding first::

    expr   := term ('|' term)*
    term   := factor ('&' factor)*
    factor := ('~' | '!') factor | '(' expr ')' | NAME

A NAME is any run of characters other than ``& | ~ ! ( )``; it may hold several words and is
compared to the prompts with case and repeated spaces ignored (``Artificial  Buildings`` names
the prompt ``artificial buildings``).

Several classes (``{"building": "...", "tree": "..."}``) give a class-index map: 0 is
background and class ``i`` (1-based, in the order given) is written where its rule holds; where
two rules hold, the class listed first wins. One class gives the paper's 0/255 two-class label.

Named rules (``NAMED_RULES``) stand for a whole expression; a class's rule may be just a name:

- ``paper``: ``(artificial buildings & structures) | trees``, the rule the SSA paper states.
- ``reference-code``: ``artificial buildings & structures & ~trees``, what the SSA reference
  effectively trains on. Its fusion script (``prior_generation/genre_BEVlabel_*.py``) combines
  0/255 masks with uint8 arithmetic that wraps around (255 * 255 = 1 mod 256), so its files hold
  trees as 1 and buildings & structures without trees as 255; its loaders then divide by 255
  with integer division, which turns the 1s (trees) into background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ssageo.config import ConfigError

_OPERATORS = "&|~!()"

NAMED_RULES = {
    "paper": "(artificial buildings & structures) | trees",
    "reference-code": "artificial buildings & structures & ~trees",
}


def normalise_name(name: str) -> str:
    """The canonical form of a prompt name: lower case, single spaces, no outer spaces."""
    return " ".join(name.split()).lower()


@dataclass(frozen=True)
class Rule:
    """A parsed fusion expression; call it with ``{prompt: bool mask}`` to get a bool mask.

    ``node`` is a nested tuple: ``("name", str)``, ``("not", node)``, ``("and", a, b)`` or
    ``("or", a, b)``. ``text`` is the expression as written.
    """

    text: str
    node: tuple

    @property
    def names(self) -> set[str]:
        """The (normalised) prompt names the rule reads."""
        found: set[str] = set()
        stack = [self.node]
        while stack:
            node = stack.pop()
            if node[0] == "name":
                found.add(node[1])
            else:
                stack.extend(node[1:])
        return found

    def __call__(self, masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate on ``masks`` (prompt -> (H, W) bool); returns an (H, W) bool mask."""
        by_name = {normalise_name(k): np.asarray(v, dtype=bool) for k, v in masks.items()}
        missing = sorted(self.names - set(by_name))
        if missing:
            raise KeyError(f"fusion rule '{self.text}' needs masks for: {', '.join(missing)}")
        return _evaluate(self.node, by_name)


def _evaluate(node: tuple, masks: dict[str, np.ndarray]) -> np.ndarray:
    kind = node[0]
    if kind == "name":
        return masks[node[1]]
    if kind == "not":
        return ~_evaluate(node[1], masks)
    left, right = _evaluate(node[1], masks), _evaluate(node[2], masks)
    return left & right if kind == "and" else left | right


def _tokenise(text: str) -> list[str]:
    tokens: list[str] = []
    word: list[str] = []
    for char in text:
        if char in _OPERATORS:
            if "".join(word).strip():
                tokens.append(normalise_name("".join(word)))
            word = []
            tokens.append("~" if char == "!" else char)
        else:
            word.append(char)
    if "".join(word).strip():
        tokens.append(normalise_name("".join(word)))
    return tokens


def parse_rule(text: str) -> Rule:
    """Parse a fusion expression; raises ConfigError saying where it is malformed."""
    tokens = _tokenise(text)
    pos = 0

    def fail(message: str) -> ConfigError:
        return ConfigError(f"fusion rule '{text}': {message}")

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> tuple:
        node = term()
        while peek() == "|":
            take()
            node = ("or", node, term())
        return node

    def term() -> tuple:
        node = factor()
        while peek() == "&":
            take()
            node = ("and", node, factor())
        return node

    def factor() -> tuple:
        token = peek()
        if token is None:
            raise fail("ends where a prompt name or '(' was expected")
        if token == "~":
            take()
            return ("not", factor())
        if token == "(":
            take()
            node = expr()
            if peek() != ")":
                raise fail("a '(' is never closed")
            take()
            return node
        if token in _OPERATORS:
            raise fail(f"unexpected '{token}' where a prompt name was expected")
        return ("name", take())

    node = expr()
    if pos != len(tokens):
        raise fail(f"unexpected '{tokens[pos]}' after a complete expression")
    return Rule(text=text, node=node)


def resolve_rule(text: str) -> str:
    """A named rule's expression (``NAMED_RULES``, case and spacing ignored), else ``text``."""
    return NAMED_RULES.get(normalise_name(text), text)


def compile_classes(classes: Mapping[str, str], prompts: Sequence[str]) -> list[tuple[str, Rule]]:
    """Parse each class's rule (an expression or a ``NAMED_RULES`` name) and check that it
    names only configured prompts.

    Returns ``[(class name, Rule), ...]`` in the given order (the order sets class indices).
    """
    if not classes:
        raise ConfigError("priors.classes is empty: configure at least one class rule")
    known = {normalise_name(p) for p in prompts}
    compiled = []
    for name, text in classes.items():
        rule = parse_rule(resolve_rule(str(text)))
        unknown = sorted(rule.names - known)
        if unknown:
            shown = text if rule.text == text else f"{text} = {rule.text}"
            raise ConfigError(
                f"class '{name}': fusion rule '{shown}' names "
                f"{', '.join(repr(u) for u in unknown)}"
                f", which {'is' if len(unknown) == 1 else 'are'} not among the prompts "
                f"({', '.join(prompts)})"
            )
        compiled.append((str(name), rule))
    return compiled


def encode_label(class_masks: Sequence[np.ndarray]) -> np.ndarray:
    """Turn per-class bool masks (priority order) into the stored uint8 label.

    One class -> 0/255 two-class label; several -> index map (0 background, first class wins).
    """
    if len(class_masks) == 1:
        return np.where(class_masks[0], 255, 0).astype(np.uint8)
    label = np.zeros(np.shape(class_masks[0]), dtype=np.uint8)
    for index in range(len(class_masks), 0, -1):  # paint last first so earlier classes win
        label[np.asarray(class_masks[index - 1], dtype=bool)] = index
    return label


def fuse(masks: Mapping[str, np.ndarray], classes: Sequence[tuple[str, Rule]]) -> np.ndarray:
    """Apply compiled class rules to prompt masks; returns the stored uint8 label (H, W)."""
    return encode_label([rule(masks) for _, rule in classes])
