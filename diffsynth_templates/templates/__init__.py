"""Template layer: the TemplateModel interface, caches and merging, folder formats, TemplatePipeline."""

from .base import TemplateError, TemplateInterfaceError, TemplateModel, check_template_model
from .cache import TemplateCacheError, TemplateOutput, merge_outputs
from .folder import (
    LoadedTemplate,
    TemplateSpec,
    TemplateTrustError,
    load_template_folder,
    save_template_folder,
)
from .pipeline import TemplatePipeline
from .registry import available_architectures, build_architecture, get_architecture, register_architecture
from .schema import InputField, InputSchema, TemplateInputError

__all__ = [
    "InputField",
    "InputSchema",
    "LoadedTemplate",
    "TemplateCacheError",
    "TemplateError",
    "TemplateInputError",
    "TemplateInterfaceError",
    "TemplateModel",
    "TemplateOutput",
    "TemplatePipeline",
    "TemplateSpec",
    "TemplateTrustError",
    "available_architectures",
    "build_architecture",
    "check_template_model",
    "get_architecture",
    "load_template_folder",
    "merge_outputs",
    "register_architecture",
    "save_template_folder",
]
