"""The trainer's multimodal pieces: what ``fastsft.train.loop`` calls when a run trains on LLaVA data.

    VisionSetup.from_config   the tower's config, the image token and the image processor, known before
                              the data is read (a record's length counts its image tokens)
    build_data                LLaVA JSON files -> train / eval MultimodalStores and the data report
    build_model               MultimodalCausalLM: a LLaVA directory, or a language model + a vision tower
                              (+ stage 1's projector); LoRA goes on the language model only
    MultimodalBatchOrder      BatchOrder whose batches also say which images they hold and where
    ImageInputs               a batch's images -> the forward's pixel_values (or cached tower features)
                              and image_starts
    save_llava_model          the final LLaVA directory: LoRA merged into a copy, transformers loads it

The rest of the loop (fused loss, packing, checkpoints, resume, eval) is the text path's: a multimodal
batch is a text batch plus ``image_paths`` and ``image_starts``, and the model's forward takes the images.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsft.config import Config, ConfigError
from fastsft.data.store import TokenStore
from fastsft.train.batching import BatchOrder

from .data import (ImageLoader, MultimodalStore, image_processor, load_llava_data, packed_image_layout,
                   padded_image_layout)
from .model import (MultimodalCausalLM, Projector, _vision_config, load_vision_tower, num_image_tokens,
                    vision_tower_from_config)

__all__ = ["VisionSetup", "is_llava_dir", "build_data", "build_model", "concat_stores", "MultimodalBatchOrder",
           "ImageInputs", "save_llava_model", "resolve_trainable"]


def is_llava_dir(path: str | None) -> bool:
    """Whether ``path`` is a local LlavaForConditionalGeneration directory."""
    if not path:
        return False
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def _demo_vision_config():
    from .demo import demo_vision_config

    return demo_vision_config()


def resolve_trainable(cfg: Config) -> str:
    if cfg.train.trainable != "auto":
        return cfg.train.trainable
    return "projector+lora" if cfg.lora.enabled else "projector+full"


@dataclass
class VisionSetup:
    """What the data needs from the vision side before any weight is loaded."""
    vision_config: Any
    image_token_id: int
    num_image_tokens: int
    feature_layer: Any
    select_strategy: str
    processor: Any
    llava_dir: str | None  # model.path when it is a LLaVA directory

    @classmethod
    def from_config(cls, cfg: Config, tokenizer) -> "VisionSetup":
        llava = cfg.model.path if is_llava_dir(cfg.model.path) else None
        if llava:
            if cfg.model.vision_tower:
                raise ConfigError(f"config key 'model.vision_tower' is set but model.path {llava} is a LLaVA "
                                  "directory with its own tower; unset one of them")
            raw = json.loads((Path(llava).expanduser() / "config.json").read_text())
            vc = dict(raw.get("vision_config") or {})
            vc.setdefault("model_type", "clip_vision_model")
            vision_config = _vision_config(vc)
            token = raw.get("image_token_index", raw.get("image_token_id"))
            if cfg.model.image_token_id >= 0 and cfg.model.image_token_id != token:
                raise ConfigError(f"config key 'model.image_token_id' is {cfg.model.image_token_id} but the LLaVA "
                                  f"model {llava} uses {token}; unset it")
            layer = raw.get("vision_feature_layer", -2)
            strategy = raw.get("vision_feature_select_strategy", "default")
            processor_source = llava if (Path(llava).expanduser() / "preprocessor_config.json").is_file() \
                else vision_config
        else:
            tower = cfg.model.vision_tower
            if not tower:
                raise ConfigError("config key 'model.vision_tower' is needed for llava data (a CLIP/SigLIP "
                                  "directory, or 'demo'), unless model.path is a LLaVA directory")
            if tower == "demo":
                vision_config = _demo_vision_config()
                processor_source = vision_config
            else:
                d = Path(tower).expanduser()
                if not (d / "config.json").is_file():
                    raise ConfigError(f"config key 'model.vision_tower': no config.json in {d}")
                vision_config = _vision_config(json.loads((d / "config.json").read_text()))
                processor_source = d if (d / "preprocessor_config.json").is_file() else vision_config
            token = cfg.model.image_token_id
            if token < 0:
                token = tokenizer.token_to_id("<image>")
                if token is None:
                    raise ConfigError("config key 'model.image_token_id' is needed: the tokenizer has no '<image>' "
                                      "token (give an id the text never produces)")
            layer, strategy = cfg.model.vision_feature_layer, cfg.model.vision_feature_select_strategy
        return cls(vision_config, int(token), num_image_tokens(vision_config, strategy), layer, strategy,
                   image_processor(processor_source), llava)


# ----------------------------------------------------------------------------------------------------
# data


def concat_stores(stores: list[MultimodalStore]) -> MultimodalStore:
    """The records of ``stores`` one after the other."""
    counts = np.concatenate([s.images_per_record() for s in stores])
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    first = stores[0]
    return MultimodalStore(TokenStore.concat([s.tokens for s in stores]), offsets,
                           np.concatenate([s.image_starts for s in stores]),
                           np.concatenate([s.image_paths for s in stores]), first.num_image_tokens,
                           first.image_token_id)


def _paths(entries: list) -> list[str]:
    return [e if isinstance(e, str) else e["path"] for e in entries]


def build_data(cfg: Config, tokenizer, vision: VisionSetup) -> tuple[MultimodalStore, MultimodalStore | None, dict]:
    """Train and eval stores from LLaVA JSON files (eval: data.eval_datasets, else data.eval_fraction of each
    training file, held out with the text pipeline's seeded split), and the data report."""
    from fastsft.data.pipeline import _rng, split_eval

    kw = dict(image_token_id=vision.image_token_id, num_image_tokens=vision.num_image_tokens,
              max_seq_len=cfg.data.max_seq_len, mode=cfg.data.llava_mode, train_on=cfg.data.train_on,
              add_bos=cfg.data.add_bos, skip_bad_records=cfg.data.skip_bad_records)
    weights = [1.0 if isinstance(e, str) else float(e.get("weight", 1.0)) for e in cfg.data.datasets]
    if any(w != 1.0 for w in weights):
        raise ConfigError("config key 'data.datasets': weights are not supported with llava data yet")
    train_parts, eval_parts, reports, eval_reports = [], [], [], []
    held_out = not cfg.data.eval_datasets
    for i, path in enumerate(_paths(cfg.data.datasets)):
        store, rep = load_llava_data(path, tokenizer, image_dir=cfg.data.image_dir, **kw)
        train_idx, eval_idx = split_eval(len(store), cfg.data.eval_fraction if held_out else 0.0,
                                         _rng(cfg.train.seed, 1, i))
        if len(eval_idx):
            eval_parts.append(store.select(eval_idx))
        train_parts.append(store.select(train_idx))
        rep.update(name=Path(path).name, format="llava", train_records=len(train_idx), eval_records=len(eval_idx))
        reports.append(rep)
    for path in _paths(cfg.data.eval_datasets):
        store, rep = load_llava_data(path, tokenizer, image_dir=cfg.data.image_dir, **kw)
        eval_parts.append(store)
        rep.update(name=Path(path).name, format="llava", train_records=0, eval_records=len(store))
        eval_reports.append(rep)
    train = concat_stores(train_parts)
    train = train.select(_rng(cfg.train.seed, 3).permutation(len(train)))
    eval_store = concat_stores(eval_parts) if eval_parts else None
    report = {"datasets": reports, "eval_datasets": eval_reports,
              "train": {"records": len(train), "images": train.num_images, "tokens": train.tokens.num_tokens,
                        "trained_tokens": train.tokens.num_trained_tokens},
              "settings": {"max_seq_len": cfg.data.max_seq_len, "mode": cfg.data.llava_mode,
                           "image_token_id": vision.image_token_id, "num_image_tokens": vision.num_image_tokens}}
    return train, eval_store, report


# ----------------------------------------------------------------------------------------------------
# the model


def _projector_state(source: str) -> dict[str, torch.Tensor]:
    """Projector weights (linear_1.*, linear_2.*) from a LLaVA directory, a run directory (its model/) or a
    .safetensors file."""
    from safetensors.torch import load_file

    p = Path(source).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model").is_dir():
        p = p / "model"  # a stage-1 run directory: its exported LLaVA model
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"config key 'model.projector': no safetensors at {source}")
    out = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            for prefix in ("multi_modal_projector.", "model.multi_modal_projector.", ""):
                if k.startswith(prefix) and k[len(prefix):].split(".")[0] in ("linear_1", "linear_2"):
                    out[k[len(prefix):]] = v
                    break
    if not out:
        raise ConfigError(f"config key 'model.projector': {source} holds no projector weights "
                          "(multi_modal_projector.linear_1.*)")
    return out


def _load_projector(projector: Projector, state: dict[str, torch.Tensor], source: str) -> None:
    own = projector.state_dict()
    if projector.kind == "linear" and "linear_2.weight" in state and "linear_2.weight" not in own:
        w = state["linear_2.weight"]  # an export writes a linear projector with linear_2 the identity
        if w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)):
            state = {k: v for k, v in state.items() if not k.startswith("linear_2.")}
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ConfigError(f"config key 'model.projector': {source} holds {shapes}, this run's "
                          f"{projector.kind} projector needs { {k: tuple(v.shape) for k, v in own.items()} }")
    projector.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def build_model(cfg: Config, vision: VisionSetup, *, dtype, device, language_model=None, seed: int = 0
                ) -> MultimodalCausalLM:
    """The run's MultimodalCausalLM: the LLaVA directory of model.path, or ``language_model`` (fastsft's
    decoder, loaded or random as for text) with the tower of model.vision_tower and a projector (random from
    ``seed``, or model.projector's weights)."""
    from .llava_io import load_llava

    if vision.llava_dir:
        model = load_llava(vision.llava_dir, dtype=dtype, device=device)
    else:
        if cfg.model.vision_tower == "demo":
            tower = vision_tower_from_config(vision.vision_config, dtype=dtype, seed=seed + 1).to(device)
        else:
            tower = load_vision_tower(cfg.model.vision_tower, dtype=dtype).to(device)
        torch.manual_seed(seed + 2)  # the projector's init: the same on a resume
        model = MultimodalCausalLM(tower, language_model, projector_type=cfg.model.projector_type,
                                   vision_feature_layer=vision.feature_layer,
                                   vision_feature_select_strategy=vision.select_strategy,
                                   image_token_id=vision.image_token_id)
    if cfg.model.projector:
        _load_projector(model.multi_modal_projector, _projector_state(cfg.model.projector), cfg.model.projector)
    return model


# ----------------------------------------------------------------------------------------------------
# batches


class MultimodalBatchOrder(BatchOrder):
    """BatchOrder over a MultimodalStore's tokens; each batch also holds ``image_paths`` (its images in token
    order) and ``image_starts`` (each image's first token in the flattened batch), for packed and padded
    rows alike."""

    def __init__(self, store: MultimodalStore, **kwargs):
        super().__init__(store.tokens, **kwargs)
        self.mm_store = store

    def batch(self, unit) -> dict:
        batch = super().batch(unit)
        k, units = unit
        width = batch["input_ids"].shape[1]
        layout = (packed_image_layout(self.mm_store, self.plans[k], units, width) if self.packing
                  else padded_image_layout(self.mm_store, units, width))
        batch["image_paths"] = [str(p) for p in self.mm_store.image_paths[layout["image_index"].numpy()]]
        batch["image_starts"] = layout["image_starts"]
        return batch


class ImageInputs:
    """Images -> the model's image arguments: ``pixel_values`` from the image processor, or (with
    ``cache_images``) the frozen tower's cached features as ``vision_features``; and ``image_starts``."""

    def __init__(self, model: MultimodalCausalLM, processor, device, cache_images: int = 0):
        from .model import VisionFeatureCache

        self.model, self.device = model, device
        self.loader = ImageLoader(processor)
        self.cache = VisionFeatureCache(model, cache_images) if cache_images else None

    def __call__(self, paths: list[str], starts: torch.Tensor) -> dict:
        if not len(paths):
            return {}
        starts = torch.as_tensor(starts, dtype=torch.long).to(self.device)
        if self.cache is not None:
            return {"vision_features": self.cache(paths, self.loader), "image_starts": starts}
        return {"pixel_values": self.loader(paths).to(self.device), "image_starts": starts}

    def for_batch(self, batch: dict) -> dict:
        """The image arguments of a training batch (MultimodalBatchOrder's)."""
        return self(batch.get("image_paths", []), batch.get("image_starts", torch.zeros(0, dtype=torch.long)))

    def for_records(self, store: MultimodalStore, indices, width: int, left_pad=None, prompt_lengths=None) -> dict:
        """The image arguments of records ``indices`` laid out one a row of ``width`` tokens, right-padded
        (eval loss) or, with ``left_pad`` [n] (generation), shifted right by it; with ``prompt_lengths`` only
        the images inside each row's prompt."""
        paths, starts = [], []
        for row, i in enumerate(np.asarray(indices, np.int64)):
            shift = row * width + (0 if left_pad is None else int(left_pad[row]))
            for path, s in store.record_images(int(i)):
                if prompt_lengths is not None and s + store.num_image_tokens > prompt_lengths[row]:
                    continue
                paths.append(path)
                starts.append(shift + s)
        return self(paths, torch.tensor(starts, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# outputs


def save_llava_model(model: MultimodalCausalLM, out_dir: Path, *, processor=None, tokenizer=None) -> None:
    """A LlavaForConditionalGeneration directory: the language model with its LoRA merged (in a copy; the
    trained model is left as it is), the tower, the projector, the image processor and the tokenizer."""
    from fastsft.export import merge_lora
    from fastsft.model.lora import lora_modules

    from .llava_io import save_llava

    if lora_modules(model.language_model):
        model = copy.deepcopy(model)
        merge_lora(model.language_model)
    save_llava(model, out_dir, image_processor=processor)
    if tokenizer is not None:
        tokenizer.save(out_dir)
