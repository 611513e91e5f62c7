"""``loading.meta_init.meta_build``: meta-device builds skip their initializers (so the first load in a
process never imports ``torch._dynamo``, which PyTorch's meta ``normal_`` kernel pulls in: over a
second), the zoo's initial values are unchanged, and the mode stays inside its context and thread."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from diffsynth_templates.loading.meta_init import meta_build, scaled_normal_
from diffsynth_templates.templates import available_architectures, get_architecture
from diffsynth_templates.templates.folder import TemplateSpec, save_template_folder
from diffsynth_templates.templates.zoo.image_lora import LoRAHead
from diffsynth_templates.templates.zoo.value_kv import ValueEncoder

REPO = Path(__file__).resolve().parents[2]


def run_fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter importing this checkout; it prints one JSON line last."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- fresh processes: loading never imports torch._dynamo ------------------------------------------


def test_loading_both_official_folders_never_imports_dynamo(tiny_klein_root, tiny_zimage_root):
    code = f"""
import json, sys
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline
klein = Flux2ImagePipeline.from_pretrained({str(tiny_klein_root)!r})
zimage = ZImagePipeline.from_pretrained({str(tiny_zimage_root)!r})
meta = [n for p in (klein, zimage) for m in (p.dit, p.vae, p.text_encoder) for n, t in m.state_dict().items() if t.is_meta]
print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules, "meta": meta}}))
"""
    result = run_fresh(code)
    assert result == {"dynamo": False, "meta": []}


@pytest.fixture(scope="module")
def template_folders(tmp_path_factory) -> dict[str, Path]:
    """One declarative folder per built-in architecture (other tests register their own), at its tiny
    config, random weights."""
    root = tmp_path_factory.mktemp("meta-init-templates")
    folders = {}
    for name in available_architectures():
        cls = get_architecture(name)
        if not cls.__module__.startswith("diffsynth_templates."):
            continue
        torch.manual_seed(0)
        model = cls(cls.config_class.tiny())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)  # no parameter keeps its initial value: a skipped init cannot pass as loaded
        folders[name] = save_template_folder(root / name, model, TemplateSpec(name))
    return folders


def test_loading_every_template_architecture_never_imports_dynamo(template_folders):
    assert set(template_folders) >= {"value_kv", "image_kv", "image_lora", "inpaint", "lora_bank"}
    code = f"""
import json, sys
from diffsynth_templates.loading.safetensors_io import load_safetensors
from diffsynth_templates.templates.folder import load_template_folder
same = {{}}
for name, folder in {json.dumps({k: str(v) for k, v in template_folders.items()})}.items():
    model = load_template_folder(folder).model
    saved = load_safetensors(folder + "/model.safetensors")
    state = model.state_dict()
    same[name] = state.keys() == saved.keys() and all(state[k].equal(saved[k]) for k in saved)
print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules, "same": same}}))
"""
    result = run_fresh(code)
    assert result == {"dynamo": False, "same": {name: True for name in template_folders}}


# -- the zoo's initial values are the old formulas', bit for bit ------------------------------------

SHAPES = [(1, 1), (3, 4), (2, 8), (5, 7), (4, 64), (17, 3), (64, 96)]  # below and above 16 elements


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_scaled_normal_matches_randn_arithmetic(rows, cols):
    torch.manual_seed(7)
    old_mul, old_div = torch.randn(rows, cols) * 0.02, torch.randn(rows, cols) / math.sqrt(cols)
    torch.manual_seed(7)
    new_mul = scaled_normal_(torch.empty(rows, cols), mul=0.02)
    new_div = scaled_normal_(torch.empty(rows, cols), div=math.sqrt(cols))
    assert torch.equal(new_mul, old_mul) and torch.equal(new_div, old_div)
    assert new_div.abs().sum() > 0 and not new_mul.requires_grad


@pytest.mark.parametrize("length, dim", [(1, 8), (4, 32), (16, 64)])
def test_value_encoder_positional_embedding_is_the_old_formula(length, dim):
    torch.manual_seed(3)
    encoder = ValueEncoder(12, dim, length)
    torch.manual_seed(3)
    nn.Linear(12, dim), nn.Linear(dim, dim)  # the RNG draws made before the embedding
    assert torch.equal(encoder.positional_embedding.data, torch.randn(length, dim) * 0.02)


@pytest.mark.parametrize("rank, in_features", [(1, 3), (4, 32), (8, 96)])
def test_lora_head_basis_is_the_old_formula(rank, in_features):
    torch.manual_seed(5)
    head = LoRAHead(16, in_features, 24, rank)
    torch.manual_seed(5)
    assert torch.equal(head.lora_A.data, torch.randn(rank, in_features) / math.sqrt(in_features))


# -- the mode skips only meta targets, and stays in its context and thread --------------------------


def test_meta_targets_are_skipped_and_real_tensors_initialized_inside_the_context():
    with meta_build():
        embedding = nn.Embedding(10, 4)
        meta = torch.empty(3, 4)
        assert nn.init.normal_(meta, std=0.1) is meta and meta.normal_() is meta and meta.fill_(1.0) is meta
        assert scaled_normal_(meta, div=2.0) is meta
        real = nn.init.normal_(torch.empty(64, 4, device="cpu"))
        filled = torch.zeros(3, device="cpu").fill_(2.5)
        with torch.device("cpu"):
            cpu_embedding = nn.Embedding(3, 4)
        after_inner = torch.empty(2)
    assert embedding.weight.is_meta and meta.is_meta and after_inner.is_meta
    assert real.std() > 0.5 and torch.equal(filled, torch.full((3,), 2.5))
    assert not cpu_embedding.weight.is_meta and cpu_embedding.weight.abs().sum() > 0


def test_the_mode_does_not_leak_after_the_context_or_an_error():
    depth = torch._C._len_torch_function_stack()
    with meta_build():
        pass
    with pytest.raises(RuntimeError, match="inside"), meta_build():
        raise RuntimeError("inside")
    assert torch._C._len_torch_function_stack() == depth
    embedding = nn.Embedding(3, 4)
    assert embedding.weight.device.type == "cpu" and embedding.weight.abs().sum() > 0
    assert torch.empty(2).device.type == "cpu"


def test_nested_contexts_unwind_in_order():
    with meta_build():
        with meta_build():
            inner = nn.Embedding(3, 4)
        outer = nn.Embedding(3, 4)
    assert inner.weight.is_meta and outer.weight.is_meta
    assert nn.Embedding(3, 4).weight.abs().sum() > 0


def test_another_thread_builds_for_real_while_one_builds_on_meta():
    built = {}

    def other():
        built["weight"] = nn.Embedding(3, 4).weight

    with meta_build():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        here = nn.Embedding(3, 4)
    assert here.weight.is_meta
    assert not built["weight"].is_meta and built["weight"].abs().sum() > 0
