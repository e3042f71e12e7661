"""`JumpLoraModel`: the PEFT tuner that puts JumpLoRA layers on a model and shares thresholds."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from jumplora.packaged import PACKAGED_MINILM_ID, packaged_minilm_path

from .config import JumpLoraConfig
from .layer import JumpLoraLayer, Linear
from .residual import disable_cpu_repack, quantization_kind
from .targets import TARGET_MODULES, is_adaptable

# Transformer blocks are numbered children of a container with one of these names:
# BERT `encoder.layer.3`, T5 `encoder.block.3`, LLaMA/Qwen/BART `layers.3`, GPT-2 `transformer.h.3`.
_BLOCK_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|block|blocks|h)\.\d+)(?:\.|$)")


def block_name(module_name: str) -> str:
    """The transformer block a module belongs to, e.g. ``encoder.layer.3`` (raises if there is none)."""
    match = _BLOCK_PATTERN.match(module_name)
    if match is None:
        raise ValueError(
            f"threshold_granularity='per_block': cannot tell which transformer block {module_name!r} is in "
            "(expected a name like '...layer.3...', '...layers.3...', '...block.3...' or '...h.3...'); "
            "use 'per_module' or 'global' for this model"
        )
    return match.group(1)


def threshold_group(config: JumpLoraConfig, module_name: str) -> str:
    if config.threshold_granularity == "global":
        return "global"
    if config.threshold_granularity == "per_block" and _BLOCK_PATTERN.match(module_name):
        return block_name(module_name)
    return module_name  # per_module, or a module outside the blocks (a pooler, a head): its own group


def _is_supported_linear(module: nn.Module) -> bool:
    base = module.get_base_layer() if isinstance(module, JumpLoraLayer) else module
    return is_adaptable(base)


class JumpLoraModel(BaseTuner):
    """PEFT tuner for JumpLoRA; build it with ``peft.get_peft_model(model, JumpLoraConfig(...))``."""

    prefix: str = "jumplora_"
    tuner_layer_cls = JumpLoraLayer
    target_module_mapping = TARGET_MODULES

    def _thresholds(self, adapter_name: str) -> dict[str, nn.Parameter]:
        groups = self.__dict__.setdefault("_threshold_params", {})
        return groups.setdefault(adapter_name, {})

    def _create_and_replace(
        self,
        config: JumpLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **_: object,
    ) -> None:
        if quantization_kind(target) == "gptq-awq":
            raise TypeError(
                f"JumpLoRA target {current_key!r} is a GPTQ/AWQ layer ({type(target).__name__}); quantized bases "
                "are supported through bitsandbytes (int8, nf4) and torchao only"
            )
        if not _is_supported_linear(target):
            raise TypeError(
                f"JumpLoRA target {current_key!r} is a {type(target).__name__}; "
                "only nn.Linear (and GPT-2's Conv1D) layers can take the adapter"
            )
        group = threshold_group(config, current_key)
        thresholds = self._thresholds(adapter_name)
        if group not in thresholds:
            weight = target.weight
            # One element, 1-D: FSDP2 and DeepSpeed shard and broadcast along dim 0 and refuse a 0-dim tensor.
            raw = torch.tensor([config.init_threshold], dtype=torch.float32, device=weight.device)
            if config.threshold_param == "log":
                raw = raw.log()
            thresholds[group] = nn.Parameter(raw)
        theta = thresholds[group]
        if isinstance(target, Linear):
            target.update_layer(adapter_name, config, theta, group, inference_mode=config.inference_mode)
            return
        new_module = Linear(target, adapter_name, config, theta, group)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _prepare_model(self, peft_config: JumpLoraConfig, model: nn.Module) -> None:
        """Keep bitsandbytes 4-bit layers trainable on CPU (see ``residual.disable_cpu_repack``)."""
        disable_cpu_repack(model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for module in model.modules():  # a dense adapter's θ is never used: keep it out of the optimizer
            if isinstance(module, JumpLoraLayer):
                for adapter, is_sparse in module.sparse.items():
                    if not is_sparse:
                        module.jumplora_theta[adapter].requires_grad_(False)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        force: bool = False,
    ) -> nn.Module:
        """PEFT's merge, refused (unless ``force``) while a sparse adapter is not fully gated.

        The merge keeps only |ΔW| > θ. At γ < 1, or with θ still at its placeholder, that is not what the
        adapter computes, and the update would be silently thrown away (e.g. after a plain Trainer run).
        """
        check_fully_gated(self.model, adapter_names or list(self.active_adapters), force)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _prepare_adapter_config(self, peft_config: JumpLoraConfig, model_config: dict) -> JumpLoraConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        peft_config.base_model_name_or_path = stable_model_name(peft_config.base_model_name_or_path)
        return peft_config


def stable_model_name(name: str | None) -> str | None:
    """The base model's id for ``adapter_config.json``: a model packaged inside site-packages is saved under
    its hub id (an absolute site-packages path breaks on any other machine); other names stay as given."""
    if not name or not Path(name).is_dir():
        return name
    try:
        packaged = packaged_minilm_path()
    except ImportError:
        return name
    return PACKAGED_MINILM_ID if Path(name).resolve() == packaged.resolve() else name


def check_fully_gated(model: nn.Module, adapters: list[str], force: bool = False) -> None:
    """Raise (or, with ``force``, warn) if a sparse adapter is at γ < 1 or its θ was never initialised."""
    problems = []
    for module in model.modules():
        if not isinstance(module, JumpLoraLayer):
            continue
        for adapter in adapters:
            if adapter not in module.jumplora_A or not module.sparse[adapter]:
                continue
            if module.gamma[adapter] < 1.0:
                problems.append(f"adapter {adapter!r} is at γ = {module.gamma[adapter]:.3g} < 1")
            elif torch.isclose(module.theta(adapter).detach(), torch.tensor(module.init_threshold[adapter])):
                problems.append(f"adapter {adapter!r} still has its placeholder θ (never initialised)")
            if problems:
                break
        if problems:
            break
    if not problems:
        return
    message = (
        f"JumpLoRA merge: {problems[0]}; the merge keeps only |ΔW| > θ, so the merged model would not compute "
        "what the adapter computes. Drive γ and θ during training (jumplora.adapters.Sparsifier and its "
        "finish(), or jumplora.JumpLoraCallback with transformers.Trainer)"
    )
    if not force:
        raise ValueError(message + ", or pass force=True to merge anyway.")
    warnings.warn(message + "; merging anyway (force=True).", stacklevel=3)
