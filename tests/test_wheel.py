"""A normal install: `pip install` of the wheel (not editable) into a fresh venv runs the demo spec from any folder.

The fresh venv borrows the already-installed dependencies (torch, ray, ...) through a path entry to this
environment's site-packages, so nothing is downloaded; the editable install of this checkout is not visible
there (its finder is a .pth file, which Python reads only in a site directory), so every promptmill module and
checkpoint the run uses must come from the wheel.
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def fresh_venv(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(venv folder, its python, its site-packages): a new venv that borrows this environment's dependencies
    through a path entry (nothing is downloaded) and does not see this checkout's editable install."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir, py, site


def test_the_wheel_in_a_fresh_venv_runs_the_demo_spec_from_another_folder(tmp_path):
    src = tmp_path / "src"  # only what the build reads: no build/ or egg-info left in the checkout
    src.mkdir()
    checkout = sorted(p.name for p in ROOT.iterdir())
    for name in ("pyproject.toml", "README.md", "promptmill", "jobs", "models", "pipelines"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("promptmill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"promptmill", "promptmill-0.1.0.dist-info"}  # one import name
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for top in ("jobs", "models", "pipelines")
                for p in (ROOT / top).rglob("__init__.py")}
    assert {f"promptmill/{p.replace('.', '/')}/__init__.py" for p in packages} <= set(names)  # none left unlisted

    env_dir, py, site = fresh_venv(tmp_path)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.check_output([str(py), "-c", "import promptmill.models as m, promptmill.pipelines.spec as s; "
                                     "print(m.__file__); print(s.SHIPPED)"], text=True, cwd=tmp_path).split()
    assert all(w.startswith(str(site)) for w in where), where  # the wheel's code and checkpoints, not the checkout's

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(env_dir / "bin" / "promptmill"), "generate", str(ROOT / "examples" / "demo.yaml"),
                          "--set", "output.path=out", "--set", "input.limit=6"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = elsewhere / "out"  # --set output.path: relative to where the command ran
    summary = json.loads((out / "summary.json").read_text())
    rows = pq.read_table(out / "metadata").to_pylist()
    assert summary["images_total"] == {"dalle": 12, "gan": 12} and len(rows) == 24
    assert {Path(r["checkpoint"]).parent for r in rows} == {site / "promptmill" / "models" / "checkpoints"}
    assert all(r["prompt_match"] is not None for r in rows)  # the shipped judge came from the wheel too
    assert sorted(p.name for p in ROOT.iterdir()) == checkout  # the build wrote nothing into the checkout


def test_an_editable_install_of_the_docker_context_keeps_a_users_own_models_package(tmp_path):
    """The image's install (`pip install -e` of what the Dockerfile copies) and a developer's: `promptmill.models`
    is ours from any folder, and a user's own `models` package beside their spec stays theirs."""
    app = tmp_path / "app"
    copied = re.findall(r"^COPY \S+ (\S+) \./", (ROOT / "Dockerfile").read_text(), re.M)
    assert {"promptmill", "jobs", "models", "pipelines"} <= set(copied)
    for name in [*copied, "pyproject.toml", "README.md"]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
        else:
            app.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    env_dir, py, site = fresh_venv(tmp_path)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                    str(app)], check=True, capture_output=True)
    user = tmp_path / "user"
    (user / "models").mkdir(parents=True)
    (user / "models" / "__init__.py").write_text("MINE = True\n")
    out = subprocess.run([str(py), "-c", "import models, promptmill.models.families as f, promptmill.jobs.cli; "
                          "print(models.MINE, f.__file__)"], cwd=user, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    mine, ours = out.stdout.split()
    assert mine == "True" and ours == str(app / "models" / "families.py")
    run = subprocess.run([str(env_dir / "bin" / "promptmill"), "spec", "--markdown"], cwd=user, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "`models[*].family`" in run.stdout, run.stderr[-2000:]


def test_the_ray_range_is_the_one_make_test_ray_range_runs_and_holds_the_installed_ray():
    """pyproject allows a Ray range (no exact pin); `make test-ray-range` runs its two ends, so the Makefile's ends
    must be the range's: the lowest allowed, and the highest below the bound."""
    import tomllib

    import ray
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert not any(s.operator == "==" for s in req.specifier), req
    make = (ROOT / "Makefile").read_text()
    lowest, highest = (Version(re.search(rf"^RAY_{end} := (\S+)$", make, re.M).group(1)) for end in ("LOWEST", "HIGHEST"))
    lower = next(Version(s.version) for s in req.specifier if s.operator == ">=")
    upper = next(Version(s.version) for s in req.specifier if s.operator == "<")
    assert lowest == lower and lowest in req.specifier and highest in req.specifier
    assert highest.release[:2] == (upper.release[0], upper.release[1] - 1)  # the last minor release under the bound
    assert Version(ray.__version__) in req.specifier
