"""Publish a repository directory into a local git mirror that an `olah` server serves as if it were the Hub.

Layout (what olah 0.5.4's `mirrors-path` expects, see `olah/server_mirror.py`): one *non-bare* git
repository per Hub repository at ``MIRROR_ROOT/models/ORG/NAME`` (``MIRROR_ROOT/models/NAME`` for a
repository without an organisation). olah reads commits, trees and refs from it, so a branch or tag
name, or a commit sha, works as a revision.

Large files are stored the way git-lfs stores them: the commit holds a standard pointer file
(``version https://git-lfs.github.com/spec/v1`` / ``oid sha256:...`` / ``size ...``) and the real bytes
sit in ``.git/lfs/objects/OID[0:2]/OID[2:4]/OID``. That is exactly where olah's `LocalMirrorRepo` looks
when a blob parses as a pointer: it then reports the LFS size and sha256 in the tree listing and streams
the real bytes on resolve, so `snapshot_download` through olah returns the original file. It only
recognises pointers of 121-149 bytes, which every standard pointer is (125 bytes plus the digits of the size).

The mirror is a server-side store: commits are written with git plumbing against a throw-away index,
so the working tree stays empty (``git status`` there shows nothing useful; clone it to look inside).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from zoo.errors import ArtifactError, ConfigError, HubError

LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
"""Files at least this large become LFS pointers, as the Hub requires."""

LFS_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.npz", "*.onnx")
"""Files matching these become LFS pointers whatever their size, as in the Hub's default `.gitattributes`."""

DEFAULT_BRANCH = "main"
_IDENTITY = {"name": "prior-zoo", "email": "prior-zoo@localhost"}
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_REF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)*$")


def mirror_repo_path(mirror_root: str | os.PathLike[str], repo_id: str) -> Path:
    """Where olah looks for `repo_id` under `mirror_root` (models only: the zoo publishes models)."""
    check_repo_id(repo_id)
    return Path(mirror_root, "models", *repo_id.split("/"))


def check_repo_id(repo_id: str) -> None:
    """Refuse ids that the Hub would refuse or that could escape the mirror directory."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConfigError(f"{repo_id!r} is not a valid repository id; use 'org/name' (letters, digits, - _ .)")


def check_ref_name(name: str, what: str) -> None:
    """Refuse branch or tag names that git or the Hub would refuse."""
    if not _REF_NAME.match(name) or ".." in name or name.endswith((".lock", ".")):
        raise ConfigError(f"{name!r} is not a valid {what} name; use letters, digits, '-', '_', '.' and '/'")


def lfs_pointer(oid: str, size: int) -> bytes:
    """The standard Git LFS pointer text for a blob of this sha256 and size."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks so large weights never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_lfs_file(rel_path: str, size: int) -> bool:
    """Whether this file is stored through LFS: by extension, or because it is large."""
    return size >= LFS_THRESHOLD_BYTES or any(Path(rel_path).match(pattern) for pattern in LFS_PATTERNS)


def folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file under `folder` by its POSIX path in the repository; hidden entries are skipped."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path
    if not files:
        raise ArtifactError(f"{folder} holds no files to publish; write the artifact there first")
    return files


def gitattributes(lfs_paths: Iterable[str]) -> bytes:
    """A `.gitattributes` that marks the LFS files, so a git-lfs clone of the mirror smudges them."""
    lines = [f"{pattern} filter=lfs diff=lfs merge=lfs -text" for pattern in LFS_PATTERNS]
    lines += [f"/{path} filter=lfs diff=lfs merge=lfs -text" for path in sorted(lfs_paths)]
    return ("\n".join(lines) + "\n").encode()


def git(repo: Path, *args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run one git command in `repo` with a fixed identity and no user configuration; return stdout."""
    full_env = {
        **os.environ,
        "GIT_AUTHOR_NAME": _IDENTITY["name"],
        "GIT_AUTHOR_EMAIL": _IDENTITY["email"],
        "GIT_COMMITTER_NAME": _IDENTITY["name"],
        "GIT_COMMITTER_EMAIL": _IDENTITY["email"],
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        **(env or {}),
    }
    command = ["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args]
    try:
        done = subprocess.run(command, cwd=repo, input=stdin, env=full_env, capture_output=True, check=False)
    except FileNotFoundError as err:
        raise HubError("publishing to a local mirror needs the `git` command; install git") from err
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise HubError(f"git {args[0]} failed in {repo}: {message}")
    return done.stdout.decode().strip()


def init_mirror_repo(repo: Path) -> None:
    """Create the non-bare repository olah expects, with HEAD on `main` like every Hub repository."""
    if (repo / ".git").is_dir():
        return
    if repo.exists() and any(repo.iterdir()):
        raise HubError(f"{repo} exists but is not a git repository; move it away or pick another mirror root")
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "--quiet")
    git(repo, "symbolic-ref", "HEAD", f"refs/heads/{DEFAULT_BRANCH}")


def store_lfs_object(repo: Path, source: Path, oid: str) -> None:
    """Copy the real bytes to `.git/lfs/objects/`, where git-lfs and olah look them up by sha256."""
    target = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp, source.open("rb") as handle:
        shutil.copyfileobj(handle, tmp, 1 << 20)
    os.replace(tmp.name, target)


def write_blob(repo: Path, rel_path: str, source: Path) -> tuple[str, bool]:
    """Write one file into the object store (as an LFS pointer when large); return (blob sha, is LFS)."""
    size = source.stat().st_size
    if not is_lfs_file(rel_path, size):
        return git(repo, "hash-object", "-w", "--", str(source)), False
    oid = sha256_file(source)
    store_lfs_object(repo, source, oid)
    return git(repo, "hash-object", "-w", "--stdin", stdin=lfs_pointer(oid, size)), True


def write_tree(repo: Path, blobs: Mapping[str, str]) -> str:
    """Build a tree holding exactly these blobs, through a throw-away index; return its sha."""
    index_info = "".join(f"100644 {sha}\t{path}\n" for path, sha in sorted(blobs.items()))
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "update-index", "--add", "--index-info", stdin=index_info.encode(), env=env)
        return git(repo, "write-tree", env=env)


def resolve_commit(repo: Path, ref: str) -> str | None:
    """The commit a ref points at, or None when it does not exist yet."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except HubError:
        return None


def parent_for(repo: Path, revision: str) -> str | None:
    """The new commit's parent: the branch tip, else (a new branch) main's tip, as `create_branch` forks."""
    return resolve_commit(repo, f"refs/heads/{revision}") or resolve_commit(repo, f"refs/heads/{DEFAULT_BRANCH}")


def commit_tree(repo: Path, tree: str, parent: str | None, message: str) -> str:
    """Create a commit of `tree` on `parent`; an unchanged tree reuses the parent instead of an empty commit."""
    if parent is not None and git(repo, "rev-parse", f"{parent}^{{tree}}") == tree:
        return parent
    parent_args = ["-p", parent] if parent else []
    return git(repo, "commit-tree", tree, *parent_args, "-m", message)


def publish_to_mirror(
    folder: str | os.PathLike[str],
    mirror_root: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str = DEFAULT_BRANCH,
    tag: str | None = None,
    commit_message: str = "Publish with prior-zoo",
) -> str:
    """Commit `folder` as branch `revision` of `repo_id` in an olah mirror; return the commit sha.

    The commit's tree is exactly the folder's files (hidden ones skipped) plus a `.gitattributes`;
    large files become LFS pointers with their bytes in the repository's LFS store. `tag`, when given,
    also points a tag at the commit (moving it if it exists), so `hf-hub:org/name@TAG` resolves.
    """
    source = Path(folder)
    if not source.is_dir():
        raise ArtifactError(f"{source} is not a directory; pass the artifact directory to publish")
    check_ref_name(revision, "branch")
    if tag is not None:
        check_ref_name(tag, "tag")
    repo = mirror_repo_path(mirror_root, repo_id)
    init_mirror_repo(repo)
    blobs, lfs_paths = {}, []
    for rel_path, path in folder_files(source).items():
        blobs[rel_path], is_lfs = write_blob(repo, rel_path, path)
        if is_lfs:
            lfs_paths.append(rel_path)
    blobs[".gitattributes"] = git(repo, "hash-object", "-w", "--stdin", stdin=gitattributes(lfs_paths))
    commit = commit_tree(repo, write_tree(repo, blobs), parent_for(repo, revision), commit_message)
    git(repo, "update-ref", f"refs/heads/{revision}", commit)
    if tag is not None:
        git(repo, "update-ref", f"refs/tags/{tag}", commit)
    return commit
