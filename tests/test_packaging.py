"""The wheel ships every sub-package: pyproject.toml lists packages by hand (presets/ is mapped into the package, which
setuptools' package discovery cannot express), so a package under farmer_cli/ missing from the list fails here.
CI also installs the built wheel and runs it from outside the checkout (.ci/run)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_every_package_on_disk_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "farmer_cli").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"farmer_cli.presets"}, sorted(listed - on_disk)
    assert any((ROOT / "presets").glob("*.toml"))
