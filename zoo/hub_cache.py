"""Place a repository directory in a Hugging Face cache, as if `snapshot_download` had fetched it.

The demo and air-gapped users need `zoo.load("org/name")` to resolve through the real huggingface_hub client
with no server at all: copy the repository once (from a USB stick, a shared drive), then load it offline by
its id. The layout is huggingface_hub's documented cache: ``models--ORG--NAME/blobs/<sha256>`` holds each
file once, ``snapshots/<commit>/<path>`` links to it, and ``refs/<revision>`` names the commit. The commit id
is a digest of the files' paths and hashes, so the same files always land in the same snapshot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from zoo.hub_mirror import check_ref_name, check_repo_id, folder_files, sha256_file


def repo_cache_dir(cache_dir: str | os.PathLike[str] | None, repo_id: str) -> Path:
    """huggingface_hub's folder for a model repository inside `cache_dir` (default: HF_HUB_CACHE)."""
    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / repo_folder_name(repo_id=repo_id, repo_type="model")


def populate_cache(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str = "main",
) -> str:
    """Copy every file under `folder` into the cache as `repo_id` at `revision`; returns the snapshot's commit id.

    Afterwards `zoo.load(repo_id, cache_dir=cache_dir, local_files_only=True)` reads it through huggingface_hub.
    """
    check_repo_id(repo_id)
    check_ref_name(revision, "revision")
    files = folder_files(Path(folder))  # raises ArtifactError on an empty folder
    hashes = {rel: sha256_file(path) for rel, path in files.items()}
    commit = hashlib.sha1("".join(f"{rel}\0{h}\n" for rel, h in sorted(hashes.items())).encode()).hexdigest()
    repo = repo_cache_dir(cache_dir, repo_id)
    snapshot = repo / "snapshots" / commit
    for rel, path in files.items():
        blob = repo / "blobs" / hashes[rel]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            partial = blob.with_suffix(".incomplete")
            shutil.copyfile(path, partial)
            partial.replace(blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
