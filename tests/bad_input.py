"""Harness for the bad-input corpus (tests/test_bad_input_*.py).

Every case feeds one malformed or hostile input to the CLI or the Python API and checks the
contract of `flamingo.errors.UserError`:

- the CLI exits with code 2 and prints one line `flamingo <command>: error: ...` (argparse's own
  errors add a usage line before it), the API raises the expected exception type;
- the message names the offending field, option or file (`expect`: substrings / regexes);
- no traceback, and the message stays short (values are never echoed unbounded);
- no file is changed, created or deleted under the watched folders, except under `allowed` ones.

    from bad_input import run_cli, expect_user_error

    run_cli(["generate", "--prompt", "x", "--beams", "0"], expect="--beams", watch=[tmp_path])
    expect_user_error(lambda: FlamingoConfig.from_dict({"lm": 5}), expect="lm")

`run_cli` runs `flamingo.cli.main` in-process (fast); `run_cli_subprocess` runs the real console
entry point in a fresh interpreter, for what only a process shows (stdin bytes, exit status).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_MESSAGE_CHARS = 2000  # far above any honest message; an echoed value blows through it
ERROR_LINE = re.compile(r"^flamingo(?: [\w-]+)*: error: ")

Expect = str | re.Pattern | Sequence[str | re.Pattern]


# ------------------------------------------------------------------------------- snapshot
def snapshot(roots: Iterable[str | Path]) -> dict[str, tuple[int, str]]:
    """Path -> (size, sha1) of every file and symlink under `roots` (symlinks by their target text)."""
    state: dict[str, tuple[int, str]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            continue
        paths = [root] if not root.is_dir() or root.is_symlink() else [root, *root.rglob("*")]
        for path in paths:
            if path.is_symlink():
                state[str(path)] = (-1, os.readlink(path))
            elif path.is_file():
                state[str(path)] = (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
            elif path.is_dir():
                state[str(path) + os.sep] = (0, "dir")
    return state


def changes(before: dict, after: dict, allowed: Iterable[str | Path] = ()) -> list[str]:
    """What differs between two snapshots, outside the `allowed` folders/files."""
    allowed = [str(Path(a)) for a in allowed]

    def is_allowed(path: str) -> bool:
        path = path.rstrip(os.sep)
        return any(path == a or path.startswith(a + os.sep) for a in allowed)

    out = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) != after.get(path) and not is_allowed(path):
            what = "created" if path not in before else "deleted" if path not in after else "changed"
            out.append(f"{what}: {path}")
    return out


# ------------------------------------------------------------------------------- messages
def _patterns(expect: Expect) -> list[str | re.Pattern]:
    if isinstance(expect, (str, re.Pattern)):
        return [expect]
    return list(expect)


def check_message(message: str, expect: Expect) -> None:
    """The message mentions every expected piece, carries no traceback and is bounded."""
    patterns = _patterns(expect)
    assert patterns and all(p for p in patterns), "a case must say which field/option/file the message names"
    assert "Traceback" not in message, message
    assert len(message) <= MAX_MESSAGE_CHARS, f"message of {len(message)} chars: {message[:300]}..."
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            assert pattern.search(message), f"{pattern.pattern!r} not in: {message}"
        else:
            assert pattern in message, f"{pattern!r} not in: {message}"


def check_error_output(stderr: str, expect: Expect, one_line: bool = True) -> str:
    """stderr ends with `flamingo CMD: error: ...` naming what was expected; returns that line."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    error_lines = [line for line in lines if ERROR_LINE.match(line)]
    assert len(error_lines) == 1, f"expected one 'flamingo ...: error:' line, got:\n{stderr[-3000:]}"
    line = error_lines[0]
    assert lines[-1] == line, f"the error line is not the last line:\n{stderr[-3000:]}"
    if one_line and not stderr.lstrip().startswith("usage:"):
        # argparse errors print usage first; ours are exactly one line
        assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-3000:]}"
    check_message(line, expect)
    return line


# ------------------------------------------------------------------------------------- CLI
@dataclass
class CliResult:
    code: int
    out: str
    err: str
    line: str  # the error line


def _binary_stdin(data: bytes | str) -> io.TextIOWrapper:
    raw = data.encode() if isinstance(data, str) else data
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")


def run_cli(argv: Sequence[str], expect: Expect, *, watch: Iterable[str | Path] = (),
            allowed: Iterable[str | Path] = (), stdin: bytes | str | None = None, code: int = 2,
            one_line: bool = True, main: Callable[..., int] | None = None) -> CliResult:
    """Run `flamingo ARGV` in this process and check the bad-input contract.

    `watch`: folders (or files) that must not change; `allowed`: places under them that may
    (an output folder). `stdin`: bytes or text the command reads (chat). `main`: another entry
    point with the same signature (e.g. `python -m flamingo.training`'s)."""
    if main is None:
        from flamingo.cli import main
    watch = list(watch)
    before = snapshot(watch)
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = _binary_stdin(stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                got = main(list(argv))
            except SystemExit as exit_:  # argparse errors
                got = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.stdin = saved_stdin
    stderr = err.getvalue()
    assert got == code, f"exit code {got}, expected {code}; stderr:\n{stderr[-3000:]}"
    line = check_error_output(stderr, expect, one_line=one_line)
    diff = changes(before, snapshot(watch), allowed)
    assert not diff, "files changed outside the output folder: " + "; ".join(diff[:10])
    return CliResult(got, out.getvalue(), stderr, line)


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh interpreter that runs this checkout (its sources first on the
    path) with the hub offline, plus `extra`. A FutureWarning is an error there as in pytest's own
    process (pyproject's filterwarnings), so a deprecated API used only in a subprocess fails too."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "error::FutureWarning", **extra}


def run_cli_subprocess(argv: Sequence[str], expect: Expect, *, watch: Iterable[str | Path] = (),
                       allowed: Iterable[str | Path] = (), stdin: bytes | str | None = None, code: int = 2,
                       one_line: bool = True, cwd: str | Path | None = None, timeout: float = 300,
                       module: str = "flamingo.cli", env: dict[str, str] | None = None) -> CliResult:
    """Run `python -m MODULE ARGV` in a fresh interpreter (this checkout's sources first on the
    path, hub offline) and check the bad-input contract."""
    watch = list(watch)
    before = snapshot(watch)
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", module, *argv], input=raw if raw is not None else b"",
                          capture_output=True, cwd=cwd, env=checkout_env(PYTHONIOENCODING="utf-8", **(env or {})),
                          timeout=timeout)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}; stderr:\n{stderr[-3000:]}"
    line = check_error_output(stderr, expect, one_line=one_line)
    diff = changes(before, snapshot(watch), allowed)
    assert not diff, "files changed outside the output folder: " + "; ".join(diff[:10])
    return CliResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), stderr, line)


@contextlib.contextmanager
def serve_subprocess(argv: Sequence[str], *, module: str = "flamingo.cli", env: dict[str, str] | None = None,
                     startup_timeout_s: float = 600) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m MODULE serve ARGV --port P` in a fresh interpreter (`checkout_env` plus `env`) on a
    free loopback port: yields the process (stdout and stderr piped) and its URL once /health
    answers; the process is killed on the way out if it still runs. `startup_timeout_s` only
    bounds a hang (a loaded machine starts it many times slower than an idle one)."""
    import socket
    import time
    import urllib.request

    server = None
    try:
        for attempt in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = subprocess.Popen([sys.executable, "-m", module, "serve", *argv, "--port", str(port)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=checkout_env(OMP_NUM_THREADS="1", **(env or {})))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout_s
            while server.poll() is None:
                assert time.monotonic() < deadline, "flamingo serve did not answer /health"
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as response:
                        assert response.status == 200
                        break
                except OSError:
                    time.sleep(0.3)
            if server.poll() is None:
                break
            # Exit 3: it could not listen. The port was free when probed, but another process (a
            # client's outgoing connection, another test's server) may take it before the server
            # binds it: try another one.
            assert server.returncode == 3 and attempt < 2, server.stderr.read().decode()[-3000:]
        yield server, url
    finally:
        if server is not None:
            server.kill()


# ------------------------------------------------------------------------------------- API
def expect_user_error(call: Callable[[], Any], expect: Expect, *, exc: type[BaseException] | None = None,
                      watch: Iterable[str | Path] = (), allowed: Iterable[str | Path] = ()) -> BaseException:
    """`call()` raises `exc` (default `flamingo.errors.UserError`) whose message names what `expect`
    says, is bounded, and leaves the watched files alone. Returns the exception."""
    if exc is None:
        from flamingo.errors import UserError as exc
    watch = list(watch)
    before = snapshot(watch)
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - checked just below
        if not isinstance(err, exc):
            raise AssertionError(f"expected {exc.__name__}, got {type(err).__name__}: {str(err)[:500]}") from err
        caught = err
    else:
        raise AssertionError(f"expected {exc.__name__}, nothing was raised")
    check_message(str(caught), expect)
    diff = changes(before, snapshot(watch), allowed)
    assert not diff, "files changed outside the output folder: " + "; ".join(diff[:10])
    return caught
