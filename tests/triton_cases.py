"""What the Triton kernel tests share: the checkout's root and the environment of a subprocess that must
compile for a GPU target rather than run under TRITON_INTERPRET=1 (set for the test process itself)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env_without_interpret() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env
