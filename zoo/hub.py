"""Hub I/O at the edge: parse a repository reference, download a repository directory, push one.

These functions move repository directories and know nothing about what the files mean. Everything
goes through the real `huggingface_hub` client, so the Hub's own rules apply: the cache layout,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`, tokens from `HF_TOKEN` or `hf auth login`.

Environment variables: `huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, at import,
into `huggingface_hub.constants`. A program (or a test) that sets them later would be silently
ignored. So each call here reads them again at call time and passes them on explicitly: the endpoint
as `endpoint=` (falling back to `constants.ENDPOINT`), and offline mode as `local_files_only=True`
when either the current environment or the import-time constant says offline. Nothing is patched
globally, so concurrent callers never see each other's settings. The cache location (`cache_dir`,
else `HF_HUB_CACHE` / `HF_HOME` as read at import) is left to huggingface_hub, so zoo and timm share
one cache. timm's own `hf-hub:` loading reads `constants.ENDPOINT`, so for timm set `HF_ENDPOINT`
before the process starts, as users normally do.

A local mirror for tests and air-gapped sites lives in `zoo.hub_mirror` (`publish_to_mirror`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from zoo.errors import ArtifactError, ConfigError, HubError
from zoo.hub_mirror import publish_to_mirror

__all__ = [
    "DEFAULT_PATTERNS",
    "HUB_PREFIX",
    "REQUIRED_FILES",
    "download",
    "hub_endpoint",
    "is_offline",
    "parse_repo_ref",
    "publish_to_mirror",
    "push",
]

HUB_PREFIX = "hf-hub:"
DEFAULT_PATTERNS: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "prior.safetensors",
    "prior_config.json",
    "README.md",
)
"""The files of a prior or posterior repository (docs/design.md, "Hub repository"); nothing else is fetched."""

REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "prior.safetensors", "prior_config.json")
"""The files without which a prior cannot be loaded (the model card is optional)."""

_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[^@\s]+))?$")


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """Split `hf-hub:org/name@rev` (prefix and `@rev` optional) into (repo_id, revision or None)."""
    text = ref.removeprefix(HUB_PREFIX).strip()
    match = _REPO_REF.match(text)
    if match is None or ".." in match["repo"]:
        raise ConfigError(
            f"{ref!r} is not a hub reference; write 'hf-hub:org/name', optionally with '@revision', "
            "or pass a local directory"
        )
    return match["repo"], match["rev"]


def hub_endpoint() -> str:
    """The Hub endpoint in effect now: `HF_ENDPOINT` from the current environment, else the import-time one."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """Whether the Hub may not be contacted now: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set, then or now."""
    current = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or current.upper() in constants.ENV_VARS_TRUE_VALUES


def looks_like_path(ref: str) -> bool:
    """Whether a string is meant as a filesystem path rather than a repository id."""
    return ref.startswith(("/", ".", "~")) or ref.endswith("/") or ref.count("/") > 1 or "\\" in ref


def as_local_dir(ref_or_dir: str | os.PathLike[str]) -> Path | None:
    """The local directory this argument names, or None when it is a hub reference."""
    if isinstance(ref_or_dir, str) and ref_or_dir.startswith(HUB_PREFIX):
        return None
    path = Path(ref_or_dir).expanduser()
    if path.exists() or not isinstance(ref_or_dir, str) or looks_like_path(ref_or_dir):
        return path
    return None


def missing_files(directory: Path, required: Sequence[str]) -> list[str]:
    """The required files that are not regular files in `directory`."""
    return [name for name in required if not (directory / name).is_file()]


def check_local_dir(path: Path, required: Sequence[str]) -> Path:
    """A local repository directory, checked to exist and to hold the required files."""
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ArtifactError(f"{path} {what}; pass a repository directory or 'hf-hub:org/name'")
    missing = missing_files(path, required)
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; it is not a complete prior repository")
    return path


def offline_advice(repo_id: str, revision: str | None) -> str:
    """What to do when a repository is not (fully) in the local cache and the Hub cannot be used."""
    ref = f"{repo_id}@{revision}" if revision else repo_id
    return (
        f"run `zoo pull {ref}` once while online (HF_HUB_OFFLINE unset), or point HF_ENDPOINT at a "
        "reachable hub or mirror, or pass the cache_dir that holds it, or pass a local directory instead"
    )


def not_cached_error(err: Exception, repo_id: str, revision: str | None, endpoint: str, offline: bool) -> HubError:
    """The repository is not (fully) cached, and the Hub is off limits (offline) or out of reach."""
    rev = revision or constants.DEFAULT_REVISION
    missing = "is incompletely cached" if isinstance(err, IncompleteSnapshotError) else "is not in the local cache"
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{endpoint} cannot be reached"
    return HubError(f"{repo_id} (revision {rev!r}) {missing} and {why}; {offline_advice(repo_id, revision)}")


def translate_error(
    err: Exception, repo_id: str, revision: str | None, endpoint: str, offline: bool
) -> HubError | ConfigError:
    """A huggingface_hub failure as a ZooError that says what happened and what to do."""
    rev = revision or constants.DEFAULT_REVISION
    if isinstance(err, GatedRepoError):
        return HubError(f"{repo_id} at {endpoint} is gated; accept its terms on the Hub and pass a token")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{repo_id} at {endpoint} has no revision {rev!r}; check the branch, tag or commit")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(
            f"{repo_id} (revision {rev!r}) was not found at {endpoint}; check the name and revision, pass a "
            "token (or `hf auth login`) if it is private, or set HF_ENDPOINT to the hub that holds it"
        )
    if isinstance(err, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return not_cached_error(err, repo_id, revision, endpoint, offline)
    if isinstance(err, HFValidationError):
        return ConfigError(f"{repo_id!r} is not a valid repository id: {err}")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        return HubError(f"{endpoint} answered HTTP {status} for {repo_id}: {first_line(err)}")
    if isinstance(err, OSError):
        return HubError(f"cannot store {repo_id} in the cache ({type(err).__name__}: {err}); check that the "
                        "cache directory (cache_dir or HF_HUB_CACHE) is writable and has space")
    return HubError(f"cannot reach {endpoint} for {repo_id} ({type(err).__name__}: {first_line(err)}); check "
                    "the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fetch_snapshot(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
    allow_patterns: Sequence[str],
) -> Path:
    """`snapshot_download` with the endpoint of now, its failures translated into ZooErrors."""
    endpoint = hub_endpoint()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=list(allow_patterns),
            endpoint=endpoint,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, IncompleteSnapshotError, OfflineModeIsEnabled,
            HFValidationError, httpx2.HTTPError, OSError) as err:
        offline = local_files_only or is_offline()
        raise translate_error(err, repo_id, revision, endpoint, offline) from err
    return Path(path)


def download(
    ref_or_dir: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    allow_patterns: Sequence[str] = DEFAULT_PATTERNS,
    required: Sequence[str] = REQUIRED_FILES,
) -> Path:
    """The local directory of a repository: a local directory as is, else a Hub snapshot (cached).

    `ref_or_dir` is `hf-hub:org/name[@rev]`, `org/name[@rev]` or a directory; an existing directory wins
    over a repository id of the same spelling. `revision` overrides `@rev`. `local_files_only=None`
    follows `HF_HUB_OFFLINE`. Raises HubError when the repository cannot be fetched (with advice) and
    ArtifactError when files in `required` are missing.
    """
    path = as_local_dir(ref_or_dir)
    if path is not None:
        return check_local_dir(path, required)
    repo_id, ref_revision = parse_repo_ref(str(ref_or_dir))
    revision = revision or ref_revision
    offline = is_offline() if local_files_only is None else local_files_only
    snapshot = fetch_snapshot(
        repo_id, revision, cache_dir=cache_dir, local_files_only=offline, token=token,
        allow_patterns=allow_patterns,
    )
    missing = missing_files(snapshot, required)
    if missing and offline:
        raise HubError(f"the cached {repo_id} lacks {', '.join(missing)}; {offline_advice(repo_id, revision)}")
    if missing:
        raise ArtifactError(f"{repo_id} at {hub_endpoint()} lacks {', '.join(missing)}; it is not a prior repository")
    return snapshot


def require_token(token: str | None) -> str:
    """The token to push with: the argument, else `HF_TOKEN` or the stored login, else a HubError."""
    try:
        found = token or get_token()
    except Exception as err:  # get_token raises when an opted-in OIDC exchange fails
        raise HubError(f"could not obtain a Hub token: {err}; set HF_TOKEN or run `hf auth login`") from err
    if not found:
        raise HubError("pushing needs a Hub token with write access; set HF_TOKEN, run `hf auth login`, "
                       "or pass token=")
    return found


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    allow_patterns: Sequence[str] | None = None,
) -> str:
    """Upload a repository directory to the Hub (creating the repository if needed); return the commit or PR URL.

    A `revision` other than main is created as a branch first, since the Hub only commits to existing
    branches. `allow_patterns=None` uploads the whole folder, as `upload_folder` does.
    """
    source = Path(folder)
    if not source.is_dir():
        raise ArtifactError(f"{source} is not a directory; pass the artifact directory to push")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ConfigError("a pull request always targets main on the Hub; drop the revision or create_pr")
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=require_token(token))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=source,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload with prior-zoo",
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
        )
    except (HfHubHTTPError, HFValidationError, httpx2.HTTPError, OSError) as err:
        raise push_error(err, repo_id, endpoint) from err
    except ValueError as err:  # the client's own checks, e.g. the model card's YAML header
        raise ArtifactError(f"the Hub refused the files of {folder}: {err}; fix them and push again") from err
    return str(info.pr_url or info.commit_url)


def push_error(err: Exception, repo_id: str, endpoint: str) -> HubError | ConfigError:
    """A failed push as a ZooError: authentication, refusal or connection, each with what to do."""
    if isinstance(err, HFValidationError):
        return ConfigError(f"{repo_id!r} is not a valid repository id: {err}")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return HubError(f"{endpoint} refused the token for {repo_id} (HTTP {status}); use a token with "
                            "write access to that namespace (HF_TOKEN or `hf auth login`)")
        return HubError(f"{endpoint} refused the upload to {repo_id} (HTTP {status}: {first_line(err)}); "
                        "check that HF_ENDPOINT is a Hub that accepts uploads (a read-only mirror does not)")
    return HubError(f"cannot reach {endpoint} to push {repo_id} ({type(err).__name__}: {first_line(err)}); "
                    "check the network or HF_ENDPOINT")
