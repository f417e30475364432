"""No test asserts how long something took (docs/development.md, "Tests"): the machines that run the suite are shared
and noisy, so a bound on measured wall time flakes. Checked over the AST of every test file: an ``assert`` may not
compare a clock's difference (``time.monotonic() - t0``, or a name or attribute that holds one, such as ``took``)
with anything. A deadline loop's ``assert time.monotonic() < deadline`` (a hang guard) compares no difference and
is allowed; so is an order of two events (``a.ended_at >= b_done``)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"monotonic", "time", "perf_counter", "monotonic_ns", "perf_counter_ns", "time_ns"}
# names that hold a duration wherever the suite used them; compared with a number they are a timed assertion
DURATION_NAMES = {"took", "elapsed", "dt", "detect", "detected", "recover", "noticed", "gone", "settled", "seconds",
                  "waited", "duration"}
# names that hold a moment (a clock read when something happened): one less another is a duration
TIME_POINTS = {"t0", "started", "cut", "crashed", "warned", "ended", "shortened", "flapped", "healed", "interrupted",
               "asked", "opened", "time", "start", "end"}


def _is_clock(node: ast.AST) -> bool:
    """``time.monotonic()`` and the like (``time.time()`` included)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCKS
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time")


def _clock_difference(node: ast.AST) -> bool:
    """A clock less an earlier reading (or the reverse): a duration. A clock less a constant is a time point."""
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub)
               and (_is_clock(n.left) and not _number(n.right) or _is_clock(n.right) and not _number(n.left))
               for n in ast.walk(node))


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            return node.slice.value
        return _name(node.value)  # took[rank]: the dict of durations
    return None


def _moment(node: ast.AST) -> bool:
    name = _name(node)
    return name is not None and (name in TIME_POINTS or name.endswith("_at"))


def _moments_apart(node: ast.AST) -> bool:
    """``ended - warned``, ``r2.opened - cut``: one moment less another."""
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and _moment(node.left) and _moment(node.right)


def _number(node: ast.AST) -> bool:
    """A constant or arithmetic on constants and UPPER_CASE names (``TTL + 3``, ``TIMEOUT / 2``)."""
    return all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Load))
               or isinstance(n, ast.Name) and n.id.isupper() for n in ast.walk(node)) and \
        any(isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) or isinstance(n, ast.Name)
            for n in ast.walk(node))


def timed_asserts(source: str) -> list[int]:
    """The lines of ``source`` whose ``assert`` bounds a measured time."""
    tree = ast.parse(source)
    timed: set[str] = set()  # names assigned a clock's difference anywhere in the file
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None \
                and _clock_difference(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            timed.update(n for t in targets for n in [_name(t)] if n)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)
                    and any(isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in n.ops)):
            sides = [cmp.left, *cmp.comparators]
            mentions_timed = any(_name(n) in timed for s in sides for n in ast.walk(s))
            if any(_clock_difference(s) for s in sides) or mentions_timed and any(_number(s) for s in sides) \
                    or any(_name(s) in timed for s in sides) \
                    or any(_name(s) in DURATION_NAMES or _moments_apart(s) for s in sides) \
                    and any(_number(s) for s in sides):
                found.append(node.lineno)
                break
    return found


def test_no_test_asserts_a_measured_time():
    found = [f"{path.relative_to(TESTS.parent)}:{line}" for path in sorted(TESTS.rglob("*.py"))
             for line in timed_asserts(path.read_text())]
    assert not found, ("bounds on measured wall time (assert the order or the count of what happened instead; a "
                       f"wait's timeout is the hang guard): {found}")


def test_the_scan_finds_what_it_is_for():
    bad = [
        "t0 = time.monotonic()\nf()\nassert time.monotonic() - t0 < 4\n",
        "t0 = time.time()\nf()\nassert 0.4 < time.time() - t0 < 4.0\n",
        "t0 = time.monotonic()\nf()\ntook = time.monotonic() - t0\nassert took >= 1.0, 'why'\n",
        "x = time.monotonic()\nelapsed = time.monotonic() - x\nassert elapsed < 3\n",
        "got = run()\nassert got.nodes[0].seconds < 15\n",
        "d = report()\nassert detect < TTL + 3 and ok\n",
        "out = {}\nout['took'] = time.monotonic() - t0\nassert out['took'] < 20, out\n",
        "took = {}\ntook[rank] = time.monotonic() - t0\nassert max(took.values()) < 20, took\n",
        "assert r2.opened - cut < NOTICE_S, r2\n",
        "assert result['time'] - warned < WITHIN_S\n",
        "assert ended - warned < WITHIN_S + 5\n",
    ]
    good = [
        "deadline = time.monotonic() + 10\nassert time.monotonic() < deadline, 'hang guard'\n",
        "assert fast.ended_at >= node1_done\n",
        "assert kv.value == b'1' and rev > 3\n",
        "started = time.monotonic()\nprint(time.monotonic() - started)\nassert done\n",
        "started = time.time() - 3600\nassert history['time'] == started\n",
        "assert fenced_at < r2.opened - cut\n",
        "assert warned <= result['time']\n",
        "assert rev - 1 > 3\n",
    ]
    assert [bool(timed_asserts(s)) for s in bad] == [True] * len(bad)
    assert [bool(timed_asserts(s)) for s in good] == [False] * len(good)
