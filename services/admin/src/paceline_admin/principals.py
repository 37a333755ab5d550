"""Named principals: who a request is (from its bearer token), and the groups they belong to.

A principal is a name with a token of its own. `PACELINE_ADMIN_TOKEN` is the principal
`admin`; `PACELINE_ADMIN_TOKENS` names others, in either of two forms, mixed freely:

    PACELINE_ADMIN_TOKENS='alice=<token>,bob=<token>'        # comma-separated name=token pairs
    PACELINE_ADMIN_TOKENS='@/etc/paceline/tokens'            # @ and a path: a file of pairs
    PACELINE_ADMIN_TOKENS='ci=<token>,@/etc/paceline/tokens' # both

The file holds one `name=token` a line; blank lines and lines starting with `#` are ignored.
Why `@` inside the one setting rather than a second setting for the path: an item can be read
one way only. A pair begins with a name, and a name begins with a letter or a digit, never `@`;
the name ends at the first `=` (a name has none), so a token may hold `=` and `@`. A token with
a comma, or a path with one, cannot be written inline: put such tokens in a file (its lines
are split at the first `=` only). A file keeps the tokens out of the environment, which other
processes of the same user can read.

`PACELINE_GROUPS` maps group names to principals: `netops=alice,bob;leads=carol` (groups
separated by `;`, members by `,`, spaces around either ignored). Every member must be a
principal, and a group has at least one. Groups do not nest.

Names (of principals and of groups) are 1 to 64 characters: letters, digits, `_`, `.`, `-`
and `@`, starting with a letter or a digit; so never `=`, `,`, `;`, `:` or whitespace, and
`group:x` (how a rule names a group, see `Principals.is_member`) can never be a principal.
Names are case-sensitive. Every token is at least `MIN_TOKEN_LENGTH` characters; no two
principals share a name or a token.

Nothing here logs, and no error message holds a token: a malformed entry is named by its place
(`item 2`, `line 3 of /etc/paceline/tokens`), never by its text, which may be a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

MIN_TOKEN_LENGTH = 16
"""A guessable token would guard nothing; `make run` generates a long random one."""
ADMIN = "admin"
"""The principal of `PACELINE_ADMIN_TOKEN`."""
GROUP_PREFIX = "group:"
"""How a rule (an approval's approvers, say) names a group rather than a principal."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
FILE_PREFIX = "@"


@dataclass(frozen=True)
class NamedToken:
    """A principal's name and token, and where it was given (for error messages)."""

    name: str
    token: SecretStr
    origin: str


NAME_RULE = "1 to 64 letters, digits, `_`, `.`, `-` or `@`, starting with a letter or a digit"


def name_problem(name: str, *, show: bool = True) -> str | None:
    """Why `name` cannot name a principal or a group; None when it can. `show=False` leaves
    the name itself out of the message."""
    if NAME.fullmatch(name):
        return None
    if not name:
        return "the name is empty"
    return f"the name{f' {name!r}' if show else ''} is not {NAME_RULE}"


def parse_tokens(value: str) -> tuple[NamedToken, ...]:
    """The principals of a `PACELINE_ADMIN_TOKENS` value (see the module's text), reading the
    files it names. ValueError with every problem, each by its place, none with a token."""
    entries, problems = read_tokens(value)
    problems += conflicts(entries)
    if problems:
        raise ValueError("; ".join(problems))
    return entries


def read_tokens(value: str) -> tuple[tuple[NamedToken, ...], list[str]]:
    """The well-formed entries of a `PACELINE_ADMIN_TOKENS` value, and the problems with the
    others (by place, none with a token). Does not look for `conflicts`."""
    entries: list[NamedToken] = []
    problems: list[str] = []
    for number, raw in enumerate(value.split(","), start=1):
        item = raw.strip()
        if not item:
            continue  # a trailing comma, or an empty setting
        if item.startswith(FILE_PREFIX):
            _read_file(item[len(FILE_PREFIX) :].strip(), entries, problems)
        else:
            _add_pair(item, f"item {number}", entries, problems)
    return tuple(entries), problems


def conflicts(entries: Iterable[NamedToken]) -> list[str]:
    """Every name and every token given more than once (tokens by place only)."""
    problems: list[str] = []
    by_name: dict[str, NamedToken] = {}
    by_digest: dict[bytes, NamedToken] = {}
    for entry in entries:
        digest = _digest(entry.token.get_secret_value())
        if (first := by_name.get(entry.name)) is not None:
            problems.append(
                f"the name {entry.name} is given twice ({first.origin}, {entry.origin})"
            )
        else:
            by_name[entry.name] = entry
        if (same := by_digest.get(digest)) is not None:
            problems.append(f"{same.origin} and {entry.origin} have the same token")
        else:
            by_digest[digest] = entry
    return problems


def _read_file(path: str, entries: list[NamedToken], problems: list[str]) -> None:
    if not path:
        problems.append("`@` must be followed by the path of a file of `name=token` lines")
        return
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        problems.append(f"cannot read the tokens file {path}: {reason}")
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            _add_pair(line, f"line {number} of {path}", entries, problems)


def _add_pair(item: str, origin: str, entries: list[NamedToken], problems: list[str]) -> None:
    name, sep, token = item.partition("=")
    name, token = name.strip(), token.strip()
    if not sep:
        problems.append(f"{origin}: not `name=token`")
        return
    # Named by its place only: a malformed item may hold its token where the name should be.
    bad = [name_problem(name, show=False)]
    if len(token) < MIN_TOKEN_LENGTH:
        bad.append(f"the token is shorter than {MIN_TOKEN_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in token):
        # `Authorization: Bearer <token>` could never carry it as given.
        bad.append("the token holds whitespace or a control character")
    if any(bad):
        problems.append(f"{origin}: " + ", and ".join(p for p in bad if p))
        return
    entries.append(NamedToken(name, SecretStr(token), origin))


def parse_groups(value: str) -> dict[str, tuple[str, ...]]:
    """The groups of a `PACELINE_GROUPS` value, `netops=alice,bob;leads=carol`. Names are
    checked here; that members are principals is `Principals`' check. ValueError with every
    problem."""
    groups: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for raw in value.split(";"):
        item = raw.strip()
        if not item:
            continue
        group, sep, listed = item.partition("=")
        group = group.strip()
        if not sep:
            problems.append(f"{item!r} is not `group=name,name`")
            continue
        if (problem := name_problem(group)) is not None:
            problems.append(f"group: {problem}")
            continue
        if group in groups:
            problems.append(f"the group {group} is given twice")
            continue
        members = [m.strip() for m in listed.split(",") if m.strip()]
        if not members:
            problems.append(f"the group {group} has no members")
        for member in members:
            if (problem := name_problem(member)) is not None:
                problems.append(f"group {group}: {problem}")
        for member in sorted({m for m in members if members.count(m) > 1}):
            problems.append(f"group {group}: {member} is listed twice")
        groups[group] = tuple(members)
    if problems:
        raise ValueError("; ".join(problems))
    return groups


class Principals:
    """Who holds which token, and who is in which group. Pure: no I/O, nothing logged.

    Only a digest of each token is kept (SHA-256), so every comparison is between two 32-byte
    values: the time `authenticate` takes depends neither on the token given nor on which
    principal, if any, it matches."""

    __slots__ = ("_digests", "_groups", "_names")

    def __init__(
        self, tokens: Iterable[NamedToken], groups: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """ValueError, with every problem, when two principals share a name or a token, when
        there is none, or when a group names someone who is not a principal."""
        entries = list(tokens)
        problems = conflicts(entries)
        if not entries:
            problems.append("there is no principal")
        names = frozenset(entry.name for entry in entries)
        members: dict[str, frozenset[str]] = {}
        for group, listed in (groups or {}).items():
            members[group] = frozenset(listed)
            for unknown in sorted(members[group] - names):
                problems.append(f"group {group}: {unknown} is not a principal")
        if problems:
            raise ValueError("; ".join(problems))
        self._digests = tuple(
            (entry.name, _digest(entry.token.get_secret_value())) for entry in entries
        )
        self._names = names
        self._groups = members

    def __repr__(self) -> str:
        return f"Principals(names={sorted(self._names)}, groups={sorted(self._groups)})"

    @property
    def names(self) -> frozenset[str]:
        return self._names

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self._groups)

    def authenticate(self, token: str | None) -> str | None:
        """The principal whose token this is, or None. Compared in constant time with every
        token (never stopping at a match)."""
        if token is None:
            return None
        given = _digest(token)
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest):
                found = name
        return found

    def members(self, group: str) -> frozenset[str]:
        """The principals of `group` (`netops` or `group:netops`); empty for an unknown one."""
        return self._groups.get(group.removeprefix(GROUP_PREFIX), frozenset())

    def groups_of(self, name: str) -> frozenset[str]:
        """The groups `name` belongs to."""
        return frozenset(group for group, members in self._groups.items() if name in members)

    def knows(self, who: str) -> bool:
        """Whether `who` (`group:x` or a principal's name) names a group or a principal."""
        if who.startswith(GROUP_PREFIX):
            return who.removeprefix(GROUP_PREFIX) in self._groups
        return who in self._names

    def is_member(self, name: str, who: str) -> bool:
        """Whether the principal `name` is `who`: a member of the group when `who` is
        `group:x`, else `name` itself. An unknown group or name has no one in it."""
        if who.startswith(GROUP_PREFIX):
            return name in self.members(who)
        return name == who and name in self._names


def _digest(token: str) -> bytes:
    # surrogatepass: an environment value that is not UTF-8 still encodes, one way only.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
