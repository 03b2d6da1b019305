"""The training recipe, top to bottom: runtime -> data -> model -> optimizer -> eval -> loop -> outputs.

One optimizer step = ``grad_accum`` micro-batches. The step's response tokens are counted first and
every micro-batch's summed loss is divided by that count (``num_items``), so the gradient is that of
the mean over all response tokens of the step: not a mean of per-batch means, and the same whatever
the batching.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsft import config as config_mod
from fastsft import kernel_usage
from fastsft.config import Config, ConfigError, curriculum_field
from fastsft.data import DatasetSpec, TokenStore, build_dataset, load_tokenizer
from fastsft.data.pipeline import default_workers
from fastsft.data import cache as token_cache
from fastsft.data.builtin import generate as generate_builtin
from fastsft.model import ModelConfig, build_model, load_model, save_pretrained
from fastsft.model.fused import configure_kernels
from fastsft.model.lora import adapters_disabled, apply_lora, save_adapter, trainable_parameters
from fastsft.preflight import PreflightError, preflight
from fastsft.train import checkpoint as ckpt_mod
from fastsft.train import distributed
from fastsft.train import signals
from fastsft.train.files import (atomic_directory, atomic_write_text, free_space, human_bytes,
                                 writing)
from fastsft.train.reporting import check_available as check_reporters
from fastsft.train.reporting import open_reporters
from fastsft.train.run_dir import RunDirectory, RunDirError
from fastsft.train.batching import BatchOrder, count_targets, curriculum_phases
from fastsft.train.base_passes import cached_arrays, compute_base_topk
from fastsft.train.evaluate import exact_match, majority_baseline, record_losses, response_loss
from fastsft.train.metrics import MetricsLog, peak_memory_bytes, plot_losses
from fastsft.train.objective import Objective

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# setup helpers


def resolve_run_dir(cfg: Config) -> Path:
    """Fill in ``{time}`` in the output directory once, so the resolved config names the real place."""
    if "{time}" in cfg.output.dir:
        cfg.output.dir = cfg.output.dir.replace("{time}", datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Path(cfg.output.dir)


def _dataset_specs(entries: list, cfg: Config) -> list[DatasetSpec]:
    specs = []
    for entry in entries:
        e = {"path": entry} if isinstance(entry, str) else dict(entry)
        specs.append(DatasetSpec(path=e["path"], format=e.get("format", cfg.data.format),
                                 fields=e.get("fields", cfg.data.fields) or None,
                                 weight=float(e.get("weight", 1.0))))
    return specs


def _text_spec(path: str) -> DatasetSpec:
    """Plain text (the forgetting meter's, the replay's): a .txt file is split into paragraphs; JSON/JSONL
    must hold {text} records."""
    p = Path(path)
    if p.suffix == ".txt":
        paragraphs = [t.strip() for t in p.read_text(errors="replace").split("\n\n") if t.strip()]
        return DatasetSpec(records=[{"text": t} for t in paragraphs], name=p.name, format="text")
    return DatasetSpec(path=path, format="text")


def _score_range(scores: np.ndarray) -> str:
    scored = scores[~np.isnan(scores)]
    return f"{scored.min():.3g}-{scored.max():.3g}" if len(scored) else "none"


def _curriculum_scores(cfg: Config, model, store, data_dir: Path, run, *, pad_id, device, autocast, kernels,
                       dist, cache_key: str | None) -> np.ndarray:
    """Each training record's difficulty: its length, the number its data holds at a field (NaN for replay
    text, which the phases share evenly), or the base model's mean response loss (one no-grad pass, timed;
    saved as data/curriculum_scores.npy and read back on resume, where the model is no longer the base; and
    kept in the token cache beside the stores, so a rerun on the same data and base reads them too: see
    ``base_passes.cached_arrays``).
    Records the scoring cannot score (no response token) count as the hardest."""
    if cfg.data.curriculum == "length":
        return store.lengths.astype(np.float64)
    if curriculum_field(cfg.data.curriculum):
        if store.score is None:
            raise ConfigError(f"data.curriculum {cfg.data.curriculum}: the token stores hold no scores (made "
                              "without this curriculum); start a fresh run")
        return store.score

    def score():
        with adapters_disabled(model):  # the base, also if the adapters ever trained
            losses = record_losses(model, store, pad_id=pad_id, batch_size=cfg.eval.batch_size, device=device,
                                   autocast=autocast, kernels=kernels)
        return [np.where(np.isnan(losses), np.inf, losses)]

    (scores,), computed = cached_arrays(
        ["curriculum_scores"], [(len(store),)], score, data_dir=data_dir, cache_key=cache_key,
        fingerprint=token_cache.model_fingerprint(cfg), is_main=dist.is_main, say=_say,
        what=f"curriculum: base-model loss of {len(store)} records")
    if dist.is_main:
        run.record_inputs("data")
    return scores


def _base_topk(cfg: Config, model, store, data_dir: Path, run, *, pad_id, device, autocast, dist,
               cache_key: str | None) -> dict[str, np.ndarray]:
    """The base's top-k log-probs of every token (train.kl_base_topk), as BatchOrder's per-token arrays: one
    no-grad pass before training, kept in the run's data/ (resume) and the token cache (reruns)."""
    k, n = cfg.train.kl_base_topk, store.num_tokens
    (ids, logp), _ = cached_arrays(
        ["base_topk_ids", "base_topk_logp"], [(n, k), (n, k + 1)],
        lambda: compute_base_topk(model, store, k, pad_id=pad_id, batch_size=cfg.eval.batch_size, device=device,
                                  autocast=autocast),
        data_dir=data_dir, cache_key=cache_key, fingerprint=token_cache.model_fingerprint(cfg), is_main=dist.is_main,
        say=_say, mmap=True, what=f"KL anchor: the base's top-{k} log-probs of {n} tokens")
    if dist.is_main:
        run.record_inputs("data")
    return {"base_topk_ids": ids, "base_topk_logp": logp}


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_lambda(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup from 0, then cosine/linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def _batch_stream(plan_epoch, epoch: int, batch_in_epoch: int):
    """Yield (epoch, index in epoch, batch) forever from a saved position; ``plan_epoch(e)`` lists
    epoch e's micro-batches (record indices, or bin indices when packing)."""
    while True:
        batches = plan_epoch(epoch)
        for i in range(batch_in_epoch, len(batches)):
            yield epoch, i, batches[i]
        epoch, batch_in_epoch = epoch + 1, 0


def _say(msg: str) -> None:
    if distributed.is_main():  # under torchrun only rank 0 prints
        tqdm.write(msg)


def _load_token_stores(data_dir: Path, load=TokenStore.load):
    """(train, eval or None, report) of a resumed run, read by ``load`` (a multimodal run's:
    MultimodalStore.load); a file that cannot be read is one line naming it."""
    path = data_dir / "train.npz"
    try:
        train_store = load(path)
        path = data_dir / "eval.npz"
        eval_store = load(path) if path.exists() else None
        path = data_dir / "report.json"
        report = json.loads(path.read_text())
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise RunDirError(f"--resume: {path}: cannot be read ({' '.join(str(e).split())[:100]}); the run cannot "
                          f"be continued without it (start it again with --output.overwrite true)") from None
    return train_store, eval_store, report


def _weights_finite(params, dist) -> bool:
    """Whether every trainable weight is finite on every rank (FSDP2: each rank checks its shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return dist.sum([int(all(bool(torch.isfinite(p).all()) for p in local))])[0] == dist.world_size


def _disk_after_first_checkpoint(ckpt: Path, cfg: Config, run_dir: Path) -> str | None:
    """A warning when the checkpoints still to be written (``keep_checkpoints`` at once, one more while
    the newest is written) and the final outputs will not fit, measured from the first checkpoint's size."""
    import shutil

    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    final = sum(f.stat().st_size for f in (ckpt / "adapter").rglob("*") if f.is_file()) if (ckpt / "adapter").is_dir() \
        else size // 3  # a full fine-tune's final model: the weights, a third of weights + AdamW moments
    need = size * cfg.output.keep_checkpoints + final  # beyond this one: `keep` more at peak, then the outputs
    free = shutil.disk_usage(run_dir).free
    if free >= need:
        return None
    return (f"fastsft: warning: checkpoint {ckpt.name} takes {human_bytes(size)}; the next checkpoints "
            f"(output.keep_checkpoints={cfg.output.keep_checkpoints}, one more while each is written) and the final "
            f"outputs need about {human_bytes(need)} more, but only {free_space(run_dir)}: a later write will fail "
            f"unless space is freed")


# ----------------------------------------------------------------------------------------------------
# the recipe


@signals.handle_stop_signals  # SIGTERM/SIGINT: checkpoint at the next step boundary, raise RunStopped
def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train as ``cfg`` says, in ``cfg.output.dir`` (see `run_dir` for what a resume may change)."""
    config_mod.validate(cfg)
    kernel_usage.reset()  # this run's record of which native pieces ran (summary.json: kernels_used)
    device = torch.device(cfg.train.device if cfg.train.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is cuda but no CUDA device is available")
    dist = distributed.setup(cfg, device)  # torchrun: join the process group; each rank on cuda:LOCAL_RANK
    resolve_run_dir(cfg)
    cfg.output.dir = dist.broadcast(cfg.output.dir)  # rank 0's {time} on every rank
    run = _open_run_dir(cfg, resume=resume, dist=dist)  # the lock; fresh / resume / restart; the saved config
    ok = False
    try:
        summary = _train(cfg, run, dist)
        ok = True
        return summary
    finally:
        run.close(ok=ok)  # a fresh run that failed before training leaves nothing behind


def _open_run_dir(cfg: Config, *, resume: bool, dist) -> RunDirectory:
    """Rank 0 locks and decides; every rank learns the decision (or the one-line error)."""
    run, error = None, None
    if dist.is_main:
        try:
            run = RunDirectory.open(cfg, resume=resume)
        except ConfigError as e:
            error = {"message": str(e), "problems": getattr(e, "problems", None)}
    shared = dist.broadcast({"error": error, "run": run.shared(cfg) if run else None})
    if shared["error"]:
        if shared["error"]["problems"]:  # preflight's: every problem, one line each
            raise PreflightError(shared["error"]["problems"])
        raise RunDirError(shared["error"]["message"])
    if run is None:
        run = RunDirectory.from_shared(cfg, shared["run"])
    for line in run.notices:
        _say(line)
    return run


def _train(cfg: Config, run: RunDirectory, dist) -> dict:
    # ---- runtime ------------------------------------------------------------------------------------
    resuming = run.mode == "resume"
    check_reporters(cfg.output.report_to)  # tensorboard / wandb installed
    preflight(cfg, resume=resuming)  # disk, data files, model: before anything is loaded
    device = dist.device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    autocast = _autocast(device, cfg.train.precision)
    loss_kernels = "off" if "loss" in cfg.train.kernels_off else cfg.train.kernels
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_dir = run.path
    resume_from = run.checkpoint
    if not resuming:
        run.write_config(cfg)  # rank 0 only
    started = time.time()

    # ---- tokenizer and data -------------------------------------------------------------------------
    tokenizer_spec = cfg.model.tokenizer or (cfg.model.path if cfg.model.path else "byte")
    tokenizer = load_tokenizer(tokenizer_spec, trust_remote_code=cfg.model.trust_remote_code)
    vision = mm = None
    if config_mod.is_multimodal(cfg):  # LLaVA data: a record's length counts its images' tokens
        from fastsft.multimodal import training as mm

        vision = mm.VisionSetup.from_config(cfg, tokenizer)
    data_dir = run_dir / "data"
    reuse_run_stores = resuming and (data_dir / "train.npz").exists()
    # (multimodal stores name image files, whose contents no cache key covers: always built afresh)
    cache_key = (token_cache.cache_key(cfg, tokenizer)
                 if cfg.data.token_cache and not reuse_run_stores and vision is None else None)
    cached = token_cache.lookup(cache_key)
    if reuse_run_stores:
        # the token stores of the interrupted run (verified against run.json): same records, same order
        if vision is not None:  # and each record's images
            mm_train, mm_eval, report = _load_token_stores(data_dir, load=mm.MultimodalStore.load)
            train_store, eval_store = mm_train.tokens, (mm_eval.tokens if mm_eval is not None else None)
        else:
            train_store, eval_store, report = _load_token_stores(data_dir)
    elif cached is not None:
        # the same data, tokenizer and options as an earlier run: its token stores, no tokenising
        if dist.is_main:
            with writing(data_dir, "the token stores"):
                token_cache.copy_into(cached, data_dir)
            run.record_inputs("data")
        train_store, eval_store, report = _load_token_stores(cached)
        _say(f"data: token stores from the cache ({cached})")
    elif vision is not None:
        mm_train, mm_eval, report = mm.build_data(cfg, tokenizer, vision)
        train_store, eval_store = mm_train.tokens, (mm_eval.tokens if mm_eval is not None else None)
        if dist.is_main:
            with writing(data_dir, "the token stores"):
                data_dir.mkdir(exist_ok=True)
                mm_train.save(data_dir / "train.npz")  # and train.images.npz: each record's images
                if mm_eval is not None:
                    mm_eval.save(data_dir / "eval.npz")
                atomic_write_text(data_dir / "report.json", json.dumps(report, indent=1, default=str))
            run.record_inputs("data")
    else:
        if cfg.data.datasets:
            specs = _dataset_specs(cfg.data.datasets, cfg)
        else:
            specs = [DatasetSpec(records=generate_builtin(cfg.data.builtin_size, seed=cfg.train.seed),
                                 name="builtin", format="prompt_completion")]
        eval_specs = _dataset_specs(cfg.data.eval_datasets, cfg) if cfg.data.eval_datasets else None
        workers = cfg.data.workers or max(1, default_workers() // dist.world_size)
        bundle = build_dataset(specs, tokenizer, max_seq_len=cfg.data.max_seq_len, train_on=cfg.data.train_on,
                               add_bos=cfg.data.add_bos, skip_bad_records=cfg.data.skip_bad_records,
                               eval_fraction=0.0 if eval_specs else cfg.data.eval_fraction,
                               eval_specs=eval_specs, seed=cfg.train.seed,
                               replay=_text_spec(cfg.data.replay["path"]) if cfg.data.replay else None,
                               replay_share=cfg.data.replay["weight"] if cfg.data.replay else 0.0,
                               score_field=curriculum_field(cfg.data.curriculum), workers=workers)
        train_store, eval_store, report = bundle.train, bundle.eval, bundle.report
        if dist.is_main:  # every rank tokenizes the same records the same way; rank 0 keeps them
            with writing(data_dir, "the token stores"):
                data_dir.mkdir(exist_ok=True)
                train_store.save(data_dir / "train.npz")
                if eval_store is not None:
                    eval_store.save(data_dir / "eval.npz")
                atomic_write_text(data_dir / "report.json", json.dumps(report, indent=1, default=str))
            run.record_inputs("data")
            token_cache.store(cache_key, data_dir)
    if len(train_store) == 0:
        raise ConfigError("no training records left after validation and truncation")
    general_store = None
    if cfg.data.general_text:
        general_store = build_dataset([_text_spec(cfg.data.general_text)], tokenizer,
                                      max_seq_len=cfg.data.max_seq_len, add_bos=cfg.data.add_bos).train
    _say(f"data: {len(train_store)} train records ({train_store.num_trained_tokens} response tokens), "
         f"{len(eval_store) if eval_store is not None else 0} eval records")
    for line in _report_lines(report):
        _say(line if line.startswith("fastsft:") else "  " + line)

    # ---- model --------------------------------------------------------------------------------------
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    dtype = DTYPES.get(cfg.model.dtype) or (torch.bfloat16 if bf16 else torch.float32)
    load_device = torch.device("cpu") if dist.fsdp else device  # FSDP2 moves only each rank's shards
    if vision is not None and vision.llava_dir:  # a LLaVA directory: tower, projector and language model
        model = mm.build_model(cfg, vision, dtype=dtype, device=load_device, seed=cfg.train.seed)
        base_name = str(Path(cfg.model.path).resolve())
    elif cfg.model.path:  # 4-bit: a bnb-4bit checkpoint as it is, or quantized weight by weight while loading
        model = load_model(cfg.model.path, dtype=dtype, device=load_device, load_in_4bit=cfg.model.load_in_4bit,
                           target_modules=cfg.lora.target_modules)
        # the adapter names its base: a local directory absolutely (peft run from elsewhere must find it,
        # not ask the Hub for a relative path), a hub id as it is
        base_name = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path
    else:
        # a random base is saved beside the run: the adapter means nothing without it
        base_name = str((run_dir / "base_model").resolve())
        if resuming and vision is not None:  # the random LLaVA (its tower, first projector, decoder) saved
            from fastsft.multimodal import load_llava

            model = load_llava(base_name, dtype=dtype, device=load_device)
        elif resuming:  # verified against run.json
            model = load_model(base_name, dtype=dtype, device=load_device)
        else:
            src = cfg.model.config
            mcfg = ModelConfig.from_json(src) if Path(src).exists() else ModelConfig.from_name(src)
            model = build_model(mcfg, dtype=dtype, device=load_device, seed=cfg.train.seed)
            if vision is not None:
                model = mm.build_model(cfg, vision, dtype=dtype, device=load_device, language_model=model,
                                       seed=cfg.train.seed)
            if dist.is_main and cfg.output.save_random_base:
                with atomic_directory(Path(base_name), f"the random base model {base_name}") as tmp:
                    if vision is not None:
                        mm.save_llava_model(model, tmp, processor=vision.processor)
                    else:
                        save_pretrained(model, tmp)
                run.record_inputs("base_model")
    if vision is not None and not isinstance(model, mm.MultimodalCausalLM):  # model.path: a text decoder
        model = mm.build_model(cfg, vision, dtype=dtype, device=load_device, language_model=model,
                               seed=cfg.train.seed)
    # the decoder: what LoRA, quantization, kernels and checkpointing apply to (never the vision tower)
    decoder = model.language_model if vision is not None else model
    vocab = model.lm_head.weight.shape[0]
    max_id = int(train_store.ids.max())
    if max_id >= vocab:
        raise ConfigError(f"tokenizer '{tokenizer_spec}' produces token id {max_id} but "
                          f"the model's vocabulary has {vocab} entries; use the model's own tokenizer")
    decoder.gradient_checkpointing = cfg.model.gradient_checkpointing
    decoder.offload_activations = cfg.model.offload_activations
    if cfg.model.load_in_4bit and not cfg.model.path:
        from fastsft.model.nf4 import quantize_linears

        quantize_linears(model, cfg.lora.target_modules, compute_dtype=dtype)
    if any(getattr(m, "quantized_base", False) for m in model.modules()) and not cfg.lora.enabled:
        raise ConfigError(f"model '{cfg.model.path}' is a 4-bit checkpoint: it can only be trained with LoRA "
                          "(set lora.enabled: true)")
    if cfg.lora.enabled:
        apply_lora(decoder, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.rslora, seed=cfg.train.seed)
    configure_kernels(decoder, cfg.train.kernels, cfg.train.kernels_off)  # fused LoRA, RMSNorm, RoPE, SwiGLU
    if vision is not None:  # the projector trains; the tower never; the decoder as train.trainable says
        model.trainable(mm.resolve_trainable(cfg))
    params = trainable_parameters(model)
    for p in params:  # optimizer state and updates in float32 even when the frozen base is bf16
        p.data = p.data.float()
    quantized = [m for m in model.modules() if getattr(m, "quantized_base", False)]
    n_total = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in quantized)
    n_train = sum(p.numel() for p in params)
    _say(f"model: {n_total / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable "
         f"({mm.resolve_trainable(cfg) + ', ' if vision is not None else ''}"
         f"{'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'full fine-tune'}"
         f"{', %d linear layers in 4-bit NF4' % len(quantized) if quantized else ''}) on {device}")
    model.train()
    dist.shard(model)  # train.fsdp: FSDP2 over each decoder layer, then the root; otherwise nothing
    params = trainable_parameters(model)  # (FSDP2 replaced them by sharded DTensors)
    if dist.world_size > 1:  # the same init on every rank above; from here each rank its own dropout masks
        torch.manual_seed(dist.rank_seed(cfg.train.seed))  # CPU and every CUDA device
    images = None  # multimodal: a batch's images -> pixel_values (or cached tower features) and image_starts
    if vision is not None:
        images = mm.ImageInputs(model, vision.processor, device, cache_images=cfg.model.vision_feature_cache)
    objective = Objective(model, device, kl_to_base=cfg.train.kl_to_base, kl_tokens=cfg.train.kl_tokens,
                          neftune_alpha=cfg.train.neftune_alpha, kernels=loss_kernels, autocast=autocast,
                          kl_topk=cfg.train.kl_base_topk > 0, inputs=images.for_batch if images else None)

    # ---- batching: packed bins of max_seq_len tokens, or one padded record a row; shuffled or phased --
    pad_id = tokenizer.pad_id
    phases = None
    if cfg.data.curriculum != "none":
        scores = _curriculum_scores(cfg, model, train_store, data_dir, run, pad_id=pad_id, device=device,
                                    autocast=autocast, kernels=loss_kernels, dist=dist, cache_key=cache_key)
        phases = curriculum_phases(scores, cfg.data.curriculum_phases)
        _say(f"curriculum ({cfg.data.curriculum}): {len(phases)} phases of "
             f"{', '.join(str(len(p)) for p in phases)} records, scores "
             + ", ".join(_score_range(scores[p]) for p in phases))
    base_topk = None  # train.kl_base_topk: the base's cached top-k, laid out with each batch's tokens
    if cfg.train.kl_base_topk:
        base_topk = _base_topk(cfg, model, train_store, data_dir, run, pad_id=pad_id, device=device,
                               autocast=autocast, dist=dist, cache_key=cache_key)
    order_kw = dict(micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, pad_id=pad_id,
                    packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                    group_by_length=cfg.train.group_by_length, phases=phases, per_token=base_topk)
    order = (mm.MultimodalBatchOrder(mm_train, **order_kw) if vision is not None
             else BatchOrder(train_store, **order_kw))
    if cfg.data.packing:
        _say(f"packing: {len(train_store)} records into {order.num_units} rows of {cfg.data.max_seq_len} tokens "
             f"({order.efficiency:.1%} of the capacity holds real tokens"
             f"{', each phase packed on its own' if phases is not None else ''})")
    plan_epoch, make_batch = order.epoch, order.batch

    # ---- optimizer and schedule ---------------------------------------------------------------------
    batches_per_epoch = order.batches_per_epoch
    step_batches = cfg.train.grad_accum * dist.world_size  # micro-batches of one (global) optimizer step
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * batches_per_epoch / step_batches))
    warmup = int(cfg.train.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total=total_steps, warmup=warmup, schedule=cfg.train.schedule,
                                       min_ratio=cfg.train.min_lr_ratio))

    # ---- resume -------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0,
             "tokens": 0, "response_tokens": 0}
    if resume_from is not None:  # every rank: the weights, and the global data position
        with dist.gathered(model, optimizer):
            state.update(ckpt_mod.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                                  rank=dist.rank))
        if dist.rank and not ckpt_mod.has_rank_rng(resume_from, dist.rank):
            torch.manual_seed(dist.rank_seed(cfg.train.seed))  # written by fewer processes: not rank 0's stream
        _say(f"resumed from {resume_from} at step {state['step']}")
        for key, (old, new) in run.changes.items():
            _say(f"  {key}: {old} -> {new}")
    resume_step = state["step"] if resuming else None
    metrics = (MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step,
                          reporters=open_reporters(cfg.output.report_to, run_dir, config=config_mod.to_dict(cfg),
                                                   resume_step=resume_step))
               if dist.is_main else distributed.NullLog())
    if resuming:  # what this resume started from and changed (config.yaml holds the values now in force)
        metrics.write({"kind": "resume", "step": state["step"], "checkpoint": resume_from.name,
                       "changes": run.changes, "skipped_checkpoints": [list(s) for s in run.skipped]})

    def save_weights(out_dir: Path) -> None:
        """The PEFT adapter (LoRA; of the decoder) or the whole model (full fine-tune; multimodal: a LLaVA
        directory), with the tokenizer."""
        if vision is not None and not cfg.lora.enabled:
            mm.save_llava_model(model, out_dir, processor=vision.processor, tokenizer=tokenizer)
            return
        if cfg.lora.enabled:
            save_adapter(decoder, out_dir, base_model_name_or_path=base_name,
                         lora_config={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                                      "target_modules": cfg.lora.target_modules, "use_rslora": cfg.lora.rslora})
        else:
            save_pretrained(model, out_dir)
        tokenizer.save(out_dir)

    cadence = ckpt_mod.Cadence(every=cfg.output.checkpoint_every, minutes=cfg.output.checkpoint_minutes,
                               total_steps=total_steps, step=state["step"])
    disk_checked = resume_from is not None  # a fresh run measures its first checkpoint against the free disk

    def checkpoint(step: int) -> Path | None:
        """Checkpoint ``step``, unless the weights are not finite: the last finite checkpoint stays the newest."""
        nonlocal disk_checked
        cadence.written(step)
        if not _weights_finite(params, dist):
            _say(f"step {step}: the weights are not finite; checkpoint not written (the newest stays "
                 f"{getattr(ckpt_mod.latest_checkpoint(run_dir), 'name', 'none')})")
            return None
        state["log_window"] = {k: v for k, v in window.items() if k != "t"} | {"seconds": time.time() - window["t"]}
        extra = (lambda d: save_weights(d / "adapter")) if cfg.lora.enabled else None
        rng_states = dist.gather(ckpt_mod.rng_state())  # every rank's RNG states, on rank 0
        written = None
        with dist.gathered(model, optimizer):  # FSDP2: whole LoRA tensors on every rank; rank 0 writes
            if dist.is_main:
                written = ckpt_mod.save_checkpoint(run_dir, step, model=model, optimizer=optimizer,
                                                   scheduler=scheduler, trainer_state=state,
                                                   keep=cfg.output.keep_checkpoints, write_extra=extra,
                                                   rng_states=rng_states)
        state.pop("log_window")
        if written is not None and not disk_checked:
            disk_checked = True
            warning = _disk_after_first_checkpoint(written, cfg, run_dir)
            if warning:
                _say(warning)
        return written

    def checkpoint_before_stop(step: int) -> Path | None:
        """This step's checkpoint (unless one was just written for it); the newest checkpoint there is."""
        if cadence.last_step != step:
            checkpoint(step)
        return ckpt_mod.latest_checkpoint(run_dir)

    # ---- evaluation ---------------------------------------------------------------------------------

    def evaluate(step: int, generate: bool = True) -> dict:
        """Held-out loss/perplexity; exact match (greedy generation, slower) when ``generate``."""
        out = {"kind": "eval", "step": step}
        if eval_store is not None and len(eval_store):
            r = response_loss(model, eval_store, pad_id=pad_id, batch_size=cfg.eval.batch_size,
                              max_records=cfg.eval.max_records, device=device, autocast=autocast,
                              kernels=loss_kernels,
                              inputs=(lambda idx, width: images.for_records(mm_eval, idx, width)) if images else None)
            out.update(eval_loss=r["loss"], eval_ppl=r["ppl"])
            if cfg.eval.exact_match and generate:
                em = exact_match(model, tokenizer, eval_store, n=cfg.eval.exact_match,
                                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                 device=device, autocast=autocast, answer_pattern=cfg.eval.answer_pattern,
                                 inputs=(lambda idx, width, pad, lens: images.for_records(mm_eval, idx, width, pad, lens))
                                 if images else None,
                                 suppress_ids={vision.image_token_id} if vision is not None else ())
                out.update(exact_match=em["exact_match"], samples=em["samples"])
                if "answer_accuracy" in em:
                    out.update(answer_accuracy=em["answer_accuracy"], answer_records=em["answer_records"])
        if general_store is not None:
            g = response_loss(model, general_store, pad_id=pad_id, batch_size=cfg.eval.batch_size,
                              max_records=cfg.eval.max_records, device=device, autocast=autocast,
                              kernels=loss_kernels)
            out.update(general_ppl=g["ppl"])
            if "eval_ppl" in out:
                out["ppl_ratio"] = out["eval_ppl"] / g["ppl"]  # instruction PPL / general PPL
        metrics.write({k: v for k, v in out.items() if k != "samples"})
        return out

    baseline = None
    if eval_store is not None and cfg.eval.exact_match:
        baseline = majority_baseline(tokenizer, train_store, eval_store, n=cfg.eval.exact_match)
    before = dist.broadcast([r for r in metrics.read() if r.get("kind") == "eval" and r["step"] == 0])
    if resume_from is not None and before:
        first_eval = before[0]  # the interrupted run already evaluated the untrained model
    else:
        first_eval = evaluate(state["step"])
        _say("eval before: " + _eval_line(first_eval, baseline))

    # ---- the loop -----------------------------------------------------------------------------------
    stream = _batch_stream(plan_epoch, state["epoch"], state["batch_in_epoch"])
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (cfg.output.progress and dist.is_main),
               unit="step", dynamic_ncols=True)
    if device.type == "cuda":  # metrics report the peak of training, not of loading (a bf16 base before NF4)
        torch.cuda.reset_peak_memory_stats(device)
    window = {"t": time.time(), "tokens": 0, "slots": 0, "response": 0, "loss": 0.0, "kl": 0.0, "n": 0}
    if "log_window" in state:  # the steps logged since the last record, from before the resume point
        restored = state.pop("log_window")
        window.update({k: restored[k] for k in ("tokens", "slots", "response", "loss", "n")},
                      kl=restored.get("kl", 0.0), t=time.time() - restored["seconds"])
    run.mark_started()
    last_eval = first_eval
    kernels_said = False
    while state["step"] < total_steps:
        micro = []
        for i in range(step_batches):
            epoch, index, units = next(stream)
            if dist.takes(i):  # rank r: micro-batches r, r + N, ... of the global step
                micro.append(make_batch(units))
            state["epoch"], state["batch_in_epoch"] = epoch, index + 1
        # response tokens, tokens and token slots of the whole step, summed over the ranks before the backward
        step_targets, tokens, slots = dist.sum([sum(count_targets(b) for b in micro),
                                                sum(b["num_tokens"] for b in micro),
                                                sum(b["input_ids"].numel() for b in micro)])
        num_items = max(1, step_targets)

        step_loss = step_kl = 0.0
        for batch in micro:
            loss, parts = objective(batch, num_items)
            loss.backward()
            step_loss += float(loss.detach())
            step_kl += parts.get("kl", 0.0)
            signals.maybe_kill_for_test("micro", state["step"] + 1)
        step_loss = dist.reduce_gradients(params, step_loss)  # sum over the ranks: gradients and loss
        if cfg.train.kl_to_base:
            step_kl = dist.sum([step_kl])[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        if math.isfinite(step_loss) and torch.isfinite(grad_norm):
            optimizer.step()
            state["nonfinite_in_a_row"] = 0
        else:
            state["skipped_steps"] += 1
            state["nonfinite_in_a_row"] += 1
            _say(f"step {state['step'] + 1}: non-finite loss or gradient norm, update skipped")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if not kernels_said:  # after one real step every piece has chosen its path: say which, once
            _say(kernel_usage.summary_line())
            kernels_said = True
        state["step"] += 1
        state["tokens"] += tokens
        state["response_tokens"] += num_items
        window["tokens"] += tokens
        window["slots"] += slots
        window["response"] += num_items
        window["loss"] += step_loss
        window["kl"] += step_kl
        window["n"] += 1
        bar.update(1)

        step = state["step"]
        if step % cfg.output.log_every == 0 or step == total_steps:
            elapsed = max(time.time() - window["t"], 1e-9)
            record = {"kind": "train", "step": step, "epoch": state["epoch"], "loss": window["loss"] / window["n"],
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "step_time_s": elapsed / window["n"],
                      "tokens_per_s": window["tokens"] / elapsed, "response_tokens_per_s": window["response"] / elapsed,
                      "peak_memory_bytes": peak_memory_bytes(device), "skipped_steps": state["skipped_steps"],
                      # real tokens / token slots of the batches (packed rows or padded records)
                      "packing_efficiency": window["tokens"] / max(window["slots"], 1)}
            if cfg.train.kl_to_base:  # the anchor's KL(p_base || p) per response token (in loss, times beta)
                record["kl_to_base"] = window["kl"] / window["n"]
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"t": time.time(), "tokens": 0, "slots": 0, "response": 0, "loss": 0.0, "kl": 0.0, "n": 0}
        if cfg.eval.every and step % cfg.eval.every == 0 and step != total_steps:
            last_eval = evaluate(step, generate=False)
            _say(f"eval step {step}: " + _eval_line(last_eval, baseline))
        if dist.broadcast(cadence.due(step)):  # rank 0's clock decides for every rank of a torchrun
            checkpoint(step)
        signals.maybe_kill_for_test("step", step)
        signals.check_stop(step=step, nonfinite_in_a_row=state["nonfinite_in_a_row"],
                           max_nonfinite=cfg.train.max_nonfinite_steps, run_dir=run_dir,
                           save_checkpoint=checkpoint_before_stop, agree=dist.sum)
    bar.close()

    # ---- outputs ------------------------------------------------------------------------------------
    final_eval = evaluate(state["step"])
    _say("eval after:  " + _eval_line(final_eval, baseline))
    if not _weights_finite(params, dist):
        raise signals.RunStopped(f"after step {state['step']} the weights are not finite, so no adapter/model was "
                                 f"written; the newest finite checkpoint is "
                                 f"{ckpt_mod.latest_checkpoint(run_dir)}", signals.NONFINITE_EXIT)
    checkpoint(state["step"])
    out_dir = run_dir / ("adapter" if cfg.lora.enabled else "model")
    with dist.gathered(model, optimizer):
        if dist.is_main:  # written beside, then renamed over: a kill leaves the old outputs or the new ones
            with atomic_directory(out_dir, f"the {'adapter' if cfg.lora.enabled else 'model'} {out_dir}",
                                  after=f"the final checkpoint is intact; free space, then resume with: "
                                        f"{signals.resume_command(run_dir)}") as tmp:
                save_weights(tmp)
                signals.maybe_kill_for_test("outputs", state["step"])  # test hook: the adapter half-published
            if vision is not None and cfg.lora.enabled:  # and the LLaVA directory that transformers / vLLM load
                out_dir = run_dir / "model"
                with atomic_directory(out_dir, f"the model {out_dir}") as tmp:
                    mm.save_llava_model(model, tmp, processor=vision.processor, tokenizer=tokenizer)
    metrics.close()
    records = metrics.read()
    if cfg.output.plot and dist.is_main:
        plot_losses(records, run_dir / "loss.png")
    summary = {
        "steps": state["step"], "skipped_steps": state["skipped_steps"], "tokens": state["tokens"],
        "response_tokens": state["response_tokens"], "seconds": time.time() - started,
        "eval_before": {k: v for k, v in first_eval.items() if k not in ("kind", "samples")},
        "eval_after": {k: v for k, v in final_eval.items() if k not in ("kind", "samples")},
        "exact_match_baseline": baseline, "samples": final_eval.get("samples", []),
        "peak_memory_bytes": peak_memory_bytes(device), "output": str(out_dir), "data": report,
        # piece -> native / reference / mixed / unused, with the reason (and on a GPU fallback, the cost)
        "kernels_used": kernel_usage.snapshot(),
    }
    if dist.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    _say(f"done: {state['step']} steps in {summary['seconds']:.0f}s; adapter/model in {out_dir}")
    dist.teardown()
    return summary


def _eval_line(ev: dict, baseline: float | None) -> str:
    parts = []
    if "eval_loss" in ev:
        parts.append(f"held-out response loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})")
    if "exact_match" in ev:
        parts.append(f"exact match {ev['exact_match']:.1%}"
                     + (f" (majority-answer baseline {baseline:.1%})" if baseline is not None else ""))
    if "answer_accuracy" in ev:
        parts.append(f"final-answer accuracy {ev['answer_accuracy']:.1%} of {ev['answer_records']}")
    if "general_ppl" in ev:
        parts.append(f"general-text ppl {ev['general_ppl']:.2f}")
    if "ppl_ratio" in ev:
        parts.append(f"ppl ratio {ev['ppl_ratio']:.3f}")
    return "; ".join(parts) or "no eval data"


def _report_lines(report: dict) -> list[str]:
    lines = []
    for d in report.get("datasets") or []:
        line = (f"{d['name']}: {d['format']} format, {d['records_read']} records read, "
                f"{d['train_records']} train / {d['eval_records']} eval")
        if d.get("bad_skipped"):
            first = d["bad_examples"][0] if d.get("bad_examples") else ""
            line += f", {d['bad_skipped']} bad records skipped (first: {first})"
        if d.get("truncated"):
            line += (f", {d['truncated']} truncated to max_seq_len ({d.get('truncated_tokens', '?')} tokens cut, "
                     f"{d.get('truncated_trained_tokens', '?')} of them response tokens)")
        if d.get("dropped_truncated"):
            line += f", {d['dropped_truncated']} dropped (response cut by max_seq_len)"
        if d.get("dropped_image_cut"):  # llava: never half an image
            line += f", {d['dropped_image_cut']} dropped (max_seq_len cuts inside an image)"
        if d.get("images") is not None and d.get("format") == "llava":
            line += f", {d['images']} images, {d.get('text_only', 0)} records without one"
        lines.append(line)
        usable = d["records"] + d.get("dropped_truncated", 0)
        if d.get("dropped_truncated", 0) > usable / 4:
            lines.append(f"fastsft: warning: {d['name']}: {d['dropped_truncated']} of {usable} records "
                         f"({d['dropped_truncated'] / usable:.0%}) dropped because max_seq_len cuts off their whole "
                         f"response; raise data.max_seq_len to train on them")
    mix = report.get("mixture") or {}
    if len(mix.get("records", {})) > 1:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in mix["records"].items())
        tok_shares = ", ".join(f"{k} {v:.1%}" for k, v in mix["trained_tokens"].items())
        lines.append(f"mixture (records): {shares}; (response tokens): {tok_shares}")
    replay = report.get("replay")
    if replay:
        lines.append(f"replay: {replay['name']} is {replay['realised_share']:.1%} of the trained tokens "
                     f"({replay['trained_tokens']} tokens; data.replay.weight {replay['share']:.1%})")
    return lines
