"""``image_kv``: a condition image (+ mask, + prompt) -> per-block KV tokens. ControlNet talking through KV.

``process_inputs`` (no gradients) encodes the condition with the base pipeline's own VAE into
normalized 128-channel DiT latents, optionally with a mask channel (the fraction of masked pixels
under each token) and an encoded prompt. ``forward`` is a small FLUX.2 transformer of the same block
classes as the base DiT: latent tokens -> ``x_embedder`` -> double-stream blocks (image + prompt) ->
single-stream blocks, conditioned on the embedding of a fixed timestep (``sigma``, default 0: the
condition is a clean image) and rotated with the condition grid's RoPE positions. Per base block,
``proj_k`` / ``proj_v`` map the condition's hidden states to K and V ``[1, N_cond, heads, head_dim]``.
On FLUX.2 each K is then rotated with the base DiT's RoPE at its token's grid position (``key_rope``):
the DiT appends the cache unrotated, and its queries are rotated, so this is what lets a query at
(row, col) find the condition token at (row, col) by position rather than only by content.

Its module names follow the DiT's, so ``init_from_dit(dit)`` starts the encoder from the base
model's first blocks. V projections start at zero and K projections small: an untrained template
adds tokens that carry nothing but still take some attention mass (appended KV has no mask, so it is
never an exact no-op); training starts near the base behaviour. Gradients reach the encoder after
the first update of V (as with ControlNet's zero convolutions), and through K from the start.

Tasks: structure control (depth / edges), editing (image + instruction prompt), super-resolution
(low-res image resized to the target size, or ``upscale``-times its size, before encoding), content
reference, inpainting (see ``inpaint``). Typical KV length: one token per 16 x 16 condition pixels,
4096 tokens at 1024 x 1024. Parameters at klein-4B size (2 single blocks, all 25 base blocks): 756.2 M
(472 M of them in the per-block K/V projections); with a prompt and one double block: 1.14 B;
klein-9B: 1.58 B. Fewer ``block_names`` shrink the projections.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.attention import apply_rope, check_rope_axes, rope_cos_sin
from ...backbones.flux2_dit import (
    DoubleStreamBlock,
    Flux2DiT,
    Flux2DiTConfig,
    Modulation,
    SingleStreamBlock,
    TimeEmbedding,
)
from ...backbones.zimage_dit import ZImageDiTConfig
from ...pipelines.common import DEFAULT_MAX_PIXELS
from ...pipelines.flux2_prompt import text_position_ids
from ...pipelines.image_io import image_to_tensor, inpaint_pair, place_image_and_mask, resize_image
from ..base import TemplateModel
from ..registry import register_architecture
from ..schema import InputField, InputSchema, TemplateInputError
from ._common import (
    DiTConfig,
    TemplateConfigError,
    base_layout,
    check_names,
    check_positive,
    grid_ids,
    kv_block_names,
    parameter_device,
    parameter_dtype,
    round_to_multiple,
    tiny_dit_config,
    tiny_zimage_dit_config,
)

K_INIT_STD = 0.02  # small keys: condition tokens start with near-uniform, small attention logits


@dataclass
class ImageKVConfig:
    """Defaults: klein-4B (24 heads x 128, all 25 blocks), an encoder of two single-stream blocks."""

    # what the base DiT takes
    block_names: tuple[str, ...] = field(default_factory=lambda: kv_block_names(Flux2DiTConfig.klein_4b()))
    num_heads: int = 24
    head_dim: int = 128
    latent_channels: int = 128  # the VAE's DiT latents
    # latent pixels per token side: 1 for FLUX.2 (its DiT latents are already patchified), 2 for Z-Image
    patch_size: int = 1
    text_dim: int = 7680  # prompt embedding width (3 x the text encoder's hidden size)
    # what the template reads
    mask_channel: bool = False  # one extra input channel: the mask, averaged over each token's pixels
    hide_masked: bool = True  # with a mask: masked pixels are set to mid-grey before encoding
    use_prompt: bool = False
    max_prompt_tokens: int = 512
    upscale: float = 1.0  # without height/width inputs: the condition is encoded at upscale x its size
    # the encoder (FLUX.2 blocks of its own size; the base DiT's size lets init_from_dit copy weights)
    hidden_heads: int = 24
    hidden_head_dim: int = 128
    num_double_blocks: int = 0
    num_single_blocks: int = 2
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    sigma: float = 0.0  # the timestep the encoder is conditioned on
    # Rotate each output key with the base DiT's RoPE at its condition token's position, so a query at
    # (row, col) meets the condition token at (row, col) at relative offset zero. The DiT appends the
    # cache unrotated (DESIGN 4.1), so without this a spatial map is matchable only through content.
    key_rope: bool = True
    # RMS-normalize each block's keys per head (a learned scale, like the DiT's own norm_k), so they
    # have the magnitude of the DiT's keys whatever proj_k's scale; init_from_dit then starts proj_k
    # and the scale as the DiT's own K projection and norm_k
    key_norm: bool = False
    key_axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)  # the base DiT's RoPE axes
    key_rope_theta: float = 2000.0

    # a saved template.json without these fields predates them and was trained without them
    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"key_rope": False}

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.block_names = check_names(owner, "block_names", self.block_names)
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        self.key_axes_dims_rope = tuple(int(a) for a in self.key_axes_dims_rope)
        check_positive(
            owner,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            latent_channels=self.latent_channels,
            patch_size=self.patch_size,
            text_dim=self.text_dim,
            max_prompt_tokens=self.max_prompt_tokens,
            upscale=self.upscale,
            hidden_heads=self.hidden_heads,
            hidden_head_dim=self.hidden_head_dim,
            mlp_ratio=self.mlp_ratio,
            rope_theta=self.rope_theta,
        )
        for name in ("num_double_blocks", "num_single_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TemplateConfigError(f"{owner}.{name} must be an integer >= 0, got {value!r}")
        if self.num_double_blocks + self.num_single_blocks == 0:
            raise TemplateConfigError(
                f"{owner} needs at least one encoder block (num_double_blocks + num_single_blocks)"
            )
        if not 0.0 <= self.sigma <= 1.0:
            raise TemplateConfigError(
                f"{owner}.sigma must be in [0, 1] (a flow-matching noise level), got {self.sigma}"
            )
        if self.key_rope:
            self._check_key_rope(owner)
        try:
            self.encoder_config()
        except ValueError as e:
            raise TemplateConfigError(f"{owner}: {e}") from e

    def _check_key_rope(self, owner: str) -> None:
        axes = self.key_axes_dims_rope
        check_rope_axes(axes, self.head_dim, f"{owner}.key_axes_dims_rope")
        # the keys sit at (0, row, col, 0): without rotated row and col axes they would carry no position
        if len(axes) != 4 or axes[1] == 0 or axes[2] == 0:
            raise TemplateConfigError(
                f"{owner}.key_axes_dims_rope must be the base DiT's four RoPE axes (t, row, col, l) with "
                f"non-zero row and col sizes, got {axes}"
            )
        if self.key_rope_theta <= 0:
            raise TemplateConfigError(f"{owner}.key_rope_theta must be > 0, got {self.key_rope_theta}")

    def encoder_config(self) -> Flux2DiTConfig:
        """The encoder's blocks as a Flux2DiTConfig (so they are built by the DiT's own classes)."""
        return Flux2DiTConfig(
            in_channels=(self.latent_channels + int(self.mask_channel)) * self.patch_size**2,
            num_double_blocks=self.num_double_blocks,
            num_single_blocks=self.num_single_blocks,
            num_heads=self.hidden_heads,
            head_dim=self.hidden_head_dim,
            text_dim=self.text_dim,
            mlp_ratio=self.mlp_ratio,
            axes_dims_rope=self.axes_dims_rope,
            rope_theta=self.rope_theta,
        )

    @classmethod
    def for_dit(cls, dit_config: DiTConfig, **kwargs: Any) -> ImageKVConfig:
        """KV for every block of ``dit_config`` (FLUX.2 or Z-Image); the encoder shares its width.

        On FLUX.2 the encoder also shares the DiT's MLP ratio and RoPE, so ``init_from_dit`` fits. On
        Z-Image (whose blocks differ from FLUX.2's) the encoder is FLUX.2 blocks of Z-Image's width,
        reading 2x2 patches of the 16-channel latents, trained from its own initialization.
        With ``use_prompt=True`` and no block counts given, the encoder gets one double-stream block
        (where image and prompt first meet) before its single-stream blocks.
        """
        if kwargs.get("use_prompt") and "num_double_blocks" not in kwargs:
            kwargs["num_double_blocks"] = 1
        layout = base_layout(dit_config)
        base = dict(
            block_names=layout.block_names,
            num_heads=layout.num_heads,
            head_dim=layout.head_dim,
            latent_channels=layout.latent_channels,
            patch_size=layout.patch_size,
            text_dim=layout.text_dim,
            hidden_heads=layout.num_heads,
            hidden_head_dim=layout.head_dim,
        )
        if isinstance(dit_config, Flux2DiTConfig):
            base.update(
                mlp_ratio=dit_config.mlp_ratio,
                axes_dims_rope=dit_config.axes_dims_rope,
                rope_theta=dit_config.rope_theta,
                key_axes_dims_rope=dit_config.axes_dims_rope,
                key_rope_theta=dit_config.rope_theta,
            )
        else:  # four equal RoPE axes (t, row, col, unused) over the encoder's head dim
            # Z-Image's image tokens sit at a time offset that depends on the caption's length, so no
            # fixed key rotation meets its queries at offset zero: keys stay unrotated there.
            base.update(axes_dims_rope=(layout.head_dim // 4,) * 4, key_rope=False)
        return cls(**{**base, **kwargs})

    @classmethod
    def klein_4b(cls, **kwargs: Any) -> ImageKVConfig:
        return cls.for_dit(Flux2DiTConfig.klein_4b(), **kwargs)

    @classmethod
    def klein_9b(cls, **kwargs: Any) -> ImageKVConfig:
        return cls.for_dit(Flux2DiTConfig.klein_9b(), **kwargs)

    @classmethod
    def z_image(cls, **kwargs: Any) -> ImageKVConfig:
        """Z-Image Turbo / base: KV for the 30 main blocks (30 heads x 128)."""
        return cls.for_dit(ZImageDiTConfig(), **kwargs)

    @classmethod
    def tiny(cls, **kwargs: Any) -> ImageKVConfig:
        """Matches ``random_flux2_pipeline()``'s DiT; prompts cut to 16 tokens."""
        return cls.for_dit(tiny_dit_config(), **{"max_prompt_tokens": 16, **kwargs})

    @classmethod
    def tiny_zimage(cls, **kwargs: Any) -> ImageKVConfig:
        """Matches ``random_zimage_pipeline()``'s DiT; prompts cut to 16 tokens."""
        return cls.for_dit(tiny_zimage_dit_config(), **{"max_prompt_tokens": 16, **kwargs})


def image_kv_schema(config: ImageKVConfig, extra: Sequence[InputField] = ()) -> InputSchema:
    """The inputs a config reads (``mask`` / ``prompt`` only when it uses them)."""
    fields_ = [InputField("image", "image", description="the condition image")]
    if config.mask_channel:
        fields_.append(InputField("mask", "mask", description="white (1) marks the pixels to regenerate"))
    if config.use_prompt:
        fields_.append(InputField("prompt", "str", description="the instruction for the condition image"))
    fields_ += [
        InputField("height", "int", required=False, minimum=1, description="encode at this height (pixels)"),
        InputField("width", "int", required=False, minimum=1, description="encode at this width (pixels)"),
        *extra,
    ]
    return InputSchema(fields_)


@register_architecture("image_kv")
class ImageKV(TemplateModel):
    """Condition image -> ``{"kv_cache": {block: (k, v)}}`` with ``k, v: [1, N_cond, heads, head_dim]``.

    Inputs: ``image`` (PIL / array / tensor); ``mask`` when ``mask_channel``; ``prompt`` when
    ``use_prompt``; optional ``height`` / ``width`` in pixels (default: the image size times
    ``upscale``, rounded to the pipeline's pixels per token).
    """

    config_class = ImageKVConfig
    # the schema of the default config; instances carry their own (mask / prompt depend on the config)
    input_schema = image_kv_schema(ImageKVConfig())
    cache_keys = ("kv_cache",)

    def __init__(self, config: ImageKVConfig):
        super().__init__()
        self.config = config
        self.input_schema = image_kv_schema(config)
        enc = config.encoder_config()
        dim = enc.hidden_size
        self.time_guidance_embed = TimeEmbedding(enc)
        if enc.num_double_blocks:
            self.double_stream_modulation_img = Modulation(dim, sets=2)
            self.double_stream_modulation_txt = Modulation(dim, sets=2)
        if enc.num_single_blocks:
            self.single_stream_modulation = Modulation(dim, sets=1)
        self.x_embedder = nn.Linear(enc.in_channels, dim, bias=False)
        if config.use_prompt:
            self.context_embedder = nn.Linear(enc.text_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(enc) for _ in range(enc.num_double_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(enc) for _ in range(enc.num_single_blocks)
        )
        out = config.num_heads * config.head_dim
        self.proj_k = nn.ModuleDict({b: nn.Linear(dim, out, bias=False) for b in config.block_names})
        self.proj_v = nn.ModuleDict({b: nn.Linear(dim, out, bias=False) for b in config.block_names})
        for b in config.block_names:
            nn.init.normal_(self.proj_k[b].weight, std=K_INIT_STD)
            nn.init.zeros_(self.proj_v[b].weight)
        if config.key_norm:
            self.key_norm = nn.ModuleDict(
                {b: nn.RMSNorm(config.head_dim, eps=1e-6) for b in config.block_names}
            )

    @property
    def _who(self) -> str:
        return f"template architecture {self.architecture!r}"

    # -- no-grad preprocessing --------------------------------------------------------------------

    @torch.no_grad()
    def process_inputs(
        self,
        pipe: Any = None,
        image: Any = None,
        mask: Any = None,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        resize_mask: bool = False,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        """``{"latents": [1, C(+1), h, w]}`` (+ ``prompt_embeds [1, L, text_dim]``, ``text_ids [L, 4]``).

        The mask must have the image's size (``resize_mask=True``: stretched to it first); both are
        resized and cropped alike onto the encoding size.
        """
        cfg, who = self.config, self._who
        if pipe is None:
            raise TemplateInputError(f"{who} encodes its image with the base model's VAE: pass pipe=...")
        if image is None:
            raise TemplateInputError(f"{who}: missing input 'image' (the condition image)")
        if cfg.mask_channel and mask is None:
            raise TemplateInputError(f"{who}: missing input 'mask' (white = pixels to regenerate)")
        if cfg.use_prompt and not (isinstance(prompt, str) and prompt.strip()):
            raise TemplateInputError(f"{who}: input 'prompt' must be a non-empty string, got {prompt!r}")
        pixel_mask = None
        if cfg.mask_channel:  # [1, 3, H, W] in [-1, 1] and [1, 1, H, W] in [0, 1]
            pixels, pixel_mask = inpaint_pair(
                image, mask, resize_mask, f"{who}: input 'image'", f"{who}: input 'mask'"
            )
        else:
            pixels = image_to_tensor(image, f"{who}: input 'image'")
        height, width = self._encode_size(pipe, pixels, height, width)
        if pixel_mask is None:
            pixels = resize_image(pixels, height, width)
        else:  # the mask lands on the pixels it marks, whatever the aspect ratios
            pixels, pixel_mask = place_image_and_mask(pixels, pixel_mask, height, width)
            if cfg.hide_masked:  # the template must not see what it is asked to replace
                pixels = pixels * (1 - pixel_mask)
        latents = pipe.encode_image((pixels + 1) / 2, height, width, f"{who}: input 'image'")
        if pixel_mask is not None:  # the fraction of masked pixels under each latent pixel
            latent_mask = F.avg_pool2d(pixel_mask, pipe.pixels_per_token // cfg.patch_size).to(latents)
            latents = torch.cat([latents, latent_mask], dim=1)

        device = parameter_device(self)
        features = {"latents": latents.float().to(device)}
        if cfg.use_prompt:
            encoded = pipe.encode_prompt([prompt], cfg.max_prompt_tokens)
            if isinstance(encoded, tuple):  # FLUX.2: (embeds [1, L, D], text_ids [L, 4])
                embeds, text_ids = encoded
            else:  # Z-Image: one [L, D] per prompt, padding stripped; FLUX.2-style ids (0, 0, 0, l)
                embeds = encoded[0][None]
                text_ids = text_position_ids(1, embeds.shape[1], embeds.device)[0]
            features["prompt_embeds"] = embeds.float().to(device)
            features["text_ids"] = text_ids.to(device)
        return features

    def _encode_size(self, pipe, pixels: Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        step = pipe.pixels_per_token
        for name, value in (("height", height), ("width", width)):
            integral = (
                isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            )
            if value is not None and (not integral or value != int(value) or value < step or value % step):
                raise TemplateInputError(
                    f"{self._who}: {name}={value!r} must be a positive multiple of {step} (pixels per DiT token)"
                )
        height, width = (None if v is None else int(v) for v in (height, width))
        h, w = pixels.shape[-2:]
        size = (
            height or round_to_multiple(h * self.config.upscale, step),
            width or round_to_multiple(w * self.config.upscale, step),
        )
        if size[0] * size[1] > DEFAULT_MAX_PIXELS:  # refused before anything is allocated
            raise TemplateInputError(
                f"{self._who}: encoding at {size[0]} x {size[1]} exceeds {DEFAULT_MAX_PIXELS} pixels; "
                "pass a smaller height / width (or a smaller image)"
            )
        return size

    # -- the trainable path -----------------------------------------------------------------------

    def forward(
        self,
        pipe: Any = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        text_ids: Tensor | None = None,
        **features: Any,
    ) -> dict[str, Any]:
        cfg = self.config
        self._check_features(latents, prompt_embeds, text_ids)
        dtype, device = parameter_dtype(self), parameter_device(self)
        p = cfg.patch_size
        h, w = latents.shape[-2] // p, latents.shape[-1] // p
        # one token per p x p latent pixels, channels ordered (c, row in patch, column in patch)
        tokens = latents.to(device, dtype).unfold(2, p, p).unfold(3, p, p)  # [1, C, h, w, p, p]
        tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(1, h * w, -1)
        img = self.x_embedder(tokens)  # [1, h*w, hidden]
        img_ids = grid_ids(h, w, device=device)
        if prompt_embeds is not None:
            txt = self.context_embedder(prompt_embeds.to(device, dtype))
            txt_ids = text_ids.to(device)
        else:
            txt = img.new_zeros(img.shape[0], 0, img.shape[-1])
            txt_ids = img_ids.new_zeros(0, img_ids.shape[-1])
        # prompt tokens first, as in the DiT's joint sequence
        rope = rope_cos_sin(torch.cat([txt_ids, img_ids]), cfg.axes_dims_rope, cfg.rope_theta)
        temb = self.time_guidance_embed(torch.full((1,), cfg.sigma * 1000, device=device, dtype=dtype), None)

        if self.transformer_blocks:
            mod_img = self.double_stream_modulation_img(temb)
            mod_txt = self.double_stream_modulation_txt(temb)
            for block in self.transformer_blocks:
                img, txt = block(img, txt, mod_img, mod_txt, rope)
        if self.single_transformer_blocks:
            (mod_single,) = self.single_stream_modulation(temb)
            x = torch.cat([txt, img], dim=1)
            for block in self.single_transformer_blocks:
                x = block(x, mod_single, rope)
            img = x[:, txt.shape[1] :]

        heads = (cfg.num_heads, cfg.head_dim)
        key_rope = None
        if cfg.key_rope:  # the positions the DiT gives its own image tokens: (0, row, col, 0)
            key_rope = rope_cos_sin(img_ids, cfg.key_axes_dims_rope, cfg.key_rope_theta)
        kv_cache = {}
        for b in cfg.block_names:
            k = self.proj_k[b](img).unflatten(-1, heads)
            if cfg.key_norm:
                k = self.key_norm[b](k)
            if key_rope is not None:
                k = apply_rope(k, *key_rope)
            kv_cache[b] = (k, self.proj_v[b](img).unflatten(-1, heads))
        return {"kv_cache": kv_cache}

    def _check_features(self, latents, prompt_embeds, text_ids) -> None:
        cfg, who = self.config, self._who
        channels, p = cfg.latent_channels + int(cfg.mask_channel), cfg.patch_size
        if (
            latents is None
            or latents.ndim != 4
            or latents.shape[0] != 1
            or latents.shape[1] != channels
            or latents.shape[2] % p
            or latents.shape[3] % p
        ):
            got = None if latents is None else tuple(latents.shape)
            sides = f"h, w multiples of {p}" if p > 1 else "h, w"
            raise TemplateInputError(
                f"{who}.forward needs 'latents' [1, {channels}, h, w] ({sides}) from process_inputs, got {got}"
            )
        if cfg.use_prompt and (prompt_embeds is None or text_ids is None):
            raise TemplateInputError(
                f"{who}.forward needs 'prompt_embeds' and 'text_ids' (use_prompt=True); pass the output of process_inputs"
            )
        if not cfg.use_prompt and prompt_embeds is not None:
            raise TemplateInputError(f"{who} was built with use_prompt=False but got prompt_embeds")

    # -- initialization ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_from_dit(self, dit: Flux2DiT) -> list[str]:
        """Copy the base DiT's weights wherever a parameter has the same name and shape.

        The encoder's i-th double / single block starts as the DiT's i-th; embedders and modulations
        as the DiT's. With a mask channel, ``x_embedder``'s latent columns are copied and the mask
        column is zeroed. With ``key_norm``, each block's ``proj_k`` and key scale start as that DiT
        block's image K projection and ``norm_k``, so the condition's keys start out shaped like the
        DiT's own (V stays zero: the untrained template takes attention mass but adds no content).
        Returns the names copied (none for a Z-Image DiT, whose blocks differ).
        """
        ours = self.state_dict()
        copied = []
        for name, value in dit.state_dict().items():
            target = ours.get(name)
            if target is None:
                continue
            if target.shape == value.shape:
                target.copy_(value)
                copied.append(name)
            elif name == "x_embedder.weight" and target.shape[1] == value.shape[1] + 1:
                target[:, : value.shape[1]].copy_(value)
                target[:, value.shape[1] :].zero_()
                copied.append(name)
        if self.config.key_norm and isinstance(dit, Flux2DiT):
            copied += self._keys_from_dit(dit)
        return copied

    def _keys_from_dit(self, dit: Flux2DiT) -> list[str]:
        copied = []
        for b in self.config.block_names:
            kind, index = b.split("_")
            if kind == "double":
                attn = dit.transformer_blocks[int(index)].attn
                weight = attn.to_k.weight
            else:  # the fused projection's rows: Q, K, V, then the MLP input
                attn = dit.single_transformer_blocks[int(index)].attn
                dim = attn.to_qkv_mlp_proj.in_features
                weight = attn.to_qkv_mlp_proj.weight[dim : 2 * dim]
            fits = weight.shape == self.proj_k[b].weight.shape
            if not fits or attn.norm_k.weight.shape != self.key_norm[b].weight.shape:
                continue  # an encoder of another width: keep the random start
            self.proj_k[b].weight.copy_(weight)
            self.key_norm[b].weight.copy_(attn.norm_k.weight)
            copied += [f"proj_k.{b}.weight", f"key_norm.{b}.weight"]
        return copied
