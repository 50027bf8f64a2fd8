"""What a plain (non-editable) ``pip install`` gets: the default sweep, its search space and the
bundled model configs inside the package; and the imagecorruptions release it was made for."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from clipray.config.architectures import BUNDLED_MODELS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, unpacked as site-packages would hold it."""
    src = tmp_path_factory.mktemp("src")
    for name in ("clipray", "sweeps", "search_spaces"):
        shutil.copytree(REPO / name, src / name, symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = tmp_path_factory.mktemp("site")
    (wheel,) = wheels.glob("clipray-*.whl")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def _run(site: Path, code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=site.parent,  # not the repository: only the unpacked wheel can be imported
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_default_sweep_ships_in_the_wheel_with_real_files(installed):
    for rel in ("defaults/sweeps/default.yaml", "defaults/search_spaces/default.yaml"):
        shipped = installed / "clipray" / rel
        assert not shipped.is_symlink()
        assert shipped.read_text() == (REPO / rel.removeprefix("defaults/")).read_text()
    configs = (installed / "clipray/config/model_configs").glob("*.json")
    assert sorted(p.stem for p in configs) == list(BUNDLED_MODELS)


def test_clipray_sweep_without_a_file_finds_its_default_after_a_plain_install(installed):
    out = _run(
        installed,
        """
        import clipray
        from clipray.cli.main import DEFAULT_SWEEP
        from clipray.cli.sweep import sweep_inputs
        exp, space = sweep_inputs(None, [], None)
        print(clipray.__file__)
        print(DEFAULT_SWEEP)
        print(exp.sweep.space)
        print(sorted(space.params))
        """,
    )
    module, default, space, params = out.splitlines()
    for path in (module, default, space):
        assert path.startswith(str(installed)), path
    assert params == "['perturb.epsilon', 'perturb.layer', 'perturb.steps']"


def test_an_imagecorruptions_release_without_the_patched_names_is_refused_at_import():
    code = """
        import sys
        import clipray.scoring.corruptions  # loads the package through the compat layer
        package = sys.modules["imagecorruptions.corruptions"]
        del package.gaussian, package.frost
        del sys.modules["clipray.scoring.corruptions"]
        try:
            import clipray.scoring.corruptions
        except ImportError as e:
            print(e)
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip().endswith(
        "lacks gaussian, frost; clipray's compatibility layer needs imagecorruptions==1.1.2"
    ), result.stdout + result.stderr
