"""README.md and docs/*.md, checked against the code they describe.

- Every fenced shell block (```bash, ```sh, ```console) is read as commands: in a console block the lines that start
  with ``$ `` (with their ``\\`` continuations), each followed by the output it shows; in bash and sh blocks every
  line that is not a comment. Every flag an ``etcd-agent`` command names must exist in that command's parser (a
  launch and ``doctor``: ``flags.build_parser``; ``status``, ``stop``, ``events``: ``flags.subcommand_parser``),
  except a flag the block's own output calls an unrecognized argument, which must not exist.
- Every block runs, unless an HTML comment just before it says ``<!-- not run: why -->``. Each command runs with
  bash in the repository root against a private etcd that stands for the docs' ``127.0.0.1:2379`` (the address is
  replaced by its endpoint; etcdctl finds it through ``ETCDCTL_ENDPOINTS``) and holds one finished job of run
  ``demo3``. It must exit 0, or N where ``<!-- exit N -->`` precedes the block; in a console block each output line
  shown must appear in the command's output, in order (``...`` matches anything). ``.venv/bin/`` is the running
  interpreter's directory. ``bash tools/setup.sh && `` before a command is not run again: the tests run in the
  environment it made, and it would reinstall the package under their feet (CI runs it first).
- The README opens with the demo and the test command, and its test command is the one .ci/run runs.
- docs/flags.md is exactly what tools/gen_flags_doc.py writes.
- Every relative link resolves to a file, and every ``#anchor`` to a heading of the page it names.
- The import table in docs/how-it-works.md is tests/test_layers.py's table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from etcd_agent.cli import flags
from etcd_agent.etcd import server as standalone

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "console")
DOCS_ETCD = "127.0.0.1:2379"  # the etcd the docs' runnable commands name
BIN = Path(sys.executable).parent
DEMO = ("bash tools/setup.sh && .venv/bin/etcd-agent --nproc-per-node 2 --max-restarts 1 --tee 3 "
        "tools/demo/train.py --crash-once")
TESTS = ".venv/bin/python -m pytest -q"
SETUP = "bash tools/setup.sh && "
SUBCOMMANDS = ("status", "stop", "events", "exporter", "quarantine")
OPERATORS = {";", "&&", "||", "|", "&", "(", ")", "do", "then", "time", "exec"}


@dataclass
class Command:
    text: str
    output: list[str] = field(default_factory=list)  # console blocks: the lines shown under the command


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: list[str]
    not_run: str | None = None
    exit_code: int = 0

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[Command]:
        out: list[Command] = []
        lines = iter(self.body)
        for line in lines:
            if self.lang == "console":
                if not line.startswith("$ "):
                    if out and line.strip():
                        out[-1].output.append(line)
                    continue
                line = line[2:]
            elif not line.strip() or line.lstrip().startswith("#"):
                continue
            while line.endswith("\\"):
                line = line[:-1] + " " + next(lines).strip()
            out.append(Command(line.strip()))
        return out


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of the page, with the HTML comments right before it read as its directives."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.fullmatch(r"```\s*([\w-]*)\s*", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if re.fullmatch(r"```\s*", lines[j]))
        block = Block(page, i + 1, opening.group(1), lines[i + 1:end])
        k = i - 1
        while k >= 0 and (not lines[k].strip() or lines[k].lstrip().startswith("<!--")):
            directive = re.fullmatch(r"\s*<!--\s*(not run:\s*(?P<why>.+?)|exit (?P<code>\d+))\s*-->\s*", lines[k])
            if directive and directive.group("why"):
                block.not_run = directive.group("why")
            elif directive:
                block.exit_code = int(directive.group("code"))
            k -= 1
        blocks.append(block)
        i = end + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.lang in SHELLS]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "ETCD_AGENT_", "ETCDCTL_"))}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_clean_env())  # PET_* variables change the parser's defaults, never its flags
    try:
        launch = flags.build_parser("")
        return {"": launch, "doctor": launch, **{name: flags.subcommand_parser(name) for name in SUBCOMMANDS}}
    finally:
        os.environ.clear()
        os.environ.update(saved)


PARSERS = _parsers()


def agent_invocations(command: str) -> list[tuple[str, list[str]]]:
    """``(subcommand or "", its arguments)`` for each ``etcd-agent`` the command line runs."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens):
        before = tokens[i - 1] if i else None
        at_start = before is None or before in OPERATORS or re.fullmatch(r"[A-Za-z_]\w*=.*", before)
        if os.path.basename(token) != "etcd-agent" or not at_start:
            continue
        args = []
        for arg in tokens[i + 1:]:
            if arg in OPERATORS:
                break
            args.append(arg)
        sub = args[0] if args and args[0] in PARSERS and args[0] else ""
        found.append((sub, args[1:] if sub else args))
    return found


def named_flags(sub: str, args: list[str]) -> list[str]:
    """The flags given before the training script (whose own arguments are never the agent's)."""
    parser, named, skip = PARSERS[sub], [], False
    by_name = {s: a for a in parser._actions for s in a.option_strings}  # noqa: SLF001 - no public list
    for arg in args:
        if skip:
            skip = False
            continue
        if not arg.startswith("-") or arg == "-":
            break  # the training script (a launch, doctor): the rest is the script's
        name = arg.split("=", 1)[0]
        named.append(name)
        action = by_name.get(name)
        skip = action is not None and action.nargs != 0 and "=" not in arg
    return named


def test_the_docs_have_shell_blocks_to_check():
    blocks = shell_blocks()
    assert len(blocks) > 20
    assert sum(1 for b in blocks if b.not_run is None) >= 8
    assert all(agent_invocations(c.text) for b in blocks for c in b.commands() if "etcd-agent doctor" in c.text)


@pytest.mark.parametrize("block", shell_blocks(), ids=lambda b: b.name)
def test_every_flag_named_exists(block):
    unknown = []
    for command in block.commands():
        typos = {m.group(1) for line in command.output for m in re.finditer(r"unrecognized argument (\S+?);", line)}
        for sub, args in agent_invocations(command.text):
            known = {s for a in PARSERS[sub]._actions for s in a.option_strings}  # noqa: SLF001
            for name in named_flags(sub, args):
                if name in typos:
                    assert name not in known, f"{block.name}: {name} is shown as unknown but the parser has it"
                elif name not in known:
                    unknown.append(f"etcd-agent {sub} {name}".replace("  ", " "))
    assert not unknown, f"{block.name}: flags the parser does not have: {', '.join(unknown)}"


@pytest.fixture(scope="module")
def docs_etcd(tmp_path_factory):
    """The docs' etcd: a private one holding one finished job of run demo3 (a worker that exits 0 at once)."""
    server = standalone.EtcdServer(name="etcd-docs").start()
    try:
        seed = subprocess.run([str(BIN / "etcd-agent"), "--etcd-endpoints", server.endpoint, "--run-id", "demo3",
                               "--nnodes", "1", "--log-dir", str(tmp_path_factory.mktemp("seed")), "--no-python",
                               "true"], env=_clean_env(), capture_output=True, text=True, timeout=60)
        assert seed.returncode == 0, seed.stderr
        yield server.endpoint
    finally:
        server.stop()


def _pattern(shown: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in shown.strip().split("...")))


def _assert_output(block: Block, command: Command, got: str) -> None:
    lines = got.splitlines()
    at = 0
    for shown in command.output:
        if shown.strip() == "...":
            continue
        pattern = _pattern(shown)
        while at < len(lines) and not pattern.fullmatch(lines[at].strip()):
            at += 1
        assert at < len(lines), (
            f"{block.name}: `{command.text}` did not print (in order):\n{shown}\n--- it printed:\n{got}")
        at += 1


def _runs_workers(block: Block) -> bool:
    """A launch the block expects to succeed runs a training script: the docs' scripts import torch."""
    return block.exit_code == 0 and any(sub == "" and "--help" not in args and "--version" not in args
                                        for c in block.commands() for sub, args in agent_invocations(c.text))


def _runnable():
    for block in shell_blocks():
        if block.not_run is None:
            marks = [pytest.mark.torch] if _runs_workers(block) else []
            yield pytest.param(block, id=block.name, marks=marks)


@pytest.mark.parametrize("block", list(_runnable()))
def test_runnable_blocks_run_as_the_docs_say(block, docs_etcd, tmp_path):
    env = _clean_env() | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ETCDCTL_API": "3",
                          "ETCDCTL_ENDPOINTS": docs_etcd, "TMPDIR": str(tmp_path)}
    for command in block.commands():
        text = command.text
        if text.startswith(SETUP):
            assert (ROOT / "tools" / "setup.sh").is_file() and (BIN / "etcd-agent").exists()
            text = text[len(SETUP):]
        text = text.replace(".venv/bin/", f"{BIN}/").replace(DOCS_ETCD, docs_etcd)
        done = subprocess.run(["bash", "-c", text], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=100)
        got = done.stdout + done.stderr
        assert done.returncode == block.exit_code, (
            f"{block.name}: `{command.text}` exited {done.returncode}, the docs say {block.exit_code}:\n{got[-3000:]}")
        _assert_output(block, command, got)


def test_the_readme_opens_with_the_demo_and_the_test_command_ci_runs():
    first, second = [b for b in fenced_blocks(ROOT / "README.md")][:2]
    assert [c.text for c in first.commands()] == [DEMO] and first.not_run is None
    assert [c.text for c in second.commands()] == [TESTS]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"{TESTS} " in ci or ci.rstrip().endswith(TESTS), ".ci/run no longer runs the README's test command"


def test_flags_page_is_generated_from_the_parser():
    spec = importlib.util.spec_from_file_location("gen_flags_doc", ROOT / "tools" / "gen_flags_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "flags.md").read_text() == gen.render(), (
        "docs/flags.md is stale: run .venv/bin/python tools/gen_flags_doc.py --write")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, every character but letters, digits, '_', '-' and ' ' dropped,
    spaces made '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return "".join(c for c in text if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.+)", line)):
            slug = _slug(m.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text, out, fence = page.read_text(), [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            out += re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked here
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_layer_table_is_test_layers_table():
    import test_layers

    text = (ROOT / "docs" / "how-it-works.md").read_text().split("## Module layout", 1)[1]
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]

    def name(cell: str) -> str:
        return {"agent.py": "agent"}.get(cell.strip().strip("`").rstrip("/"), cell.strip().strip("`").rstrip("/"))

    table = {name(layer): set() if below.strip() == "nothing" else {name(c) for c in below.split(",")}
             for layer, below in rows}
    assert table == test_layers.LAYERS_BELOW
