"""What `mergequant run` and `mergequant push` refuse: folders they did not make, workdirs and outputs
that overlap an input, leftovers that are not verifiably theirs, links out of the pushed folder,
non-regular files, and repo ids the Hub would refuse.

Every case goes through the CLI: exit status 2 and one line on stderr naming the folder, link or repo
id; nothing created or deleted (every file hashed before and after, every entry of the input folders
listed, so a stray ``.lock`` shows); the dry run states the same refusal. Each test's first refusal of
its first case runs the real CLI in a subprocess (``case_cli``); the other calls run the same CLI
in-process (``helpers.cli``), which saves an interpreter start-up (seconds) per call.
Release files are merge-only or refused before any step runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from mergequant.hub import repo_id_problem
from mergequant.release import CLAIM_SLACK_NS, MANIFEST

from helpers import REPO, TOKEN, cli, run_cli  # fixtures env, online (in-process pushes) and hub (loopback Hub): conftest

RECIPE = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"


@pytest.fixture(scope="module")
def pristine(tiny_models) -> Path:
    """The session's tiny float32 base + two fine-tunes (2 layers, hidden 64): folders base, a, b; tests work on copies."""
    return tiny_models["base"].parent


@pytest.fixture
def models(pristine, tmp_path) -> Path:
    """This test's own copy of the models (a bug here must not break the other tests) and a linear recipe."""
    root = tmp_path / "models"
    shutil.copytree(pristine, root)
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(a=root / "a", b=root / "b"))
    return root


def tree(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: files by sha256, folders and links by kind: any file created,
    deleted or changed (a ``.lock``, a replaced model) makes two trees differ."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                key = str(p)
                if p.is_symlink():
                    out[key] = f"link -> {os.readlink(p)}"
                elif p.is_dir():
                    out[key] = "dir"
                else:
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(root)] = "dir" if root.is_dir() else "missing"
    return out


def refused(proc, *needles: str) -> str:
    """The one stderr line of a refusal (exit status 2), checked to name every needle."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def release(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "release.yaml"
    path.write_text(body)
    return path


# ---- mergequant run ---------------------------------------------------------------------------------------
def test_unrecorded_output_folder_is_refused_and_force_step_keeps_it(models, tmp_path, case_cli):
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n")
    mine = tmp_path / "out" / "merged"
    (mine / "sub").mkdir(parents=True)
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "weights.bin").write_bytes(os.urandom(4096))
    (mine / "sub" / "notes.txt").write_text("not a mergequant output")
    before = tree(tmp_path)

    dry = case_cli("run", path, "--dry-run")
    line = refused(dry, str(mine), "no record")
    assert f"REFUSED: {line.removeprefix('error: ')}" in dry.stdout and "REFUSED merge" in dry.stdout
    refused(cli("run", path), str(mine), "refusing to replace", "--force-step merge")
    assert tree(tmp_path) == before  # nothing replaced, nothing created (no manifest, no .lock)

    dry = cli("run", path, "--dry-run", "--force-step", "merge")
    assert dry.returncode == 0 and f"{mine} is not mergequant's: kept under another name" in dry.stdout, dry.stdout
    done = cli("run", path, "--force-step", "merge", check=True)
    kept = [p for p in mine.parent.iterdir() if p.name.startswith("merged.set-aside-")]
    assert len(kept) == 1 and f"{mine} was not written by mergequant: kept as {kept[0].name}" in done.stdout
    assert {k.replace(str(kept[0]), str(mine)): v for k, v in tree(kept[0]).items()} == \
        {k: v for k, v in before.items() if k.startswith(str(mine))}  # byte-identical, only renamed
    assert "architectures" in json.loads((mine / "config.json").read_text())
    assert json.loads((mine.parent / MANIFEST).read_text())["steps"]["merge"]["output"] == "merged"


@pytest.mark.parametrize("how", ["a note added to the finished output", "the user's folder put in its place"])
def test_recorded_output_holding_files_we_did_not_write_is_refused(models, tmp_path, how, case_cli):
    """The manifest records `merged`, but the folder now holds a file no run wrote: redoing the step
    (because the files differ) used to delete it."""
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n")
    cli("run", path, check=True)
    mine = tmp_path / "out" / "merged"
    if how.startswith("the user's"):
        shutil.rmtree(mine)
        mine.mkdir()
    (mine / "NOTES.txt").write_text("precious")
    before = tree(tmp_path)
    dry = case_cli("run", path, "--dry-run")
    refused(dry, str(mine), "did not write there (NOTES.txt)")
    refused(cli("run", path), str(mine), "did not write there (NOTES.txt)", "--force-step merge")
    assert tree(tmp_path) == before
    done = cli("run", path, "--force-step", "merge", check=True)
    kept = [p for p in mine.parent.iterdir() if p.name.startswith("merged.set-aside-")]
    assert len(kept) == 1 and (kept[0] / "NOTES.txt").read_text() == "precious", done.stdout
    assert not (mine / "NOTES.txt").exists() and (mine / "config.json").exists()


def test_step_named_like_an_input_model_is_refused(models, tmp_path, case_cli):
    """The reported case: `workdir: ../models` and a quantization named like a merge parent."""
    path = release(tmp_path, f"workdir: models\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n"
                             "quantize:\n  - {name: a, method: rtn, bits: 4, group_size: 32}\n")
    before = tree(tmp_path)
    dry = case_cli("run", path, "--dry-run")
    line = refused(dry, "quantize/a", str(models / "a"), "merge parent")
    assert f"REFUSED: {line.removeprefix('error: ')}" in dry.stdout
    refused(cli("run", path), "quantize/a", str(models / "a"))
    assert tree(tmp_path) == before  # models/a intact; no .lock or manifest in models/ either


@pytest.mark.parametrize("workdir, merge, victim", [
    ("models/a", "recipe", "a"),  # the workdir is a merge parent
    ("models/a/run", "recipe", "a"),  # inside one
    ("models/base", "model", "base"),  # the model a release quantizes
])
def test_workdir_in_an_input_model_folder_is_refused(models, tmp_path, workdir, merge, victim, case_cli):
    spec = f"{{recipe: {tmp_path / 'recipe.yaml'}}}" if merge == "recipe" else f"{{model: {models / 'base'}}}"
    path = release(tmp_path, f"workdir: {workdir}\nmerge: {spec}\nquantize:\n  - {{name: q, method: rtn, bits: 4, group_size: 32}}\n")
    before = tree(tmp_path)
    dry = case_cli("run", path, "--dry-run")
    line = refused(dry, f"workdir {tmp_path / workdir}", f"input model folder {models / victim}")
    assert f"REFUSED: {line.removeprefix('error: ')}" in dry.stdout
    refused(cli("run", path), f"workdir {tmp_path / workdir}", str(models / victim))
    assert tree(tmp_path) == before
    assert not any(p.name == ".lock" for p in models.rglob("*"))


def test_output_folder_holding_an_input_file_is_refused(models, tmp_path, case_cli):
    held = tmp_path / "out" / "merged" / "heldout.txt"
    held.parent.mkdir(parents=True)
    held.write_text("some held-out text " * 50)
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\neval: {{data: {held}}}\n")
    before = tree(tmp_path)
    refused(case_cli("run", path, "--dry-run"), "merge would write", str(held), "eval.data")
    refused(cli("run", path), str(held), "eval.data")
    assert tree(tmp_path) == before


def test_leftovers_are_deleted_only_when_verifiably_ours(models, tmp_path):
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n")
    wd = tmp_path / "out"
    cli("run", path, check=True)
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (wd / ".merged.old-deadbeef").symlink_to(victim, target_is_directory=True)  # our name, but a link
    (wd / ".merged.old-backup").mkdir()  # a user's backup: not our name
    (wd / ".merged.old-backup" / "model.safetensors").write_bytes(b"user data")
    (wd / ".merged.partial-0123abcd").mkdir()  # our name, but no run of this workdir was interrupted
    (wd / ".merged.partial-0123abcd" / "x").write_bytes(b"who knows")
    foreign = tree(victim, wd / ".merged.old-backup", wd / ".merged.partial-0123abcd")

    dry = cli("run", path, "--dry-run", "--force-step", "merge")
    assert dry.returncode == 0 and "removed by the next run" not in dry.stdout
    assert dry.stdout.count("kept by the next run (not verifiably left by mergequant)") == 3, dry.stdout
    res = cli("run", path, "--force-step", "merge", check=True)
    assert "removed ." not in res.stdout and res.stdout.count("not verifiably left by mergequant") == 3, res.stdout
    assert tree(victim, wd / ".merged.old-backup", wd / ".merged.partial-0123abcd") == foreign
    assert (wd / ".merged.old-deadbeef").is_symlink()

    # a run killed after claiming `merged` (and maybe after renaming it into place, before recording it):
    # its leftover is ours and removed, the unrecorded-but-claimed output is redone, not refused
    time.sleep(CLAIM_SLACK_NS / 1e9 + 0.2)  # the look-alike .merged.partial-0123abcd predates the killed run
    manifest = json.loads((wd / MANIFEST).read_text())
    del manifest["steps"]["merge"]
    manifest["pending"] = {"merged": {"step": "merge", "since_ns": time.time_ns()}}
    (wd / MANIFEST).write_text(json.dumps(manifest))
    (wd / ".merged.partial-89abcdef").mkdir()
    (wd / ".merged.partial-89abcdef" / "model.safetensors").write_bytes(b"half written")
    dry = cli("run", path, "--dry-run")
    assert dry.returncode == 0 and "removed by the next run): .merged.partial-89abcdef" in dry.stdout, dry.stdout
    res = cli("run", path, check=True)
    assert "removed .merged.partial-89abcdef (left by an interrupted run)" in res.stdout
    assert "kept .merged.partial-0123abcd: older than the interrupted run that was writing merged" in res.stdout
    assert "[merge] run (not done yet)" in res.stdout and not (wd / ".merged.partial-89abcdef").exists()
    assert tree(victim, wd / ".merged.old-backup", wd / ".merged.partial-0123abcd") == foreign
    assert "pending" not in json.loads((wd / MANIFEST).read_text())


@pytest.mark.slow
def test_release_file_with_a_bad_repo_id_is_refused_like_push(models, tmp_path):
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\npush: {{merged: a/..}}\n")
    line = refused(run_cli("run", path, "--dry-run"), "push.merged", "'a/..'")
    assert repo_id_problem("a/..") in line
    assert not (tmp_path / "out").exists()


# ---- mergequant push ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine_model(tiny_models) -> Path:
    return tiny_models["base"]


@pytest.fixture
def model(pristine_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(pristine_model, folder)
    return folder


def push(folder: Path, hub, *args: str, repo: str = REPO, runner=cli):
    """``mergequant push`` to the loopback Hub; in-process unless ``runner`` is ``run_cli`` (the in-process
    calls need the ``online`` fixture, as a subprocess needs ``env``)."""
    return runner("push", folder, "--repo", repo, "--endpoint", hub.url, "--token", TOKEN, *args)


def assert_nothing_sent(hub, *procs) -> None:
    assert hub.requests == [] and hub.repos == {}
    for p in procs:
        assert TOKEN not in p.stdout + p.stderr


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_link_out_of_the_folder_is_refused_before_any_request(model, online, hub, tmp_path, kind, case_cli):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOP SECRET")
    link, target = ((model / "notes.txt", Path("../outside/secret.txt")) if kind == "file"
                    else (model / "extra", secret.parent))
    link.symlink_to(target)
    resolved = secret if kind == "file" else secret.parent
    before = tree(model, secret.parent)
    dry = push(model, hub, "--dry-run", runner=case_cli)
    real = push(model, hub)
    for proc in (dry, real):
        refused(proc, str(link), f"a link to {resolved}", "outside the folder")
    assert "TOP SECRET" not in dry.stdout
    assert_nothing_sent(hub, dry, real)
    assert tree(model, secret.parent) == before


def test_link_inside_the_folder_is_uploaded_as_the_file_it_points_to(model, online, hub):
    (model / "real").mkdir()
    (model / "config.json").rename(model / "real" / "config.json")
    (model / "config.json").symlink_to("real/config.json")
    dry = push(model, hub, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    line = next(ln for ln in dry.stdout.splitlines() if ln.strip().startswith("config.json"))
    assert "config.json -> real/config.json" in line and "(link inside the folder)" in line
    real = push(model, hub)
    assert real.returncode == 0, real.stderr
    assert "config.json -> real/config.json (link inside the folder)" in real.stderr
    files = hub.files(REPO)
    assert files["config.json"].content == (model / "real" / "config.json").read_bytes()
    assert not files["config.json"].content.startswith(b"real/")  # the file, not the link text
    assert TOKEN not in dry.stdout + dry.stderr + real.stdout + real.stderr


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_non_regular_files_are_refused(model, online, hub, kind, case_cli):
    special = model / ("pipe" if kind == "fifo" else "sock")
    if kind == "fifo":
        os.mkfifo(special)
    else:
        if len(str(special)) > 100:
            pytest.skip("socket path too long for AF_UNIX")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(special))
        sock.close()
    for proc in (push(model, hub, "--dry-run", runner=case_cli), push(model, hub)):
        refused(proc, str(special), f"a {kind}", "not a regular file")
        assert_nothing_sent(hub, proc)


BAD_IDS = ["a/..", "a/b/c", "a/" + "x" * 97, "a/b c", "a/-b", "a/b-", "a/.b", "a/b.", "a/b--c", "a/b..c"]


@pytest.mark.parametrize("repo", BAD_IDS)
def test_invalid_repo_ids_are_refused_identically_by_dry_run_and_push(model, online, hub, repo, case_cli):
    dry = push(model, hub, "--dry-run", repo=repo, runner=case_cli)
    real = push(model, hub, repo=repo)
    assert refused(dry, repr(repo), "expected a Hub repo id") == refused(real, repr(repo))
    assert_nothing_sent(hub, dry, real)
    with pytest.raises(HFValidationError):  # what huggingface_hub refuses, we refuse (and more)
        validate_repo_id(repo)


@pytest.mark.parametrize("repo", ["me/tiny.git", "a/é", "a", "a/b@main", "/b", "a/"])
def test_more_invalid_repo_ids_are_refused_by_both_validators(repo):
    assert repo_id_problem(repo)
    if repo != "a":  # huggingface_hub takes a bare name (a repo in the user's namespace); a push needs the namespace
        with pytest.raises(HFValidationError):
            validate_repo_id(repo)


@pytest.mark.parametrize("repo", ["me/tiny-merge", "Org_1/m.v2-GPTQ", "a/" + "x" * 96, "_a/b_"])
def test_valid_repo_ids_pass_both_validators(repo):
    assert repo_id_problem(repo) is None
    validate_repo_id(repo)


# ---------------------------------------------------------------------------------------------------
# tokens that cannot be tokens: refused before any request, never quoted (a CRLF token file used to be printed)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token, kind", [(TOKEN + "\r", "line ending"), (TOKEN + "\nxyz", "line ending"),
                                         ("hf_SECRET é", "whitespace"), ("hf_SECRETé", "non-ASCII"),
                                         ("hf_SECRET\x07", "control character")])
@pytest.mark.parametrize("via", ["HF_TOKEN", "--token"])
def test_malformed_token_refused_before_any_request_and_never_printed(model, online, hub, monkeypatch, token, kind, via,
                                                                     case_cli):
    args = ["push", model, "--repo", "me/tokencheck", "--endpoint", hub.url]
    if via == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        args += ["--token", token]
    res = case_cli(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert kind in lines[0] and "token" in lines[0]
    assert hub.requests == []
    secret = token.strip().split()[0].rstrip("\x07é")
    for text in (res.stdout, res.stderr):
        assert secret not in text and repr(token)[1:-1] not in text


@pytest.mark.parametrize("revision", ["../x", "-rf", "a..b", "x y", "br~1", "x.lock", "a/.b"])
def test_invalid_branch_names_refused_before_any_request(model, online, hub, revision, case_cli):
    res = case_cli("push", model, "--repo", "me/branchcheck", "--endpoint", hub.url, "--token", TOKEN,
                  "--revision", revision)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "not a valid branch name" in lines[0], res.stderr
    assert hub.requests == []


@pytest.mark.slow
def test_endpoint_credentials_never_printed(model, env):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_cli("push", model, "--repo", "me/creds", "--token", TOKEN,
                  "--endpoint", f"http://user:pa55word@127.0.0.1:{port}")
    assert res.returncode == 2 and "pa55word" not in res.stdout + res.stderr, res.stderr
    assert f"127.0.0.1:{port}" in res.stderr


# ---------------------------------------------------------------------------------------------------
# second campaign: claims of interrupted steps, edited manifests
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_step_does_not_make_a_later_user_folder_ours(models, tmp_path, monkeypatch):
    """A step that fails or is interrupted renamed nothing into place: its claim must not make a folder
    a user puts at that name afterwards look like ours (it used to be replaced on the next run)."""
    import mergequant.release as release_mod

    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n")

    def interrupted(self, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(release_mod._Runner, "_do_merge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        release_mod.run_release(path, release_mod.RunOptions(quiet=True), log=lambda m: None)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert "pending" not in manifest, manifest
    monkeypatch.undo()
    mine = tmp_path / "out" / "merged"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    refused(run_cli("run", path), str(mine), "no record")  # the real CLI: the only run of this test
    assert (mine / "notes.txt").read_text() == "precious"


def _edited(manifest: dict, how: str) -> dict:
    m = json.loads(json.dumps(manifest))
    rec = m["steps"]["merge"]
    if how == "pending a list":
        m["pending"] = ["merged"]
    elif how == "pending a number":
        m["pending"] = 5
    elif how == "no content_hash":
        del rec["content_hash"]
    elif how == "files null":
        rec["files"] = None
    elif how == "output outside":
        rec["output"] = "../x"
    elif how == "file outside":
        rec["files"] = {"../../etc/passwd": {"size": 1, "sha256": "0"}}
    elif how == "record a list":
        m["steps"]["merge"] = []
    return m


@pytest.mark.parametrize("how", ["pending a list", "pending a number", "no content_hash", "files null",
                                 "output outside", "file outside", "record a list", "nested", "symlink"])
def test_edited_manifest_is_one_line(models, tmp_path, how, case_cli):
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n")
    cli("run", path, check=True)
    mpath = tmp_path / "out" / MANIFEST
    if how == "nested":
        mpath.write_text("[" * 100000 + "]" * 100000)
    elif how == "symlink":
        real = tmp_path / "elsewhere.json"
        real.write_text(mpath.read_text())
        mpath.unlink()
        mpath.symlink_to(real)
    else:
        mpath.write_text(json.dumps(_edited(json.loads(mpath.read_text()), how)))
    before = tree(tmp_path)
    refused(case_cli("run", path), str(mpath), "delete it to redo every step")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_endpoint_that_never_answers_times_out_in_one_line(model, env, monkeypatch):
    """A server that accepts connections and never answers used to hang `push` (no timeout at all)."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    monkeypatch.setenv("MERGEQUANT_HUB_TIMEOUT", "2")
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        import subprocess
        import sys

        res = subprocess.run([sys.executable, "-m", "mergequant", "push", str(model), "--repo", "me/blackhole",
                              "--endpoint", url, "--token", TOKEN], capture_output=True, text=True, timeout=90,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})  # a regression fails, not hangs
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and url in lines[0], res.stderr
    assert "imeout" in lines[0] or "timed out" in lines[0], lines[0]
    assert took < 45 and TOKEN not in res.stderr


@pytest.mark.parametrize("damage", ["delete weights", "truncate weights", "empty config"])
def test_damaged_merge_output_is_redone_not_an_error(models, tmp_path, damage):
    """The quantizations' plan used to open the damaged merge output before the merge step could see
    the damage and redo itself: the run stopped instead of resuming."""
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {tmp_path / 'recipe.yaml'}}}\n"
                             "quantize:\n  - {name: q, method: rtn, bits: 4, group_size: 32}\n")
    cli("run", path, check=True)
    merged = tmp_path / "out" / "merged"
    weights = next(merged.glob("*.safetensors"))
    if damage == "delete weights":
        weights.unlink()
    elif damage == "truncate weights":
        os.truncate(weights, 100)
    else:
        (merged / "config.json").write_text("{}")
    assert cli("run", path, "--dry-run").returncode == 0
    done = cli("run", path, check=True)
    assert "[merge] run" in done.stdout and "[quantize/q] skip" in done.stdout, done.stdout
    assert json.loads((merged / "config.json").read_text()).get("architectures")


def test_own_earlier_output_reused_under_a_new_step_is_not_set_aside(models, tmp_path):
    """merge.out renamed and a quantization given the old name: the old folder is ours (an earlier run
    wrote it); it is replaced, not renamed aside as if it were someone else's."""
    recipe = tmp_path / "recipe.yaml"
    path = release(tmp_path, f"workdir: out\nmerge: {{recipe: {recipe}}}\n")
    cli("run", path, check=True)
    path.write_text(f"workdir: out\nmerge: {{recipe: {recipe}, out: m2}}\n"
                    "quantize:\n  - {name: merged, method: rtn, bits: 4, group_size: 32}\n")
    done = cli("run", path, check=True)
    assert "set-aside" not in done.stdout and not list((tmp_path / "out").glob("*.set-aside-*")), done.stdout
    assert json.loads((tmp_path / "out" / "merged" / "config.json").read_text()).get("quantization_config")
