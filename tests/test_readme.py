"""The README's two start-up commands are what CI runs, and its code example runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_commands_verbatim():
    commands = re.search(r"## Start.*?```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci for command in commands)


def test_the_usage_example_runs_and_fuses():
    code = re.search(r"## Use.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, batch, steer, out = (namespace[name] for name in ("model", "batch", "steer", "out"))
    plain = model(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(out.hidden_states[3], plain[3] + steer)
    assert not torch.equal(out.last_hidden_state, plain[-1])
