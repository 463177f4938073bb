"""The two sides of `lossbench ab`: a git ref of the repository in the working directory (checked out
into a temporary worktree, removed afterwards) or a directory holding a clean checkout; each with its
python. Everything is checked before a worker starts: bad input is one line and exit 2."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError


@dataclass
class Side:
    name: str             # "base" or "head"
    ref: str              # as given
    sha: str              # the commit measured
    path: Path            # the checkout the worker runs in
    python: str
    plugins: list[str] = field(default_factory=list)  # resolved in this side's checkout
    worktree: bool = False  # made by us: removed by close()

    def close(self) -> None:
        if self.worktree and self.path.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], capture_output=True,
                           cwd=_toplevel(Path.cwd()))
            shutil.rmtree(self.path, ignore_errors=True)


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _toplevel(cwd: Path) -> Path | None:
    r = _git(["rev-parse", "--show-toplevel"], cwd)
    return Path(r.stdout.strip()) if r.returncode == 0 else None


def _check_python(python: str, name: str) -> str:
    found = shutil.which(python) if os.sep not in python else (python if os.access(python, os.X_OK) else None)
    if not found:
        raise UsageError(f"--{name}-python {python!r}: no such python")
    r = subprocess.run([found, "-c", "import torch, lossbench"], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["it does not start"])[-1]
        raise UsageError(f"--{name}-python {python!r} cannot import torch and lossbench: {last}")
    return found


def _dirty(path: Path) -> str:
    return _git(["status", "--porcelain", "--untracked-files=no"], path).stdout.strip()


def open_side(name: str, ref: str, python: str | None, plugins: list[str], sha: str | None = None,
              workdir: Path | None = None) -> Side:
    """`ref`: a directory holding a clean checkout, or a git ref of the repository in the working
    directory (sha: the commit a resumed run measured, which the ref must still name)."""
    python = _check_python(python, name) if python else _python_default()
    here = Path.cwd()
    p = Path(ref)
    if p.is_dir():
        top = _toplevel(p)
        if top is None:
            raise UsageError(f"{name} {ref!r} is a directory but not a git checkout")
        dirty = _dirty(top)
        if dirty:
            raise UsageError(f"{name} {ref!r} has uncommitted changes ({dirty.splitlines()[0].strip()} ...): "
                             "its rows would carry a commit that is not what ran; commit or stash them")
        head = _git(["rev-parse", "HEAD"], top).stdout.strip()
        if sha and head != sha:
            raise UsageError(f"{name} {ref!r} is now at {head[:12]}, the run measured {sha[:12]}")
        side = Side(name, ref, head, top.resolve(), python)
        here = p.resolve()  # a relative plugin path is this directory's file
    else:
        top = _toplevel(here)
        if top is None:
            raise UsageError(f"{name} {ref!r} is neither a directory nor a git ref: the working directory is "
                             "not in a git repository")
        r = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], top)
        if r.returncode != 0:
            raise UsageError(f"{name} {ref!r}: no such directory, and not a commit of {top}")
        commit = r.stdout.strip()
        if sha and commit != sha:
            raise UsageError(f"{name} {ref!r} now names {commit[:12]}, the run measured {sha[:12]}")
        dest = Path(tempfile.mkdtemp(prefix=f"lossbench-ab-{name}-", dir=workdir))
        dest.rmdir()
        r = _git(["worktree", "add", "--detach", str(dest), commit], top)
        if r.returncode != 0:
            raise UsageError(f"cannot check out {name} {ref!r}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        side = Side(name, ref, commit, dest, python, worktree=True)
        # A plugin given relative to where the user stands is taken at this commit, in the worktree.
        here = dest / here.relative_to(top) if here.is_relative_to(top) else dest
    try:
        side.plugins = [_plugin_in(plugin, side, here) for plugin in plugins]
    except UsageError:
        side.close()
        raise
    return side


def _plugin_in(plugin: str, side: Side, here: Path) -> str:
    """A .py plugin given by a relative path is the side's own file; a module name or an absolute path is
    the same for both sides."""
    if not plugin.endswith(".py") or os.path.isabs(plugin):
        return plugin
    path = (here / plugin).resolve()
    if not path.is_file():
        raise UsageError(f"plugin {plugin!r} does not exist in {side.name} {side.ref!r} ({path})")
    return str(path)


def _python_default() -> str:
    import sys

    return sys.executable
