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


def test_the_develop_layout_names_every_module_of_the_package():
    block = re.search(r"## Develop.*?```\nsrc/layerfuse/\n(.*?)```", README, re.S).group(1)
    listed = dict(line.strip().split(None, 1) for line in block.splitlines())
    package = ROOT / "src" / "layerfuse"
    entries = {
        path.name + ("/" if path.is_dir() else "")
        for path in package.iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    }
    assert set(listed) == entries
    for folder in (name for name in entries if name.endswith("/")):
        modules = {
            path.stem for path in (package / folder).iterdir() if path.suffix == ".py" and path.stem != "__init__"
        }
        modules |= {path.name for path in (package / folder).iterdir() if (path / "__init__.py").exists()}
        assert all(re.search(rf"\b{module}\b", listed[folder]) for module in modules), (folder, modules)
