"""The template stage's CPU thread limit (``stage_threads``): the caches are bit-identical with and
without it, the process's thread count is restored after every call (also a failing one), and bad
values are refused."""

from __future__ import annotations

import pytest
import torch

from diffsynth_templates.templates import TemplatePipeline, build_architecture, save_template_folder
from diffsynth_templates.templates.pipeline import TemplateArgumentError
from diffsynth_templates.templates.residency import HostStore, stage_threads
from diffsynth_templates.templates.schema import TemplateInputError
from diffsynth_templates.templates.zoo import template_spec
from diffsynth_templates.templates.zoo.value_kv import ValueKVConfig


@pytest.fixture
def two_threads():
    """Two intra-op threads (what the limit lowers), the process's setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def value_kv_folders(tmp_path, dit_config, count=3, length=512):
    folders = []
    for i in range(count):
        torch.manual_seed(70 + i)
        config = ValueKVConfig.for_dit(dit_config, length=length)
        model = build_architecture("value_kv", config.__dict__)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        folders.append(save_template_folder(tmp_path / f"v{i}", model, template_spec(model, name=f"v{i}")))
    return folders


def test_stage_threads_leave_the_caches_bit_identical(pipes, tmp_path, two_threads):
    pipe = pipes["flux2"]
    folders = value_kv_folders(tmp_path, pipe.dit.config)
    positive = [{"model_id": i, "scale": 0.3 + 0.2 * i} for i in range(3)]
    negative = [{"model_id": 1, "scale": 0.9, "strength": 0.5}]
    caches = []
    for threads, lazy, memo in ((None, True, 0), (1, True, 0), (1, False, 32)):
        tp = TemplatePipeline.from_pretrained(
            folders, torch_dtype=torch.float32, device="cpu", lazy_loading=lazy, memo_size=memo,
            host_store=HostStore(), stage_threads=threads,
        )  # fmt: skip
        caches.append(tp.prepare(pipe, positive, negative, prompt="a", cfg_scale=3.0))
        assert torch.get_num_threads() == 2  # restored
    reference = caches[0]
    for cache in caches[1:]:
        for key in ("kv_cache", "negative_kv_cache"):
            a, b = reference[key], cache[key]
            assert a.keys() == b.keys()
            assert all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))


def test_the_limit_holds_inside_and_is_undone_after_an_error(pipes, tmp_path, two_threads):
    with stage_threads(torch.device("cpu"), 1):
        assert torch.get_num_threads() == 1
    with stage_threads(torch.device("cpu"), None), stage_threads(torch.device("meta"), 1):
        assert torch.get_num_threads() == 2  # no limit asked / not a CPU stage
    with pytest.raises(RuntimeError), stage_threads(torch.device("cpu"), 1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    folders = value_kv_folders(tmp_path, pipes["flux2"].dit.config, count=1, length=4)
    tp = TemplatePipeline.from_pretrained(folders, device="cpu", lazy_loading=True, host_store=HostStore())
    with pytest.raises(TemplateInputError):
        tp.prepare(pipes["flux2"], [{"model_id": 0, "scale": "bright"}], prompt="a", cfg_scale=1.0)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_bad_stage_threads_are_refused(tmp_path, bad):
    with pytest.raises(TemplateArgumentError, match="stage_threads"):
        TemplatePipeline([], device="cpu", stage_threads=bad)


def test_skeleton_clone_matches_deepcopy_and_shares_nothing_mutable():
    import copy

    from diffsynth_templates.templates.folder import _clone_tree

    class Twice(torch.nn.Module):  # one submodule under two names, a config shared with a child
        def __init__(self):
            super().__init__()
            self.config = {"dims": [4, 8]}
            self.a = torch.nn.Linear(4, 8)
            self.b = self.a
            self.seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())
            self.seq.config = self.config
            self.register_buffer("scale", torch.ones(3), persistent=False)

    with torch.device("meta"):
        skeleton = Twice()
    clone, reference = _clone_tree(skeleton, {}), copy.deepcopy(skeleton)
    assert [type(m) for m in clone.modules()] == [type(m) for m in reference.modules()]
    assert {k: (v.shape, v.dtype, v.is_meta) for k, v in clone.state_dict(keep_vars=True).items()} == {
        k: (v.shape, v.dtype, v.is_meta) for k, v in reference.state_dict(keep_vars=True).items()
    }
    assert clone.b is clone.a and clone.seq.config is clone.config and clone.config == skeleton.config
    assert clone.config is not skeleton.config and clone.a is not skeleton.a
    assert all(p is not q for p, q in zip(clone.parameters(), skeleton.parameters()))
    assert clone.scale is not skeleton.scale and "scale" in clone._non_persistent_buffers_set
    assert clone._non_persistent_buffers_set is not skeleton._non_persistent_buffers_set
    clone.register_forward_hook(lambda *a: None)  # hooks of one copy are not the skeleton's
    assert clone._forward_hooks and not skeleton._forward_hooks
