"""zoo.hub and zoo.hub_mirror against real components on 127.0.0.1: olah, huggingface_hub, git, timm.

One olah serves a mirror that the session publishes into; pulls go through `snapshot_download` with
HF_ENDPOINT pointing at it. The push tests use a loopback HTTP server that stands in for the Hub and
records what the real client sends.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from olah_server import OlahServer, free_port, olah  # noqa: F401  (olah is a fixture)
from safetensors.torch import save_file

from zoo.errors import ArtifactError, ConfigError, HubError, ZooError
from zoo.hub import DEFAULT_PATTERNS, download, parse_repo_ref, push
from zoo.hub_cache import populate_cache
from zoo.hub_mirror import (
    LFS_THRESHOLD_BYTES,
    git,
    is_lfs_file,
    lfs_pointer,
    mirror_repo_path,
    publish_to_mirror,
    sha256_file,
)

REPO = "org/tiny-prior"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts online, with no endpoint, token or login of the machine it runs on."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def write_artifact(folder: Path, *, seed: int, note: str = "") -> Path:
    """A small repository in the prior format: real safetensors and JSON files, and a card."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"fc.weight": torch.randn(4, 3, generator=gen), "fc.bias": torch.zeros(4)},
              folder / "model.safetensors")
    save_file({"fc.A": torch.eye(4), "fc.G": torch.eye(4) * 2}, folder / "prior.safetensors",
              metadata={"format_version": "1"})
    (folder / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 4, "note": note}))
    (folder / "prior_config.json").write_text(json.dumps({"format_version": 1, "seed": seed}))
    (folder / "README.md").write_text(f"---\nlibrary_name: timm\ntags: [prior-zoo]\n---\n# tiny prior {seed}\n")
    return folder


@dataclass
class Published:
    """What the session put into the mirror: the source folders and commit shas per revision."""

    folders: dict[str, Path] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def published(olah: OlahServer, tmp_path_factory: pytest.TempPathFactory) -> Published:  # noqa: F811
    """v1 (tagged) then v2 on main, a `dev` branch, and an incomplete repository."""
    root = tmp_path_factory.mktemp("artifacts")
    out = Published()
    for rev, seed in (("v1", 1), ("main", 2), ("dev", 3)):
        out.folders[rev] = write_artifact(root / rev, seed=seed, note=rev)
    out.commits["v1"] = publish_to_mirror(out.folders["v1"], olah.mirror_root, REPO, tag="v1")
    out.commits["main"] = publish_to_mirror(out.folders["main"], olah.mirror_root, REPO)
    out.commits["dev"] = publish_to_mirror(out.folders["dev"], olah.mirror_root, REPO, revision="dev")
    incomplete = root / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    publish_to_mirror(incomplete, olah.mirror_root, "org/incomplete")
    return out


@pytest.fixture
def endpoint(olah: OlahServer, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """Point HF_ENDPOINT at olah for this test only."""
    monkeypatch.setenv("HF_ENDPOINT", olah.url)
    return olah.url


def dead_endpoint() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def assert_same_files(got: Path, expected: Path, names: tuple[str, ...] = DEFAULT_PATTERNS) -> None:
    for name in names:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("hf-hub:org/name", ("org/name", None)),
        ("hf-hub:org/name@v1.0", ("org/name", "v1.0")),
        ("org/name", ("org/name", None)),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("hf-hub:name@0123abcd", ("name", "0123abcd")),
    ],
)
def test_parse_repo_ref(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_repo_ref(ref) == expected


@pytest.mark.parametrize("ref", ["hf-hub:", "a/b/c", "org/name@", "org/../x", "org/name@a@b", "-x/y"])
def test_parse_repo_ref_refuses_malformed(ref: str) -> None:
    with pytest.raises(ConfigError, match="hf-hub:org/name"):
        parse_repo_ref(ref)


# ---------------------------------------------------------------- local mirror


def test_lfs_rule_follows_extension_and_size() -> None:
    assert is_lfs_file("model.safetensors", 10)
    assert is_lfs_file("big.json", LFS_THRESHOLD_BYTES)
    assert not is_lfs_file("config.json", LFS_THRESHOLD_BYTES - 1)


def test_mirror_holds_lfs_pointers_and_real_blobs(olah: OlahServer, published: Published) -> None:  # noqa: F811
    repo = mirror_repo_path(olah.mirror_root, REPO)
    assert repo == olah.mirror_root / "models" / "org" / "tiny-prior"
    source = published.folders["main"] / "model.safetensors"
    oid = sha256_file(source)
    pointer = git(repo, "cat-file", "blob", "main:model.safetensors") + "\n"
    assert pointer.encode() == lfs_pointer(oid, source.stat().st_size)
    assert 120 < len(pointer) < 150  # the size window in which olah recognises a pointer
    assert (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == source.read_bytes()
    assert git(repo, "cat-file", "blob", "main:config.json") == (published.folders["main"] / "config.json").read_text()
    assert "model.safetensors filter=lfs" in git(repo, "cat-file", "blob", "main:.gitattributes")
    assert git(repo, "log", "-1", "--format=%an <%ae>", "main") == "prior-zoo <prior-zoo@localhost>"
    assert git(repo, "rev-parse", "v1") == published.commits["v1"]
    assert git(repo, "rev-parse", "main~1") == published.commits["v1"]


def test_mirror_path_follows_olah_layout(tmp_path: Path) -> None:
    assert mirror_repo_path(tmp_path, "org/name") == tmp_path / "models" / "org" / "name"
    assert mirror_repo_path(tmp_path, "name") == tmp_path / "models" / "name"


def test_republishing_the_same_folder_makes_no_commit(olah: OlahServer, published: Published) -> None:  # noqa: F811
    again = publish_to_mirror(published.folders["main"], olah.mirror_root, REPO)
    assert again == published.commits["main"]


def test_publish_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a directory"):
        publish_to_mirror(tmp_path / "absent", tmp_path / "m", REPO)
    with pytest.raises(ArtifactError, match="no files"):
        publish_to_mirror(tmp_path, tmp_path / "m", REPO)
    with pytest.raises(ConfigError, match="repository id"):
        publish_to_mirror(tmp_path, tmp_path / "m", "../escape")
    with pytest.raises(ConfigError, match="branch"):
        publish_to_mirror(tmp_path, tmp_path / "m", REPO, revision="bad..name")


# ---------------------------------------------------------------- download through olah


def test_download_through_olah_is_byte_identical(endpoint: str, published: Published, tmp_path: Path) -> None:
    path = download(f"hf-hub:{REPO}", cache_dir=tmp_path)
    assert path.name == published.commits["main"]
    assert_same_files(path, published.folders["main"])
    assert not (path / ".gitattributes").exists()  # only the allowed patterns are fetched


@pytest.mark.parametrize("rev", ["v1", "dev"])
def test_download_a_tag_or_branch(endpoint: str, published: Published, tmp_path: Path, rev: str) -> None:
    by_ref = download(f"hf-hub:{REPO}@{rev}", cache_dir=tmp_path)
    by_keyword = download(REPO, revision=rev, cache_dir=tmp_path)
    assert by_ref == by_keyword
    assert by_ref.name == published.commits[rev]
    assert_same_files(by_ref, published.folders[rev])


def test_download_by_commit_sha(endpoint: str, published: Published, tmp_path: Path) -> None:
    path = download(f"{REPO}@{published.commits['v1']}", cache_dir=tmp_path)
    assert_same_files(path, published.folders["v1"])


def test_offline_uses_a_prepopulated_cache(
    endpoint: str, published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = download(f"hf-hub:{REPO}@dev", cache_dir=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())  # proves nothing is contacted
    offline = download(f"hf-hub:{REPO}@dev", cache_dir=tmp_path)
    assert offline == online
    assert_same_files(offline, published.folders["dev"])


def test_offline_with_a_missing_file_says_what_to_do(
    endpoint: str, published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    download(f"hf-hub:{REPO}", cache_dir=tmp_path, allow_patterns=("config.json",), required=())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="incompletely cached and offline mode is on") as info:
        download(f"hf-hub:{REPO}", cache_dir=tmp_path)
    assert f"run `zoo pull {REPO}` once while online" in str(info.value)


def test_populated_cache_is_what_the_client_would_have_fetched(
    endpoint: str, published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched = download(f"hf-hub:{REPO}@dev", cache_dir=tmp_path / "fetched")
    commit = populate_cache(published.folders["dev"], REPO, cache_dir=tmp_path / "placed", revision="dev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())  # proves nothing is contacted
    placed = download(f"hf-hub:{REPO}@dev", cache_dir=tmp_path / "placed")
    assert placed.name == commit
    assert sorted(p.name for p in placed.iterdir()) == sorted(p.name for p in fetched.iterdir())
    assert_same_files(placed, fetched)
    # huggingface_hub's own cache scanner reads the layout: one repo, its files, the ref
    (repo,) = scan_cache_dir(tmp_path / "placed").repos
    (revision,) = repo.revisions
    assert (repo.repo_id, revision.commit_hash, set(revision.refs)) == (REPO, commit, {"dev"})
    assert revision.nb_files == len(list(published.folders["dev"].iterdir()))


def test_populating_twice_is_one_snapshot_and_new_files_are_another(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", seed=4)
    first = populate_cache(folder, REPO, cache_dir=tmp_path / "cache")
    assert populate_cache(folder, REPO, cache_dir=tmp_path / "cache") == first
    write_artifact(folder, seed=5)
    second = populate_cache(folder, REPO, cache_dir=tmp_path / "cache")
    assert second != first
    path = download(REPO, cache_dir=tmp_path / "cache", local_files_only=True)
    assert path.name == second
    assert_same_files(path, folder)


def test_populate_cache_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no files"):
        populate_cache(tmp_path / "empty", REPO, cache_dir=tmp_path)
    folder = write_artifact(tmp_path / "a", seed=1)
    with pytest.raises(ConfigError, match="not a valid repository id"):
        populate_cache(folder, "../escape", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a valid revision"):
        populate_cache(folder, REPO, cache_dir=tmp_path, revision="a..b")


def test_offline_without_any_cache_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="not in the local cache and offline mode is on") as info:
        download("hf-hub:org/never-fetched@v3", cache_dir=tmp_path)
    assert "zoo pull org/never-fetched@v3" in str(info.value)


def test_unknown_repository_is_a_hub_error(endpoint: str, published: Published, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="not found"):
        download("hf-hub:org/absent", cache_dir=tmp_path)


def test_unknown_revision_is_a_hub_error(endpoint: str, published: Published, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="nope"):
        download(f"hf-hub:{REPO}@nope", cache_dir=tmp_path)


def test_unreachable_endpoint_is_a_hub_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    with pytest.raises(HubError, match="cannot be reached; run `zoo pull"):
        download(f"hf-hub:{REPO}", cache_dir=tmp_path)


def test_missing_required_files_after_download(endpoint: str, published: Published, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=re.escape("model.safetensors, prior.safetensors, prior_config.json")):
        download("hf-hub:org/incomplete", cache_dir=tmp_path)


# ---------------------------------------------------------------- local directories


def test_local_directory_passes_through(published: Published) -> None:
    folder = published.folders["main"]
    assert download(folder) == folder
    assert download(str(folder)) == folder


def test_local_directory_missing_a_file(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "art", seed=0)
    (folder / "prior.safetensors").unlink()
    with pytest.raises(ArtifactError, match=re.escape("lacks prior.safetensors")):
        download(folder)


def test_absent_local_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        download(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- push


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub(BaseHTTPRequestHandler):
    """A loopback stand-in for the Hub's write API: it records requests and answers as the Hub does."""

    requests: list[Recorded]

    def log_message(self, *args: object) -> None:
        pass

    def record(self, method: str) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append(Recorded(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        return body

    def do_GET(self) -> None:
        self.record("GET")
        if self.path.startswith("/api/models/me/pushed/discussions/1"):
            self.reply({"num": 1, "title": "m", "status": "draft", "isPullRequest": True, "events": [],
                        "createdAt": "2026-01-01T00:00:00.000Z", "author": {"name": "me"},
                        "repo": {"name": "me/pushed", "type": "model"}, "changes": {"base": "refs/heads/main"},
                        "filesWithConflicts": []})
        else:
            self.reply({"error": "unexpected"}, status=404)

    def do_POST(self) -> None:
        body = self.record("POST")
        base = f"http://{self.headers['Host']}"
        if self.path == "/api/models/me/pushed/discussions":
            self.reply({"num": 1})
        elif self.path == "/api/repos/create":
            self.reply({"url": f"{base}/me/pushed", "name": "me/pushed", "id": "x"})
        elif self.path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            errors = [{"message": "license: not a known license"}] if "license: nonsense" in content else []
            self.reply({"errors": errors, "warnings": []}, status=400 if errors else 200)
        elif "/branch/" in self.path:
            self.reply({})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for f in files]})
        elif "/commit/" in self.path:
            self.reply({"commitUrl": f"{base}/me/pushed/commit/{'a' * 40}", "commitOid": "a" * 40})
        else:
            self.reply({"error": "unexpected"}, status=404)

    def reply(self, payload: object, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Recorded]]:
    recorded: list[Recorded] = []
    handler = type("RecordingHub", (FakeHub,), {"requests": recorded})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield recorded
    finally:
        server.shutdown()
        server.server_close()


def committed_files(ndjson: bytes) -> dict[str, bytes]:
    """The files in a Hub commit payload (one JSON object per line), decoded."""
    files = {}
    for line in ndjson.splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_push_sends_well_formed_hub_requests(fake_hub: list[Recorded], published: Published) -> None:
    folder = published.folders["main"]
    url = push(folder, "me/pushed", token="hf_test", private=True, revision="dev", commit_message="m")
    assert url.endswith("/me/pushed/commit/" + "a" * 40)
    paths = [r.path for r in fake_hub]
    assert paths[0] == "/api/repos/create"
    assert paths[1] == "/api/models/me/pushed/branch/dev"
    assert paths[-1] == "/api/models/me/pushed/commit/dev"
    assert "/api/models/me/pushed/preupload/dev" in paths
    assert "/api/validate-yaml" in paths  # the client checks the card's YAML before uploading
    assert all(r.headers["authorization"] == "Bearer hf_test" for r in fake_hub)
    created = json.loads(fake_hub[0].body)
    assert created["name"] == "pushed" and created["organization"] == "me" and created["type"] == "model"
    assert created.get("visibility") == "private" or created.get("private") is True
    files = committed_files(fake_hub[-1].body)
    assert files == {name: (folder / name).read_bytes() for name in DEFAULT_PATTERNS}
    header = json.loads(fake_hub[-1].body.splitlines()[0])
    assert header["value"]["summary"] == "m"


def test_push_as_a_pull_request_returns_its_url(fake_hub: list[Recorded], published: Published) -> None:
    url = push(published.folders["main"], "me/pushed", token="hf_test", create_pr=True)
    assert url.endswith("/me/pushed/discussions/1")
    opened = next(r for r in fake_hub if r.path == "/api/models/me/pushed/discussions")
    assert json.loads(opened.body)["pullRequest"] is True
    assert fake_hub[-1].path == "/api/models/me/pushed/commit/refs%2Fpr%2F1"
    assert not any("/branch/" in r.path for r in fake_hub)


def test_a_pull_request_targets_main(published: Published) -> None:
    with pytest.raises(ConfigError, match="main"):
        push(published.folders["main"], "me/pushed", token="hf_test", create_pr=True, revision="dev")


def test_push_with_an_invalid_card_is_refused(fake_hub: list[Recorded], tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "art", seed=0)
    (folder / "README.md").write_text("---\nlicense: nonsense\n---\n# card\n")
    with pytest.raises(ArtifactError, match="not a known license"):
        push(folder, "me/pushed", token="hf_test")
    assert not any("/commit/" in r.path for r in fake_hub)


def test_push_to_a_read_only_mirror_is_a_hub_error(endpoint: str, published: Published) -> None:
    with pytest.raises(HubError, match="refused"):
        push(published.folders["main"], "me/pushed", token="hf_test")


def test_push_without_a_token(published: Published) -> None:
    with pytest.raises(HubError, match="HF_TOKEN"):
        push(published.folders["main"], "me/pushed")


def test_push_to_an_unreachable_hub(published: Published, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    with pytest.raises(HubError, match="cannot reach"):
        push(published.folders["main"], "me/pushed", token="hf_test")


def test_every_failure_is_a_zoo_error() -> None:
    assert issubclass(HubError, ZooError) and issubclass(ArtifactError, ZooError)


# ---------------------------------------------------------------- timm


TIMM_CHECK = """
import sys, timm, torch
from safetensors.torch import load_file
model = timm.create_model(sys.argv[1], pretrained=True)
expected = load_file(sys.argv[2])
got = model.state_dict()
assert set(got) == set(expected), sorted(set(got) ^ set(expected))
assert all(torch.equal(got[k], expected[k]) for k in expected)
assert model.pretrained_cfg["hf_hub_id"] == sys.argv[1].removeprefix("hf-hub:")
print("timm-ok", model.num_classes)
"""


def test_timm_loads_the_weights_through_olah(olah: OlahServer, tmp_path: Path) -> None:  # noqa: F811
    """timm alone, in a fresh process with only HF_ENDPOINT set, loads the repository's weights."""
    import timm
    from timm.models import save_for_hf

    folder = tmp_path / "timm-repo"
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    save_for_hf(model, str(folder), safe_serialization=True)
    publish_to_mirror(folder, olah.mirror_root, "org/timm-tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=olah.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run(
        [sys.executable, "-c", TIMM_CHECK, "hf-hub:org/timm-tiny", str(folder / "model.safetensors")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "timm-ok 7" in done.stdout
