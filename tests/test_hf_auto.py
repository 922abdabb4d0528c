"""`import pkm` is enough for transformers' Auto classes to load a saved BertPkm folder (fresh
processes, so no earlier import in this one can have registered "bert_pkm")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from pkm.modeling import BertPkmForMaskedLM
    from pkm.presets import preset_config

    torch.manual_seed(0)
    model = BertPkmForMaskedLM(preset_config("tiny", vocab_size=50)).eval()
    folder = tmp_path_factory.mktemp("tiny_bert_pkm")
    model.save_pretrained(folder)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, folder / "probe.pt")
    return str(folder)


def _run_fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter (repo on the path); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not register" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LOAD = """
import json, sys, torch
{imports}
from transformers import AutoConfig, AutoModelForMaskedLM
folder = {folder!r}
model = AutoModelForMaskedLM.from_pretrained(folder).eval()
probe = torch.load(folder + "/probe.pt")
with torch.no_grad():
    same = torch.allclose(model(probe["ids"]).logits, probe["logits"], atol=1e-6)
print(json.dumps({{"cheap": cheap, "class": type(model).__name__, "same": same,
                  "config": type(AutoConfig.from_pretrained(folder)).__name__}}))
"""


def test_import_pkm_is_enough_for_auto_classes(saved_tiny):
    imports = "import pkm\ncheap = 'pkm.modeling' not in sys.modules and 'transformers' not in sys.modules"
    out = _run_fresh(_LOAD.format(imports=imports, folder=saved_tiny))
    assert out == {"cheap": True, "class": "BertPkmForMaskedLM", "same": True, "config": "BertPkmConfig"}


def test_import_pkm_after_transformers(saved_tiny):
    imports = ("from transformers import AutoModelForSequenceClassification\nimport pkm\n"
               "cheap = 'pkm.modeling' not in sys.modules")
    out = _run_fresh(_LOAD.format(imports=imports, folder=saved_tiny))
    assert out["class"] == "BertPkmForMaskedLM" and out["same"] and out["config"] == "BertPkmConfig"
    assert out["cheap"]


def test_import_pkm_configuration_first(saved_tiny):
    """pkm.configuration imports transformers, which loads its Auto configs halfway through."""
    imports = "from pkm.configuration import BertPkmConfig\ncheap = 'pkm.modeling' not in sys.modules"
    out = _run_fresh(_LOAD.format(imports=imports, folder=saved_tiny))
    assert out == {"cheap": True, "class": "BertPkmForMaskedLM", "same": True, "config": "BertPkmConfig"}


def test_without_import_pkm_the_folder_is_unknown(saved_tiny):
    """The registration above is what makes the difference (the test is not vacuous)."""
    code = (f"import json\nfrom transformers import AutoModelForMaskedLM\n"
            f"try:\n    AutoModelForMaskedLM.from_pretrained({saved_tiny!r}); ok = True\n"
            f"except (ValueError, KeyError):\n    ok = False\nprint(json.dumps({{'ok': ok}}))")
    assert _run_fresh(code) == {"ok": False}
