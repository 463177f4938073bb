"""The nightly workflow (.github/workflows/nightly.yml), checked offline.

- GitHub's workflow schema (check-jsonschema's vendored copy) and zizmor's offline audits accept it with
  no finding of medium or high severity; each tool, shown a broken copy, reports the breakage.
- Its steps do what the README says with each exit code of `lossbench nightly` and of asv (their scripts
  are run here, taken from the YAML, with fakes of both), and .ci/nightly-results.sh keeps branch
  lossbench-results (lossbench's run files and asv's results), exercised against a local bare repository.
Nothing here uses the network or a GitHub token.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is part of the test extra (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"
RESULTS_SCRIPT = ROOT / ".ci" / "nightly-results.sh"
BIN = Path(sys.executable).parent
SERIOUS = ("medium", "high")
SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")
needs_git = pytest.mark.skipif(shutil.which("git") is None or BASH is None, reason="git and bash are needed")


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable} (it is in the test extra: "
                    "pip install -e '.[test]')")
    return path


def _offline_env() -> dict[str, str]:
    """The environment minus anything that would let a linter go online as someone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN", "GH_HOST")}
    env.update(ZIZMOR_OFFLINE="true", NO_COLOR="1")
    return env


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(_tool("check-jsonschema")), "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, env=_offline_env(), timeout=120)


def _zizmor(path: Path) -> list[dict]:
    """zizmor's findings on one workflow, every severity; offline, so only the offline audits run."""
    proc = subprocess.run([str(_tool("zizmor")), "--offline", "--no-exit-codes", "--format", "json", str(path)],
                          capture_output=True, text=True, env=_offline_env(), timeout=120)
    assert proc.returncode == 0, f"zizmor failed (exit {proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def _serious(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["determinations"]["severity"].lower() in SERIOUS]


def _describe(findings: list[dict]) -> str:
    lines = []
    for f in findings:
        det, loc = f["determinations"], f["locations"][0]["concrete"]
        lines.append(f"{f['ident']} ({det['severity']}, confidence {det['confidence']}) at line "
                     f"{loc['location']['start_point']['row'] + 1}: {f['desc']}: {loc['feature'].strip()}")
    return "\n".join(lines) or "(none)"


def _load() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _triggers(wf: dict) -> dict:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as the boolean true


def _step(job: dict, prefix: str) -> dict:
    matches = [s for s in job["steps"] if s.get("name", "").startswith(prefix)]
    assert len(matches) == 1, f"one step named {prefix!r}... expected, found {len(matches)}"
    return matches[0]


def _broken_copy(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    text = WORKFLOW.read_text()
    assert old in text, f"{old!r} is no longer in the workflow: update this test"
    path = tmp_path / ".github" / "workflows" / "nightly.yml"
    path.parent.mkdir(parents=True)
    path.write_text(text.replace(old, new, count))
    return path


# --- the linters ------------------------------------------------------------------------------------------


def test_workflow_matches_githubs_schema():
    proc = _schema_check(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("old, new, expected", [
    ("    runs-on: ubuntu-latest\n", "", "'runs-on' is a required property"),
    ("\njobs:\n", "\nnightly_gate: true\njobs:\n", "'nightly_gate' was unexpected"),
    ("    timeout-minutes: 100\n", "    timeout-minutes: forty\n", "forty"),
], ids=["runs-on-missing", "unknown-top-level-key", "timeout-not-a-number"])
def test_schema_check_rejects_a_broken_workflow(tmp_path, old, new, expected):
    proc = _schema_check(_broken_copy(tmp_path, old, new))
    assert proc.returncode == 1, f"the schema accepted a broken workflow:\n{proc.stdout}{proc.stderr}"
    assert expected in proc.stdout, proc.stdout


def test_zizmor_finds_nothing_medium_or_high():
    findings = _zizmor(WORKFLOW)
    serious = _serious(findings)
    assert not serious, f"zizmor findings of medium or high severity:\n{_describe(serious)}"
    print(f"zizmor, low and informational findings:\n{_describe(findings)}")


@pytest.mark.parametrize("old, new, ident", [
    # an attacker-controlled expression inside a script
    ("      - name: Comparison to the job summary\n",
     "      - run: echo \"${{ github.event.issue.title }}\"\n      - name: Comparison to the job summary\n",
     "template-injection"),
    # a tag instead of a commit
    ("actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2", "actions/checkout@v4", "unpinned-uses"),
    # the token left in .git/config, where an uploaded artifact could carry it
    ("          persist-credentials: false\n", "", "artipacked"),
], ids=["template-injection", "unpinned-uses", "persisted-credentials"])
def test_zizmor_catches_an_insecure_workflow(tmp_path, old, new, ident):
    serious = _serious(_zizmor(_broken_copy(tmp_path, old, new)))
    assert ident in {f["ident"] for f in serious}, \
        f"zizmor did not report {ident} at medium or high severity; it reported:\n{_describe(serious)}"


# --- what the workflow says -------------------------------------------------------------------------------


def test_triggers_permissions_and_jobs():
    wf = _load()
    on = _triggers(wf)
    assert set(on) == {"schedule", "workflow_dispatch"}
    assert len(on["schedule"][0]["cron"].split()) == 5
    assert wf["permissions"] == {}
    assert wf["concurrency"]["cancel-in-progress"] is False
    cpu, gpu = wf["jobs"]["cpu"], wf["jobs"]["gpu"]
    assert cpu["runs-on"] == "ubuntu-latest"
    assert gpu["runs-on"] == ["self-hosted", "linux", "x64", "gpu", "cuda"]
    assert (cpu["timeout-minutes"], gpu["timeout-minutes"]) == (100, 60)
    for job in (cpu, gpu):
        assert job["permissions"] == {"contents": "write"}  # the jobs push lossbench-results
    assert gpu["needs"] == "cpu" and "cancelled()" in gpu["if"]  # never two pushes at once


STEPS = {
    "cpu": ["Check out", "Set up Python", "Install (the README's set-up, torch pinned by constraints.txt)",
            "Restore the baseline and history from lossbench-results", "lossbench nightly",
            "Comparison to the job summary", "asv on this commit", "Collect this run's files",
            "Upload run files, baseline and comparison", "Upload asv's site",
            "Commit run files and baseline to lossbench-results",
            "Verdict (fails on regression, bad input, rows that failed to run, or asv's failure)"],
    "gpu": ["Check out", "Install over the runner's CUDA torch (PIP_CONSTRAINTS= keeps it)",
            "Restore the baseline and history from lossbench-results", "lossbench nightly",
            "Comparison to the job summary", "Collect this run's files",
            "Upload run files, baseline and comparison", "Commit run files and baseline to lossbench-results",
            "Verdict (fails on regression, bad input or rows that failed to run)"],
}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_step_order(name):
    """asv runs after the nightly and its summary, before the collect step that stages its results."""
    assert [s.get("name") for s in _load()["jobs"][name]["steps"]] == STEPS[name]


@pytest.mark.parametrize("name, device, install", [
    ("cpu", "cpu", "make .venv/.installed"),
    ("gpu", "cuda", "make .venv/.installed PIP_CONSTRAINTS="),
])
def test_steps_of_each_job(name, device, install):
    job = _load()["jobs"][name]
    for step in job["steps"]:
        if "uses" in step:
            assert SHA_PIN.match(step["uses"]), f"{step['uses']} is not pinned to a commit"
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False
    if name == "cpu":
        assert _step(job, "Set up Python")["with"]["python-version"] == "3.11"
    assert _step(job, "Install")["run"].strip().splitlines()[-1] == install
    nightly = _step(job, "lossbench nightly")
    assert nightly["id"] == "nightly"
    assert (f".venv/bin/lossbench nightly --ab --device {device} --results results --markdown comparison.md "
            "--json comparison.json") in nightly["run"]
    assert _step(job, "Restore")["run"] == ".ci/nightly-results.sh restore"
    upload = _step(job, "Upload run files")
    assert upload["if"] == "always()" and upload["uses"].startswith("actions/upload-artifact@")
    assert upload["with"] == {"name": f"nightly-{name}", "path": "${{ runner.temp }}/nightly/",
                              "if-no-files-found": "warn"}
    publish = _step(job, "Commit run files")
    assert publish["run"] == ".ci/nightly-results.sh publish"
    assert "contains(fromJSON('[\"0\", \"1\", \"3\", \"4\"]'), steps.nightly.outputs.rc)" in publish["if"]
    assert _step(job, "Verdict")["if"] == "always()"
    for step in job["steps"]:  # expressions reach scripts through env only
        assert "${{" not in step.get("run", ""), f"an expression inside the script of {step.get('name')!r}"
    if name == "gpu":
        assert not [s for s in job["steps"] if "asv" in s.get("name", "") + s.get("run", "")]
        assert "ASV_RC" not in _step(job, "Verdict")["env"]


def test_asv_steps_of_the_cpu_job():
    job = _load()["jobs"]["cpu"]
    # asv places results on main's history: a shallow checkout would drop the earlier nights from the site
    assert _step(job, "Check out")["with"]["fetch-depth"] == 0
    assert _step(job, "Install")["id"] == "install"
    asv = _step(job, "asv on this commit")
    assert asv["id"] == "asv"
    # Not success(): whatever the nightly's verdict; but not on a cancelled run, nor without the install.
    assert asv["if"] == "${{ !cancelled() && steps.install.outcome == 'success' }}"
    assert "steps.nightly" not in asv["if"]
    assert 0 < asv["timeout-minutes"] < job["timeout-minutes"]
    commands = [line.strip() for line in asv["run"].splitlines() if line.strip().startswith(".venv/bin/asv")]
    assert [c.split(" || ")[0] for c in commands] == [
        ".venv/bin/asv machine --yes --machine github-cpu",
        '.venv/bin/asv run --python=same --machine github-cpu --set-commit-hash "$(git rev-parse HEAD)" '
        "--record-samples",
        ".venv/bin/asv publish",
    ]
    site = _step(job, "Upload asv's site")
    assert site["if"] == "always()"
    assert site["uses"] == _step(job, "Upload run files")["uses"]  # the same pinned commit
    assert site["with"] == {"name": "asv-site", "path": ".asv/html", "if-no-files-found": "warn"}
    assert _step(job, "Verdict")["env"]["ASV_RC"] == "${{ steps.asv.outputs.rc }}"


def _run_step(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # `shell: bash` on GitHub runs: bash --noprofile --norc -eo pipefail {0}
    return subprocess.run([BASH, "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


@needs_bash
@pytest.mark.parametrize("name", ["cpu", "gpu"])
@pytest.mark.parametrize("rc, fails", [("0", False), ("1", True), ("2", True), ("3", True), ("4", False),
                                       ("", True), ("137", True)])
def test_verdict_fails_the_job_on_regression_bad_input_and_failed_rows(tmp_path, name, rc, fails):
    proc = _run_step(_step(_load()["jobs"][name], "Verdict")["run"], tmp_path, RC=rc, ASV_RC="0")
    assert (proc.returncode != 0) == fails, f"exit code {rc!r}: step exited {proc.returncode}\n{proc.stdout}"


@needs_bash
@pytest.mark.parametrize("rc, asv_rc, errors", [
    ("0", "0", 0), ("4", "0", 0),
    ("0", "2", 1), ("4", "1", 1), ("0", "", 1), ("0", "137", 1),
    ("1", "0", 1), ("1", "2", 2), ("", "", 2),
])
def test_verdict_of_the_cpu_job_also_fails_on_asv(tmp_path, rc, asv_rc, errors):
    """asv's failure fails the job, a regression with it or not; the verdict names both."""
    proc = _run_step(_step(_load()["jobs"]["cpu"], "Verdict")["run"], tmp_path, RC=rc, ASV_RC=asv_rc)
    assert (proc.returncode != 0) == (errors > 0), f"{rc!r}, asv {asv_rc!r}: exit {proc.returncode}\n{proc.stdout}"
    assert proc.stdout.count("::error::") == errors, proc.stdout


@needs_bash
@pytest.mark.parametrize("rc", [0, 1, 3, 4])
def test_nightly_step_records_the_exit_code_and_goes_on(tmp_path, rc):
    """A regression must not stop the job before the summary, the artifact and the commit."""
    fake = tmp_path / ".venv" / "bin" / "lossbench"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$@" > args.txt\nexit {rc}\n')
    fake.chmod(0o755)
    output = tmp_path / "github_output"
    output.write_text("")
    proc = _run_step(_step(_load()["jobs"]["cpu"], "lossbench nightly")["run"], tmp_path, GITHUB_OUTPUT=str(output))
    assert proc.returncode == 0, proc.stderr
    assert output.read_text() == f"rc={rc}\n"
    assert (tmp_path / "args.txt").read_text().split()[:4] == ["nightly", "--ab", "--device", "cpu"]


def _git_env(tmp_path: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def _fake_asv_checkout(tmp_path: Path, branch: str = "main") -> tuple[Path, dict[str, str]]:
    """A checkout of `branch` (origin/main beside it, as a full actions/checkout leaves it) whose .venv/bin/asv
    logs its arguments and exits ASV_<SUBCOMMAND>_RC."""
    work, env = tmp_path / "work", _git_env(tmp_path)
    work.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=work, env=env, check=True, capture_output=True,  # noqa: E731
                                    text=True, timeout=60).stdout.strip()
    git("init", "--quiet", "-b", "main")
    git("commit", "--quiet", "--allow-empty", "-m", "main")
    git("update-ref", "refs/remotes/origin/main", "HEAD")
    if branch != "main":
        git("checkout", "--quiet", "-b", branch)
        git("commit", "--quiet", "--allow-empty", "-m", branch)
        git("branch", "--quiet", "-D", "main")
    fake = work / ".venv" / "bin" / "asv"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$*" >> asv_calls.txt\n'
                    'case "$1" in machine) exit "${ASV_MACHINE_RC:-0}" ;; run) exit "${ASV_RUN_RC:-0}" ;; '
                    'publish) exit "${ASV_PUBLISH_RC:-0}" ;; esac\nexit 99\n')
    fake.chmod(0o755)
    return work, {**env, "GITHUB_OUTPUT": str(tmp_path / "github_output")}


@needs_git
@pytest.mark.parametrize("machine_rc, run_rc, publish_rc, rc, calls", [
    ("0", "0", "0", 0, ["machine", "run", "publish"]),
    ("0", "2", "0", 2, ["machine", "run", "publish"]),  # a benchmark failed: what was measured is published
    ("0", "0", "1", 1, ["machine", "run", "publish"]),
    ("0", "2", "1", 2, ["machine", "run", "publish"]),  # the first failure is the one reported
    ("1", "0", "0", 1, ["machine", "publish"]),  # no machine, no run; the earlier nights' site still
])
def test_asv_step_records_asv_exit_status_and_goes_on(tmp_path, machine_rc, run_rc, publish_rc, rc, calls):
    work, env = _fake_asv_checkout(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    proc = subprocess.run([BASH, "--noprofile", "--norc", "-eo", "pipefail", "-c",
                           _step(_load()["jobs"]["cpu"], "asv on this commit")["run"]], cwd=work,
                          capture_output=True, text=True, timeout=60,
                          env={**env, "ASV_MACHINE_RC": machine_rc, "ASV_RUN_RC": run_rc, "ASV_PUBLISH_RC": publish_rc})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "github_output").read_text() == f"rc={rc}\n"
    logged = (work / "asv_calls.txt").read_text().splitlines()
    assert [line.split()[0] for line in logged] == calls
    expected = {"machine": "machine --yes --machine github-cpu",
                "run": f"run --python=same --machine github-cpu --set-commit-hash {head} --record-samples",
                "publish": "publish"}
    assert logged == [expected[c] for c in calls]


@needs_git
def test_asv_step_makes_the_local_main_asv_reads_on_a_dispatch_from_another_branch(tmp_path):
    """asv run and asv publish read asv.conf.json's branch, main; a checkout of another branch has only
    origin/main. The step makes main there, and leaves HEAD (the measured commit) alone."""
    work, env = _fake_asv_checkout(tmp_path, branch="feature")
    rev = lambda name: subprocess.run(["git", "rev-parse", "-q", "--verify", name], cwd=work, env=env,  # noqa: E731
                                      capture_output=True, text=True).stdout.strip()
    head, origin_main = rev("HEAD"), rev("refs/remotes/origin/main")
    assert rev("refs/heads/main") == "" and head != origin_main
    script = _step(_load()["jobs"]["cpu"], "asv on this commit")["run"]
    for _ in range(2):  # the second time, main exists already
        proc = subprocess.run([BASH, "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=work,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert rev("refs/heads/main") == origin_main and rev("HEAD") == head
        assert f"--set-commit-hash {head} " in (work / "asv_calls.txt").read_text()


@needs_bash
def test_summary_step_appends_the_comparison(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("before\n")
    script = _step(_load()["jobs"]["cpu"], "Comparison to the job summary")["run"]
    assert _run_step(script, tmp_path, GITHUB_STEP_SUMMARY=str(summary)).returncode == 0  # no comparison.md
    (tmp_path / "comparison.md").write_text("| row | verdict |\n")
    assert _run_step(script, tmp_path, GITHUB_STEP_SUMMARY=str(summary)).returncode == 0
    assert summary.read_text() == "before\n| row | verdict |\n"


# --- .ci/nightly-results.sh against a local bare repository -----------------------------------------------

class _Server:
    """A bare repository standing for github.com/acme/lossbench, and checkouts of it as a job makes them."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
            "GITHUB_SERVER_URL": f"file://{tmp_path / 'server'}", "GITHUB_REPOSITORY": "acme/lossbench",
            "GITHUB_TOKEN": "not-a-token", "RESULTS_BRANCH": "lossbench-results",
            "GITHUB_SHA": "0" * 40, "GITHUB_RUN_ID": "1",
        }
        self.bare = tmp_path / "server" / "acme" / "lossbench.git"
        self.git("init", "--quiet", "--bare", str(self.bare))
        src = tmp_path / "src"
        (src / "results").mkdir(parents=True)
        (src / "README.md").write_text("lossbench\n")
        (src / "results" / ".gitkeep").write_text("")
        (src / "results" / "20260101T000000Z-manual.jsonl").write_text('{"run": "committed on main"}\n')
        self.git("init", "--quiet", "-b", "main", str(src))
        self.git("add", ".", cwd=src)
        self.git("commit", "--quiet", "-m", "main", cwd=src)
        self.git("push", "--quiet", str(self.bare), "main", cwd=src)
        self.nights = 0

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.tmp, env=self.env, check=True, capture_output=True,
                              text=True, timeout=60).stdout

    def checkout(self) -> tuple[Path, dict]:
        """A fresh shallow clone (actions/checkout) and the runner's environment for one job."""
        self.nights += 1
        work, temp = self.tmp / f"work{self.nights}", self.tmp / f"runner_temp{self.nights}"
        temp.mkdir()
        self.git("clone", "--quiet", "--depth", "1", f"file://{self.bare}", str(work))
        return work, {**self.env, "RUNNER_TEMP": str(temp), "GITHUB_RUN_ID": str(self.nights)}

    def script(self, command: str, work: Path, env: dict, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([BASH, str(RESULTS_SCRIPT), command], cwd=work, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)

    def branch_files(self) -> dict[str, str]:
        names = self.git("ls-tree", "-r", "--name-only", "lossbench-results", cwd=self.bare).split()
        return {n: self.git("show", f"lossbench-results:{n}", cwd=self.bare) for n in names}

    def branch_log(self) -> list[str]:
        return self.git("log", "--format=%s", "lossbench-results", cwd=self.bare).splitlines()


def _night(server: _Server, run_id: str, baseline: str, rc: str,
           asv: dict[str, str] | None = None) -> tuple[Path, dict, set[str]]:
    """One job: restore, a fake nightly run (a run file, its meta, the baseline, the comparison), then the
    files `asv` names written under results/asv/ (asv's run), collect, publish. Returns the checkout, its env
    and the staged files."""
    work, env = server.checkout()
    proc = server.script("restore", work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert server.git("status", "--porcelain", "--untracked-files=no", cwd=work) == "", \
        "restore touched tracked files: the run's git_sha would read +dirty"
    results = work / "results"
    (results / f"{run_id}.jsonl").write_text(f'{{"run_id": "{run_id}"}}\n')
    (results / f"{run_id}.meta.json").write_text(f'{{"run_id": "{run_id}", "state": "complete"}}\n')
    (results / "baseline.json").write_text(baseline)
    (work / "comparison.md").write_text(f"comparison of {run_id}\n")
    (work / "comparison.json").write_text("{}\n")
    for name, text in (asv or {}).items():
        (results / "asv" / name).parent.mkdir(parents=True, exist_ok=True)
        (results / "asv" / name).write_text(text)
    proc = server.script("collect", work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage = Path(env["RUNNER_TEMP"]) / "nightly"
    staged = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
    proc = server.script("publish", work, env, NIGHTLY_DEVICE="cpu", NIGHTLY_RC=rc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not-a-token" not in proc.stdout + proc.stderr
    return work, env, staged


@needs_git
def test_results_branch_starts_then_grows(tmp_path):
    server = _Server(tmp_path)

    # Night 1: no branch yet (lossbench nightly exits 4): it is created with this run and the baseline only.
    _, _, staged = _night(server, "R1", '{"v": 1}\n', rc="4")
    assert staged == {"results/R1.jsonl", "results/R1.meta.json", "results/baseline.json",
                      "comparison.md", "comparison.json"}  # not the run file committed on main
    assert server.branch_files() == {"results/R1.jsonl": '{"run_id": "R1"}\n',
                                     "results/R1.meta.json": '{"run_id": "R1", "state": "complete"}\n',
                                     "results/baseline.json": '{"v": 1}\n'}
    assert server.branch_log() == ["nightly cpu: R1 (lossbench nightly exit 4)"]

    # Night 2: restore brings R1 and the baseline back; the new run and the new baseline go on top.
    work, env, staged = _night(server, "R2", '{"v": 2}\n', rc="1")
    assert staged == {"results/R2.jsonl", "results/R2.meta.json", "results/baseline.json",
                      "comparison.md", "comparison.json"}
    files = server.branch_files()
    assert set(files) == {"results/R1.jsonl", "results/R1.meta.json", "results/R2.jsonl", "results/R2.meta.json",
                          "results/baseline.json"}
    assert files["results/baseline.json"] == '{"v": 2}\n'
    assert server.branch_log() == ["nightly cpu: R2 (lossbench nightly exit 1)",
                                   "nightly cpu: R1 (lossbench nightly exit 4)"]

    # Publishing the same files again adds no commit.
    proc = server.script("publish", work, env, NIGHTLY_DEVICE="cpu", NIGHTLY_RC="1")
    assert proc.returncode == 0 and "nothing new" in proc.stdout, proc.stdout + proc.stderr
    assert len(server.branch_log()) == 2


@needs_git
def test_results_branch_keeps_asv_results_at_their_paths(tmp_path):
    server = _Server(tmp_path)
    mine = "results/asv/github-cpu"

    # Night 1: asv's first results, in its machine folder, staged and committed at their paths.
    _, env, staged = _night(server, "R1", '{"v": 1}\n', rc="4", asv={
        "benchmarks.json": '{"b": 1}\n', "github-cpu/machine.json": '{"machine": "github-cpu"}\n',
        "github-cpu/aaaa1111-existing-py.json": '{"commit_hash": "aaaa1111"}\n'})
    assert staged == {"results/R1.jsonl", "results/R1.meta.json", "results/baseline.json", "comparison.md",
                      "comparison.json", "results/asv/benchmarks.json", f"{mine}/machine.json",
                      f"{mine}/aaaa1111-existing-py.json"}
    assert (Path(env["RUNNER_TEMP"]) / "nightly" / mine / "aaaa1111-existing-py.json").is_file()
    files = server.branch_files()
    assert set(files) == {"results/R1.jsonl", "results/R1.meta.json", "results/baseline.json",
                          "results/asv/benchmarks.json", f"{mine}/machine.json", f"{mine}/aaaa1111-existing-py.json"}
    assert files[f"{mine}/aaaa1111-existing-py.json"] == '{"commit_hash": "aaaa1111"}\n'
    assert server.branch_log() == ["nightly cpu: R1 (lossbench nightly exit 4)"]  # asv's files are no runs

    # Night 2: restore brings asv's history back; only what asv added or changed is staged, and the branch
    # keeps the first night's file beside the second's.
    work, _, staged = _night(server, "R2", '{"v": 2}\n', rc="0", asv={
        "benchmarks.json": '{"b": 2}\n', "github-cpu/machine.json": '{"machine": "github-cpu"}\n',
        "github-cpu/bbbb2222-existing-py.json": '{"commit_hash": "bbbb2222"}\n', "github-cpu/notes.txt": "x\n"})
    assert (work / mine / "aaaa1111-existing-py.json").read_text() == '{"commit_hash": "aaaa1111"}\n'
    assert staged == {"results/R2.jsonl", "results/R2.meta.json", "results/baseline.json", "comparison.md",
                      "comparison.json", "results/asv/benchmarks.json", f"{mine}/bbbb2222-existing-py.json"}
    files = server.branch_files()
    assert {n for n in files if n.startswith("results/asv/")} == {
        "results/asv/benchmarks.json", f"{mine}/machine.json", f"{mine}/aaaa1111-existing-py.json",
        f"{mine}/bbbb2222-existing-py.json"}
    assert files[f"{mine}/aaaa1111-existing-py.json"] == '{"commit_hash": "aaaa1111"}\n'
    assert files[f"{mine}/bbbb2222-existing-py.json"] == '{"commit_hash": "bbbb2222"}\n'
    assert files["results/asv/benchmarks.json"] == '{"b": 2}\n'

    # A job without asv (the gpu job) publishes on top and keeps asv's results.
    _, _, staged = _night(server, "R3", '{"v": 3}\n', rc="0")
    assert not [s for s in staged if s.startswith("results/asv/")]
    files = server.branch_files()
    assert f"{mine}/aaaa1111-existing-py.json" in files and f"{mine}/bbbb2222-existing-py.json" in files
    assert "results/R3.jsonl" in files and files["results/asv/benchmarks.json"] == '{"b": 2}\n'


@needs_git
def test_results_branch_is_never_forced(tmp_path):
    """A job whose branch moved since its restore fails instead of overwriting the other job's commit."""
    server = _Server(tmp_path)
    _night(server, "R1", '{"v": 1}\n', rc="0")
    late, late_env = server.checkout()
    assert server.script("restore", late, late_env).returncode == 0
    _night(server, "R2", '{"v": 2}\n', rc="0")  # pushes while `late` is still running
    (late / "results" / "R3.jsonl").write_text("{}\n")
    assert server.script("collect", late, late_env).returncode == 0
    proc = server.script("publish", late, late_env, NIGHTLY_DEVICE="gpu", NIGHTLY_RC="0")
    assert proc.returncode != 0 and "::error::" in proc.stdout, proc.stdout + proc.stderr
    assert "results/R3.jsonl" not in server.branch_files()
    assert server.branch_files()["results/baseline.json"] == '{"v": 2}\n'


@needs_git
def test_restore_fails_when_the_repository_cannot_be_read(tmp_path):
    """An unreadable remote is an error, not 'no baseline yet' (which would pass every night)."""
    server = _Server(tmp_path)
    work, env = server.checkout()
    proc = server.script("restore", work, {**env, "GITHUB_REPOSITORY": "acme/missing"})
    assert proc.returncode != 0 and "::error::cannot read branch lossbench-results" in proc.stdout, \
        proc.stdout + proc.stderr
