"""The training configuration: one dataclass tree, loaded from YAML, overridden by ``--section.key value``.

    fastsft train                                   # the embedded default, needs nothing from outside
    fastsft train run.yaml --train.lr 1e-4          # a YAML file plus overrides

Every field's ``help`` is what ``fastsft train --help`` prints; unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


KERNEL_PIECES = ("loss", "lora", "rms_norm", "rope", "swiglu", "geglu")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def _opt(default, help: str, choices: tuple | None = None):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


CURRICULA = ("none", "length", "base_loss")


def curriculum_field(curriculum: str) -> str | None:
    """The field path of a ``field:NAME`` curriculum (None for the others, and for an empty NAME)."""
    if isinstance(curriculum, str) and curriculum.startswith("field:"):
        return curriculum[len("field:"):].strip() or None
    return None

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str | None = _opt(None, "Hugging Face model directory, a .gguf file (dequantised; needs fastsft[gguf]) or hub id. Unset: a random model from `model.config`.")
    config: str = _opt("tiny", "With no `model.path`: a preset name (tiny) or a config.json path; weights are random.")
    tokenizer: str | None = _opt(None, "Tokenizer directory or hub id, or 'byte' (built in). Default: the model's, or 'byte'.")
    dtype: str = _opt("auto", "Weight dtype; auto = bfloat16 on CUDA, float32 on CPU.",
                      ("auto", "float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = _opt(False, "Recompute each decoder layer in the backward to save activation memory.")
    offload_activations: bool = _opt(False, "With gradient_checkpointing: keep each decoder layer's saved input in "
                                             "pinned CPU memory instead of GPU memory (copied back for the recompute).")
    load_in_4bit: bool = _opt(False, "QLoRA: quantize the frozen base's linear layers (lora.target_modules) to "
                                     "bitsandbytes NF4 (blocksize 64, double quantization) at load time.")
    vision_tower: str | None = _opt(None, "Multimodal (LLaVA, with data.format llava): the frozen vision tower, a local "
                                          "CLIP or SigLIP directory, or 'demo' (a tiny random CLIP built from a config, "
                                          "for the embedded demo). A LLaVA model.path brings its own tower.")
    projector: str | None = _opt(None, "Multimodal: start the projector from these weights (stage 2 from stage 1): a "
                                       "LLaVA directory (a run's model/), a run directory, or a .safetensors file. "
                                       "Unset: from model.path when it is a LLaVA directory, else random.")
    projector_type: str = _opt("mlp2x_gelu", "Multimodal: the projector of a new (random) one.",
                               ("linear", "mlp2x_gelu"))
    vision_feature_layer: int = _opt(-2, "Multimodal: the tower's hidden state the features come from (LLaVA: -2, "
                                         "the penultimate layer). A LLaVA model.path brings its own.")
    vision_feature_select_strategy: str = _opt("default", "Multimodal: default drops the CLS position, full keeps "
                                                          "it. A LLaVA model.path brings its own.", ("default", "full"))
    image_token_id: int = _opt(-1, "Multimodal: the placeholder token id that image features replace. -1: the "
                                   "LLaVA model.path's image_token_index, else the tokenizer's '<image>' token.")
    vision_feature_cache: int = _opt(0, "Multimodal: keep the frozen tower's features of this many images (each "
                                        "image's tower forward then runs once, not once an epoch; memory: patches x "
                                        "tower width x 4 bytes an image). 0: off.")
    trust_remote_code: bool = _opt(False, "Let a Hugging Face tokenizer run Python code from its directory or hub "
                                          "repo (only needed for custom tokenizers; weights are always read as "
                                          "safetensors, never unpickled). Only for sources you trust.")


@dataclass
class LoRAConfig:
    enabled: bool = _opt(True, "Train LoRA adapters on a frozen base; false trains every weight (full fine-tune).")
    r: int = _opt(16, "LoRA rank.")
    alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = _opt(0.0, "Dropout on the LoRA input.")
    target_modules: list = _opt(list(ALL_LINEAR), "Linear layers (by short name) that get adapters.")
    rslora: bool = _opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")


@dataclass
class DataConfig:
    datasets: list = _opt([], "Training files: a list of paths or {path, format, fields, weight}. "
                              "Empty: the built-in generated instruction dataset.")
    format: str = _opt("auto", "Record format for datasets that do not set their own.",
                       ("auto", "alpaca", "prompt_completion", "sharegpt", "messages", "text", "llava"))
    fields: dict = _opt({}, "Field mapping canonical=source for datasets that do not set their own, "
                            "e.g. prompt=question,completion=answer (GSM8K).")
    image_dir: str | None = _opt(None, "llava format: the directory that records' image paths are relative to. "
                                       "Unset: each data file's own directory.")
    llava_mode: str = _opt("instruct", "llava format: instruct (stage 2: the conversation in the chat template, "
                                       "assistant turns trained) or caption (stage 1, LLaVA's plain template: the "
                                       "image, then the last assistant turn as the caption, trained).",
                           ("instruct", "caption"))
    eval_datasets: list = _opt([], "Held-out files (same forms as datasets); empty: split off eval_fraction.")
    eval_fraction: float = _opt(0.05, "Fraction of each training dataset held out for eval when no eval_datasets.")
    general_text: str | None = _opt(None, "A plain-text (.txt) or {text} JSON/JSONL file whose perplexity is "
                                          "tracked to watch forgetting.")
    replay: dict | None = _opt(None, "Against forgetting: {path, weight} mixes pretraining-style text (a .txt file, "
                                     "split into paragraphs, or {text} JSON/JSONL records; the loss on all its "
                                     "tokens) into training as `weight` (0-1) of the trained tokens. Never the "
                                     "data.general_text file: the forgetting meter must not see what it trains on.")
    curriculum: str = _opt("none", "Order the training records easy -> hard in data.curriculum_phases phases "
                                   "(shuffled and packed within each phase; every epoch repeats them): none, "
                                   "length (tokens), base_loss (the base model's mean response loss per "
                                   "record, from one no-grad scoring pass before training, cached with the "
                                   "token stores), or field:NAME (a number every record holds at that field "
                                   "path, e.g. field:difficulty or field:meta.level; lower is easier).")
    curriculum_phases: int = _opt(3, "Phases of the curriculum (records split by score into equal parts).")
    max_seq_len: int = _opt(512, "Records are truncated to this many tokens; ones left with no response are dropped.")
    train_on: str = _opt("all", "Multi-turn: train every assistant turn or only the last.", ("all", "last"))
    add_bos: str = _opt("auto", "Prepend the BOS token (auto: when the tokenizer has one).", ("auto", "true", "false"))
    skip_bad_records: bool = _opt(False, "Skip malformed records (counted and reported) instead of stopping.")
    builtin_size: int = _opt(6000, "Records generated for the built-in dataset.")
    workers: int = _opt(0, "Processes that validate, render and tokenise the data (chunks of records, in order; the "
                           "result is the same for any number). 0: the cores (divided among torchrun's ranks).")
    token_cache: bool = _opt(True, "Reuse the token stores of an earlier run on the same data, tokenizer and options "
                                   "(a cache keyed by their content hashes, in $FASTSFT_CACHE_DIR or "
                                   "~/.cache/fastsft/token-stores); false always tokenises. LLaVA data is "
                                   "always tokenised afresh (no key covers its image files).")
    packing: bool = _opt(True, "Pack several records into each max_seq_len row (best-fit decreasing), attention "
                               "kept within each record; false pads one record a row.")


@dataclass
class TrainConfig:
    epochs: float = _opt(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _opt(0, "Optimizer steps; 0: derived from epochs.")
    micro_batch_size: int = _opt(8, "Rows per forward/backward: packed rows of data.max_seq_len tokens, or one "
                                    "record a row when data.packing is false.")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    lr: float = _opt(2e-4, "Peak learning rate.")
    schedule: str = _opt("cosine", "Learning-rate schedule after warmup.", ("cosine", "linear", "constant"))
    warmup_ratio: float = _opt(0.03, "Fraction of the steps spent warming up linearly from 0.")
    min_lr_ratio: float = _opt(0.0, "The schedule decays to lr * min_lr_ratio.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_betas: list = _opt([0.9, 0.999], "AdamW betas.")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping by global norm; 0 disables.")
    max_nonfinite_steps: int = _opt(5, "A step whose loss or gradient norm is not finite is skipped (counted as "
                                       "skipped_steps); this many in a row stop the run with a checkpoint of "
                                       "the last finite weights. 0: never stop.")
    kl_to_base: float = _opt(0.0, "Beta of a KL anchor to the base model against forgetting: each covered token's loss "
                                  "adds beta * KL(p_base || p_tuned), the base being the model with its LoRA "
                                  "adapters off (one more no-grad forward a micro-batch; no second copy of the "
                                  "weights). Needs lora.enabled, or train.kl_base_topk. 0: off.")
    kl_base_topk: int = _opt(0, "The KL anchor without a base forward in training: k > 0 runs the base once before "
                                "training and caches its k most likely next tokens and their log-probs, plus the "
                                "rest's mass, for every token (with the token stores: 8k + 4 bytes a token); the KL is "
                                "then taken over those k tokens and the tail. Also works for full fine-tuning (the "
                                "cache is the frozen base). 0: the base runs forward every micro-batch.")
    kl_tokens: str = _opt("response", "Which tokens the KL anchor covers: response (those the loss trains on) or "
                                      "all (prompt tokens too).", ("response", "all"))
    neftune_alpha: float = _opt(0.0, "NEFTune: uniform noise on the input embeddings in training, scaled "
                                     "alpha / sqrt(L * hidden) with L each sequence's own length (also inside a "
                                     "packed row). 0: off; the NEFTune paper uses 5-15.")
    trainable: str = _opt("auto", "Multimodal: what trains beside the frozen tower: projector (stage 1; needs "
                                  "lora.enabled false), projector+lora, projector+full (lora.enabled false). auto: "
                                  "projector+lora with lora.enabled, else projector+full.",
                          ("auto", "projector", "projector+lora", "projector+full"))
    group_by_length: bool = _opt(True, "Without packing: batch records of similar length together (less padding).")
    seed: int = _opt(0, "Seed for model init, LoRA init, data order and dropout.")
    device: str = _opt("auto", "auto = cuda when available, else cpu.", ("auto", "cpu", "cuda"))
    precision: str = _opt("auto", "Autocast precision; auto = bf16 on CUDA, fp32 on CPU.", ("auto", "bf16", "fp32"))
    threads: int = _opt(0, "CPU threads for torch; 0 leaves torch's default.")
    kernels: str = _opt("auto", "Native paths (fused loss, fused LoRA / NF4 dequant, RMSNorm, RoPE, SwiGLU): auto = "
                                "on CUDA, each Triton kernel after a one-time self-check; on = always (CPU needs "
                                "TRITON_INTERPRET=1); off = the plain PyTorch paths (the ablation).",
                        ("auto", "on", "off"))
    kernels_off: list = _opt([], "Native pieces switched off one by one (benchmark ablation), any of: "
                                 "loss (fused linear cross-entropy), lora (fused LoRA / NF4 dequant), "
                                 "rms_norm, rope, swiglu, geglu.")
    fsdp: bool = _opt(False, "Under torchrun: shard the model over the processes with FSDP2 (each decoder layer, then "
                             "the root), for models that do not fit one GPU; needs lora.enabled. False: data "
                             "parallel, the model replicated on every process.")


@dataclass
class EvalConfig:
    every: int = _opt(0, "Evaluate every N optimizer steps (also always before and after training); 0: only then.")
    max_records: int = _opt(512, "Eval records used for loss and perplexity.")
    exact_match: int = _opt(64, "Eval records whose response is generated greedily and compared exactly, before "
                                "and after training; 0 disables.")
    max_new_tokens: int = _opt(64, "Generation limit for exact-match.")
    answer_pattern: str = _opt("", "A regex applied to the expected and the generated response of the exact-match "
                                   "records; its first group (or the whole match) is the final answer, compared "
                                   "numerically when both are numbers, and reported as answer_accuracy beside "
                                   "exact_match (GSM8K: '#### (-?[0-9.,]+)'). Empty: off.")
    batch_size: int = _opt(16, "Sequences per eval forward.")


@dataclass
class OutputConfig:
    dir: str = _opt("runs/{time}", "Output directory ({time} becomes the start time).")
    checkpoint_every: int = _opt(0, "Write a resumable checkpoint every N optimizer steps; 0: by time only "
                                    "(output.checkpoint_minutes) and at the end.")
    checkpoint_minutes: float = _opt(30.0, "Also write a resumable checkpoint when this many minutes of training "
                                           "passed since the last one, so a killed run loses at most that "
                                           "much; 0: off.")
    keep_checkpoints: int = _opt(2, "Checkpoints kept (oldest deleted first).")
    overwrite: bool = _opt(False, "Start over in an output.dir that already holds a run: its checkpoints, "
                                  "adapter, metrics and token stores are deleted first. Without it such a "
                                  "directory is refused (--resume continues the run in it).")
    log_every: int = _opt(10, "Log metrics every N optimizer steps.")
    progress: bool = _opt(True, "Show a progress bar.")
    report_to: list = _opt([], "Also send the metrics to: tensorboard (event files under the run directory), "
                               "wandb (WANDB_MODE=offline honoured). metrics.jsonl is always written.")
    plot: bool = _opt(True, "Write loss.png with the train/eval loss curves.")
    save_random_base: bool = _opt(True, "With a random base (no model.path): save it to base_model/ beside the "
                                        "run (export and resume need it); false skips it (throughput "
                                        "benchmarks of large random models: 16 GB for 8B).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str):
    return {"model": ModelConfig, "lora": LoRAConfig, "data": DataConfig, "train": TrainConfig,
            "eval": EvalConfig, "output": OutputConfig}[name]


def iter_options():
    """Yield (dotted key, dataclass field) for every option, in declaration order."""
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(_section_class(section.name)):
            yield f"{section.name}.{f.name}", f


def _field_kind(f) -> type:
    """The base Python type of a field (str | None -> str)."""
    hint = typing.get_type_hints(_owner_of(f))[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _owner_of(f):
    for section in dataclasses.fields(Config):
        cls = _section_class(section.name)
        if any(g is f for g in dataclasses.fields(cls)):
            return cls
    raise KeyError(f.name)


_FIELDS = dict(iter_options())


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS) + list(SECTIONS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the type of option ``key``; errors name the key."""
    f = _FIELDS[key]
    kind = _field_kind(f)
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"config key '{key}' cannot be null")
    try:
        if isinstance(value, str) and kind is not str:
            value = _parse_cli_value(value, kind)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
                raise TypeError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            value = float(value)
        elif kind is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            value = str(value)
        elif kind is list:
            value = value if isinstance(value, list) else [value]
        elif kind is dict:
            if not isinstance(value, dict):
                raise TypeError
            value = {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def _parse_cli_value(text: str, kind: type):
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is dict:
        # prompt=question,completion=answer   or YAML {prompt: question}
        if "=" in text and not text.lstrip().startswith("{"):
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(text)
            return {k.strip(): v.strip() for k, v in pairs}
        return yaml.safe_load(text)
    if kind is list:
        if text.lstrip().startswith("["):
            return yaml.safe_load(text)
        return [yaml.safe_load(p.strip()) for p in text.split(",") if p.strip()]
    value = yaml.safe_load(text)
    if kind is float and isinstance(value, str):
        return float(value)  # YAML reads '2e-4' as a string
    return value


def set_option(cfg: Config, key: str, value: Any, where: str = "") -> None:
    if key not in _FIELDS:
        raise _unknown(key, where)
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, coerce(key, value))


def from_dict(d: dict, where: str = "", *, check: bool = True) -> Config:
    """A Config from a {section: {key: value}} mapping; ``check=False`` defers the cross-field checks (a
    recipe that the command line completes)."""
    cfg = Config()
    if not isinstance(d, dict):
        raise ConfigError(f"{where}a config must be a mapping of sections, got {type(d).__name__}")
    for section, body in d.items():
        if section not in SECTIONS:
            raise _unknown(str(section), where)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping, got {body!r}")
        for name, value in body.items():
            set_option(cfg, f"{section}.{name}", value, where)
    if check:
        validate(cfg)
    return cfg


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or start from the defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    cfg = from_dict(data, where=f"{path}: " if path else "", check=False)  # checked with the overrides below
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    validate(cfg)
    return cfg


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")

    need(cfg.lora.r > 0, "lora.r", "must be positive")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(cfg.train.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(cfg.train.grad_accum > 0, "train.grad_accum", "must be positive")
    need(cfg.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be 0 (never stop) or positive")
    need(cfg.train.lr > 0, "train.lr", "must be positive")
    need(0.0 <= cfg.train.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    need(cfg.train.epochs > 0 or cfg.train.max_steps > 0, "train.epochs", "or train.max_steps must be positive")
    need(len(cfg.train.adam_betas) == 2, "train.adam_betas", "must hold two numbers")
    need(0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    need(cfg.data.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
    need(cfg.output.keep_checkpoints >= 1, "output.keep_checkpoints", "must be at least 1")
    need(cfg.output.log_every >= 1, "output.log_every", "must be at least 1")
    need(cfg.output.checkpoint_every >= 0, "output.checkpoint_every", "must be 0 (by time only) or positive")
    need(cfg.output.checkpoint_minutes >= 0, "output.checkpoint_minutes", "must be 0 (off) or positive")
    if cfg.data.replay is not None:
        r = cfg.data.replay
        need(isinstance(r, dict) and set(r) == {"path", "weight"}, "data.replay",
             f"must be {{path, weight}}; got {r!r}")
        w = r["weight"]
        if isinstance(w, str):  # from the command line (path=...,weight=0.2 or a YAML flow mapping)
            try:
                w = r["weight"] = float(w)
            except ValueError:
                pass
        need(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < 1, "data.replay.weight",
             f"is the replay text's share of the trained tokens: a number in (0, 1); got {w!r}")
        need(not cfg.data.general_text or _same_file(r["path"], cfg.data.general_text) is False, "data.replay.path",
             "is the data.general_text file: the forgetting meter would measure text it trains on; give the "
             "meter and the replay separate files")
    score_field = curriculum_field(cfg.data.curriculum)
    need(cfg.data.curriculum in CURRICULA or score_field, "data.curriculum",
         f"must be one of {', '.join(CURRICULA)} or field:NAME (a numeric field of every record); "
         f"got {cfg.data.curriculum!r}")
    if score_field:
        from fastsft.data.errors import DataError
        from fastsft.data.formats import _parse_path

        try:
            _parse_path(score_field)
        except DataError as e:
            need(False, "data.curriculum", str(e))
    need(cfg.data.curriculum_phases >= 1, "data.curriculum_phases", "must be at least 1")
    need(cfg.data.workers >= 0, "data.workers", "must be 0 (the cores) or a number of processes")
    need(cfg.train.kl_to_base >= 0, "train.kl_to_base", "must be 0 (off) or positive")
    need(cfg.lora.enabled or not cfg.train.kl_to_base or cfg.train.kl_base_topk > 0, "train.kl_to_base",
         "needs lora.enabled: the base is the model with its adapters off (full fine-tuning would need a frozen "
         "copy of every weight, which fastsft does not make); or train.kl_base_topk k, whose cache of the "
         "base's top-k log-probs is made before training")
    need(cfg.train.kl_base_topk >= 0, "train.kl_base_topk", "must be 0 (off) or a positive k")
    need(not cfg.train.kl_base_topk or cfg.train.kl_to_base > 0, "train.kl_base_topk",
         "caches the base for the KL anchor, which is off: set train.kl_to_base too")
    need(cfg.train.neftune_alpha >= 0, "train.neftune_alpha", "must be 0 (off) or positive")
    need(cfg.lora.enabled or not cfg.train.fsdp, "train.fsdp",
         "needs lora.enabled (sharded full fine-tuning is not supported: checkpoints gather the trainable weights whole)")
    if cfg.eval.answer_pattern:
        try:
            re.compile(cfg.eval.answer_pattern)
        except re.error as e:
            need(False, "eval.answer_pattern", f"is not a valid regular expression ({e})")
    bad = [r for r in cfg.output.report_to if r not in ("tensorboard", "wandb")]
    need(not bad, "output.report_to", f"has unknown reporters {bad}; known: tensorboard, wandb")
    unknown = set(cfg.train.kernels_off) - set(KERNEL_PIECES)
    need(not unknown, "train.kernels_off", f"has unknown pieces {sorted(unknown)}; known: {', '.join(KERNEL_PIECES)}")
    _validate_multimodal(cfg, need)
    for i, d in enumerate(cfg.data.datasets + cfg.data.eval_datasets):
        if isinstance(d, dict):
            extra = set(d) - {"path", "format", "fields", "weight"}
            need(not extra and "path" in d, "data.datasets",
                 f"entry {i} must be a path or {{path, format, fields, weight}}; got {d!r}")
        else:
            need(isinstance(d, str), "data.datasets", f"entry {i} must be a path; got {d!r}")


def dataset_formats(cfg: Config) -> list[str]:
    """The format of every training and eval dataset (an entry's own, else data.format)."""
    return [(d.get("format") if isinstance(d, dict) else None) or cfg.data.format
            for d in cfg.data.datasets + cfg.data.eval_datasets]


def is_multimodal(cfg: Config) -> bool:
    """LLaVA data or a vision tower: the run trains a MultimodalCausalLM (fastsft.multimodal)."""
    return "llava" in dataset_formats(cfg) or cfg.data.format == "llava" or bool(cfg.model.vision_tower)


def _validate_multimodal(cfg: Config, need) -> None:
    if not is_multimodal(cfg):
        need(not cfg.model.vision_tower, "model.vision_tower", "is for multimodal runs: set data.format llava")
        need(not cfg.model.projector, "model.projector", "is for multimodal runs: set data.format llava")
        need(cfg.train.trainable == "auto", "train.trainable", "is for multimodal runs: set data.format llava")
        return
    formats = dataset_formats(cfg)
    need(bool(cfg.data.datasets), "data.datasets", "must name the LLaVA JSON files of a multimodal run (the built-in "
         "dataset is text; `fastsft train --recipe llava-demo` draws its own images)")
    need(set(formats) == {"llava"}, "data.format",
         f"must be llava for every dataset of a multimodal run (records without an image train as text); got "
         f"{sorted(set(formats))}")
    for key, ok in (("data.curriculum", cfg.data.curriculum == "none"), ("train.kl_base_topk", not cfg.train.kl_base_topk),
                    ("train.kl_to_base", not cfg.train.kl_to_base), ("data.replay", cfg.data.replay is None),
                    ("train.fsdp", not cfg.train.fsdp), ("model.load_in_4bit", not cfg.model.load_in_4bit)):
        need(ok, key, "is not supported with multimodal (llava) data yet")
    t = cfg.train.trainable
    need(t not in ("projector", "projector+full") or not cfg.lora.enabled, "train.trainable",
         f"{t} trains no LoRA adapters: set lora.enabled false")
    need(t != "projector+lora" or cfg.lora.enabled, "train.trainable", "projector+lora needs lora.enabled true")
    need(cfg.model.vision_feature_cache >= 0, "model.vision_feature_cache", "must be 0 (off) or a number of images")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_text(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML atomically (a kill leaves the old file or the new one, never an empty one)."""
    from fastsft.train.files import atomic_write_text

    atomic_write_text(Path(path), dump_text(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every option."""
    return {f"{section}.{name}": value for section, body in to_dict(cfg).items() for name, value in body.items()}
