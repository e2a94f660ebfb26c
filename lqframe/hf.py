"""transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` (or the checkpoint's own
class, ``AutoModel``, …) loads an lqframe checkpoint once ``lqframe`` is imported (an
``HfQuantizer`` registered under ``quant_method: "lqframe"``). transformers has no entry-point
discovery for quantizers, hence the import.

Importing transformers' quantizer machinery takes seconds, so ``import lqframe`` does not do it:
:func:`install` registers at once when ``transformers.quantizers.auto`` (the module holding the
quantizer tables that ``from_pretrained`` consults) is already imported, and otherwise puts a finder
on ``sys.meta_path`` that registers right after that module is executed, before anything can look
the method up. :func:`register_with_transformers` registers explicitly (``lqframe.load`` does).
"""

from __future__ import annotations

import importlib.abc
import logging
import re
import sys
import threading
from typing import Any

__all__ = ["register_with_transformers", "install", "WATCHED_MODULE"]

#: the transformers module whose import triggers the registration
WATCHED_MODULE = "transformers.quantizers.auto"

_log = logging.getLogger(__name__)
_LOCK = threading.RLock()
_DONE = False


def register_with_transformers() -> bool:
    """Register the ``lqframe`` quantization method with transformers (idempotent; imports
    transformers' quantizer modules). Returns False when transformers is not importable or too old to
    accept custom quantizers."""
    global _DONE
    if _DONE:
        return True
    try:  # imports outside the lock: another thread may hold an import lock and wait for ours
        from transformers.quantizers.auto import register_quantization_config, register_quantizer
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False
    from lqframe.checkpoint import QUANT_METHOD

    with _LOCK:
        if _DONE:
            return True
        config_cls, quantizer_cls = _classes(HfQuantizer, QuantizationConfigMixin, QUANT_METHOD)
        for register, obj in ((register_quantization_config, config_cls), (register_quantizer, quantizer_cls)):
            try:
                register(QUANT_METHOD)(obj)
            except ValueError:  # already registered (e.g. module reloaded)
                pass
        _DONE = True
        _uninstall()
        return True


def _classes(HfQuantizer: type, QuantizationConfigMixin: type, QUANT_METHOD: str) -> tuple[type, type]:  # noqa: N803
    class LqframeConfig(QuantizationConfigMixin):
        """``config.json["quantization_config"]`` of an lqframe checkpoint."""

        def __init__(self, layers: dict[str, Any] | None = None, format_version: int = 1, **kwargs: Any):
            self.quant_method = QUANT_METHOD
            self.layers = dict(layers or {})
            self.format_version = format_version
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

        def to_dict(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items()}

    class LqframeHfQuantizer(HfQuantizer):
        """Swaps the compressed linears for empty ``LQLinear`` modules before the weights load."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            from lqframe.checkpoint import swap_in_skeletons
            from lqframe.factors import is_quantized, layer_factor_dtype

            layers = swap_in_skeletons(model, self.quantization_config.layers,  # by the names model has
                                       getattr(self.quantization_config, "unfolded", None))
            # a model's weight initialisation may reach into a compressed layer's parent for its `weight`
            # (GPT-2 rescales every c_proj): the parents' tensors all come from the checkpoint
            for name in layers:
                parent = name.rpartition(".")[0]
                (model.get_submodule(parent) if parent else model)._is_hf_initialized = True
            # int8 factors are stored packed (left_q/right_q); L and R are decoded after loading
            packed = [re.escape(name) + r"\.(left|right)$" for name, cfg in layers.items()
                      if is_quantized(layer_factor_dtype(cfg))]
            if packed:
                model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(packed)
            return model

        def update_weight_conversions(self, weight_conversions, model):
            # the checkpoint holds the unfolded model's own names (per-expert linears): a converter that
            # would fuse per-expert tensors into parameters the unfolded model no longer has is dropped
            from lqframe.structure import unfolded

            conversions = super().update_weight_conversions(weight_conversions, model)
            if not unfolded(model):
                return conversions
            names = [n for n, _ in model.named_parameters()]
            kept = []
            for conv in conversions:
                targets = getattr(conv, "_original_target_patterns", None) or getattr(conv, "target_patterns", None)
                operations = getattr(conv, "operations", None)
                if operations and targets and not any(
                        re.search(str(t).replace("*", r"\d+"), n) for t in targets for n in names):
                    continue
                kept.append(conv)
            return kept

        def _process_model_after_weight_loading(self, model, **kwargs):
            from lqframe.lqlinear import LQLinear

            for module in model.modules():
                if isinstance(module, LQLinear):
                    module.restore_factors()
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    return LqframeConfig, LqframeHfQuantizer


# --------------------------------------------------------------------------- lazy registration


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the loader of :data:`WATCHED_MODULE` for one import: executes the module, puts the real
    loader back in its place and registers."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader
        try:
            register_with_transformers()
        except Exception as exc:  # noqa: BLE001 - never break someone's `import transformers`
            _log.warning("lqframe: could not register with transformers: %s: %s", type(exc).__name__, exc)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, … of the real loader
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds :data:`WATCHED_MODULE` through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _Finder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_FINDER: _Finder | None = None


def _uninstall() -> None:
    global _FINDER
    if _FINDER is not None:
        try:
            sys.meta_path.remove(_FINDER)
        except ValueError:
            pass
        _FINDER = None


def install() -> None:
    """Register now if transformers' quantizer tables are already imported, else as soon as they are
    (see the module doc). Idempotent; called by ``import lqframe``."""
    global _FINDER
    if _DONE:
        return
    if WATCHED_MODULE in sys.modules:
        register_with_transformers()
        return
    with _LOCK:
        if _FINDER is None and not _DONE:
            _FINDER = _Finder()
            sys.meta_path.insert(0, _FINDER)
    if WATCHED_MODULE in sys.modules:  # imported by another thread meanwhile, past the finder
        register_with_transformers()
