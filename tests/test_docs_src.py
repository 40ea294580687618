"""docs_src/: every example a page shows runs as written, and answers what the page says.

Each directory of docs_src/ is one example: the files a user copies, and `output.txt`,
the `curl -i` exchange its page shows. docs/frameworks/<example>.md includes them
(`--8<-- "docs_src/..."`) and gives the commands, each a one-line `sh` block: `pip install
...`, the server (`uvicorn ...`) and one or more workers (`asgi-worker worker ...`,
`arq ...`). The test takes those commands from the page, so page and test cannot drift:
it runs the server (with `--port` added: a free port) and each worker in the example's
directory, makes the exchanges of `output.txt` (a `202` first; where the file shows a
`200`, it asks again until the worker stored it) and compares, as curl shows it, what it
got with the file. The headers of `LEFT_OUT` change from run to run, so neither the file
nor the comparison has them, and every page that shows an output says so.

An example's `Config` is written in its file with a prefix of its own
(`prefix="example-fastapi"`): the file runs exactly as a user copies it, so the test
uses that prefix, deletes its keys before and after, and holds a Redis lock on it so
that two test runs on one Redis take turns.

The rest is static: every docs_src file is included by a page; every Python block in the
docs is an include, a tested example or a fragment (`test_every_python_block_...`); the
README's blocks are the files byte for byte (GitHub cannot include files); a page that
includes an example gives only commands its framework page gives (and so the test runs).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis

from .processes import Processes, asgi_worker_command, free_port, processes

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOCS_SRC = ROOT / "docs_src"
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

EXAMPLES = sorted(
    path.name for path in DOCS_SRC.iterdir() if path.is_dir() and path.name[0] not in "._"
)
OUTPUT = "output.txt"
LEFT_OUT = ("date", "server", "age")
"""Response headers that change from run to run: left out of the outputs shown."""
PORT = "127.0.0.1:8000"  # where the pages' commands serve (uvicorn's default)
SERVERS = ("uvicorn ",)
WORKERS = ("asgi-worker worker ", "arq ")
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
INCLUDE = re.compile(r'^--8<-- "(docs_src/[^"]+)"$')
COPY_MARK = r"<!-- (docs_src/[^\s,]+)[ ,][^\n]*-->\n"  # a README block that is a copy
COPY = re.compile(COPY_MARK + r"```\w*\n(.*?)^```$", re.M | re.S)
TESTED = re.compile(r"<!-- docs-example: (\S+) -->\n$")
FRAGMENT = "<!-- fragment -->\n"


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def page_of(example: str) -> Path:
    return DOCS / "frameworks" / f"{example}.md"


@dataclass(frozen=True)
class Block:
    """A fenced block of a page."""

    info: str  # what follows the opening fence: `python title="app.py"`
    body: str
    before: str  # the page's text before the block

    @property
    def language(self) -> str:
        return self.info.partition(" ")[0]


def blocks(text: str) -> list[Block]:
    return [
        Block(match["info"], match["body"], text[: match.start()]) for match in FENCE.finditer(text)
    ]


def included(text: str) -> list[str]:
    """The docs_src paths a page includes."""
    return [
        found[1]
        for block in blocks(text)
        for line in block.body.splitlines()
        if (found := INCLUDE.match(line))
    ]


@dataclass(frozen=True)
class Commands:
    """The one-line commands a page gives."""

    install: tuple[str, ...]
    servers: tuple[str, ...]
    workers: tuple[str, ...]


def commands(text: str) -> Commands:
    lines = [
        block.body.strip()
        for block in blocks(text)
        if block.language == "sh" and block.body.count("\n") == 1
    ]
    return Commands(
        install=tuple(line for line in lines if line.startswith("pip install ")),
        servers=tuple(line for line in lines if line.startswith(SERVERS)),
        workers=tuple(line for line in lines if line.startswith(WORKERS)),
    )


@dataclass(frozen=True)
class Exchange:
    """A `$ curl -i URL` of an output file, and the response it shows."""

    command: str
    response: str

    @property
    def path(self) -> str:
        url = shlex.split(self.command)[-1]
        assert url.startswith(f"http://{PORT}/"), url
        return url.removeprefix(f"http://{PORT}")

    @property
    def status(self) -> int:
        return int(self.response.split(" ")[1])


def exchanges(text: str) -> list[Exchange]:
    found = []
    for part in re.split(r"^(?=\$ )", text, flags=re.M):
        if part:
            command, _, response = part.partition("\n")
            assert command.startswith("$ curl -i "), command
            found.append(Exchange(command.removeprefix("$ "), response.rstrip("\n")))
    return found


def shown(response: httpx.Response) -> str:
    """`response` as `curl -i` shows it, without the headers of `LEFT_OUT`."""
    lines = [f"{response.http_version} {response.status_code} {response.reason_phrase}"]
    for name, value in response.headers.raw:
        if name.decode().lower() not in LEFT_OUT:
            lines.append(f"{name.decode()}: {value.decode()}")
    return "\n".join(lines) + "\n\n" + response.text


def session(parts: list[tuple[str, str]]) -> str:
    """An output file's text: each `$ command`, then its response."""
    return (
        "\n\n".join(f"$ {command}\n{response}".rstrip("\n") for command, response in parts) + "\n"
    )


def config_of(directory: Path) -> tuple[str, str]:
    """The Redis URL and prefix of the one `Config(...)` in the example's files."""
    found = [
        (match[1], match[2])
        for path in sorted(directory.rglob("*.py"))
        for match in re.finditer(r'Config\(redis_url="([^"]+)", prefix="([^"]+)"', path.read_text())
    ]
    assert len(found) == 1, f"{directory}: one Config(redis_url=..., prefix=...), not {found}"
    return found[0]


def argv(command: str) -> list[str]:
    """`command` as the user's shell runs it, in the environment of this test run."""
    program, *arguments = shlex.split(command)
    if program == "asgi-worker":
        return asgi_worker_command(*arguments)
    found = BIN / program if (BIN / program).exists() else shutil.which(program)
    assert found, f"{program} is not installed"
    return [str(found), *arguments]


def accepting(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@contextmanager
def own_keys(redis_url: str, prefix: str) -> Iterator[None]:
    """The example's prefix for this test alone (a Redis lock), its keys deleted around it.

    Deleted before too: an interrupted run's stored response would be a hit.
    """
    redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        with redis.lock(f"docs-src-lock:{prefix}", timeout=120, blocking_timeout=60):
            delete_keys(redis, prefix)
            try:
                yield
            finally:
                delete_keys(redis, prefix)
    finally:
        redis.close()


def delete_keys(redis: Redis, prefix: str) -> None:
    # The example's keys start with its prefix; arq's job keys hold it in the job id.
    for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
        for key in redis.scan_iter(match=pattern, count=1000):
            redis.delete(key)


def stored(group: Processes, http: httpx.Client, path: str) -> httpx.Response:
    """GET `path` until the answer is not a 202 (the worker stored it), and that answer."""
    answers: list[httpx.Response] = []

    def ready() -> bool:
        answers.append(http.get(path))
        return answers[-1].status_code != 202

    group.wait_for(f"the stored response of {path}", ready)
    return answers[-1]


def run(example: str, worker: str, directory: Path) -> tuple[str, str]:
    """Serve `example` and run `worker` as its page says; the file's and the real session."""
    source = DOCS_SRC / example
    page = commands(page_of(example).read_text())
    (server,) = page.servers
    expected = (source / OUTPUT).read_text()
    redis_url, prefix = config_of(source)
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ASGI_") and name != "DJANGO_SETTINGS_MODULE"
    }
    # No __pycache__ left in docs_src/.
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    got: list[tuple[str, str]] = []
    with (
        own_keys(redis_url, prefix),
        processes(directory, env) as group,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        group.start("server", [*argv(server), "--port", str(port)], cwd=source)
        group.start("worker", argv(worker), cwd=source)
        group.wait_for("server", lambda: accepting(port))
        for exchange in exchanges(expected):
            if exchange.status == 202:
                response = http.get(exchange.path)
            else:  # what the file shows once the worker stored it
                response = stored(group, http, exchange.path)
            got.append((exchange.command, shown(response)))
    return expected, session(got)


CASES = [
    (example, worker)
    for example in EXAMPLES
    if page_of(example).is_file()  # else the page test below fails
    for worker in commands(page_of(example).read_text()).workers
]


@pytest.mark.e2e
@pytest.mark.parametrize(("example", "worker"), CASES)
def test_the_example_answers_what_its_page_shows(example: str, worker: str, tmp_path: Path) -> None:
    expected, got = run(example, worker, tmp_path)
    assert got == expected


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_page_gives_the_install_the_server_and_a_worker(example: str) -> None:
    page = page_of(example)
    assert page.is_file(), f"docs_src/{example} has no page {page.relative_to(ROOT)}"
    text = page.read_text()
    given = commands(text)
    assert len(given.install) == 1, given
    assert len(given.servers) == 1, given
    assert given.workers, given
    assert f"docs_src/{example}/{OUTPUT}" in included(text)
    # What the example imports, and the server, is what the install command installs.
    installed = {distribution(name.split("[")[0]) for name in shlex.split(given.install[0])[2:]}
    distributions = importlib.metadata.packages_distributions()
    # (an editable install, as this project's own, is not in the map: its module's name)
    needed = {given.servers[0].split(" ")[0]} | {
        distributions.get(module, [module])[0] for module in imported(DOCS_SRC / example)
    }
    missing = {distribution(name) for name in needed} - installed
    assert not missing, f"{page.name}: `{given.install[0]}` misses {missing}"


def distribution(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported(source: Path) -> set[str]:
    """The top-level modules an example imports, except the standard library and its own."""
    own = {path.stem for path in source.iterdir()}
    found = set()
    for path in source.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.partition(".")[0])
    return found - own - set(sys.stdlib_module_names)


def test_every_docs_src_file_is_included_by_a_page() -> None:
    texts = {page: page.read_text() for page in pages()}
    shown_paths = {path for text in texts.values() for path in included(text)}
    for path in sorted(DOCS_SRC.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        inner_parts = path.relative_to(DOCS_SRC).parts
        if path.is_dir() or any(part.startswith((".", "__pycache__")) for part in inner_parts):
            continue  # caches of Python and its tools
        if path.parent == DOCS_SRC:
            continue  # docs_src/ruff.toml: how the examples are linted, not an example
        if path.stat().st_size == 0:  # an empty __init__.py: named by a page, not shown
            example = DOCS_SRC / path.relative_to(DOCS_SRC).parts[0]
            inner = path.relative_to(example).as_posix()
            assert any(f"`{inner}`" in text for text in texts.values()), relative
        else:
            assert relative in shown_paths, f"no page includes {relative}"


def test_every_python_block_is_an_include_a_tested_example_or_a_fragment() -> None:
    """The rule for Python blocks in docs/: what a user copies is a file that runs.

    A block is one of: an include of docs_src files (and its title, if any, is the file's
    name in the example); a tested example (`<!-- docs-example: name -->` before it, and a
    test that runs `docs_example(page, name)`); a block marked `<!-- fragment -->`; or a
    fragment by nature: lines to put in your own code, with no import (so not a file).
    """
    tests = "\n".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    problems = []
    for page in pages():
        name = page.relative_to(DOCS).as_posix()
        for block in blocks(page.read_text()):
            if block.language not in ("python", "py"):
                continue
            body, before = block.body, block.before
            lines = body.splitlines()
            if all(INCLUDE.match(line) for line in lines):
                title = re.search(r'title="([^"]+)"', block.info)
                for line in lines:
                    path = INCLUDE.match(line)[1]  # type: ignore[index]
                    if not (ROOT / path).is_file():
                        problems.append(f"{name}: includes {path}, which does not exist")
                    # docs_src/<example>/<path in the example>: the file's name for a user
                    if len(lines) == 1 and title and title[1] != path.split("/", 2)[2]:
                        problems.append(f"{name}: {path} titled {title[1]!r}")
                continue
            if tested := TESTED.search(before):
                if f'docs_example("{name}", "{tested[1]}")' not in tests:
                    problems.append(f"{name}: docs-example {tested[1]} is run by no test")
                continue
            if before.endswith(FRAGMENT):
                continue
            if re.search(r"^(import|from) \S+", body, re.M):
                problems.append(f"{name}: a block with imports is not an include:\n{body}")
    assert not problems, "\n".join(problems)


def test_the_readmes_blocks_are_the_docs_src_files() -> None:
    """GitHub shows the README without includes: its copies must be the files, byte for byte."""
    text = README.read_text()
    copies = COPY.findall(text)
    assert {path for path, _ in copies} >= {
        "docs_src/fastapi/app.py",
        "docs_src/fastapi/worker.py",
        f"docs_src/fastapi/{OUTPUT}",
    }
    for path, body in copies:
        assert body == (ROOT / path).read_text(), f"README's copy of {path} is not the file"
    python = [block for block in blocks(text) if block.language == "python"]
    assert len(python) == sum(path.endswith(".py") for path, _ in copies)
    for block in python:
        copy = re.search(COPY_MARK + "$", block.before)
        assert copy, f"a Python block of the README is not a copy:\n{block.body}"
        # labelled with its file name, in the line above the block
        label = block.before.removesuffix(copy[0]).rstrip("\n").rsplit("\n", 1)[-1]
        assert f"`{copy[1].split('/', 2)[2]}`" in label, label


def test_pages_that_show_an_example_give_only_the_tested_commands() -> None:
    """Getting started and the README give FastAPI's commands: the ones its test runs."""
    for path in [README, *pages()]:
        text = path.read_text()
        shown_examples = {
            found.split("/")[1] for found in included(text) + [p for p, _ in COPY.findall(text)]
        }
        given = commands(text)
        for example in sorted(shown_examples):
            tested = commands(page_of(example).read_text())
            runs = {*tested.install, *tested.servers, *tested.workers}
            for command in (*given.install, *given.servers, *given.workers):
                assert command in runs, f"{path.name}: {command!r} is not on {example}'s page"
            if f"docs_src/{example}/{OUTPUT}" in text:
                for name in LEFT_OUT:
                    assert f"`{name}`" in text, f"{path.name} does not say it leaves out {name}"
