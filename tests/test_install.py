"""`pip install .` gives a package that works from any folder: the wheel holds unidiffuser/ and
models/, and the README's Python API snippet runs outside the checkout."""
import shutil
import subprocess
import sys

from conftest import ROOT, child_env

SNIPPET = """
import sys
from unidiffuser import UniDiffuser
import models, unidiffuser
assert not unidiffuser.__file__.startswith({root!r}), unidiffuser.__file__   # the installed copy, not the checkout
pipe = UniDiffuser.load(sys.argv[1], device="cpu")
out = pipe("an elephant under the sea", seed=1234, n=2, steps=2, height=32, width=32)
assert out.seeds == [1234, 1235] and out.images[0].size == (32, 32)
print(len(out.save(sys.argv[2])))
"""


def test_wheel_installs_and_the_api_snippet_runs_from_another_folder(tmp_path):
    wheels, site, elsewhere, src = (tmp_path / d for d in ("wheels", "site", "elsewhere", "src"))
    elsewhere.mkdir()
    # Built from a copy: setuptools leaves build/ and *.egg-info/ in the folder it builds.
    for d in ("unidiffuser", "models"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src)
    # No build isolation: setuptools comes from this environment (no download needed).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = tmp_path / "model"
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--random", "tiny", "--out", str(model)],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    env = {**child_env(), "PYTHONPATH": str(site)}        # the installed package only, not the checkout
    r = subprocess.run([sys.executable, "-c", SNIPPET.format(root=str(ROOT)), str(model), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2" and len(list((tmp_path / "out").glob("*.png"))) == 2
