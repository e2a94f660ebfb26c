"""transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads an lqframe
checkpoint once ``lqframe`` is imported (an ``HfQuantizer`` registered under ``quant_method:
"lqframe"``). transformers has no entry-point discovery for quantizers, hence the import."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["register_with_transformers"]

_DONE = False


def register_with_transformers() -> bool:
    """Register the ``lqframe`` quantization method with transformers (idempotent). Returns False
    when transformers is not importable or too old to accept custom quantizers."""
    global _DONE
    if _DONE:
        return True
    try:
        from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False

    from lqframe.checkpoint import QUANT_METHOD, swap_in_skeletons
    from lqframe.factors import is_quantized
    from lqframe.lqlinear import LQLinear

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
            layers = self.quantization_config.layers
            swap_in_skeletons(model, layers)
            # int8 factors are stored packed (left_q/right_q); L and R are decoded after loading
            packed = [re.escape(name) + r"\.(left|right)$" for name, cfg in layers.items()
                      if is_quantized(cfg.get("lowrank_dtype", "float32"))]
            if packed:
                model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(packed)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for module in model.modules():
                if isinstance(module, LQLinear):
                    module.restore_factors()
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    for register, obj in ((register_quantization_config, LqframeConfig), (register_quantizer, LqframeHfQuantizer)):
        try:
            register(QUANT_METHOD)(obj)
        except ValueError:  # already registered (e.g. module reloaded)
            pass
    _DONE = True
    return True
