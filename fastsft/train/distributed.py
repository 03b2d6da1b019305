"""More than one process: data parallel and sharded (FSDP2) training under torchrun.

    torchrun --nproc_per_node 4 -m fastsft train run.yaml                      # 4 GPUs, data parallel
    torchrun --nproc_per_node 4 -m fastsft train run.yaml --train.fsdp true    # 4 GPUs, sharded model

PyTorch's own engine does the work: torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK
(and the rendezvous), `torch.distributed` is the process group (NCCL on CUDA, gloo on CPU) and FSDP2
(`torch.distributed.fsdp.fully_shard`) shards. Without torchrun nothing here does anything and the
trainer runs exactly as a single process.

**Data parallel** (the default under torchrun). One optimizer step takes ``world_size x grad_accum``
micro-batches from the same (seed, epoch) order one process would take them from, and deals them out
round-robin: rank r trains micro-batches r, r + N, r + 2N, ... of the step, so each rank packs and reads
its own disjoint share of the bins. The step's response-token count is summed over the ranks *before*
the backward and every micro-batch's summed loss is divided by it; after the last backward the
trainable gradients are all-reduced with SUM. That is exactly the gradient of the mean over every
response token of the global step, so N ranks with grad_accum = k give the update of one process with
grad_accum = N x k over the same micro-batches (up to the order of the float additions). The model is
replicated; the gradient all-reduce is an explicit one after the accumulation (no DDP hooks: with LoRA
the gradients are small, and the loop's own token normalisation stays the only normalisation).

**Sharded** (``train.fsdp``, for models that do not fit one GPU). The same dealing and normalisation;
each decoder layer, then the root (embeddings, final norm, LM head), is wrapped by ``fully_shard``, so a
rank holds 1/N of every weight and all-gathers one layer at a time for its forward and backward. FSDP2
reduce-scatters the LoRA gradients itself, told to *sum* them (not average: the loss is already divided
by the global token count). Each rank builds the model in CPU memory and FSDP2 moves only its shards to
the GPU, one layer at a time. LoRA only (``lora.enabled``): the trainable tensors are small, so
checkpoints and the adapter gather them whole (`Distributed.gathered`) and keep the single-process file
formats.

4-bit bases (``model.load_in_4bit`` with ``train.fsdp``) are sharded too. FSDP2 shards parameters and
leaves buffers whole on every rank, and `NF4Linear` keeps its packed codes as buffers, so `shard`
re-registers the packed 4-bit codes, their absmax codes and the nested scales as frozen *parameters*
(uint8 and float32). FSDP2 shards them on dim 0 like any frozen weight and all-gathers the bytes before
the layer's forward (one byte buffer for the layer's mixed dtypes), and the layer dequantizes the
gathered codes as on one GPU; only the code books (256 floats) stay replicated. Tested on CPU with gloo
(the update equals one process's); not yet run with NCCL, nor with bf16 compute. Left as they are: the
shards cannot be computed on directly (a layer is used only whole, after its gather), and every process
first builds the whole dense base in CPU memory and quantizes it there before sharding, so host memory
needs one base per process (loading on rank 0 only and broadcasting the shards would lift that).

Only rank 0 prints, draws the progress bar and writes (config, token store, metrics, checkpoints,
adapter, summary). Every rank tokenizes the data itself (deterministic: same records, same order), so a
fresh multi-node run needs no shared file system and no rank waits at a collective while another
tokenizes; a resumed run reads the run directory (checkpoint, token store) on every rank, so resuming
needs it on storage every node sees. Evaluation runs on every rank over the same records (with FSDP2
every forward is a collective, so all ranks must make the same calls; greedy generation is
deterministic, so they do); rank 0 records it.

Randomness: the model and LoRA init draw from generators seeded with ``train.seed``, so every rank builds
the same weights; then each rank's torch RNG (CPU and CUDA) is reseeded with its own seed
(`Distributed.rank_seed`), so the ranks draw different LoRA dropout masks for their different
micro-batches. The data order is a function of (seed, epoch) alone, and Python's and NumPy's global
generators stay the same on every rank. A checkpoint holds every rank's RNG states (gathered to rank
0, which writes them) and on resume each rank restores its own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from fastsft.config import Config, ConfigError

# Gradients are all-reduced in flat buckets of at most this many numbers: LoRA's (a few million
# numbers) go in a single all-reduce; a full fine-tune never holds a second copy of every gradient.
BUCKET_NUMEL = 1 << 25  # 128 MiB of float32
# Rank r's torch RNG is reseeded with train.seed + RANK_SEED_STRIDE * r once the model is built (a prime,
# so the ranks of runs with nearby seeds do not share streams in practice).
RANK_SEED_STRIDE = 1_000_003


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one): the one that prints and writes."""
    return not tdist.is_initialized() or tdist.get_rank() == 0


@dataclass
class Distributed:
    """This process's place in the run; with ``world_size == 1`` every method is a no-op."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False
    owns_group: bool = field(default=False, repr=False)  # we started the process group, we end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def takes(self, i: int) -> bool:
        """Whether micro-batch ``i`` of the global step is this rank's (round-robin dealing)."""
        return i % self.world_size == self.rank

    # ---- collectives on plain numbers ---------------------------------------------------------------

    def sum(self, values: list) -> list:
        """``values`` summed over the ranks, element-wise (ints stay ints: float64 holds them exactly)."""
        if self.world_size == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(t)
        return [int(s) if isinstance(v, int) else float(s) for v, s in zip(values, t.tolist())]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable Python object)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` (a picklable Python object), in rank order, on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def rank_seed(self, seed: int) -> int:
        """This rank's seed for what is random per rank (LoRA dropout masks); ``seed`` in one process."""
        return seed + RANK_SEED_STRIDE * self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---- gradients ------------------------------------------------------------------------------------

    def reduce_gradients(self, params: list[torch.Tensor], step_loss: float) -> float:
        """After the step's last backward: sum the trainable gradients and the step's loss over the ranks.

        Data parallel: an all-reduce (SUM) of the gradients, flattened into buckets. FSDP2 has already
        reduce-scattered them in the backward, so only the loss is summed. Returns the global loss.
        """
        if self.world_size == 1:
            return step_loss
        if not self.fsdp:
            for p in params:
                if p.grad is None:  # unused on this rank: its zeros keep the buckets aligned across ranks
                    p.grad = torch.zeros_like(p)
            for bucket in _buckets([p.grad for p in params], BUCKET_NUMEL):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                tdist.all_reduce(flat)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        return self.sum([step_loss])[0]

    # ---- sharding ------------------------------------------------------------------------------------

    def shard(self, model: nn.Module) -> None:
        """FSDP2 over each decoder layer, then the root. A no-op unless ``train.fsdp``.

        Call it after LoRA is applied and the trainable weights are float32, before the optimizer is
        made: the module's parameters become sharded DTensors (new Parameter objects).
        """
        if not self.fsdp:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
            raise ConfigError(f"config key 'train.fsdp' needs torch 2.8 or newer (FSDP2 summing its gradient "
                              f"reduction); this is torch {torch.__version__}")
        _nf4_storage_as_parameters(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # sum the gradients (the loss is already divided by the global step's token count), as a
                # plain SUM reduction (gloo has no pre-multiplied sum)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Inside: every trainable parameter, and its optimizer state, is a whole plain tensor on every
        rank, so checkpoints and adapters are saved and loaded by the single-process code unchanged.

        FSDP2 only (elsewhere nothing happens); every rank must enter (the all-gathers are collectives).
        On the way out the whole tensors, changed or not (a checkpoint may have been loaded into them),
        are cut back into this rank's shards. Meant for LoRA-sized trainables.
        """
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(model, FSDPModule):
            model.reshard()  # the root stays unsharded after a no-grad forward (eval); register its shards
        swapped = []  # (module, name, sharded parameter, whole parameter)
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and isinstance(p, DTensor):
                    whole = nn.Parameter(p.full_tensor().detach().clone())
                    module._parameters[name] = whole
                    _replace_param(optimizer, p, whole, lambda v: v.full_tensor() if isinstance(v, DTensor) else v)
                    swapped.append((module, name, p, whole))
        try:
            yield
        finally:
            with torch.no_grad():
                for module, name, p, whole in swapped:
                    def shard_like(v, p=p):
                        if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                        return v

                    p.copy_(shard_like(whole.detach()))
                    module._parameters[name] = p
                    _replace_param(optimizer, whole, p, shard_like)

    def teardown(self) -> None:
        """Wait for every rank (rank 0's files are complete when any rank returns), then leave."""
        if self.world_size > 1:
            tdist.barrier()
        if self.owns_group:
            tdist.destroy_process_group()


class NullLog:
    """The metrics log of a rank other than 0: records nothing (rank 0 logs the global step)."""

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


def setup(cfg: Config, device: torch.device) -> Distributed:
    """Join torchrun's process group (when launched by torchrun) and pick this rank's device.

    ``device``: the single-process choice; on CUDA each rank takes ``cuda:LOCAL_RANK``. NCCL on CUDA,
    gloo on CPU. Data parallel whenever torchrun started more than one process; sharded with
    ``train.fsdp``.
    """
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not under_torchrun and not tdist.is_initialized():
        if cfg.train.fsdp:
            raise ConfigError("config key 'train.fsdp' shards the model over the processes of a torchrun launch; "
                              "run: torchrun --nproc_per_node N -m fastsft train ...")
        return Distributed(device=device)
    world = tdist.get_world_size() if tdist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if world == 1 and not cfg.train.fsdp:
        return Distributed(device=device)  # torchrun with one process: exactly the single-process run
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Distributed(device=device, rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                       fsdp=cfg.train.fsdp, owns_group=owns)


# ----------------------------------------------------------------------------------------------------
# helpers


def _buckets(tensors: list[torch.Tensor], max_numel: int):
    bucket, n = [], 0
    for t in tensors:
        if bucket and (n + t.numel() > max_numel or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, n = [], 0
        bucket.append(t)
        n += t.numel()
    if bucket:
        yield bucket


def _replace_param(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, convert) -> None:
    """Make ``new`` take ``old``'s place in the optimizer: its slot in the param groups, and its state
    (each value passed through ``convert``)."""
    for group in optimizer.param_groups:
        group["params"] = [new if q is old else q for q in group["params"]]
    if old in optimizer.state:
        optimizer.state[new] = {k: convert(v) for k, v in optimizer.state.pop(old).items()}


def _nf4_storage_as_parameters(model: nn.Module) -> None:
    """FSDP2 shards parameters and leaves buffers whole on every rank; re-register NF4Linear's packed
    codes, absmax codes and nested scales (its big buffers) as frozen parameters so they are sharded."""
    from fastsft.model.nf4 import NF4Linear

    for m in model.modules():
        if isinstance(m, NF4Linear):
            for name in ("weight", "absmax", "nested_absmax"):
                t = m._buffers.pop(name, None)
                if t is not None:
                    m.register_parameter(name, nn.Parameter(t, requires_grad=False))
