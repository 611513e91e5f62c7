"""The built-in template architectures (importing this package registers them by name).

| name           | carrier          | reads                                           |
|----------------|------------------|-------------------------------------------------|
| ``value_kv``   | KV               | scalars (brightness, sharpness, age, RGB color) |
| ``image_kv``   | KV               | an image (+ mask, + prompt)                     |
| ``inpaint``    | KV (+ hard mask) | an image and a mask                             |
| ``image_lora`` | LoRA             | an image                                        |
| ``lora_bank``  | LoRA             | ids of stored LoRAs, their scales, a merge rule |

Every config has ``klein_4b()``, ``klein_9b()``, ``tiny()`` (the random test pipeline's DiT) and
``for_dit(dit_config, ...)`` constructors. ``template_spec(model)`` gives the ``TemplateSpec`` to
save one as a declarative folder with its own input schema.
"""

from ._common import LoRATargetsConfig, attention_lora_modules, kv_block_names, linear_shapes, template_spec
from .image_kv import ImageKV, ImageKVConfig
from .image_lora import ImageLoRA, ImageLoRAConfig
from .inpaint import Inpaint, InpaintConfig
from .lora_bank import LoRABank, LoRABankConfig
from .value_kv import ValueKV, ValueKVConfig

__all__ = [
    "ImageKV",
    "ImageKVConfig",
    "ImageLoRA",
    "ImageLoRAConfig",
    "Inpaint",
    "InpaintConfig",
    "LoRABank",
    "LoRABankConfig",
    "LoRATargetsConfig",
    "ValueKV",
    "ValueKVConfig",
    "attention_lora_modules",
    "kv_block_names",
    "linear_shapes",
    "template_spec",
]
