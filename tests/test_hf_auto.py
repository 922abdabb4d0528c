"""`import pkm` is enough for transformers' Auto classes to load a saved BertPkm folder, in any
import order (fresh processes, so no earlier import in this one can have registered "bert_pkm")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pkm.auto_classes import AUTO_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO_IMPORT = f"from transformers import AutoConfig, {', '.join(AUTO_CLASSES)}"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A BertPkmForPreTraining folder: every head's weights but the fresh classifiers are in it."""
    from pkm.modeling import BertPkmForMaskedLM, BertPkmForPreTraining
    from pkm.presets import preset_config

    torch.manual_seed(0)
    model = BertPkmForPreTraining(preset_config("tiny", vocab_size=50)).eval()
    folder = tmp_path_factory.mktemp("tiny_bert_pkm")
    model.save_pretrained(folder)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    # probed as loaded from the file (tensor alignment, hence CPU rounding, as in the subprocess)
    loaded = BertPkmForMaskedLM.from_pretrained(folder).eval()  # the pretraining model's MLM head
    with torch.no_grad():
        logits = loaded(ids).logits
    torch.save({"ids": ids, "logits": logits}, folder / "probe.pt")
    return str(folder)


def _run_fresh(code: str, tmp_path) -> dict:
    """Run ``code`` in a new interpreter (repo on the path); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "default", "HF_HUB_OFFLINE": "1",
           # the parent's thread count (the probe's): a matmul split over other threads may round differently
           "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not register" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LOAD_WITH_EVERY_AUTO_CLASS = """
import json, sys, torch
{imports}
import transformers
folder = {folder!r}
classes = {{"AutoConfig": type(transformers.AutoConfig.from_pretrained(folder)).__name__}}
for name in {auto_classes!r}:
    model = getattr(transformers, name).from_pretrained(folder).eval()
    classes[name] = type(model).__module__ + "." + type(model).__name__
    if name == "AutoModelForMaskedLM":
        probe = torch.load(folder + "/probe.pt")
        with torch.no_grad():
            same = torch.equal(model(probe["ids"]).logits, probe["logits"])
print(json.dumps({{"classes": classes, "same": same}}))
"""

ORDERS = {
    "pkm_then_transformers": ["import pkm", AUTO_IMPORT],
    "transformers_then_pkm": [AUTO_IMPORT, "import pkm"],
    "bare_transformers_first": ["import transformers", "import pkm", AUTO_IMPORT],
    "pkm_configuration_then_transformers": ["from pkm.configuration import BertPkmConfig", AUTO_IMPORT],
    "pkm_modeling_then_transformers": ["from pkm.modeling import BertPkmModel", AUTO_IMPORT],
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_every_auto_class_in_every_import_order(saved_tiny, tmp_path, order):
    code = _LOAD_WITH_EVERY_AUTO_CLASS.format(imports="\n".join(ORDERS[order]), folder=saved_tiny,
                                              auto_classes=list(AUTO_CLASSES))
    out = _run_fresh(code, tmp_path)
    expected = {"AutoConfig": "BertPkmConfig", **{a: f"pkm.modeling.{c}" for a, c in AUTO_CLASSES.items()}}
    assert out == {"classes": expected, "same": True}


def test_import_pkm_registers_the_config_and_leaves_the_model_code_for_later(tmp_path):
    """The model classes (transformers' model code: seconds to import) come with the first config."""
    code = ("import json, sys\nimport pkm\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "before = {'registered': 'bert_pkm' in CONFIG_MAPPING, 'modeling': 'pkm.modeling' in sys.modules,\n"
            "          'model_code': 'transformers.modeling_utils' in sys.modules}\n"
            "from transformers import AutoModelForTokenClassification\n"
            "pkm.BertPkmConfig  # the class alone builds no config\n"
            "known_early = pkm.BertPkmConfig in AutoModelForTokenClassification._model_mapping\n"
            "config = pkm.preset_config('tiny')\n"
            "known = pkm.BertPkmConfig in AutoModelForTokenClassification._model_mapping\n"
            "print(json.dumps({**before, 'known_early': known_early, 'known': known}))")
    assert _run_fresh(code, tmp_path) == {"registered": True, "modeling": False, "model_code": False,
                                          "known_early": False, "known": True}


def test_without_import_pkm_the_folder_needs_trust_remote_code(saved_tiny, tmp_path):
    """The registration above is what makes the difference (the test is not vacuous): without the
    package, the folder's own code is the only way in, and transformers asks before running it."""
    code = (f"import json\nfrom transformers import AutoModelForMaskedLM\n"
            f"try:\n    AutoModelForMaskedLM.from_pretrained({saved_tiny!r}); error = ''\n"
            f"except ValueError as e:\n    error = str(e)\n"
            f"print(); print(json.dumps({{'error': error}}))")  # a line of its own: the prompt ends without one
    assert "trust_remote_code=True" in _run_fresh(code, tmp_path)["error"]
