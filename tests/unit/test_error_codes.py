"""Every error code has one meaning and one status, and no request is answered with a
500 or with ``configuration_error``.

The table is ``broker.errors.CODES`` (and ``OAUTH_CODES`` for the CLI token endpoint).
Three checks hold it:

* every class in the error tree, and every code written as a literal (the HTTP-level
  refusals, the exec credential server), is in its table with the table's status;
* the table lists nothing that is never used;
* a static walk over ``broker/`` finds every place a 500-status error class is named
  outside an ``except``, ``isinstance`` or annotation, and each must be listed below as
  start-up (it runs while the broker builds itself from its settings, before it serves)
  or as a backstop, naming the load-time check that makes it unreachable. A new raise
  of ``ConfigurationError`` or ``ServerError`` on a request path fails here.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import broker
from broker import errors
from broker.client import exec as client_exec
from broker.server import _REFUSALS
from broker.web.errors import _HTTP_CODES

BROKER = Path(broker.__file__).parent

# (module path, function) -> why a 500-status error may be built there.
STARTUP = "start-up: runs while the broker builds itself from its settings"
ALLOWED: dict[tuple[str, str], str] = {
    ("providers/__init__.py", "_provider_class"): STARTUP,
    ("providers/amazon.py", "AmazonProvider.__init__"): STARTUP,
    ("providers/facebook.py", "FacebookProvider.__init__"): STARTUP,
    ("providers/oidc.py", "OIDCProvider.__init__"): STARTUP,
    ("issuer.py", "_file_key"): STARTUP + " (Issuer.__init__ loads issuer.key_files)",
    ("credentials.py", "CredentialService._assume"): "backstop: Services always builds an issuer",
    ("guest.py", "guest_grant"): "backstop: settings refuses guest access without role_arn",
    ("rules.py", "_scalar_holds"): "backstop: settings refuses unknown operators",
    (
        "policy.py",
        "_identity_value",
    ): "backstop: check_policy_template refuses unknown placeholders",
    ("policy.py", "_checked_value"): "backstop: settings checks identity.region",
    ("policy.py", "render"): "backstop: check_policy_template refuses templates that are not JSON "
    "or too long with the longest values",
    ("policy.py", "render_tags"): "backstop: settings refuses rules with too many tags",
    ("sts.py", "_params"): "backstop: settings and the renderer keep within STS's limits",
    ("sts.py", "_map_param_error"): "backstop: settings checks the role and policy ARNs",
}


def _all_modules() -> None:
    for info in pkgutil.walk_packages(broker.__path__, "broker."):
        importlib.import_module(info.name)


def _tree(cls: type[errors.BrokerError]) -> Iterator[type[errors.BrokerError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


_all_modules()
CLASSES = list(_tree(errors.BrokerError))
FIVE_HUNDREDS = {cls.__name__ for cls in CLASSES if cls.status == 500}


def _literal_codes() -> Iterator[tuple[str, int, str]]:
    """(code, status, where) for every code the broker writes without a class."""
    for status, code in _HTTP_CODES.items():
        yield code, status, "web.errors._HTTP_CODES"
    for _kind, status, code, _message in _REFUSALS:
        yield code, status, "server._REFUSALS"
    # The exec credential server answers the SDK in the broker's shape.
    source = ast.parse(Path(client_exec.__file__).read_text())
    for node in ast.walk(source):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_json":
            status_node, body = node.args
            assert isinstance(status_node, ast.Constant)
            assert isinstance(status_node.value, int)
            if not isinstance(body, ast.Dict):
                continue  # the credentials themselves
            for key, value in zip(body.keys, body.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "error":
                    assert isinstance(value, ast.Constant)
                    assert isinstance(value.value, str)
                    yield value.value, status_node.value, "client.exec"


def test_every_class_is_in_its_table_with_its_status() -> None:
    assert len(CLASSES) > 20  # the walk found the tree, including the modules' own
    for cls in CLASSES:
        entry = cls.vocabulary.get(cls.code)
        assert entry is not None, cls
        assert entry.status == cls.status, cls


def test_every_literal_code_is_in_the_table_with_its_status() -> None:
    seen = list(_literal_codes())
    assert {where for _c, _s, where in seen} == {
        "web.errors._HTTP_CODES",
        "server._REFUSALS",
        "client.exec",
    }
    for code, status, where in seen:
        assert code in errors.CODES, (code, where)
        assert errors.CODES[code].status == status, (code, status, where)


def test_the_table_lists_only_codes_in_use() -> None:
    used = {cls.code for cls in CLASSES if cls.vocabulary is errors.CODES}
    used |= {code for code, _status, _where in _literal_codes()}
    # werkzeug's refusals with no code of their own (e.g. 416 from a Range header).
    used.add("http_error")
    assert set(errors.CODES) == used
    oauth = {cls.code for cls in CLASSES if cls.vocabulary is errors.OAUTH_CODES}
    assert set(errors.OAUTH_CODES) == oauth


def test_every_entry_says_when_and_what_to_do() -> None:
    for table in (errors.CODES, errors.OAUTH_CODES):
        for code, entry in table.items():
            assert entry.when, code
            assert entry.action, code
    assert all(e.status == 400 for e in errors.OAUTH_CODES.values())


def test_a_class_that_disagrees_with_the_table_fails_at_import() -> None:
    with pytest.raises(TypeError, match="not in its error table"):

        class WrongStatus(errors.BadRequest):  # invalid_request is 400
            status = 401

    with pytest.raises(TypeError, match="not in its error table"):

        class Unlisted(errors.BadRequest):
            code = "made_up"

    with pytest.raises(TypeError, match="not in its error table"):

        class WrongVocabulary(errors.OAuthError):
            code = "unknown_provider"


# --------------------------------------------------------------------------- the walk


# Calls that take an error class to match against, not to build: name -> which
# positional argument (None: all of them).
_CLASS_TAKERS: dict[str | None, int | None] = {
    "isinstance": 1,
    "issubclass": 1,
    "suppress": None,
    "register_error_handler": 0,
    "errorhandler": 0,
}


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _harmless(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether naming an error class here cannot build or raise one."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.ExceptHandler) and child is parent.type:
            return True
        if isinstance(parent, ast.ClassDef) and child in parent.bases:
            return True
        if isinstance(parent, ast.ImportFrom | ast.Import):
            return True
        if isinstance(parent, ast.arg) and child is parent.annotation:
            return True
        if isinstance(parent, ast.AnnAssign) and child is parent.annotation:
            return True
        if isinstance(parent, ast.FunctionDef) and child is parent.returns:
            return True
        if isinstance(parent, ast.Call) and _called(parent) in _CLASS_TAKERS:
            arg = _CLASS_TAKERS[_called(parent)]
            if child in (parent.args if arg is None else parent.args[arg : arg + 1]):
                return True
        if isinstance(parent, ast.stmt):
            return False
        child, parent = parent, parents.get(parent)
    return False


def five_hundred_sites(source: str) -> Iterator[tuple[str, int, str]]:
    """(function, line, class) for every use of a 500-status class in ``source``."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def qualname(node: ast.AST) -> str:
        names = []
        while (node := parents.get(node)) is not None:  # type: ignore[assignment]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
        return ".".join(reversed(names))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Name | ast.Attribute):
            continue
        name = node.id if isinstance(node, ast.Name) else node.attr
        if name in FIVE_HUNDREDS and not _harmless(node, parents):
            yield qualname(node), node.lineno, name


def test_the_walk_finds_a_raise_on_a_request_path() -> None:
    # The walk itself must be able to fail: each of these is a request-time 500.
    sources = [
        "def f():\n    raise errors.ConfigurationError('x')\n",
        "def f():\n    raise ServerError()\n",
        "def f(e):\n    e.error = e if e else BrokerError()\n",
        "MAPPING = {'Code': errors.ConfigurationError}\n",
        "def f():\n    return ConfigurationError\n",
    ]
    for source in sources:
        assert list(five_hundred_sites(source)), source
    harmless = (
        "def f(x: ServerError) -> BrokerError:\n"
        "    try:\n        pass\n    except (ServerError, errors.BrokerError):\n        pass\n"
        "    return isinstance(x, errors.ConfigurationError)\n"
        "class E(errors.ServerError):\n    pass\n"
    )
    assert list(five_hundred_sites(harmless)) == []


def test_no_request_path_answers_500_or_configuration_error() -> None:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(BROKER.rglob("*.py")):
        relative = path.relative_to(BROKER).as_posix()
        if relative == "errors.py":
            continue  # the tree's own definitions
        for function, line, name in five_hundred_sites(path.read_text()):
            found.setdefault((relative, function), []).append(f"{name} at line {line}")
    unlisted = {site: uses for site, uses in found.items() if site not in ALLOWED}
    assert not unlisted, (
        "a 500-status error is built where it may answer a request; use the status the "
        f"condition deserves (broker.errors.CODES), or list it with its reason: {unlisted}"
    )
    stale = set(ALLOWED) - set(found)
    assert not stale, f"listed sites that no longer build a 500-status error: {stale}"
