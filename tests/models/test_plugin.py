"""Bring your own backbone: the example plugin of docs/backbones.md, installed with pip into a temp
directory, found through its ``agentd.backbones`` entry point, passing the shared invariants through
the public pytest helper, and serving chat in a real daemon."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import models
from models import testing

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "plugin-example"
OPTIONS = {"d_model": 32, "n_layers": 1}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example plugin pip-installed (a real wheel build, offline) into a directory put on sys.path."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src)  # pip writes build files beside the sources: keep docs/ clean
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("agentd_tinygru", None)


def _factory() -> models.Backbone:
    torch.manual_seed(0)
    return models.build("tinygru", **OPTIONS)


def test_entry_point_makes_it_available_and_buildable(site: Path) -> None:
    assert "tinygru" in models.available()
    bb = models.build("tinygru", **OPTIONS)
    assert bb.name == "tinygru" and type(bb).__module__ == "agentd_tinygru"
    assert Path(sys.modules["agentd_tinygru"].__file__ or "").parent == site  # the installed copy, not docs/
    with pytest.raises(models.BackboneConfigError, match="tinygru: unknown config key"):
        models.build("tinygru", d_modle=32)


# The public helper, used as docs/backbones.md shows a plugin author (one item per check); here the
# plugin must be installed first, hence the fixture.
test_invariant = pytest.mark.usefixtures("site")(testing.invariant_tests(_factory))


def test_the_helper_refuses_unknown_names_and_can_skip() -> None:
    with pytest.raises(KeyError, match="no_such_check"):
        testing.invariant_tests(_factory, skip=["no_such_check"])
    fn = testing.invariant_tests(_factory, skip=["overfits"])
    (mark,) = [m for m in fn.pytestmark if m.name == "parametrize"]  # type: ignore[attr-defined]
    assert "overfits" not in mark.args[1] and "causal" in mark.args[1]


@pytest.mark.slow
def test_the_plugin_serves_chat_in_the_daemon(site: Path, daemon_factory: Any) -> None:
    d = daemon_factory(env={"PYTHONPATH": str(site)}, backbone={"name": "tinygru", "max_tokens": 16, "options": dict(OPTIONS)})

    events = d.chat("hello, plugin")
    assert events[-1]["event"] == "done", events
    assert d.request("status")["backbone"] == "tinygru"
    assert d.stop() == 0
