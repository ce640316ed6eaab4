"""The training stacks of the `stacks` extra (litgpt, OLMo-core, torchtitan) for the tests.

They install without their own pins (litgpt pins an older huggingface-hub than transformers 5
needs), so the extra holds what they really import and the packages go in with `--no-deps`, as
.ci/run does. A test that needs a missing stack is skipped, naming that line; under CI (`CI=true`)
it fails instead, so that CI never passes by skipping them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL = (
    'pip install -e ".[stacks]" && pip install --no-deps litgpt==0.5.13 ai2-olmo-core==3.0.0 '
    "torchtitan==0.3.0 cached-path==1.8.10"
)


def require(module: str) -> ModuleType:
    """Import a stack's module; skip the test without it, or fail under CI."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)  # CI installs every stack: missing is a failure
    return pytest.importorskip(module, reason=f"needs {module.split('.')[0]}: {INSTALL}")
