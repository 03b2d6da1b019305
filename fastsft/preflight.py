"""Preflight: what can be checked before any model is loaded, checked first.

A fine-tune that dies after an hour of downloading, tokenizing and loading because the output disk is
full or a path has a typo wastes the hour. ``preflight(cfg)`` runs at the top of ``train()`` and
raises `PreflightError` listing every problem it finds, each one line naming the thing and the fix
(the CLI prints one ``error:`` line per problem and exits with status 2):

- config: the cross-field checks of `config.validate`, plus the ones that need the environment
  (``train.device cuda`` without a GPU, ``model.load_in_4bit`` without LoRA);
- output directory: creatable and writable (a probe file is created and removed in it, or in the
  nearest existing parent when it does not exist yet);
- free disk: enough for the checkpoints kept and the final outputs (`estimate_disk_bytes`);
- data files (``data.datasets``, ``data.eval_datasets``, ``data.general_text``): exist, are readable
  regular files, not empty. Every record is then parsed and validated by the data step, which also
  runs before the model is loaded, so a bad record still stops the run before any model is touched;
- model: ``model.path`` is a directory with ``config.json`` and safetensors weights, or a hub id that
  is cached or exists on the Hub; otherwise ``model.config`` is a preset or a config.json file;
  ``model.tokenizer``, when it is a path, exists.

On ``--resume`` the data files are not needed (the run's token stores are reused) and are not checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from fastsft import config as config_mod
from fastsft.config import Config, ConfigError
from fastsft.train.files import human_bytes  # noqa: F401 - also this module's API

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # org/name (or a legacy bare name)
# Token-store bytes per byte of data file: int32 id + int32 label per token; a byte-level tokenizer
# makes about one token per byte, subword tokenizers about one per 3-4 bytes of JSON.
_STORE_BYTES_PER_DATA_BYTE = {"byte": 8.0, "subword": 2.5}
_BUILTIN_RECORD_BYTES = 256  # a generated builtin record: ~20 byte tokens (8 bytes each) + offsets, generously
_STORE_FIXED_BYTES = 8 << 10  # the .npz headers of the train and eval stores, data/report.json
# What every run writes besides weights and token stores: config.yaml, run.json, summary.json, loss.png,
# the lock file, directory entries; metrics.jsonl is counted by line.
_RUN_FILES_BYTES = 128 << 10
_METRICS_LINE_BYTES = 512  # one metrics.jsonl record (a train line is ~400 bytes)
# One checkpoint besides its tensors: rng.safetensors + rng.json (~20 KB), manifest, optimizer/scheduler/
# trainer-state JSON, the adapter's config, two directories.
_CHECKPOINT_FIXED_BYTES = 32 << 10
_TENSOR_ENTRY_BYTES = 128  # one tensor's entry in a safetensors header (name, dtype, shape, offsets)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                    "chat_template.jinja", "chat_template.json")
_TOKENIZER_UNKNOWN_BYTES = 12 << 20  # a Hub tokenizer not downloaded yet (Llama 3's tokenizer.json: 9 MB)
_BYTE_TOKENIZER_BYTES = 64  # fastsft_tokenizer.json


class PreflightError(ConfigError):
    """Every problem preflight found: ``problems`` (one line each); ``str()`` joins them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def preflight(cfg: Config, *, resume: bool = False) -> None:
    """Raise `PreflightError` naming every problem found; return quietly when there is none."""
    problems: list[str] = []
    try:
        config_mod.validate(cfg)
    except ConfigError as e:
        problems.append(str(e))
    problems += _check_runtime(cfg)
    problems += _check_output_dir(cfg)
    run_dir = _run_dir(cfg)
    resuming_stores = resume and (run_dir / "data" / "train.npz").exists()
    if not resuming_stores:
        problems += _check_data_files(cfg)
    model_problems, model_cfg = _check_model(cfg, resume=resume)
    problems += model_problems
    if not any(p.startswith("output.dir") for p in problems):
        problems += _check_free_disk(cfg, model_cfg, resume=resume)
    if problems:
        raise PreflightError(problems)


# ----------------------------------------------------------------------------------------------------
# config and output directory


def _check_runtime(cfg: Config) -> list[str]:
    out = []
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            out.append("config key 'train.device' is cuda but no CUDA device is available; "
                       "use --train.device auto (or cpu)")
    if cfg.train.kernels == "on" and os.environ.get("TRITON_INTERPRET") != "1":
        import torch

        if cfg.train.device == "cpu" or not torch.cuda.is_available():
            out.append("config key 'train.kernels' is on, which runs the Triton kernels, but training runs on the "
                       "CPU; use --train.kernels auto (or set TRITON_INTERPRET=1 for Triton's slow interpreter)")
    if cfg.model.load_in_4bit and not cfg.lora.enabled:
        out.append("config key 'model.load_in_4bit' needs lora.enabled true (a 4-bit base is frozen); "
                   "set --lora.enabled true or --model.load_in_4bit false")
    return out


def _run_dir(cfg: Config) -> Path:
    # '{time}' is filled in later; a placeholder has the same parent, which is what matters here
    return Path(cfg.output.dir.replace("{time}", "time")).expanduser()


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_output_dir(cfg: Config) -> list[str]:
    run_dir = _run_dir(cfg)
    fix = "choose another with --output.dir"
    if run_dir.exists() and not run_dir.is_dir():
        return [f"output.dir {run_dir} exists and is not a directory; {fix}"]
    where = _existing_ancestor(run_dir)
    if not where.is_dir():
        return [f"output.dir {run_dir} cannot be created: {where} is a file, not a directory; {fix}"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastsft-write-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not writable" if where == run_dir.absolute() else f"cannot be created in {where}"
        return [f"output.dir {run_dir} {what} ({e.strerror or e}); {fix}"]
    return []


# ----------------------------------------------------------------------------------------------------
# data files


def _data_paths(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every data file the run reads."""
    out = []
    for key in ("data.datasets", "data.eval_datasets"):
        for entry in getattr(cfg.data, key.split(".")[1]):
            path = entry.get("path") if isinstance(entry, dict) else entry
            if isinstance(path, str):
                out.append((key, path))
    if cfg.data.general_text:
        out.append(("data.general_text", cfg.data.general_text))
    if isinstance(cfg.data.replay, dict) and isinstance(cfg.data.replay.get("path"), str):
        out.append(("data.replay.path", cfg.data.replay["path"]))
    return out


def _check_data_files(cfg: Config) -> list[str]:
    out = []
    for key, path in _data_paths(cfg):
        p = Path(path).expanduser()
        if key not in ("data.general_text", "data.replay.path") and (p.is_dir() or not p.exists()):
            # a `datasets` save_to_disk directory, a directory of data files, or a Hub dataset id in the local
            # cache: found without reading a record
            from fastsft.data.formats import source_problem

            problem = source_problem(path)
            if problem and not (problem == "no such file" and not p.exists()):
                out.append(f"{key}: {path}: {problem}")
                continue
            if problem is None:
                continue
        if not p.exists():
            out.append(f"{key}: {path}: no such file; check the path (relative paths start at the "
                       f"current directory, {Path.cwd()})")
        elif not p.is_file():
            out.append(f"{key}: {path}: is a directory, expected a .json or .jsonl file; name the file")
        elif not os.access(p, os.R_OK):
            out.append(f"{key}: {path}: not readable (permissions); fix its permissions or copy it")
        elif p.stat().st_size == 0:
            out.append(f"{key}: {path}: file is empty; give a file with records")
    return out


# ----------------------------------------------------------------------------------------------------
# model


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or not _HUB_ID.match(spec)


def _is_connection_error(e: BaseException) -> bool:
    """No network or no answer (requests', httpx's and the stdlib's names for it)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "NetworkError", "TransportError", "ConnectionError",
                         "Timeout", "TimeoutException", "OfflineModeIsEnabled"})


def _hub_problem(repo_id: str, key: str) -> str | None:
    """None when ``repo_id`` is cached or exists on the Hub (or the Hub cannot be asked)."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        return None
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return (f"{key} {repo_id!r} is not a local directory and not in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE is set; download it first or give a local directory")
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except hub_errors.GatedRepoError:
        return (f"{key} {repo_id!r} is gated on the Hugging Face Hub; accept its licence on the model page "
                f"and log in (hf auth login), or give a local directory")
    except hub_errors.RepositoryNotFoundError:
        return (f"{key} {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub; "
                f"check the spelling, or log in (hf auth login) if it is private")
    except Exception as e:  # noqa: BLE001 - sorted below
        if _is_connection_error(e):  # offline: one line now, not a minute of download retries later
            return (f"{key} {repo_id!r} is not a local directory and not in the Hugging Face cache, and the Hub "
                    f"cannot be reached ({' '.join(str(e).split())[:80]}); download it where there is network "
                    f"(hf download {repo_id}) or give a local directory")
        return None  # the Hub answered oddly: the download will say more
    return None


def _model_dir_problem(d: Path, key: str) -> str | None:
    if not d.is_dir():
        return (f"{key} {d} is not a directory; give a Hugging Face model directory (config.json + safetensors) "
                f"or a .gguf file")
    if not (d / "config.json").is_file():
        return f"{key} {d} has no config.json; give the directory that holds the model's config.json"
    if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
        return None
    if any((d / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        return (f"{key} {d} only has PyTorch pickle weights (pytorch_model.bin), which fastsft never loads; "
                f"convert them: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                f"safe_serialization=True)")
    return f"{key} {d} has no model.safetensors or model.safetensors.index.json; give a directory with weights"


def _cached_hub_config(repo_id: str):
    """The ModelConfig of a Hub model whose config.json is in the local cache (for the disk estimate)."""
    from fastsft.model import ModelConfig

    try:
        import huggingface_hub

        path = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
        return ModelConfig.from_json(path) if isinstance(path, str) else None
    except Exception:  # noqa: BLE001 - only an estimate depends on it; loading the model will say more
        return None


def _check_model(cfg: Config, *, resume: bool):
    """(problems, ModelConfig or None): the ModelConfig feeds the disk estimate when it is at hand."""
    from fastsft.model import ModelConfig

    problems, mcfg = [], None
    spec = cfg.model.path
    if spec:
        p = Path(spec).expanduser()
        if p.exists() or _looks_local(spec):
            if not p.exists():
                problems.append(f"model.path {spec}: no such directory; give a local Hugging Face model "
                                f"directory (config.json + safetensors), a .gguf file or a hub id like org/name")
            elif p.is_file() and p.name.lower().endswith(".gguf"):
                from fastsft.model.loading import load_gguf_config

                try:  # architecture, tensor types, RoPE, the gguf package: before the tokenizer or data load
                    mcfg = load_gguf_config(p)
                except ValueError as e:
                    problems.append(f"model.path {spec}: {' '.join(str(e).split())}")
            else:
                problem = _model_dir_problem(p, "model.path")
                if problem:
                    problems.append(problem)
                else:
                    try:
                        raw = json.loads((p / "config.json").read_text())
                        if raw.get("model_type") == "llava":  # a LlavaForConditionalGeneration directory
                            if not config_mod.is_multimodal(cfg):
                                problems.append(f"model.path {spec}: a LLaVA (vision-language) model; train it on "
                                                f"LLaVA data (data.format llava)")
                            text = dict(raw.get("text_config") or {})
                            text.setdefault("model_type", "llama")
                            mcfg = ModelConfig.from_hf_dict(text)
                        else:
                            mcfg = ModelConfig.from_json(p / "config.json")
                    except (ValueError, KeyError, TypeError, OSError) as e:
                        problems.append(f"model.path {spec}: config.json is not a supported model: "
                                        f"{' '.join(str(e).split())}")
        else:
            problem = _hub_problem(spec, "model.path")
            if problem:
                problems.append(problem)
            else:
                mcfg = _cached_hub_config(spec)
    elif not (resume and (_run_dir(cfg) / "base_model" / "config.json").is_file()):
        src = cfg.model.config
        from fastsft.model.config import PRESETS

        try:
            mcfg = ModelConfig.from_json(src) if Path(src).exists() else ModelConfig.from_name(src)
        except (ValueError, KeyError, TypeError, OSError) as e:
            reason = " ".join(str(e).split())
            if not Path(src).exists():
                reason = f"neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config.json file"
            problems.append(f"model.config {src}: {reason}; give a preset name or a config.json path "
                            f"(or --model.path for pretrained weights)")
    tok = cfg.model.tokenizer
    if tok and tok != "byte" and _looks_local(tok) and not Path(tok).expanduser().exists():
        problems.append(f"model.tokenizer {tok}: no such file or directory; give a tokenizer directory, "
                        f"a hub id, or 'byte'")
    return problems, mcfg


# ----------------------------------------------------------------------------------------------------
# disk


def _linear_shapes(m) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer, by short name."""
    hd = m.head_dim or m.hidden_size // m.num_attention_heads
    q, kv = m.num_attention_heads * hd, (m.num_key_value_heads or m.num_attention_heads) * hd
    h, i = m.hidden_size, m.intermediate_size
    if getattr(m, "fused_projections", False):  # Phi-3
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _targets(m, target_modules) -> tuple:
    """Short target names as the model's layers spell them (Phi-3's fused projections)."""
    from fastsft.model.lora import FUSED_PROJECTIONS, fuse_target_names

    fused = FUSED_PROJECTIONS if getattr(m, "fused_projections", False) else ()
    return fuse_target_names(tuple(target_modules), fused)


def count_parameters(m, *, lora_r: int = 0, target_modules=()) -> tuple[int, int]:
    """(base parameters, LoRA parameters for ``target_modules`` at rank ``lora_r``) of a ModelConfig."""
    shapes = _linear_shapes(m)
    target_modules = _targets(m, target_modules)
    norms = 4 if getattr(m, "sandwich_norms", False) else 2  # Gemma 2/3: pre/post feed-forward norms too
    per_layer = sum(a * b for a, b in shapes.values()) + norms * m.hidden_size  # + the RMSNorm weights
    hd = m.head_dim or m.hidden_size // m.num_attention_heads
    if m.attention_bias:
        per_layer += shapes["q_proj"][1] + 2 * shapes["k_proj"][1]
    if m.o_proj_bias:
        per_layer += m.hidden_size
    if m.mlp_bias:
        per_layer += 2 * m.intermediate_size + m.hidden_size
    if m.qk_norm:
        per_layer += 2 * hd
    embed = m.vocab_size * m.hidden_size
    base = m.num_hidden_layers * per_layer + embed * (1 if m.tie_word_embeddings else 2) + m.hidden_size
    lora = m.num_hidden_layers * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in target_modules)
    return base, lora


def _tensor_counts(m, target_modules) -> tuple[int, int]:
    """(base tensors, LoRA tensors) of a ModelConfig: the safetensors header entries."""
    norms = 4 if getattr(m, "sandwich_norms", False) else 2
    per_layer = len(_linear_shapes(m)) + norms + (2 if m.qk_norm else 0)
    per_layer += (3 if m.attention_bias else 0) + (1 if m.o_proj_bias else 0) + (3 if m.mlp_bias else 0)
    base = m.num_hidden_layers * per_layer + (1 if m.tie_word_embeddings else 2) + 1
    target_modules = _targets(m, target_modules)
    lora = 2 * m.num_hidden_layers * sum(1 for name in _linear_shapes(m) if name in target_modules)
    return base, lora


def _base_dtype_bytes(cfg: Config) -> int:
    """Bytes per weight of the base model as loaded (and as a random base is saved): train.loop's rule."""
    if cfg.model.dtype in ("bfloat16", "float16"):
        return 2
    if cfg.model.dtype == "float32" or cfg.train.device == "cpu" or cfg.train.precision == "fp32":
        return 4
    import torch

    return 2 if torch.cuda.is_available() else 4


def _tokenizer_bytes(cfg: Config) -> int:
    """Bytes of one saved copy of the tokenizer (the final outputs and each LoRA checkpoint hold one)."""
    spec = cfg.model.tokenizer or cfg.model.path or "byte"
    if spec == "byte":
        return _BYTE_TOKENIZER_BYTES
    local = Path(spec).expanduser()
    if local.is_dir():
        sizes = [(local / n).stat().st_size for n in _TOKENIZER_FILES if (local / n).is_file()]
    elif _looks_local(spec):
        sizes = []
    else:
        sizes = []
        try:
            import huggingface_hub

            for n in _TOKENIZER_FILES:
                hit = huggingface_hub.try_to_load_from_cache(spec, n)
                if isinstance(hit, str):
                    sizes.append(os.path.getsize(hit))
        except (ImportError, OSError, ValueError):
            sizes = []
    return sum(sizes) + 4096 if sizes else _TOKENIZER_UNKNOWN_BYTES


def _estimated_steps(cfg: Config, store_bytes: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    tokens = store_bytes / 8
    rows = tokens / cfg.data.max_seq_len if cfg.data.packing else tokens / 64
    return max(1, int(cfg.train.epochs * rows / max(1, cfg.train.micro_batch_size * cfg.train.grad_accum)) + 1)


def estimate_disk_bytes(cfg: Config, mcfg, *, resume: bool = False) -> dict[str, int]:
    """Bytes the run will have on disk at its peak, by part (an estimate, slightly on the generous side;
    measured within a few percent of the peak and about 1.4x the final size of the nano and tiny runs):

    - each checkpoint: the trainable weights and AdamW's two moments, all float32 (12 bytes per trainable
      parameter), with LoRA a copy of the adapter (4 more) and of the tokenizer, plus the RNG states and
      small JSON files; ``output.keep_checkpoints + 1`` exist at once, because the newest is written
      before the oldest is deleted (on resume the kept ones are on disk already: one more);
    - final outputs: the adapter (4 bytes per LoRA parameter) or the whole model in float32, and the
      tokenizer;
    - a random base (no ``model.path``) is saved beside the run in the base dtype;
    - the token-store cache: 8 bytes per token, from the data files' sizes;
    - run files: metrics.jsonl (one line per logged step or evaluation), config.yaml, run.json,
      summary.json, loss.png.
    """
    out: dict[str, int] = {}
    store = 0
    if not resume:
        tok = "byte" if (cfg.model.tokenizer or ("" if cfg.model.path else "byte")) == "byte" else "subword"
        data_bytes = sum(Path(p).stat().st_size for _, p in _data_paths(cfg) if Path(p).is_file())
        store = int(data_bytes * _STORE_BYTES_PER_DATA_BYTE[tok])
        if not cfg.data.datasets:
            store += cfg.data.builtin_size * _BUILTIN_RECORD_BYTES
        store += _STORE_FIXED_BYTES
    if mcfg is not None:
        base, lora = count_parameters(mcfg, lora_r=cfg.lora.r, target_modules=cfg.lora.target_modules)
        n_base, n_lora = _tensor_counts(mcfg, cfg.lora.target_modules)
        tokenizer = _tokenizer_bytes(cfg)
        if cfg.lora.enabled:
            trainable, tensors = lora, n_lora
            # trainable + 2 moments + the adapter copy, each tensor named in four safetensors headers
            per_ckpt = 16 * trainable + 4 * _TENSOR_ENTRY_BYTES * tensors + tokenizer
        else:
            trainable, tensors = base, n_base
            per_ckpt = 12 * trainable + 3 * _TENSOR_ENTRY_BYTES * tensors
        per_ckpt += _CHECKPOINT_FIXED_BYTES
        n_ckpt = 1 if resume else cfg.output.keep_checkpoints + 1
        out["checkpoints"] = per_ckpt * n_ckpt
        out["final outputs"] = 4 * trainable + _TENSOR_ENTRY_BYTES * tensors + tokenizer + 4096
        if not cfg.model.path and not resume and cfg.output.save_random_base:
            out["random base model"] = _base_dtype_bytes(cfg) * base + _TENSOR_ENTRY_BYTES * n_base + 4096
    if not resume:
        out["token-store cache"] = store
    steps = _estimated_steps(cfg, store) if not resume else max(cfg.train.max_steps, 1)
    lines = steps // max(1, cfg.output.log_every) + (steps // cfg.eval.every if cfg.eval.every else 0) + 4
    out["metrics and run files"] = _RUN_FILES_BYTES + _METRICS_LINE_BYTES * lines
    return out


def _check_free_disk(cfg: Config, mcfg, *, resume: bool) -> list[str]:
    where = _existing_ancestor(_run_dir(cfg))
    need = estimate_disk_bytes(cfg, mcfg, resume=resume)
    total = sum(need.values())
    free = shutil.disk_usage(where).free
    if free >= total:
        return []
    keep = cfg.output.keep_checkpoints
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in need.items() if v)
    # lowering keep_checkpoints only helps when checkpoints are a large share of the need
    if keep > 1 and need.get("checkpoints", 0) * 3 > total and not resume:
        per = need["checkpoints"] // (keep + 1)
        fix = (f"lower output.keep_checkpoints (each checkpoint takes {human_bytes(per)}), free space there, "
               f"or choose another --output.dir")
    else:
        fix = "free space there or choose another --output.dir"
    return [f"output.dir {_run_dir(cfg)}: not enough free disk: about {human_bytes(total)} needed ({parts}; "
            f"output.keep_checkpoints={keep}, one more while each is written), {human_bytes(free)} free on "
            f"{where}; {fix}"]
