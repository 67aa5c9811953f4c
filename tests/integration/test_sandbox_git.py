"""The developer's sandbox on a real directory (escapes refused, tools working, commands killed on
timeout) and the git operations on a real repository (mirrors, worktrees, diff/apply, commits,
pushes) and validate_patch end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from casperd.agents import gitwork
from casperd.agents.sandbox import Sandbox
from casperd.agents.tools import execute
from casperd.agents.validation import PatchLimits, validate_patch
from casperd.errors import GitError, PatchConflictError, SandboxError, TaskError, TaskTimeoutError

pytestmark = pytest.mark.integration

GIT_ENV = {
    "GIT_AUTHOR_NAME": "T",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "T",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def sh_git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(repo)}
    return subprocess.run(
        ["git", "-c", "init.defaultBranch=main", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    root = tmp_path / "wt"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("def main():\n    return 1\n\n\ndef other():\n    return 1\n")
    (root / "README.md").write_text("# demo\n")
    (root / ".git").write_text("gitdir: /somewhere/else\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("TOP SECRET\n")
    return Sandbox(root, command_timeout_s=5, output_cap=1000)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    sh_git(r, "init", "-q")
    (r / "pkg").mkdir()
    (r / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (r / "README.md").write_text("hello\n")
    sh_git(r, "add", "-A")
    sh_git(r, "commit", "-q", "-m", "initial")
    return r


# --- sandbox: escapes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "../outside/secret.txt", ".git", ".git/config", "src/../.git/config"]
)
async def test_escapes_refused(box: Sandbox, path: str) -> None:
    with pytest.raises(SandboxError):
        box.resolve(path)
    for name, args in (
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "x"}),
        ("list_files", {"path": path}),
        ("replace_in_file", {"path": path, "old": "a", "new": "b"}),
    ):
        text, is_error = await execute(box, name, args)
        assert is_error, (name, path, text)
        assert "hint:" in text
    assert (box.root.parent / "outside" / "secret.txt").read_text() == "TOP SECRET\n"
    assert (box.root / ".git").read_text() == "gitdir: /somewhere/else\n"


async def test_symlink_to_outside_file_refused_for_read_and_write(box: Sandbox) -> None:
    (box.root / "passwd").symlink_to("/etc/passwd")
    (box.root / "leak").symlink_to(box.root.parent / "outside" / "secret.txt")
    text, is_error = await execute(box, "read_file", {"path": "passwd"})
    assert is_error and "outside the worktree" in text and "root:" not in text
    text, is_error = await execute(box, "read_file", {"path": "leak"})
    assert is_error and "TOP SECRET" not in text
    text, is_error = await execute(box, "write_file", {"path": "leak", "content": "pwned"})
    assert is_error
    assert (box.root.parent / "outside" / "secret.txt").read_text() == "TOP SECRET\n"
    # a dangling link to outside: writing would create the file outside
    (box.root / "dangling").symlink_to(box.root.parent / "outside" / "new.txt")
    text, is_error = await execute(box, "write_file", {"path": "dangling", "content": "x"})
    assert is_error and not (box.root.parent / "outside" / "new.txt").exists()
    text, is_error = await execute(box, "search", {"pattern": "SECRET"})
    assert not is_error and "TOP SECRET" not in text


async def test_symlinked_directory_to_outside_refused(box: Sandbox) -> None:
    (box.root / "etc").symlink_to("/etc")
    (box.root / "out").symlink_to(box.root.parent / "outside")
    for args in ({"path": "etc/passwd"}, {"path": "out/secret.txt"}):
        text, is_error = await execute(box, "read_file", args)
        assert is_error and "outside the worktree" in text
    text, is_error = await execute(box, "write_file", {"path": "out/sub/new.txt", "content": "x"})
    assert is_error and not (box.root.parent / "outside" / "sub").exists()
    text, is_error = await execute(box, "list_files", {"path": "out"})
    assert is_error
    text, is_error = await execute(box, "search", {"pattern": "SECRET", "path": "out"})
    assert is_error
    # listing the root does not descend into the linked directory
    text, is_error = await execute(box, "list_files", {})
    assert not is_error and "secret.txt" not in text


async def test_symlink_into_git_refused(box: Sandbox) -> None:
    (box.root / "g").symlink_to(box.root / ".git")
    text, is_error = await execute(box, "read_file", {"path": "g"})
    assert is_error and ".git" in text


async def test_symlink_inside_root_is_fine(box: Sandbox) -> None:
    (box.root / "alias.py").symlink_to(box.root / "src" / "app.py")
    text, is_error = await execute(box, "read_file", {"path": "alias.py"})
    assert not is_error and "def main" in text


# --- sandbox: happy paths ------------------------------------------------------------------------
async def test_read_write_replace_list_search(box: Sandbox) -> None:
    text, is_error = await execute(box, "write_file", {"path": "pkg/deep/new.py", "content": "x = 1\ny = 2\n"})
    assert not is_error and "pkg/deep/new.py" in text
    assert (box.root / "pkg" / "deep" / "new.py").read_text() == "x = 1\ny = 2\n"
    assert await box.read_file("pkg/deep/new.py") == "x = 1\ny = 2\n"
    ranged = await box.read_file("src/app.py", start_line=2, end_line=2)
    assert ranged.endswith("    return 1\n") and "lines 2-2 of 6" in ranged and "def main" not in ranged
    text, is_error = await execute(
        box,
        "replace_in_file",
        {"path": "src/app.py", "old": "def main():\n    return 1", "new": "def main():\n    return 2"},
    )
    assert not is_error and "replaced 1 occurrence" in text
    assert (box.root / "src" / "app.py").read_text().startswith("def main():\n    return 2\n")
    listing = await box.list_files()
    assert listing.splitlines() == ["README.md", "pkg/deep/new.py", "src/app.py"]
    assert (await box.list_files(".", "*.py")).splitlines() == ["pkg/deep/new.py", "src/app.py"]
    found = await box.search(r"return \d")
    assert found.splitlines() == ["src/app.py:2:     return 2", "src/app.py:6:     return 1"]
    assert (await box.search("x = ", glob="*.py")) == "pkg/deep/new.py:1: x = 1"
    assert "no matches" in await box.search("nothing-here-at-all")


async def test_replace_ambiguity_and_absence(box: Sandbox) -> None:
    text, is_error = await execute(box, "replace_in_file", {"path": "src/app.py", "old": "return 1", "new": "return 3"})
    assert is_error and "2 times" in text and "replace_all" in text
    assert "return 3" not in (box.root / "src" / "app.py").read_text()
    text, is_error = await execute(
        box, "replace_in_file", {"path": "src/app.py", "old": "return 1", "new": "return 3", "replace_all": True}
    )
    assert not is_error and "2 occurrences" in text
    assert (box.root / "src" / "app.py").read_text().count("return 3") == 2
    text, is_error = await execute(box, "replace_in_file", {"path": "src/app.py", "old": "nope", "new": "x"})
    assert is_error and "not found" in text


async def test_read_caps_and_binary(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "big.txt").write_text("line\n" * 1000)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    box = Sandbox(root, max_read_bytes=100, max_write_bytes=50)
    text = await box.read_file("big.txt")
    assert "truncated" in text and len(text) < 300 and "start_line=21" in text
    assert "binary file (300 bytes)" in await box.read_file("blob.bin")
    text, is_error = await execute(box, "write_file", {"path": "x.txt", "content": "y" * 51})
    assert is_error and "limit" in text and not (root / "x.txt").exists()
    text, is_error = await execute(box, "search", {"pattern": "(unclosed"})
    assert is_error and "invalid regular expression" in text


async def test_list_cap(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(2100):
        (root / f"f{i:05d}.txt").write_text("")
    text = await Sandbox(root).list_files()
    lines = text.splitlines()
    assert len(lines) == 2001 and "stopped at 2000" in lines[-1]


# --- sandbox: commands ---------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _gone_soon(pid: int, within: float = 3.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _worktree_count(mirror: Path) -> int:
    out = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=mirror, capture_output=True, text=True)
    return out.stdout.count("worktree ")


# The pid file names the sleep itself: the shell exec'd into it, or a grandchild in the background.
@pytest.mark.parametrize("command", ["echo $$ > pid; exec sleep 30", "sh -c 'sleep 30 & echo $! > pid; wait'"])
async def test_command_timeout_kills_the_process_group(box: Sandbox, command: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match="timed out after 1s"):
        await box.run_command(command, timeout_s=1)
    assert time.monotonic() - t0 < 6
    pid = int((box.root / "pid").read_text())
    assert _gone_soon(pid)


async def test_command_background_child_is_killed_when_the_command_exits(box: Sandbox) -> None:
    t0 = time.monotonic()
    text = await box.run_command("sleep 30 & echo $! > bgpid; echo started")
    assert time.monotonic() - t0 < 4
    assert "started" in text and "[exit code 0]" in text
    pid = int((box.root / "bgpid").read_text())
    assert _gone_soon(pid)


async def test_command_timeout_is_capped_and_reported_as_error(box: Sandbox) -> None:
    t0 = time.monotonic()
    text, is_error = await execute(box, "run_command", {"command": "sleep 30", "timeout_s": 1000})
    assert is_error and "timed out after 5s" in text
    assert time.monotonic() - t0 < 10


async def test_command_cancel_kills_the_group(box: Sandbox) -> None:
    task = asyncio.create_task(box.run_command("sleep 30 & echo $! > pid; wait"))
    for _ in range(100):
        if (box.root / "pid").exists() and (box.root / "pid").read_text().strip():
            break
        await asyncio.sleep(0.05)
    pid = int((box.root / "pid").read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone_soon(pid)


async def test_command_output_cap_exit_code_cwd_env(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-should-never-be-seen")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-should-never-be-seen")
    monkeypatch.setenv("CASPER_STATE_DIR", "/nope")
    wide = Sandbox(box.root, output_cap=1_000_000)
    text = await wide.run_command("env; pwd; echo HOME=$HOME")
    await wide.aclose()
    assert "output truncated" not in text
    assert "ANTHROPIC_API_KEY" not in text and "should-never-be-seen" not in text and "CASPER_" not in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text and str(box.root) in text
    assert text.rsplit("HOME=", 1)[1].split("\n", 1)[0] != os.environ.get("HOME")
    home = (await box.run_command("echo $HOME")).split("\n", 1)[0]
    assert await asyncio.to_thread(os.path.isdir, home)
    assert not home.startswith(str(box.root)) and home != os.environ.get("HOME")
    assert home == (await box.run_command("echo $HOME")).split("\n", 1)[0]
    text = await box.run_command("seq 1 5000; echo ERR >&2; exit 3")
    assert "[exit code 3]" in text and "output truncated" in text and "ERR" in text and "5000" in text
    assert "\n1\n" not in text and len(text) < 1300
    text, is_error = await execute(box, "run_command", {"command": "false"})
    assert not is_error and "[exit code 1]" in text
    await box.aclose()
    assert not await asyncio.to_thread(os.path.exists, home)


async def test_execute_errors_are_results(box: Sandbox) -> None:
    for name, args in [
        ("read_file", {}),
        ("read_file", {"path": 3}),
        ("read_file", {"path": "nope.txt"}),
        ("read_file", {"path": "src"}),
        ("write_file", {"path": "a", "content": "x", "extra": 1}),
        ("run_command", {"command": ""}),
        ("run_command", {"command": "true", "timeout_s": "x"}),
        ("nonexistent_tool", {}),
        ("read_file", "not a dict"),
    ]:
        text, is_error = await execute(box, name, args)  # type: ignore[arg-type]
        assert is_error and text, (name, args)
    with pytest.raises(ValueError):
        await execute(box, "finish", {"summary": "done"})


async def test_sandbox_methods_raise_casper_errors(box: Sandbox) -> None:
    with pytest.raises(SandboxError):
        await box.write_file("../evil.txt", "x")
    with pytest.raises(TaskError):
        await box.replace_in_file("README.md", "zzz", "y")


# --- gitwork -------------------------------------------------------------------------------------
async def test_resolve_commit(repo: Path, tmp_path: Path) -> None:
    sha = await gitwork.resolve_commit(repo)
    assert sha == sh_git(repo, "rev-parse", "HEAD").strip() and len(sha) == 40
    with pytest.raises(GitError, match="not a commit"):
        await gitwork.resolve_commit(repo, "no-such-branch")
    (tmp_path / "plain").mkdir()
    with pytest.raises(GitError, match="not a git repository"):
        await gitwork.resolve_commit(tmp_path / "plain")
    with pytest.raises(GitError, match="does not exist"):
        await gitwork.resolve_commit(tmp_path / "missing")
    with pytest.raises(GitError):
        await gitwork.resolve_commit(repo, "--output=/tmp/x")


async def test_worktrees_diff_apply_commit_push(repo: Path, tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    base = await gitwork.resolve_commit(repo)
    repo_state = sh_git(repo, "for-each-ref"), sh_git(repo, "status", "--porcelain")
    wt1, wt2 = await asyncio.gather(
        gitwork.make_worktree(repo, base, tmp_path / "w" / "one", mirrors),
        gitwork.make_worktree(repo, "main", tmp_path / "w" / "two", mirrors),
    )
    assert (wt1 / "pkg" / "mod.py").read_text() == (wt2 / "pkg" / "mod.py").read_text() == "def f():\n    return 1\n"
    assert len(list(mirrors.glob("*.git"))) == 1
    assert (sh_git(repo, "for-each-ref"), sh_git(repo, "status", "--porcelain")) == repo_state
    assert await gitwork.diff(wt1, base) == b""

    (wt1 / "pkg" / "mod.py").write_text("def f():\n    return 2\n")
    (wt1 / "pkg" / "new.py").write_text("X = 1\n")
    blob = bytes(range(256)) * 4
    (wt1 / "data.bin").write_bytes(blob)
    (wt1 / "README.md").unlink()
    patch = await gitwork.diff(wt1, base)
    assert sorted(gitwork.changed_paths(patch)) == ["README.md", "data.bin", "pkg/mod.py", "pkg/new.py"]
    assert b"GIT binary patch" in patch

    await gitwork.apply(wt2, patch)
    assert (wt2 / "pkg" / "new.py").read_text() == "X = 1\n"
    assert (wt2 / "data.bin").read_bytes() == blob
    assert (wt2 / "pkg" / "mod.py").read_text() == "def f():\n    return 2\n"
    assert not (wt2 / "README.md").exists()

    sha = await gitwork.commit_all(wt2, "apply the change")
    assert sha != base and await gitwork.commit_all(wt2, "nothing new") == sha
    await gitwork.push_ref(wt2, repo, "casper/job-1")
    assert sh_git(repo, "rev-parse", "refs/heads/casper/job-1").strip() == sha
    assert (
        sh_git(repo, "log", "-1", "--format=%an <%ae>|%s", "casper/job-1").strip()
        == "CASPER <casper@localhost>|apply the change"
    )
    assert sh_git(repo, "status", "--porcelain") == repo_state[1]  # the checkout was not touched
    with pytest.raises(GitError):
        await gitwork.push_ref(wt2, repo, "bad..ref")

    # a new commit in the repository that the mirror lacks is fetched on demand
    (repo / "later.txt").write_text("later\n")
    sh_git(repo, "add", "-A")
    sh_git(repo, "commit", "-q", "-m", "later")
    wt3 = await gitwork.make_worktree(repo, "main", tmp_path / "w" / "three", mirrors)
    assert (wt3 / "later.txt").read_text() == "later\n"

    for wt in (wt1, wt2, wt3):
        await gitwork.remove_worktree(wt)
        assert not wt.exists()
        await gitwork.remove_worktree(wt)  # already gone: no error
    mirror = next(mirrors.glob("*.git"))
    assert _worktree_count(mirror) == 1


async def test_apply_conflict(repo: Path, tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    base = await gitwork.resolve_commit(repo)
    wt = await gitwork.make_worktree(repo, base, tmp_path / "w1", mirrors)
    (wt / "pkg" / "mod.py").write_text("def f():\n    return 'mine'\n")
    patch = await gitwork.diff(wt, base)
    other = await gitwork.make_worktree(repo, base, tmp_path / "w2", mirrors)
    (other / "pkg" / "mod.py").write_text("def f():\n    return 'theirs'\n")
    await gitwork.commit_all(other, "theirs")
    with pytest.raises(PatchConflictError) as info:
        await gitwork.apply(other, patch)
    assert "pkg/mod.py" in info.value.message and info.value.hint and "redo" in info.value.hint
    # the failed apply left the worktree as it was
    assert (other / "pkg" / "mod.py").read_text() == "def f():\n    return 'theirs'\n"
    assert sh_git(other, "status", "--porcelain") == ""
    await gitwork.remove_worktree(wt)
    await gitwork.remove_worktree(other)


async def test_remove_worktree_fallback_when_directory_is_a_mess(repo: Path, tmp_path: Path) -> None:
    wt = await gitwork.make_worktree(repo, "HEAD", tmp_path / "w", tmp_path / "mirrors")
    (wt / ".git").write_text("gitdir: /nonexistent/worktrees/w\n")
    await gitwork.remove_worktree(wt)
    assert not wt.exists()
    await gitwork.remove_worktree(tmp_path / "never-existed")


# --- validate_patch ------------------------------------------------------------------------------
async def _patch_for(repo: Path, tmp_path: Path, files: dict[str, str]) -> tuple[bytes, str]:
    base = await gitwork.resolve_commit(repo)
    wt = await gitwork.make_worktree(repo, base, tmp_path / "dev", tmp_path / "dev-mirrors")
    try:
        for rel, text in files.items():
            (wt / rel).parent.mkdir(parents=True, exist_ok=True)
            (wt / rel).write_text(text)
        return await gitwork.diff(wt, base), base
    finally:
        await gitwork.remove_worktree(wt)


async def _validate(patch: bytes, repo: Path, base: str, tmp_path: Path, allowed: list[str] | None = None) -> list[str]:
    scratch = tmp_path / "scratch"
    problems = await validate_patch(
        patch,
        repo=repo,
        base=base,
        allowed=allowed or [],
        limits=PatchLimits(),
        scratch=scratch,
        mirror_root=tmp_path / "police-mirrors",
    )
    assert not scratch.exists() or list(scratch.iterdir()) == []  # the worktree is always removed
    return problems


async def test_validate_accepts_a_good_patch(repo: Path, tmp_path: Path) -> None:
    patch, base = await _patch_for(repo, tmp_path, {"pkg/mod.py": "def f():\n    return 2\n", "pkg/b.py": "Y = 2\n"})
    assert await _validate(patch, repo, base, tmp_path, ["pkg/"]) == []


async def test_validate_rejects_paths_outside_allowed(repo: Path, tmp_path: Path) -> None:
    patch, base = await _patch_for(repo, tmp_path, {"pkg/mod.py": "def f():\n    return 2\n", "setup.py": "x = 1\n"})
    problems = await _validate(patch, repo, base, tmp_path, ["pkg/**"])
    assert len(problems) == 1 and "'setup.py'" in problems[0] and "pkg/**" in problems[0]


async def test_validate_reports_syntax_errors_with_file_and_line(repo: Path, tmp_path: Path) -> None:
    patch, base = await _patch_for(repo, tmp_path, {"pkg/mod.py": "def f():\n    return 2\n\ndef g(:\n    pass\n"})
    problems = await _validate(patch, repo, base, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pkg/mod.py:4: ")


async def test_validate_rejects_an_embedded_key(repo: Path, tmp_path: Path) -> None:
    key = "AKIA" + "Q3ZT7WXK9M2LPR4B"
    patch, base = await _patch_for(repo, tmp_path, {"pkg/cfg.py": f"ID = '{key}'\n"})
    problems = await _validate(patch, repo, base, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pkg/cfg.py:1: ") and "AWS" in problems[0]
    assert key[4:] not in problems[0]


async def test_validate_rejects_empty_and_conflicting_patches(repo: Path, tmp_path: Path) -> None:
    base = await gitwork.resolve_commit(repo)
    assert await _validate(b"", repo, base, tmp_path) == ["the patch is empty: nothing was changed"]
    patch, base = await _patch_for(repo, tmp_path, {"README.md": "changed\n"})
    (repo / "README.md").write_text("moved on\n")
    sh_git(repo, "commit", "-q", "-am", "moved on")
    problems = await _validate(patch, repo, "HEAD", tmp_path)
    assert len(problems) == 1 and "does not apply" in problems[0]
