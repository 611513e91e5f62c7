"""The built-in template zoo: caches that fit the DiT, declarative round trips through TemplatePipeline,
full-size shapes and parameter counts on the meta device, learning on a frozen DiT, the published
brightness layout, and errors. What the zoo does the same on both backbones (every tiny architecture end to
end, untrained LoRAs, force_inpaint) is tested once for both in tests/templates/test_zoo_families.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffsynth_templates.backbones.attention import apply_rope, rope_cos_sin
from diffsynth_templates.backbones.flux2_dit import Flux2DiT, Flux2DiTConfig
from diffsynth_templates.pipelines.flux2_pipeline import _grid_ids
from diffsynth_templates.pipelines.lora import applied_lora, validate_lora
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline
from diffsynth_templates.templates import (
    TemplateError,
    TemplateInputError,
    TemplatePipeline,
    available_architectures,
    build_architecture,
    load_template_folder,
    save_template_folder,
)
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo import (
    ImageKV,
    ImageKVConfig,
    ImageLoRA,
    ImageLoRAConfig,
    Inpaint,
    InpaintConfig,
    LoRABank,
    LoRABankConfig,
    LoRATargetsConfig,
    ValueKV,
    ValueKVConfig,
    template_spec,
)
from diffsynth_templates.templates.zoo._common import grid_ids
from tests.templates.zoo_cases import CALL, half_mask, perturb_zeros, rgb

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return random_flux2_pipeline()


# --- every architecture at its tiny config (end to end on both families: test_zoo_families.py) -----


def test_registry_lists_the_zoo():
    assert {"value_kv", "image_kv", "inpaint", "image_lora", "lora_bank"} <= set(available_architectures())


def test_super_resolution_encodes_at_the_target_size(pipe):
    model = ImageKV(ImageKVConfig.tiny(upscale=4.0))
    with torch.no_grad():
        assert model.process_inputs(pipe=pipe, image=rgb(16))["latents"].shape == (1, 128, 4, 4)
        given = model.process_inputs(pipe=pipe, image=rgb(16), height=32, width=48)["latents"]
    assert given.shape == (1, 128, 2, 3)  # explicit height / width win


def test_mask_channel_is_the_masked_fraction_per_token(pipe):
    model = Inpaint(InpaintConfig.tiny())
    with torch.no_grad():
        latents = model.process_inputs(pipe=pipe, image=rgb(), mask=half_mask())["latents"]
    assert latents.shape == (1, 129, 2, 2)
    assert torch.equal(latents[0, -1], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_init_from_dit_copies_the_first_blocks(pipe):
    model = Inpaint(InpaintConfig.tiny(num_double_blocks=1, num_single_blocks=1))
    copied = model.init_from_dit(pipe.dit)
    dit = pipe.dit.state_dict()
    ours = model.state_dict()
    assert "transformer_blocks.0.attn.to_q.weight" in copied
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight" in copied
    assert torch.equal(ours["single_transformer_blocks.0.attn.to_out.weight"], dit["single_transformer_blocks.0.attn.to_out.weight"])  # fmt: skip
    assert torch.equal(ours["x_embedder.weight"][:, :128], dit["x_embedder.weight"])
    assert not ours["x_embedder.weight"][:, 128].any()  # the mask column starts at zero
    assert not any(name.startswith("proj_") for name in copied)


def test_image_kv_keys_meet_queries_at_their_own_position(pipe):
    # The DiT rotates its image queries by their grid position and appends the cache unrotated, so a
    # rotated key at (row, col) scores against the query at (row, col) as if neither were rotated.
    rotated = ImageKV(ImageKVConfig.tiny())
    plain = ImageKV(ImageKVConfig.tiny(key_rope=False))
    plain.load_state_dict(rotated.state_dict())
    with torch.no_grad():
        features = rotated.process_inputs(pipe=pipe, image=rgb(48), height=48, width=32)
        k_rot = rotated(pipe=pipe, **features)["kv_cache"]
        k_plain = plain(pipe=pipe, **features)["kv_cache"]
    h, w = features["latents"].shape[-2:]
    cos, sin = rope_cos_sin(_grid_ids(h, w, t=0), pipe.dit.config.axes_dims_rope, pipe.dit.config.rope_theta)
    for block in ("double_0", "single_1"):
        k, k0 = k_rot[block][0], k_plain[block][0]  # [1, h*w, heads, head_dim]
        q0 = torch.randn_like(k0)
        q = apply_rope(q0, cos, sin)  # the queries of the DiT's own image tokens
        torch.testing.assert_close((q * k).sum(-1), (q0 * k0).sum(-1), atol=1e-4, rtol=1e-4)
        assert not torch.allclose((q * k0).sum(-1), (q0 * k0).sum(-1), atol=1e-2)  # unrotated keys drift


def test_key_norm_starts_the_keys_as_the_dits_own(pipe):
    model = ImageKV(ImageKVConfig.tiny(key_norm=True, num_double_blocks=1, num_single_blocks=1))
    copied = model.init_from_dit(pipe.dit)
    dit, dim = pipe.dit, pipe.dit.config.hidden_size
    assert {"proj_k.double_0.weight", "key_norm.double_0.weight", "proj_k.single_1.weight"} <= set(copied)
    assert torch.equal(model.proj_k["double_0"].weight, dit.transformer_blocks[0].attn.to_k.weight)
    fused = dit.single_transformer_blocks[1].attn.to_qkv_mlp_proj.weight
    assert torch.equal(model.proj_k["single_1"].weight, fused[dim : 2 * dim])  # the K rows
    assert torch.equal(model.key_norm["single_1"].weight, dit.single_transformer_blocks[1].attn.norm_k.weight)
    assert not any(name.startswith("proj_v") for name in copied)  # V stays zero: no effect at the start

    with torch.no_grad():
        model.key_norm["double_0"].weight.fill_(2.0)
        features = model.process_inputs(pipe=pipe, image=rgb())
        k, v = model(pipe=pipe, **features)["kv_cache"]["double_0"]
    rms = k.float().pow(2).mean(-1).sqrt()  # RoPE rotates pairs, so it keeps each head's RMS
    torch.testing.assert_close(rms, torch.full_like(rms, 2.0), atol=1e-3, rtol=1e-3)
    assert not v.any()


def test_a_folder_saved_before_key_rope_loads_unrotated(tmp_path):
    import json

    model = ImageKV(ImageKVConfig.tiny())
    folder = save_template_folder(tmp_path / "old", model, template_spec(model, name="old"))
    data = json.loads((folder / "template.json").read_text())
    assert data["config"].pop("key_rope") is True
    data.pop("sha256", None)
    (folder / "template.json").write_text(json.dumps(data))
    assert load_template_folder(folder).model.config.key_rope is False  # as it was trained
    new = save_template_folder(tmp_path / "new", model, template_spec(model, name="new"))
    assert load_template_folder(new).model.config.key_rope is True


def test_zimage_image_kv_keys_stay_unrotated():
    # Z-Image's image positions shift with the caption's length: no fixed rotation can meet them
    assert ImageKVConfig.tiny_zimage().key_rope is False
    assert ImageKVConfig.tiny().key_rope is True


# --- full size, on the meta device ------------------------------------------------------------------

# parameter counts at klein-4B size (README, template zoo table); value_kv and lora_bank are also derived below
FULL_SIZE_PARAMS = {
    "value_kv": 590_131_200,
    "image_kv": 756_154_880,
    "inpaint": 756_157_952,
    "image_lora": 129_162_496,
    "lora_bank": 13_762_560,
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def meta_dit():
    with torch.device("meta"):
        return Flux2DiT(Flux2DiTConfig.klein_4b())


def test_value_kv_full_size(meta_dit):
    with torch.device("meta"):
        model = ValueKV(ValueKVConfig.klein_4b())
        kv = model(**model.process_inputs(scale=0.5))["kv_cache"]
    assert len(kv) == 25 and all(k.shape == v.shape == (1, 512, 24, 128) for k, v in kv.values())
    meta_dit.validate_kv_cache(kv)
    per_encoder = (256 * 3072 + 3072) + (3072 * 3072 + 3072) + 512 * 3072
    assert count(model) == 2 * 25 * per_encoder == FULL_SIZE_PARAMS["value_kv"]

    with torch.device("meta"):
        nine = ValueKV(ValueKVConfig.klein_9b(values=("R", "G", "B")))
        kv = nine(**nine.process_inputs(R=0.1, G=0.2, B=0.3))["kv_cache"]
    assert len(kv) == 32 and kv["single_23"][0].shape == (1, 512, 32, 128)


@pytest.mark.parametrize("arch", ["image_kv", "inpaint"])
def test_image_kv_full_size(meta_dit, arch):
    cls, config = (ImageKV, ImageKVConfig) if arch == "image_kv" else (Inpaint, InpaintConfig)
    with torch.device("meta"):
        model = cls(config.klein_4b())
        channels = 128 + int(model.config.mask_channel)
        kv = model(latents=torch.empty(1, channels, 64, 64))["kv_cache"]  # a 1024 x 1024 condition
    assert len(kv) == 25 and kv["double_0"][0].shape == (1, 4096, 24, 128)
    meta_dit.validate_kv_cache(kv)
    assert count(model) == FULL_SIZE_PARAMS[arch]


def test_image_kv_with_prompt_full_size(meta_dit):
    with torch.device("meta"):
        model = ImageKV(ImageKVConfig.klein_4b(use_prompt=True))
        kv = model(
            latents=torch.empty(1, 128, 32, 32),
            prompt_embeds=torch.empty(1, 512, 7680),
            text_ids=torch.zeros(512, 4, dtype=torch.long),
        )["kv_cache"]
    assert len(model.transformer_blocks) == 1 and kv["single_19"][1].shape == (1, 1024, 24, 128)


def test_lora_templates_full_size(meta_dit):
    with torch.device("meta"):
        image_lora = ImageLoRA(ImageLoRAConfig.klein_4b())
        lora = image_lora(latents=torch.empty(1, 128, 32, 32))["lora"]
        bank = LoRABank(LoRABankConfig.klein_4b())
        merged = bank(**bank.process_inputs(lora_ids=[1, 3]))["lora"]
    for cache, rank in ((lora, 4), (merged, 2 * 8)):
        validate_lora(meta_dit, cache)
        assert len(cache) == 2 * 40
        assert cache["single_transformer_blocks.19.attn.to_out.lora_A.weight"].shape == (rank, 12288)
        assert cache["transformer_blocks.4.attn.to_out.0.lora_B.weight"].shape == (3072, rank)
    assert count(image_lora) == FULL_SIZE_PARAMS["image_lora"]
    sizes = sum(i + o for i, o in zip(bank.config.in_features, bank.config.out_features))
    assert count(bank) == 4 * 8 * sizes == FULL_SIZE_PARAMS["lora_bank"]


# --- learning on a frozen DiT -----------------------------------------------------------------------

# The learning DiT is as small as the test pipeline's but 128 wide: the test pipeline's DiT is 32 wide
# and its output head can only reach a 32-dim subspace of the 128 latent channels, so no template
# could halve a loss on random noise there.
WIDE_DIT = Flux2DiTConfig(
    num_double_blocks=1,
    num_single_blocks=2,
    num_heads=4,
    head_dim=32,
    text_dim=96,
    axes_dims_rope=(8, 8, 8, 8),
)
SIZE = 32


@pytest.fixture(scope="module")
def wide_pipe():
    return random_flux2_pipeline(RandomPipelineSpec(dit=WIDE_DIT))


LEARNERS = {
    "value_kv": (lambda: ValueKV(ValueKVConfig.for_dit(WIDE_DIT, length=8)), 1e-2, lambda i: {"scale": 0.2 + 0.6 * i}),
    "image_kv": (lambda: ImageKV(ImageKVConfig.for_dit(WIDE_DIT)), 1e-3, lambda i: {"image": rgb(SIZE, i)}),
    "inpaint": (lambda: Inpaint(InpaintConfig.for_dit(WIDE_DIT)), 1e-3, lambda i: {"image": rgb(SIZE, i), "mask": half_mask(SIZE)}),
    "image_lora": (lambda: ImageLoRA(ImageLoRAConfig.for_dit(WIDE_DIT, hidden=32, num_layers=1, num_heads=2)), 1e-2, lambda i: {"image": rgb(SIZE, i)}),
    "lora_bank": (lambda: LoRABank(LoRABankConfig.for_dit(WIDE_DIT)), 1e-2, lambda i: {"lora_ids": [i]}),
}  # fmt: skip
MAX_STEPS = 300


@pytest.mark.parametrize("arch", sorted(LEARNERS))
def test_template_learns_on_a_frozen_dit(wide_pipe, arch):
    pipe, (build, lr, inputs_of) = wide_pipe, LEARNERS[arch]
    dit = pipe.dit
    assert not any(p.requires_grad for p in dit.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the fixed batch: two images, their noise and noise levels
        x0 = (
            torch.cat([pipe.encode_image(rgb(SIZE, i), SIZE, SIZE) for i in range(2)])
            .flatten(2)
            .transpose(1, 2)
        )
        prompt_embeds, txt_ids = pipe.encode_prompt(["a red circle"], 16)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(2, generator=g) * 0.8 + 0.1
    x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    target = noise - x0
    img_ids = grid_ids(SIZE // 16, SIZE // 16)

    torch.manual_seed(0)
    model = build().train()
    features = [model.process_inputs(pipe=pipe, **inputs_of(i)) for i in range(2)]

    def loss_fn() -> torch.Tensor:
        losses = []
        for i in range(2):
            cache = model(pipe=pipe, **features[i])  # gradients flow through forward only
            call = dict(
                hidden_states=x_t[i : i + 1],
                encoder_hidden_states=prompt_embeds,
                timestep=sigma[i : i + 1],
                img_ids=img_ids,
                txt_ids=txt_ids,
            )
            with applied_lora(dit, cache.get("lora")):
                prediction = dit(**call, kv_cache=cache.get("kv_cache"))
            losses.append(F.mse_loss(prediction, target[i : i + 1]))
        return torch.stack(losses).mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps, loss = 0, loss_fn()
    initial = loss.item()
    while loss.item() > 0.5 * initial and steps < MAX_STEPS:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps, loss = steps + 1, loss_fn()
    assert loss.item() <= 0.5 * initial, (
        f"{arch}: loss {initial:.3f} -> {loss.item():.3f} after {steps} steps"
    )
    assert all(p.grad is None for p in dit.parameters())  # the base stayed frozen
    print(f"{arch}: loss {initial:.3f} -> {loss.item():.3f} in {steps} steps")


# --- the published brightness layout ----------------------------------------------------------------


def reference_value_kv(
    state: dict, block: str, which: str, value: float, length: int, heads: int
) -> torch.Tensor:
    """DiffSynth-Studio's brightness ValueFormatModel, written out by hand for one block."""
    prefix = f"{which}.{block}"
    exponent = -math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128
    angles = torch.tensor([value * 1000.0])[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    hidden = F.silu(F.linear(embedding, state[f"{prefix}.prefer_value_embedder.0.weight"], state[f"{prefix}.prefer_value_embedder.0.bias"]))  # fmt: skip
    out = F.linear(hidden, state[f"{prefix}.prefer_value_embedder.2.weight"], state[f"{prefix}.prefer_value_embedder.2.bias"])  # fmt: skip
    tokens = out.squeeze(0).expand(length, -1) + state[f"{prefix}.positional_embedding"]
    return tokens.view(1, length, heads, -1)


def test_value_kv_loads_the_brightness_layout():
    dim, heads, length = 32, 2, 6
    blocks = ["double_0", "single_0", "single_1"]
    g = torch.Generator().manual_seed(0)
    state = {}
    for which in ("proj_k", "proj_v"):  # built by name and shape, as the published checkpoint is laid out
        for block in blocks:
            p = f"{which}.{block}"
            state[f"{p}.prefer_value_embedder.0.weight"] = torch.randn(dim, 256, generator=g) * 0.1
            state[f"{p}.prefer_value_embedder.0.bias"] = torch.randn(dim, generator=g) * 0.1
            state[f"{p}.prefer_value_embedder.2.weight"] = torch.randn(dim, dim, generator=g) * 0.1
            state[f"{p}.prefer_value_embedder.2.bias"] = torch.randn(dim, generator=g) * 0.1
            state[f"{p}.positional_embedding"] = torch.randn(length, dim, generator=g)
    model = ValueKV(ValueKVConfig(block_names=blocks, dim=dim, num_heads=heads, length=length))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        kv = model(**model.process_inputs(scale=0.37))["kv_cache"]
    for block in blocks:
        for i, which in enumerate(("proj_k", "proj_v")):
            want = reference_value_kv(state, block, which, 0.37, length, heads)
            torch.testing.assert_close(kv[block][i], want, rtol=1e-5, atol=1e-5)


def test_value_kv_several_values_widen_only_the_first_layer():
    one = ValueKV(ValueKVConfig.tiny())
    three = ValueKV(ValueKVConfig.tiny(values=("R", "G", "B")))
    shapes_one = {k: v.shape for k, v in one.state_dict().items()}
    shapes_three = {k: v.shape for k, v in three.state_dict().items()}
    assert shapes_one.keys() == shapes_three.keys()
    widened = {k for k in shapes_one if shapes_one[k] != shapes_three[k]}
    assert widened and all(k.endswith("prefer_value_embedder.0.weight") for k in widened)
    assert all(shapes_three[k][1] == 3 * 256 for k in widened)
    with torch.no_grad():  # and each value matters
        perturb_zeros(three)
        a = three(**three.process_inputs(R=0.2, G=0.5, B=0.5))["kv_cache"]["single_0"][1]
        b = three(**three.process_inputs(R=0.2, G=0.5, B=0.6))["kv_cache"]["single_0"][1]
    assert not torch.allclose(a, b)


def test_value_ranges_map_to_unit_interval():
    model = ValueKV(ValueKVConfig.tiny(values=("age",), ranges=((0, 100),)))
    assert model.process_inputs(age=25)["value"].tolist() == [0.25]


def test_lora_bank_merges_by_rank_concatenation():
    torch.manual_seed(0)
    bank = LoRABank(LoRABankConfig.tiny(num_loras=3, rank=2))
    perturb_zeros(bank)
    module = "single_transformer_blocks.1.attn.to_out"
    stack = bank.loras[module.replace(".", "-")]

    def delta(ids, scales, merge_type):
        lora = bank(**bank.process_inputs(lora_ids=ids, lora_scales=scales, merge_type=merge_type))["lora"]
        return lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]

    with torch.no_grad():
        one = [stack.lora_B[i] @ stack.lora_A[i] for i in range(3)]
        torch.testing.assert_close(delta([0, 2], [0.5, 2.0], "sum"), 0.5 * one[0] + 2.0 * one[2])
        torch.testing.assert_close(delta([0, 2], [0.5, 2.0], "mean"), (0.5 * one[0] + 2.0 * one[2]) / 2)
        torch.testing.assert_close(delta([1], None, None), one[1])


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ValueKVConfig(values=()), "values is empty"),
        (lambda: ValueKVConfig(values=("scale", "scale")), "more than once"),
        (lambda: ValueKVConfig(values=("model_id",)), "model_id"),
        (lambda: ValueKVConfig(dim=30, num_heads=4), "not divisible"),
        (lambda: ValueKVConfig(length=-1), "length"),
        (lambda: ValueKVConfig(values=("R", "G"), ranges=((0, 1),)), "one \\(low, high\\) per value"),
        (lambda: ValueKVConfig(ranges=((1, 0),)), "low < high"),
        (lambda: ImageKVConfig(sigma=2.0), "sigma"),
        (lambda: ImageKVConfig(num_double_blocks=0, num_single_blocks=0), "at least one encoder block"),
        (lambda: ImageKVConfig(hidden_head_dim=100), "axes_dims_rope"),
        (lambda: ImageKVConfig(upscale=0), "upscale"),
        (lambda: ImageKVConfig(key_axes_dims_rope=(32, 32, 32)), "key_axes_dims_rope"),
        (lambda: ImageKVConfig(key_axes_dims_rope=(64, 0, 32, 32)), "non-zero row and col"),
        (lambda: ImageKVConfig(key_axes_dims_rope=(-32, 96, 32, 32)), "non-negative"),
        (lambda: ImageKVConfig(head_dim=64), "summing to head_dim 64"),
        (lambda: InpaintConfig(mask_channel=False), "mask_channel must be True"),
        (lambda: ImageLoRAConfig(hidden=30, num_heads=4), "not divisible"),
        (
            lambda: LoRATargetsConfig(modules=("a.b",), in_features=(1, 2), out_features=(1,)),
            "one entry per module",
        ),
        (lambda: LoRATargetsConfig.tiny(modules=["transformer_blocks.9.attn.to_q"]), "does not exist"),
        (lambda: LoRATargetsConfig.tiny(modules=["transformer_blocks.0.attn"]), "not a Linear"),
        (lambda: LoRABankConfig(rank=0), "rank"),
        (lambda: LoRABankConfig(num_loras=0), "num_loras"),
        (lambda: LoRABankConfig(merge_type="max"), "merge_type"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_config_field_is_an_error():
    with pytest.raises(TemplateError, match="no config field"):
        build_architecture("value_kv", {"lenght": 4})


def test_bad_inputs(pipe):
    image_kv = ImageKV(ImageKVConfig.tiny())
    with pytest.raises(TemplateInputError, match="missing input 'image'"):
        image_kv.process_inputs(pipe=pipe)
    with pytest.raises(TemplateInputError, match="pass pipe="):
        image_kv.process_inputs(image=rgb())
    with pytest.raises(TemplateInputError, match="multiple of 16"):
        image_kv.process_inputs(pipe=pipe, image=rgb(), height=40)
    with pytest.raises(TemplateInputError, match="missing input 'mask'"):
        Inpaint(InpaintConfig.tiny()).process_inputs(pipe=pipe, image=rgb())
    with pytest.raises(TemplateInputError, match="'prompt'"):
        ImageKV(ImageKVConfig.tiny(use_prompt=True)).process_inputs(pipe=pipe, image=rgb())
    with pytest.raises(TemplateInputError, match="latents"):
        image_kv()
    with pytest.raises(TemplateInputError, match="missing input 'image'"):
        ImageLoRA(ImageLoRAConfig.tiny()).process_inputs(pipe=pipe)

    brightness = ValueKV(ValueKVConfig.tiny())
    with pytest.raises(TemplateInputError, match="missing input 'scale'"):
        brightness.process_inputs(brightness=0.5)
    with pytest.raises(TemplateInputError, match="above the maximum 1.0"):
        brightness.process_inputs(scale=1.5)

    bank = LoRABank(LoRABankConfig.tiny(num_loras=4))
    with pytest.raises(TemplateInputError, match="lora id 4 is out of range; this bank holds ids 0..3"):
        bank.process_inputs(lora_ids=[1, 4])
    with pytest.raises(TemplateInputError, match="unknown merge_type 'max'"):
        bank.process_inputs(lora_ids=[1], merge_type="max")
    with pytest.raises(TemplateInputError, match="one scale per id"):
        bank.process_inputs(lora_ids=[1, 2], lora_scales=[1.0])
    with pytest.raises(TemplateInputError, match="out of range"):
        bank(lora_ids=torch.tensor([7]), lora_scales=torch.tensor([1.0]))


def test_bad_inputs_through_the_template_pipeline(pipe, tmp_path):
    bank = LoRABank(LoRABankConfig.tiny(num_loras=4))
    image_kv = ImageKV(ImageKVConfig.tiny())
    folders = [
        save_template_folder(tmp_path / "bank", bank, template_spec(bank)),
        save_template_folder(tmp_path / "control", image_kv, template_spec(image_kv)),
    ]
    tp = TemplatePipeline.from_pretrained([str(f) for f in folders], device="cpu", host_store=HostStore())
    with pytest.raises(TemplateInputError, match="above the maximum 3"):
        tp(pipe, template_inputs=[{"model_id": "bank", "lora_ids": [5]}], **CALL, progress=False)
    with pytest.raises(TemplateInputError, match="missing input 'image'"):
        tp(pipe, template_inputs=[{"model_id": "control"}], **CALL, progress=False)
