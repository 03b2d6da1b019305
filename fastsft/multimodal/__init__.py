"""LLaVA-style multimodal instruction tuning: a frozen vision tower, a projector, fastsft's decoder.

    model.py     MultimodalCausalLM (forward -> hidden states, image features spliced at placeholders),
                 Projector, vision towers from a local directory or a config
    llava_io.py  LlavaForConditionalGeneration directories in (load_llava) and out (save_llava)
    data.py      LLaVA JSON records -> MultimodalStore (token store + each record's images), images -> pixels,
                 the image layout of padded and packed batches
"""

from .llava_io import llava_config_dict, load_llava, save_llava
from .model import (FEATURE_STRATEGIES, PROJECTOR_TYPES, MultimodalCausalLM, Projector, VisionFeatureCache,
                    load_vision_tower, num_image_tokens, splice_image_features, vision_tower_from_config)

__all__ = ["FEATURE_STRATEGIES", "PROJECTOR_TYPES", "MultimodalCausalLM", "Projector", "VisionFeatureCache",
           "llava_config_dict", "load_llava", "load_vision_tower", "num_image_tokens", "save_llava",
           "splice_image_features", "vision_tower_from_config"]
