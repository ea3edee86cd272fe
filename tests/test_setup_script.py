"""scripts/setup.sh on a machine with only python3 (issue 28): it makes and uses a venv itself, or says in
one line what is missing. Only the failure paths run here (a real install takes minutes: CI's `.ci/run`)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_setup(tmp_path: Path, python3: str | None) -> subprocess.CompletedProcess:
    """scripts/setup.sh copied into an empty checkout, with a PATH of bash's basics and `python3` (None: none)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "rm", "mktemp", "mkdir", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    if python3 is not None:
        (bin_dir / "python3").write_text(python3)
        (bin_dir / "python3").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}  # no VIRTUAL_ENV, no CONDA_PREFIX, no `python`
    return subprocess.run([str(bin_dir / "bash"), "scripts/setup.sh"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.name != "posix", reason="a bash script")
def test_no_python3_is_one_line_saying_what_to_install(tmp_path):
    res = run_setup(tmp_path, None)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "scripts/setup.sh: no python3 on PATH: install Python 3.10+ (Debian/Ubuntu: apt install python3 python3-venv)"]


@pytest.mark.skipif(os.name != "posix", reason="a bash script")
def test_a_python3_without_venv_is_one_line_and_leaves_no_half_made_venv(tmp_path):
    # Debian's python3 without python3-venv: `python3 -m venv` fails (ensurepip is missing)
    res = run_setup(tmp_path, "#!/bin/bash\necho 'ensurepip is not available' >&2\nexit 1\n")
    assert res.returncode == 1 and not (tmp_path / ".venv").exists()
    assert res.stderr.strip().splitlines() == [
        "scripts/setup.sh: python3 -m venv failed: install the venv module (Debian/Ubuntu: apt install python3-venv), "
        "then run this again"]


@pytest.mark.skipif(os.name != "posix", reason="a bash script")
def test_it_installs_into_the_venv_it_made_not_the_system_python(tmp_path):
    # a python3 whose `-m venv DIR` makes DIR/bin/python, a stub that records what it is asked and then fails
    fake = ("#!/bin/bash\nif [ \"$1 $2\" = '-m venv' ]; then mkdir -p \"$3/bin\"; "
            "printf '#!/bin/bash\\necho \"venv python $*\" >>%s/calls; exit 3\\n' \"$PWD\" >\"$3/bin/python\"; "
            "chmod +x \"$3/bin/python\"; exit 0; fi\necho \"system python3 $*\" >>\"$PWD/calls\"; exit 3\n")
    res = run_setup(tmp_path, fake)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert res.returncode == 3 and "created .venv" in res.stdout
    assert calls and all(c.startswith("venv python -m pip install") for c in calls)  # never the system python


@pytest.mark.skipif(os.name != "posix", reason="a bash script")
def test_on_colab_it_keeps_the_installed_torch(tmp_path):
    # the notebooks' install cell runs setup.sh on Colab, whose runtime has a CUDA torch: a plain `torch` (satisfied
    # by it), never the CPU pin; and Colab's own `python`, not a venv
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("#!/bin/bash\necho \"python $*\" >>\"$PWD/calls\"; exit 3\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "COLAB_RELEASE_TAG": "release-colab"}
    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and not (tmp_path / ".venv").exists()
    assert (tmp_path / "calls").read_text().splitlines() == ["python -m pip install torch"]
