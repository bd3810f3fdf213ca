"""Every developer task is a nox session. `nox` alone runs lint, typecheck and every test, measuring coverage.

The README's two commands wrap this file: `./run serve` and `./run test`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint", "typecheck", "tests-core", "tests-aws", "tests-gcp", "tests-e2e", "tests-k8s", "tests-browser",
    "coverage",  # last: it combines what the test sessions measured, and gates it
]  # fmt: skip

ROOT = Path(__file__).parent
# The interpreter `./run` was started with (3.11 or newer); nox's own when unset.
PYTHON = os.environ.get("CMBCLUSTER_PYTHON") or None
REPORTS = ROOT / ".reports"
PACKAGES = {"core": "cmbcluster-core", "aws": "cmbcluster-aws", "gcp": "cmbcluster-gcp"}
# A package's test files run side by side in this many processes (pytest-xdist; files kept whole, as
# their fixtures start servers per module). Most of the time is waiting on servers, so more workers
# than cores still help: on 2 cores, 3 workers took tests-core from 12 to 5.5 minutes.
PARALLEL = ["-n", os.environ.get("CMBCLUSTER_TEST_WORKERS", "3"), "--dist", "loadfile"]
# Pinned so that lint and typecheck results do not change under us between runs.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
# Coverage is part of every test run (`./run test`, CI): each test session runs its tests under
# coverage.py, servers and CLI subprocesses included (.coveragerc), into .reports/coverage/<session>;
# the `coverage` session, last, combines them, prints the figures, and fails below the gates.
# CMBCLUSTER_COVERAGE=0 runs the tests without measuring (a quicker run while working on one thing).
# What it costs, measured on 2 cores, and why it is measured this way: docs/development.md.
# Pinned: 7.10 brought `patch = subprocess` (.coveragerc), which measures the CLI and servers tests start.
COVERAGE = "coverage==7.10.7"
# tests/helm's offline manifest validation; the pin fixes which Kubernetes schemas it ships (to 1.37).
# Installed only where those tests run (tests-e2e) and are type-checked: where it is installed,
# `import kubernetes` imports it (the client's dynamic module does), and with it jsonschema's format
# checkers, which compile 39 grammars (rfc3987-syntax, which JupyterLab brings): 0.25 s of CPU became
# 1.4 s for every process of the tests that imports the Kubernetes client (each control plane and CLI
# run on the Kubernetes backend), a cost no production install has.
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
COVERAGE_DATA = REPORTS / "coverage"
MEASURE = os.environ.get("CMBCLUSTER_COVERAGE", "1") != "0"
#: The gates of the `coverage` session: branch coverage of everything measured, and 100 % of the
#: plugin contract (what a third party implements against and what checks their plugins), by path
#: under cmbcluster-core/src/cmbcluster.
COVERAGE_OVERALL = 85.0
COVERAGE_CONTRACT = ("interfaces/", "hookspecs.py", "registrations.py", "plugins.py", "config.py")


#: pytest options that take a value: what follows one of them is its value (`-k helm`, `--ignore tests/x.py`),
#: not a choice of tests, even where a file or folder of that name exists.
VALUE_OPTIONS = (
    "-k", "-m", "-p", "-n", "-c", "-o", "-W", "--deselect", "--ignore", "--ignore-glob", "--basetemp", "--junitxml",
    "--junit-xml", "--rootdir", "--maxfail", "--dist", "--tb", "--durations",
)  # fmt: skip


def chosen_tests(session: nox.Session, *default: str) -> list[str]:
    """The session's arguments for pytest: those that name tests (an existing file or folder, or a test
    in one: `tests/browser/test_ui_phone.py::test_x`) choose them; otherwise the session's ``default``
    comes first and the arguments are options over it (`-- -k budget -x`)."""
    args = list(session.posargs)
    names_tests = any(
        not arg.startswith("-")
        and (ROOT / arg.split("::")[0]).exists()
        and (i == 0 or args[i - 1] not in VALUE_OPTIONS)
        for i, arg in enumerate(args)
    )
    return args if names_tests else [*default, *args]


def install_packages(
    session: nox.Session, *, extras: str = "test", core_extras: str = "", clouds: Sequence[str] = ("aws", "gcp")
) -> None:
    """Install cmbcluster-core and the cloud plugins ``clouds`` (all three distributions by default) from
    this checkout, editable, with their test extras (and ``core_extras`` of cmbcluster-core besides:
    ``jupyter`` where JupyterLab runs)."""
    args = []
    for name, dist in PACKAGES.items():
        if name != "core" and name not in clouds:
            continue
        wanted = ",".join(e for e in (extras, core_extras if name == "core" else "") if e)
        args += ["-e", f"{ROOT / dist}[{wanted}]" if wanted else str(ROOT / dist)]
    session.install(*args)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def fmt(session: nox.Session) -> None:
    """Apply ruff's fixes and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", "--fix", ".")
    session.run("ruff", "format", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the three packages' code and every test (their tests/ and tests/)."""
    install_packages(session)
    # the browser tests', the Helm tests' and cmbcluster.testing.xdist_coverage's imports; psutil and
    # jsonschema ship no annotations of their own
    session.install(MYPY, PLAYWRIGHT, COVERAGE, KUBERNETES_VALIDATE, "types-PyYAML", "types-psutil", "types-jsonschema")
    session.run("mypy", "cmbcluster-core/src", "cmbcluster-aws/src", "cmbcluster-gcp/src", "tests")
    # one run per package's tests: each has its own conftest and test modules, importable by plain name
    for dist in PACKAGES.values():
        session.run("mypy", f"{dist}/tests")


def install_test_cluster(session: nox.Session) -> None:
    """The Kubernetes test cluster's binaries (tests/k8s/cluster.sh install): built from Debian's source
    package the first time, about 4 minutes on 2 cores, with its steps printed; cached afterwards in
    ~/.cache/cmbcluster-k8s, and then this takes a second. tests-e2e needs its helm, tests-k8s all of it."""
    session.log("the Kubernetes test cluster: built once (about 4 minutes), then cached in ~/.cache/cmbcluster-k8s")
    session.run("bash", str(ROOT / "tests" / "k8s" / "cluster.sh"), "install", external=True)


#: Where tests/k8s/cluster.sh installs helm (among the test cluster's binaries).
TEST_CLUSTER_BIN = Path.home() / ".cache" / "cmbcluster-k8s" / "bin"


def helm_on_path(session: nox.Session) -> dict[str, str]:
    """The environment of a test run that renders the chart with ``helm template`` (the deploy-values
    contract suite): the test cluster's helm, at the end of PATH."""
    install_test_cluster(session)
    return {"PATH": os.pathsep.join([os.environ.get("PATH", ""), str(TEST_CLUSTER_BIN)])}


def pytest_under_coverage(session: nox.Session, env: dict[str, str], pytest: Sequence[str]) -> list[str]:
    """``pytest`` (the command ``pytest``) under ``coverage run`` unless CMBCLUSTER_COVERAGE=0; ``env`` then
    gets coverage's settings, which the tests' subprocesses inherit. This session's earlier data is removed
    first: a rerun replaces it, and `nox -s coverage` combines the latest of each session."""
    if not MEASURE:
        return list(pytest)
    session.install(COVERAGE)
    data = COVERAGE_DATA / session.name
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    # absolute: tests run servers and the CLI in other working directories
    env.update(COVERAGE_RCFILE=str(ROOT / ".coveragerc"), COVERAGE_FILE=str(data / "data"))
    # `coverage run -m pytest` puts the working directory on sys.path, as `python -m pytest` does
    return ["coverage", "run", "-m", "pytest"]


def _package_tests(name: str, dist: str) -> None:
    @nox.session(name=f"tests-{name}", python=PYTHON)
    def run(session: nox.Session) -> None:
        install_packages(session, core_extras="jupyter" if name == "core" else "")  # core runs JupyterLab
        env = helm_on_path(session)
        command = pytest_under_coverage(session, env, ["pytest"])
        session.run(
            *command, *PARALLEL, f"--junitxml={REPORTS / f'tests-{name}.xml'}", *chosen_tests(session, f"{dist}/tests"),
            env=env,
        )  # fmt: skip

    run.__doc__ = f"{dist}'s own tests."


for _name, _dist in PACKAGES.items():
    _package_tests(_name, _dist)


@nox.session(name="tests-e2e", python=PYTHON)
def tests_e2e(session: nox.Session) -> None:
    """Tests that cross packages (tests/): end to end, installed plugins, imports, several replicas on
    PostgreSQL (a real server from Debian's package), the Helm chart's static checks, the README's
    `./run serve`, the catalog's Streamlit example through the proxy."""
    install_packages(session, core_extras="streamlit")
    session.install(KUBERNETES_VALIDATE)  # tests/helm
    install_test_cluster(session)  # the Helm chart's checks use its helm
    # `python -m` puts the repository root on sys.path: tests import tests.postgres, tests.k8s.harness...
    env: dict[str, str] = {}
    command = pytest_under_coverage(session, env, ["python", "-m", "pytest"])
    session.run(
        *command, f"--junitxml={REPORTS / 'tests-e2e.xml'}",
        *chosen_tests(session, "tests", "--ignore=tests/k8s", "--ignore=tests/browser"), env=env,
    )  # fmt: skip


@nox.session(name="tests-k8s", python=PYTHON)
def tests_k8s(session: nox.Session) -> None:
    """Everything that needs a real Kubernetes API server (tests/k8s/cluster.sh builds one once,
    about 4 minutes, and caches it in ~/.cache/cmbcluster-k8s): the compute backend, the control
    plane on it, the cloud flows and the Helm chart. JupyterLab too: the test kubelet runs the
    catalog's notebook pod with it."""
    install_packages(session, core_extras="jupyter")
    install_test_cluster(session)
    # `python -m` puts the repository root on sys.path: these tests import tests.k8s.harness, tests.helm...
    env: dict[str, str] = {}
    command = pytest_under_coverage(session, env, ["python", "-m", "pytest"])
    session.run(*command, f"--junitxml={REPORTS / 'tests-k8s.xml'}", *chosen_tests(session, "tests/k8s"), env=env)


# -- the web UI (frontend/: Next.js, built into cmbcluster-core's package data) ---------------------
# Pinned: Playwright's API and bundled driver change with each release; this one is verified with
# Debian's Chromium (150 on bookworm), which it drives since `playwright install` cannot download here.
PLAYWRIGHT = "playwright==1.65.2"
CHROMIUM = Path("/usr/bin/chromium")


def build_ui(session: nox.Session) -> None:
    """npm ci + next build into cmbcluster/webui_static, skipped when frontend/ did not change."""
    session.run("python", str(ROOT / "frontend" / "build_ui.py"), "--if-stale")


@nox.session(python=PYTHON)
def frontend(session: nox.Session) -> None:
    """Build the web UI (always) into cmbcluster-core's package data, where `cmbcluster serve` finds it."""
    session.run("python", str(ROOT / "frontend" / "build_ui.py"))


@nox.session(name="openapi-client", python=PYTHON)
def openapi_client(session: nox.Session) -> None:
    """Regenerate the UI's typed API client from the app's OpenAPI document (`-- --check`: fail if stale)."""
    install_packages(session, extras="")
    session.run("python", str(ROOT / "frontend" / "openapi_client.py"), *session.posargs)


@nox.session(name="tests-browser", python=PYTHON)
def tests_browser(session: nox.Session) -> None:
    """The web UI in Debian's Chromium against `cmbcluster serve` and a real OIDC provider (tests/browser)."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            session.error(
                f"the browser tests need Debian's Chromium at {CHROMIUM}: "
                "`sudo apt-get install -y --no-install-recommends chromium`"
            )
        apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=apt_env)
        session.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", external=True, env=apt_env)
    install_packages(session, core_extras="jupyter")  # the notebook test runs JupyterLab through the proxy
    session.install(PLAYWRIGHT)
    build_ui(session)
    # `python -m` puts the repository root on sys.path: the notebook test imports tests.run_serve.
    # Not measured for coverage: its first-load budget times the server, which must not run traced
    # (measured so, on a loaded machine: 1.8 s against the 1.0 s budget), and the API it drives is
    # measured in tests-core and tests-e2e.
    session.run(
        "python", "-m", "pytest", f"--junitxml={REPORTS / 'tests-browser.xml'}", *chosen_tests(session, "tests/browser")
    )


@nox.session(python=PYTHON)
def coverage(session: nox.Session) -> None:
    """Combine the coverage data of the test sessions run before (each session's latest run), print the
    figures per package and for the plugin contract, write them to .reports/coverage-summary.json (the
    closing summary of `./run test` shows them), and fail below COVERAGE_OVERALL overall or below 100 %
    for a file of the plugin contract, listing its missing lines and branches."""
    if not MEASURE:
        session.skip("CMBCLUSTER_COVERAGE=0: the tests ran without measuring")
    session.install(COVERAGE)
    measured = sorted(d for d in COVERAGE_DATA.glob("*") if d.is_dir() and any(d.glob("data.*")))
    if not measured:
        session.error("no coverage data: run the test sessions first (`./run test` runs them all, then this)")
    combined = COVERAGE_DATA / "data"
    combined.unlink(missing_ok=True)
    env = {"COVERAGE_RCFILE": str(ROOT / ".coveragerc"), "COVERAGE_FILE": str(combined)}
    session.run("coverage", "combine", "--keep", "--quiet", *map(str, measured), env=env)
    report = COVERAGE_DATA / "coverage.json"
    session.run("coverage", "json", "--quiet", "-o", str(report), env=env)
    data = json.loads(report.read_text())
    summary = coverage_summary(data, [d.name for d in measured])
    (REPORTS / "coverage-summary.json").write_text(json.dumps(summary, indent=2))
    session.log(f"sessions measured: {', '.join(summary['sessions'])}")
    for package, percent in summary["packages"].items():
        session.log(f"{package}: {percent:.1f} % of statements and branches")
    session.log(f"overall: {summary['overall']:.1f} % (gate {COVERAGE_OVERALL} %)")
    if summary["problems"]:
        session.run("coverage", "report", "--include=*/src/cmbcluster/*", env=env, success_codes=[0, 2])
        session.error("coverage below its gates:\n" + "\n".join(summary["problems"]))


def coverage_summary(data: dict[str, Any], sessions: list[str]) -> dict[str, Any]:
    """The figures of a `coverage json` report: per package, per file of the plugin contract, overall,
    and every gate missed (with the contract file's missing lines and branches)."""
    counts: dict[str, list[int]] = {}
    contract: dict[str, float] = {}
    problems = []
    for path, entry in sorted(data["files"].items()):
        totals = entry["summary"]
        package = next((p for p in ("cmbcluster_aws", "cmbcluster_gcp") if f"/{p}/" in path), "cmbcluster")
        covered = totals["covered_lines"] + totals["covered_branches"]
        total = totals["num_statements"] + totals["num_branches"]
        package_counts = counts.setdefault(package, [0, 0])
        package_counts[0] += covered
        package_counts[1] += total
        relative = path.split("/src/cmbcluster/", 1)[1] if "/src/cmbcluster/" in path else ""
        if relative and relative.startswith(COVERAGE_CONTRACT):
            contract[relative] = totals["percent_covered"]
            if covered < total:  # exact: 99.96 % is not 100 %
                branches = [f"{a}->{b if b > 0 else 'exit'}" for a, b in entry.get("missing_branches", [])]
                missing = entry["missing_lines"] + branches
                problems.append(f"{relative}: {totals['percent_covered']:.1f} % < 100 % (missing {missing})")
    overall = data["totals"]["percent_covered"]
    if overall < COVERAGE_OVERALL:
        problems.append(f"overall coverage {overall:.1f} % < {COVERAGE_OVERALL} %")
    return {
        "sessions": sessions,
        "overall": overall,
        "overall_gate": COVERAGE_OVERALL,
        "packages": {name: 100 * c / max(t, 1) for name, (c, t) in sorted(counts.items())},
        "contract": contract,
        "contract_gate": 100.0,
        "problems": problems,
    }


@nox.session(name="helm-rbac", python=PYTHON)
def helm_rbac(session: nox.Session) -> None:
    """Regenerate the Helm chart's copy of the control plane's RBAC rules from cmbcluster/kubernetes/rbac.py."""
    install_packages(session, extras="")
    session.run("python", str(ROOT / "helm" / "generate_rbac.py"))


@nox.session(python=PYTHON)
def serve(session: nox.Session) -> None:
    """Run `cmbcluster serve` on the embedded default, with JupyterLab (extra arguments go to serve;
    CMBCLUSTER_EXTRAS=jupyter,streamlit adds the Streamlit example's program; CLOUD_PROVIDER=aws or gcp
    installs that cloud's plugin, and only then)."""
    clouds = serve_clouds(os.environ)
    install_packages(session, extras="", core_extras=os.environ.get("CMBCLUSTER_EXTRAS", "jupyter"), clouds=clouds)
    uninstall_other_clouds(session, keep=clouds)
    build_ui(session)
    serve_until_stopped(session, *session.posargs)


def serve_clouds(environ: Mapping[str, str]) -> list[str]:
    """The cloud plugins `./run serve` installs: the one CLOUD_PROVIDER names, none when it is unset.

    The README's `./run serve` serves the embedded default, which needs neither plugin (nor boto3 and
    Google's libraries). Installed anyway, they made the server warn "CLOUD_PROVIDER is not set ...
    although cloud plugins are installed", which is meant for an operator who installed a plugin and
    forgot to choose it, and which a newcomer read as their own mistake."""
    chosen = environ.get("CMBCLUSTER_CLOUD_PROVIDER") or environ.get("CLOUD_PROVIDER") or ""
    return [chosen] if chosen in PACKAGES and chosen != "core" else []


def uninstall_other_clouds(session: nox.Session, *, keep: Sequence[str]) -> None:
    """Remove the cloud plugins an earlier run left in this reused environment (`./run serve` installed
    both before `serve_clouds`): the server has what this run chose, and no leftover brings the warning back.
    Looked up on disk first, so that the usual run, with nothing to remove, runs nothing."""
    site_packages = list(Path(session.bin).parent.glob("lib/python*/site-packages"))
    stale = [
        f"cmbcluster-{name}" for name in PACKAGES
        if name != "core" and name not in keep
        and any(found for site in site_packages for found in site.glob(f"cmbcluster_{name}-*.dist-info"))
    ]  # fmt: skip
    if stale and session.venv_backend == "uv":
        session.run("uv", "pip", "uninstall", *stale, silent=True)  # quiet as an install: nox names the command
    elif stale:
        session.run("python", "-m", "pip", "uninstall", "--yes", *stale, silent=True)


def serve_until_stopped(session: nox.Session, *args: str) -> None:
    """`cmbcluster serve` as a child that Ctrl-C and a SIGTERM to ./run stop cleanly, environments and all.

    Not session.run: nox dies on SIGTERM and leaves its child serving, and kills it 0.5 s after a
    Ctrl-C, before it has stopped its environments. Here either signal becomes one SIGTERM for the
    server (a terminal's Ctrl-C reaches it too: uvicorn takes SIGINT then SIGTERM as one request
    to stop), and nox waits for it.
    """
    import signal
    import subprocess

    bin_dir = Path(str(session.bin))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(bin_dir.parent)}  # fmt: skip
    server = subprocess.Popen([str(bin_dir / "cmbcluster"), "serve", *args], env=env)

    def stop(signum: int, frame: object) -> None:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in stops}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        session.error(f"cmbcluster serve exited with status {code}")


@nox.session(python=PYTHON)
def benchmark(session: nox.Session) -> None:
    """Run every benchmark under tests/benchmarks and print its figures; ``-- bench_x.py [its options]``
    runs the one named, with its options."""
    install_packages(session)
    session.install(PLAYWRIGHT)  # bench_ui drives Debian's Chromium (it says so and skips without one)
    scripts = sorted((ROOT / "tests" / "benchmarks").glob("bench_*.py"))
    named = [script for script in scripts if script.name in session.posargs]
    options = [arg for arg in session.posargs if arg not in {script.name for script in named}]
    for script in named or scripts:
        session.run("python", str(script), *options)
