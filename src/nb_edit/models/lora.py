"""LoRA adapters on a frozen base, so several roles can share one copy of the weights.

NP-Edit (sec. 3, DMD) needs three velocity models: the generator (trained), the teacher
("real" score, frozen) and the "fake" score (trained online on the generator's outputs). With
peft they are one frozen base and two adapters::

    attach_lora(editor, rank=8, adapter_name="generator")
    attach_lora(editor, rank=8, adapter_name="fake")
    with active_adapter(editor, "generator"): v_gen = editor(x_t, t, text, pooled, source)
    with active_adapter(editor, "fake"):      v_fake = editor(x_t, t, text_edited, pooled_edited)
    with adapters_disabled(editor):           v_real = editor(x_t, t, text_edited, pooled_edited)

Every LoRA weight keeps ``requires_grad=True`` whichever adapter is active (peft's own switch
flips the flags; these helpers put them back), so each role's optimizer keeps its parameters;
only the active adapter enters the forward pass and so receives gradients.

For a ``UNetEditor`` built by ``editor_from_teacher`` the reference channels of ``conv_in`` are
zero in the base: ``default_lora_targets`` therefore adapts ``conv_in`` too, or the editor could
never learn to read the reference. With adapters disabled and no reference the base is exactly
the teacher.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from nb_edit.models.editors import DiTEditor, UNetEditor

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def default_lora_targets(editor: nn.Module) -> list[str]:
    """Module names to adapt: attention projections (+ ``conv_in`` for UNets, + the text stream for DiTs)."""
    if isinstance(editor, UNetEditor):
        return [*_ATTENTION, "conv_in"]
    if isinstance(editor, DiTEditor):
        return [*_ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    raise TypeError(f"no default LoRA targets for {type(editor).__name__}; pass target_modules explicitly.")


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters attached to ``model``, sorted."""
    names = set()
    for layer in _tuner_layers(model):
        names.update(layer.lora_A.keys())
    return sorted(names)


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (or all adapters): what an optimizer should get."""
    return [p for name, p in model.named_parameters()
            if "lora_" in name and (adapter_name is None or f".{adapter_name}." in name)]


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} is not attached; attached: {adapter_names(model)}. "
                         "Call attach_lora(model, ..., adapter_name=...) first.")


def _keep_lora_trainable(model: nn.Module) -> None:
    for p in lora_parameters(model):
        p.requires_grad_(True)


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None, target_modules: list[str] | None = None,
                adapter_name: str = "default", dropout: float = 0.0) -> nn.Module:
    """Freeze ``model``'s base weights and add a LoRA adapter (B zero-initialised, so the output
    is unchanged). ``alpha`` defaults to ``rank`` (scale 1). The new adapter becomes active.
    Call again with another ``adapter_name`` to add a second adapter on the same base.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}.")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} is already attached; pick another adapter_name.")
    targets = target_modules if target_modules is not None else default_lora_targets(model)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=targets, init_lora_weights=True)
    with warnings.catch_warnings():  # a second adapter on the same base is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_active_adapter(model, adapter_name)
    return model


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the one adapter in the forward pass (and re-enable adapters)."""
    _check_adapter(model, adapter_name)
    for layer in _tuner_layers(model):
        layer.enable_adapters(True)
        layer.set_adapter(adapter_name)
    _keep_lora_trainable(model)


def _active_names(model: nn.Module) -> tuple[list[str], bool]:
    layer = _tuner_layers(model)[0]
    return list(layer.active_adapters), bool(layer.disable_adapters)


@contextmanager
def active_adapter(model: nn.Module, adapter_name: str):
    """Within the block, only ``adapter_name`` is applied; the previous state comes back after."""
    _check_adapter(model, adapter_name)
    previous, was_disabled = _active_names(model)
    set_active_adapter(model, adapter_name)
    try:
        yield model
    finally:
        for layer in _tuner_layers(model):
            layer.set_adapter(previous)
            layer.enable_adapters(not was_disabled)
        _keep_lora_trainable(model)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model is its frozen base: the teacher, when the base is the teacher's."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("adapters_disabled(model): no LoRA adapter is attached to this model.")
    was_disabled = bool(layers[0].disable_adapters)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(not was_disabled)
        _keep_lora_trainable(model)


def lora_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights (detached), e.g. for ``safetensors.torch.save_file``."""
    _check_adapter(model, adapter_name)
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if "lora_" in name and f".{adapter_name}." in name}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights written by ``lora_state_dict`` into adapters already attached with the same shape."""
    own = dict(model.named_parameters())
    missing = [name for name in state if name not in own]
    if missing:
        raise KeyError(f"{len(missing)} LoRA weights have no matching parameter (first: {missing[0]}); attach the "
                       "adapter with the same name, rank and target_modules before loading.")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def merged_copy(model: nn.Module, adapter_name: str) -> nn.Module:
    """A copy of ``model`` with ``adapter_name`` merged into its base weights and every LoRA
    layer removed: a plain model that computes what ``model`` computes with that adapter active,
    ready for ``save_pretrained``. ``model`` itself is left as it was. The base must not be
    quantised (a merge into 4-/8-bit weights is lossy): load it with ``quantization=None``."""
    _check_adapter(model, adapter_name)
    if any(getattr(p, "quant_state", None) is not None or p.dtype in (torch.int8, torch.uint8)
           for p in model.parameters()):
        raise ValueError("merged_copy: this model's base is quantised; merging into 4-/8-bit weights is lossy. "
                         "Load the base with quantization=None (e.g. the config's quantization: null) to merge.")
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter_name])
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    for p in merged.parameters():
        p.requires_grad_(False)
    if hasattr(merged, "peft_config"):  # set by peft on the module it injected into
        del merged.peft_config
    return merged
