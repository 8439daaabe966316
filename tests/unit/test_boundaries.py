"""The process boundary holds: outside the client layer (`rpc/`), nothing creates, finds or calls the actors of
Tidal (instances, frontends, the scheduler) directly, so every call has one deadline policy and one error
mapping, and a test can swap a client for a fake. Read from the source, so it needs neither Ray nor a model."""

import ast
import inspect
from pathlib import Path

from instance.actor import InstanceActor
from orchestrator.frontend import Frontend
from orchestrator.scheduler import GlobalScheduler

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("instance", "migration", "orchestrator", "benchmarks", "tests")
ACTORS = {cls.__name__: cls for cls in (InstanceActor, Frontend, GlobalScheduler)}


def actor_methods() -> set[str]:
    return {name for cls in ACTORS.values() for name, _ in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def violations(tree: ast.AST, methods: set[str]) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        target, attr = node.func.value, node.func.attr
        if attr == "remote" and isinstance(target, ast.Attribute) and target.attr in methods:
            found.append((node.lineno, f".{target.attr}.remote(...) on an actor"))
        if attr == "remote" and isinstance(target, ast.Name) and target.id == "ray" and \
                any(isinstance(a, ast.Name) and a.id in ACTORS for a in node.args):
            found.append((node.lineno, f"ray.remote({node.args[0].id}) creates an actor"))
        if attr == "get_actor" and isinstance(target, ast.Name) and target.id == "ray":
            found.append((node.lineno, "ray.get_actor(...) finds an actor"))
    return found


def test_no_module_outside_the_client_layer_calls_tidal_actors_directly():
    methods = actor_methods()
    assert {"add_request", "migrate_out", "push_chunks", "register_frontend", "drain"} <= methods
    problems = []
    files = [p for d in CHECKED for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        for line, what in violations(ast.parse(path.read_text(), str(path)), methods):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {what}; use the client in rpc/")
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_direct_call():
    methods = actor_methods()
    code = ("ray.get(inst.actor.add_request.remote(rid, ids, params, 0, sink))\n"
            "ray.remote(InstanceActor).options(name='x').remote()\n"
            "ray.get_actor('tidal-scheduler')\n"
            "sink.chunks.remote(rid)\n")                  # a test's own helper actor: allowed
    assert sorted(line for line, _ in violations(ast.parse(code), methods)) == [1, 2, 3]


PRODUCT = ("orchestrator", "instance", "migration", "rpc")


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_product_code_never_imports_the_benchmarks_or_the_tests():
    """An installed `tidal` has no `benchmarks/` or `tests/`: what `tidal serve` and `tidal bench` run must not
    need them."""
    bad = []
    for d in PRODUCT:
        for path in (ROOT / d).rglob("*.py"):
            for name in imported_modules(ast.parse(path.read_text())):
                if name.split(".")[0] in ("benchmarks", "tests"):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []
