"""`mergequant push` against a loopback Hub (tests/hub_server.py): what arrives, what is sent, errors.

Real pushes run the CLI in a subprocess (``run_cli``) with a controlled environment: huggingface_hub
reads HF_HUB_OFFLINE / HF_HUB_DISABLE_XET at import time, and conftest sets HF_HUB_OFFLINE=1 for the
suite. Checks that send nothing (dry run, bad folder, offline, option errors) run in-process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from mergequant import hub as hubmod
from mergequant.card import merge_card, split_card
from mergequant.cli import app
from mergequant.errors import MergeQuantError

# the loopback Hub's token, a token it rejects, the repo; fixtures `env`, `hub` and `online` are in conftest.py
from helpers import BAD_TOKEN, REPO, TOKEN, run_cli
from hub_server import HubServer


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mtime_ns) of every file: 'byte-identical and untouched'."""
    return {p.relative_to(folder).as_posix(): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_models) -> Path:
    """A tiny 2-shard checkpoint with a merge card: one local parent to map, one to leave local."""
    root = tmp_path_factory.mktemp("push")
    for name in ("poet", "coder"):
        (root / name).mkdir()
        (root / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    m = Path(shutil.copytree(tiny_models["base"], root / "model"))  # the session's tiny base, with a card added
    (m / "README.md").write_text(merge_card(
        method="linear", pretty_name="Linear", paper="https://arxiv.org/abs/2203.05482",
        models=["./poet", "./coder"], base_model=None, recipe_text="merge_method: linear\n", out_dtype="float32",
        num_parameters=1, base_dir=root, parent_dirs={"./poet": root / "poet", "./coder": root / "coder"}))
    return m


def push(folder: Path, hub: HubServer, *args: str, token: str = TOKEN):
    return run_cli("push", folder, "--repo", REPO, "--endpoint", hub.url, "--token", token, *args)


def assert_no_token_anywhere(hub: HubServer, *texts: str, roots: tuple[Path, ...] = ()) -> None:
    for t in texts:
        assert TOKEN not in t and BAD_TOKEN not in t
    for r in hub.requests:
        assert TOKEN.encode() not in r.body and BAD_TOKEN.encode() not in r.body, r.path
        assert not any(TOKEN in v or BAD_TOKEN in v for v in r.headers.values()), r.path
        assert TOKEN not in r.path
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert TOKEN.encode() not in data and BAD_TOKEN.encode() not in data, p


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- real pushes (subprocess) --------------------------------------------------------------------------
@pytest.mark.slow
def test_push_arrives_byte_identical_through_lfs_and_repush_sends_nothing(model, env, hub):
    before = snapshot(model)
    poet = model.parent / "poet"
    res = push(model, hub, "--base-model-map", f"{poet}=me/poet", "--commit-message", "first upload")
    assert res.returncode == 0, res.stderr
    assert snapshot(model) == before  # the card was rewritten in memory, never on disk

    files = hub.files(REPO)
    local = {p.relative_to(model).as_posix(): p for p in model.rglob("*") if p.is_file()}
    assert set(files) == set(local)
    for name, p in local.items():
        if name != "README.md":
            assert files[name].sha256 == sha256(p), name
    # safetensors went through LFS: stored as LFS, one PUT per shard with exactly its bytes, never inline
    shards = sorted(n for n in local if n.endswith(".safetensors"))
    assert len(shards) >= 2 and all(files[n].lfs for n in shards)
    assert not files["config.json"].lfs
    puts = {r.path.rsplit("/", 1)[1]: r.body_size for r in hub.lfs_puts()}
    assert puts == {sha256(local[n]): local[n].stat().st_size for n in shards}
    commit = hub.requests_matching("POST", r"/api/models/me/tiny-merge/commit/main")[0]
    lines = [json.loads(ln) for ln in commit.body.splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "first upload", "description": ""}}
    kinds = {ln["value"]["path"]: ln["key"] for ln in lines[1:]}
    assert all(kinds[n] == "lfsFile" for n in shards) and kinds["config.json"] == "file"
    assert commit.headers["content-type"] == "application/x-ndjson"
    assert all(r.authorized for r in hub.requests if r.path.startswith("/api/repos") or "/commit/" in r.path)
    assert not hub.repos[REPO].private

    # the card on the Hub: the mapped parent is a Hub id, the other one is listed in the body only
    card = files["README.md"].content.decode()
    data = ModelCard(card).data
    assert data.base_model == ["me/poet"] and data.base_model_relation == "merge"
    assert data.license == "apache-2.0" and "merge" in data.tags
    assert "`./coder`" in split_card(card)[1].split("## Parents not on the Hub")[1]
    assert "mergequant-parents" not in card

    # progress and the final line with the repo and commit URLs
    head = hub.repos[REPO].heads["main"]
    assert f"{hub.url}/{REPO}" in res.stdout and f"{hub.url}/{REPO}/commit/{head}" in res.stdout
    assert_no_token_anywhere(hub, res.stdout, res.stderr, roots=(env, model.parent))

    # pushing the unchanged folder again: no LFS object, no commit
    hub.clear_requests()
    again = push(model, hub, "--base-model-map", f"{poet}=me/poet")
    assert again.returncode == 0, again.stderr
    assert hub.lfs_puts() == []
    assert hub.requests_matching("POST", r"/commit/") == []
    assert hub.repos[REPO].heads["main"] == head and "up to date" in again.stdout
    assert_no_token_anywhere(hub, again.stdout, again.stderr)


@pytest.mark.slow
def test_private_repo_then_pull_request(model, env, hub, tmp_path):
    res = push(model, hub, "--private")
    assert res.returncode == 0, res.stderr
    assert hub.repos[REPO].private
    create = json.loads(hub.requests_matching("POST", r"^/api/repos/create$")[0].body)
    assert create == {"name": "tiny-merge", "organization": "me", "visibility": "private"}
    main_before = dict(hub.files(REPO))

    changed = tmp_path / "changed"
    shutil.copytree(model, changed)
    (changed / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    hub.clear_requests()
    res = push(changed, hub, "--create-pr", "--commit-message", "tweak generation")
    assert res.returncode == 0, res.stderr
    commit = hub.requests_matching("POST", r"/api/models/me/tiny-merge/commit/main\?create_pr=1$")
    assert len(commit) == 1
    assert hub.requests_matching("POST", r"/preupload/main\?create_pr=1$")
    assert hub.lfs_puts() == []  # the shards are already there
    assert f"{hub.url}/{REPO}/discussions/1" in res.stdout
    assert hub.files(REPO) == main_before  # main untouched; the change is on the PR ref
    assert hub.files(REPO, "refs/pr/1")["generation_config.json"].content == (changed / "generation_config.json").read_bytes()
    assert_no_token_anywhere(hub, res.stdout, res.stderr)


def test_push_to_a_branch_in_process(model, online, hub):
    """The same push through the Python API (in-process, huggingface_hub's import-time constants patched)."""
    res = hubmod.push(model, hubmod.PushOptions(repo=REPO, endpoint=hub.url, token=TOKEN, revision="v1",
                                                base_model_map={"./poet": "me/poet"}), log=lambda m: None)
    assert hub.requests_matching("POST", r"/api/models/me/tiny-merge/branch/v1$")
    assert set(hub.files(REPO, "v1")) == {f.path for f in res.files} and hub.files(REPO) == {}
    assert ModelCard(hub.files(REPO, "v1")["README.md"].content.decode()).data.base_model == ["me/poet"]
    assert res.commit_url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].heads['v1']}" and res.pr_url is None
    assert hubmod.summary(res).startswith(f"pushed {len(res.files)} changed file(s)")
    hub.clear_requests()
    with pytest.raises(hubmod.PushError, match="already exists and is public"):  # refuse rather than publish
        hubmod.push(model, hubmod.PushOptions(repo=REPO, endpoint=hub.url, token=TOKEN, private=True))
    assert hub.requests_matching("POST", r"/preupload/|/commit/") == []


@pytest.mark.slow
def test_rejected_token_is_one_clear_line(model, env, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)  # no --token: HF_TOKEN is used (and refused by the server)
    res = run_cli("push", model, "--repo", REPO, "--endpoint", hub.url)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "401" in lines[0] and REPO in lines[0] and "--token" in lines[0] and "HF_TOKEN" in lines[0]
    assert hub.requests and all(r.authorized for r in hub.requests)
    assert hub.lfs_puts() == [] and hub.requests_matching("POST", r"/commit/") == []
    assert_no_token_anywhere(hub, res.stdout, res.stderr, roots=(env,))


def test_unreachable_and_wrong_endpoints_name_the_endpoint(model, online, hub):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = invoke("push", model, "--repo", REPO, "--endpoint", f"http://127.0.0.1:{port}", "--token", TOKEN)
    assert res.exit_code == 2
    assert f"http://127.0.0.1:{port}" in res.output and "connection refused" in res.output.lower()
    assert len(res.output.strip().splitlines()) == 1 and TOKEN not in res.output
    res = invoke("push", model, "--repo", REPO, "--endpoint", f"{hub.url}/not-a-hub", "--token", TOKEN)
    assert res.exit_code == 2 and f"{hub.url}/not-a-hub" in res.output and "404" in res.output
    assert_no_token_anywhere(hub, res.output)


# ---- nothing sent (in-process) --------------------------------------------------------------------------
def test_dry_run_lists_files_and_card_and_sends_nothing(model, env, hub):
    before = snapshot(model)
    res = invoke("push", model, "--repo", REPO, "--endpoint", hub.url, "--dry-run",
                 "--base-model-map", f"{model.parent / 'poet'}=me/poet")
    assert res.exit_code == 0, res.output
    assert hub.requests == []
    for p in model.iterdir():
        assert p.name in res.stdout
    assert f"would push {len(list(model.iterdir()))} file(s)" in res.stdout
    assert "base_model:\n- me/poet\nbase_model_relation: merge" in res.stdout  # the card as it would be uploaded
    assert snapshot(model) == before


def test_incomplete_folder_is_refused_before_any_request(model, env, hub, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    (broken / shards[1]).unlink()
    res = invoke("push", broken, "--repo", REPO, "--endpoint", hub.url, "--token", TOKEN)
    assert res.exit_code == 2 and shards[1] in res.output and "incomplete" in res.output
    assert hub.requests == []

    stale = tmp_path / "stale"
    shutil.copytree(model, stale)
    shutil.copy(stale / shards[0], stale / "model-00009-of-00009.safetensors")
    with pytest.raises(hubmod.PushError, match="not in model.safetensors.index.json"):
        hubmod.validate_folder(stale)
    (stale / "model-00009-of-00009.safetensors").unlink()
    idx = json.loads((stale / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.extra.weight"] = shards[0]
    (stale / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(hubmod.PushError, match="model.extra.weight is listed in the index but missing"):
        hubmod.validate_folder(stale)
    (stale / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(hubmod.PushError, match="invalid index"):
        hubmod.validate_folder(stale)

    noconfig = tmp_path / "noconfig"
    shutil.copytree(model, noconfig)
    (noconfig / "config.json").unlink()
    with pytest.raises(hubmod.PushError, match="no config.json"):
        hubmod.validate_folder(noconfig)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model, corrupt)
    (corrupt / shards[-1]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(MergeQuantError, match="corrupt"):
        hubmod.validate_folder(corrupt)
    assert hub.requests == []


def test_file_over_the_hub_limit_is_refused(model, monkeypatch):
    monkeypatch.setattr(hubmod, "MAX_FILE_BYTES", 100_000)
    with pytest.raises(hubmod.PushError, match="per-file limit"):
        hubmod.validate_folder(model)


def test_bad_card_is_refused(model, tmp_path, env, hub):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "README.md").write_text("---\nbase_model: [a/b, c/d]\nbase_model_relation: quantized\n---\n")
    res = invoke("push", bad, "--repo", REPO, "--endpoint", hub.url, "--token", TOKEN)
    assert res.exit_code == 2 and "exactly one base_model" in res.output
    res = invoke("push", model, "--repo", REPO, "--endpoint", hub.url, "--token", TOKEN, "--base-model-map", "./poet=not a repo")
    assert res.exit_code == 2 and "not a Hub id" in res.output
    assert hub.requests == []


def test_offline_mode_is_detected_before_any_request(model, env, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = invoke("push", model, "--repo", REPO, "--endpoint", hub.url, "--token", TOKEN)
    assert res.exit_code == 2
    assert "offline mode" in res.output and "HF_HUB_OFFLINE" in res.output
    assert hub.requests == [] and TOKEN not in res.output


@pytest.mark.parametrize("args, msg", [
    (["--create-pr", "--revision", "dev"], "cannot be combined with --revision"),
    (["--repo", "not-a-repo-id"], "expected a Hub repo id"),
    (["--commit-message", " "], "must not be empty"),
])
def test_option_errors_before_any_request(model, env, hub, args, msg):
    base = ["push", model, "--endpoint", hub.url, "--token", TOKEN]
    if "--repo" not in args:
        base += ["--repo", REPO]
    res = invoke(*base, *args)
    assert res.exit_code == 2 and msg in res.output, res.output
    assert hub.requests == []


def test_no_token_is_a_clear_error(model, env, hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # conftest's offline default, read at import
    with pytest.raises(hubmod.PushError, match="no Hugging Face token"):
        hubmod.push(model, hubmod.PushOptions(repo=REPO, endpoint=hub.url))
    assert hub.requests == []


@pytest.mark.parametrize("status, headers, expected", [
    (401, {}, ["401", REPO, "--token", "HF_TOKEN"]),
    (403, {"X-Error-Message": "You don't have the rights"}, ["403", REPO, "write access", "'me' namespace"]),
    (404, {}, ["404", "https://hub.example", "--endpoint"]),
    (404, {"X-Error-Code": "RevisionNotFound"}, ["404", "revision 'dev'"]),
    (500, {"X-Error-Message": "boom"}, ["500", "boom"]),
])
def test_http_errors_become_actionable_messages(status, headers, expected):
    httpx2 = pytest.importorskip("httpx2")
    from huggingface_hub.errors import HfHubHTTPError

    req = httpx2.Request("POST", f"https://hub.example/api/models/{REPO}/commit/main",
                         headers={"authorization": f"Bearer {TOKEN}"})
    err = HfHubHTTPError(f"{status} error", response=httpx2.Response(status, headers=headers, request=req))
    msg = hubmod._explain(err, repo=REPO, endpoint="https://hub.example", revision="dev")
    for e in expected:
        assert e in msg, msg
    assert TOKEN not in msg and "\n" not in msg
    wrapped = RuntimeError("Error while uploading 'x' to the Hub.")
    wrapped.__cause__ = err
    assert hubmod._explain(wrapped, repo=REPO, endpoint="https://hub.example", revision="dev") == msg
