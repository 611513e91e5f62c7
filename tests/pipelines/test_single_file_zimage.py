"""A single-file Z-Image transformer in the official layout (``layers.N.attention.qkv``,
``attention.out``, ``x_embedder``, ``final_layer``, an unused ``norm_final``) against the folder model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.backbones.zimage_dit import ZImageDiT
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.single_file import SingleFileError, load_single_file_dit
from tests.pipelines.test_single_file import to_bfl

ZIMAGE = FAMILIES["zimage"]


def to_official(dit: ZImageDiT) -> dict[str, torch.Tensor]:
    out = {f"model.diffusion_model.{k}": v for k, v in to_bfl(dit, ZIMAGE.checkpoint_layout).items()}
    out["model.diffusion_model.norm_final.weight"] = torch.ones(dit.config.dim)
    return out


def test_official_layout_is_diffusers_single_file_layout(tiny_zimage_root):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    dit = ZImageDiT.from_pretrained(tiny_zimage_root / "transformer")
    back = convert_z_image_transformer_checkpoint_to_diffusers(to_official(dit))
    state = dit.state_dict()
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_single_file_equals_the_folder_model(tiny_zimage_root, tmp_path, dtype):
    folder = ZImageDiT.from_pretrained(tiny_zimage_root / "transformer", torch_dtype=dtype)
    path = tmp_path / "z_image.safetensors"
    save_file(to_official(folder), str(path))
    dit = load_single_file_dit(ZIMAGE, path, tiny_zimage_root / "transformer", torch_dtype=dtype)
    state = folder.state_dict()
    assert all(torch.equal(v, state[k]) and v.dtype == dtype for k, v in dit.state_dict().items())
    with pytest.raises(SingleFileError, match="transformer/config.json"):
        load_single_file_dit(ZIMAGE, path)  # Z-Image's config is not read from shapes


def test_transformer_file_through_from_pretrained(tiny_zimage_root, tmp_path):
    import numpy as np

    from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline
    from tests.pipelines.test_zimage_pipeline import run

    folder = ZImagePipeline.from_pretrained(tiny_zimage_root, torch_dtype=torch.float32, device="cpu")
    path = tmp_path / "z_image.safetensors"
    save_file(to_official(folder.dit), str(path))
    single = ZImagePipeline.from_pretrained(
        tiny_zimage_root, torch_dtype=torch.float32, device="cpu", transformer=str(path)
    )
    assert single.variant == folder.variant and single.shift == folder.shift
    assert np.array_equal(run(single, cfg_scale=3.0), run(folder, cfg_scale=3.0))
