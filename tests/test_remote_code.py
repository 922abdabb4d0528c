"""Saved folders load without this package: ``save_pretrained`` writes remote code generated from
the package's source (pkm.remote_code), and every head loaded through it with only torch and
transformers computes what the package's class computes, bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from pkm import modeling, remote_code
from pkm.auto_classes import AUTO_CLASSES
from pkm.presets import preset_config

ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "functools", "math", "os", "typing",
                   "torch", "transformers", "huggingface_hub"}


def test_generated_files_need_only_torch_and_transformers(tmp_path):
    from transformers.dynamic_module_utils import get_imports

    sources = remote_code.remote_code_sources()
    assert sources == remote_code.remote_code_sources()  # deterministic
    assert set(sources) == {remote_code.CONFIG_FILE, remote_code.MODELING_FILE}
    for name, text in sources.items():
        path = tmp_path / name
        path.write_text(text)
        # the check transformers itself runs before it executes remote code
        assert set(get_imports(str(path))) <= ALLOWED_IMPORTS, name
        # no line that imports pkm or Triton, not even in a function or a docstring
        assert not re.search(r"^\s*(import|from)\s+(pkm|triton)\b", text, re.MULTILINE), name
    modeling_text = sources[remote_code.MODELING_FILE]
    for class_name in [*AUTO_CLASSES.values(), "ProductKeyMemory", "ValueTable", "QueryBatchNorm"]:
        assert f"\nclass {class_name}(" in modeling_text, class_name
    assert "def save_pretrained" not in modeling_text  # package-only: it runs the generator
    assert "from .configuration_bert_pkm import" in modeling_text


def test_save_pretrained_writes_auto_map_and_code(tmp_path):
    model = modeling.BertPkmForTokenClassification(preset_config("tiny", num_labels=3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == remote_code.auto_map()
    assert config["auto_map"]["AutoModelForTokenClassification"] == "modeling_bert_pkm.BertPkmForTokenClassification"
    assert config["auto_map"]["AutoConfig"] == "configuration_bert_pkm.BertPkmConfig"
    for name, text in remote_code.remote_code_sources().items():
        assert (tmp_path / name).read_text() == text
    with pytest.raises(ValueError, match="no config.json"):
        remote_code.write_remote_code(tmp_path / "missing")


# -- the generator's rules, on made-up modules -----------------------------------------------------

FAKE = {
    "fake.kernels": '''
        """doc"""
        import os
        from pkm.memory_config import MemoryConfig

        def triton_enabled(tensor, flag=None):
            return True

        def only_for_kernels(x):
            from pkm import triton_kernels
            return triton_kernels.go(x)

        def lookup(x, flag=None):
            # a comment that stays
            if triton_enabled(x, flag):
                from pkm import triton_kernels
                return triton_kernels.go(x)
            else:
                y = x + 1  # torch path
                return y * 2

        class Model:
            def save_pretrained(self, folder):
                from pkm.remote_code import write_remote_code
                write_remote_code(folder)

            def forward(self, x):
                return lookup(x)
        ''',
    "fake.plain_import": "import pkm.triton_kernels\n",
    "fake.unknown": "from pkm.sharded_values import ShardedValueTable\n",
    "fake.still_used": '''
        def kernel_only(x):
            from pkm import triton_kernels
            return x

        def user(x):
            return kernel_only(x)
        ''',
}


@pytest.fixture()
def fake_sources(monkeypatch):
    def source(module):
        if module in FAKE:
            return module, textwrap.dedent(FAKE[module]).lstrip()
        return original(module)

    original = remote_code._module_source
    monkeypatch.setattr(remote_code, "_module_source", source)


def test_kernel_branches_and_package_only_code_are_cut(fake_sources):
    text = remote_code._generate("x.py", ("fake.kernels",), {"pkm.memory_config": "configuration_bert_pkm.py"})
    assert "from .configuration_bert_pkm import MemoryConfig" in text
    assert "only_for_kernels" not in text and "def save_pretrained" not in text and "triton_kernels" not in text
    assert "# a comment that stays" in text and "y = x + 1  # torch path" in text
    namespace: dict = {}
    exec(compile(text.replace("from .configuration_bert_pkm import MemoryConfig", ""), "x.py", "exec"), namespace)
    assert namespace["lookup"](1) == 4 and namespace["Model"]().forward(2) == 6  # the else branch
    assert namespace["triton_enabled"](None) is False  # the stub says no...
    with pytest.raises(RuntimeError, match="no Triton kernels"):
        namespace["triton_enabled"](None, True)  # ...and refuses when kernels are demanded


@pytest.mark.parametrize("module, message", [
    ("fake.plain_import", "only `from pkm.x import names`"),
    ("fake.unknown", "does not hold"),
    ("fake.still_used", "uses kernel_only"),
])
def test_what_the_rules_do_not_cover_is_refused(fake_sources, module, message):
    with pytest.raises(remote_code.RemoteCodeError, match=message):
        remote_code._generate("x.py", (module,), {})


# -- every head through trust_remote_code, in a process where pkm cannot be imported ---------------

_BLOCKED_LOAD = """
import json, sys
class NoPkm:  # pkm (also the editable install of the virtualenv) and Triton cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pkm", "triton"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, NoPkm())
try:
    import pkm
    blocked = False
except ImportError:
    blocked = True
import torch, transformers
results = {}
for folder, auto_name in json.load(open(sys.argv[1])):
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    probe = torch.load(folder + "/probe.pt")
    with torch.no_grad():
        out = model(**probe["inputs"])
    same = all(torch.equal(out[k], v) for k, v in probe["outputs"].items())
    if auto_name == "AutoModelForMaskedLM":  # saved again by the remote class itself, and reopened
        model.save_pretrained(folder + "_again")
        again = getattr(transformers, auto_name).from_pretrained(folder + "_again", trust_remote_code=True).eval()
        with torch.no_grad():
            same = same and torch.equal(again(**probe["inputs"]).logits, probe["outputs"]["logits"])
        # and it trains: the row-sparse value gradient and the dense ones arrive
        again.train()
        again(**probe["inputs"], labels=probe["inputs"]["input_ids"]).loss.backward()
        memory = again.bert.encoder.layer[1].memory
        same = same and memory.values.sparse_grad is not None and memory.query_proj.weight.grad is not None
    results[auto_name] = [type(model).__module__.split(".")[0], type(model).__name__, same]
print(json.dumps({"blocked": blocked, "pkm_loaded": any(m.split(".")[0] == "pkm" for m in sys.modules),
                  "results": results}))
"""


def _inputs(multiple_choice: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 9) if multiple_choice else (2, 9)
    ids = torch.randint(5, 50, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, ..., 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_every_head_loads_without_pkm_and_matches(tmp_path):
    torch.manual_seed(0)
    jobs = []
    for auto_name, class_name in AUTO_CLASSES.items():
        config = preset_config("tiny", vocab_size=50, num_labels=2)  # normal values: the memory at work
        folder = tmp_path / class_name
        getattr(modeling, class_name)(config).save_pretrained(folder)
        # the reference: the package's class, loaded from the same file
        loaded = getattr(modeling, class_name).from_pretrained(folder).eval()
        inputs = _inputs(class_name == "BertPkmForMultipleChoice")
        with torch.no_grad():
            out = loaded(**inputs)
        outputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        assert outputs and out.memory_outputs[0].weights.abs().sum() > 0
        torch.save({"inputs": inputs, "outputs": outputs}, folder / "probe.pt")
        jobs.append((str(folder), auto_name))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the parent's thread count: a matmul split over other threads may round differently
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_LOAD, str(tmp_path / "jobs.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"] and not out["pkm_loaded"]
    assert out["results"] == {a: ["transformers_modules", c, True] for a, c in AUTO_CLASSES.items()}
