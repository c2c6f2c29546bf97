"""Per-worker Ray Train plumbing shared by the stage recipes: rank, dataset shard, report, checkpoint, resume."""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray.train
import torch

from lbr_ray import storage
from lbr_ray.config import config_from_dict
from lbr_ray.errors import CheckpointError
from lbr_ray.layout import collate_columns
from lbr_ray.train import checkpoint as ckpt
from lbr_ray.train import manifest
from lbr_ray.train.checkpoint import LoopState
from lbr_ray.train.console import worker_console
from lbr_ray.train.telemetry import Telemetry

log = logging.getLogger("lbr_ray")

try:
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError:  # older Ray: plain callables
    NumpyBatchCollateFn = object

class PadCollate(NumpyBatchCollateFn):
    """Pads `<prefix>_ids/_seg` columns of a numpy batch into tensors (runs in the iterator's thread)."""

    def __init__(self, prefixes: list[str], pad_id: int, length: int | None = None):
        self.prefixes, self.pad_id, self.length = prefixes, pad_id, length

    def __call__(self, batch):
        return collate_columns(batch, self.prefixes, self.pad_id, self.length)


def grouped_batches(megabatches, prefixes: list[str], batch_size: int, collate, seed: tuple[int, int]):
    """Numpy megabatches -> length-grouped padded batches on this worker's device (see WorkerRun.batches)."""
    from ray.train.torch import get_device

    from lbr_ray.layout import length_groups

    device = get_device()
    for j, mega in enumerate(megabatches):
        lengths = np.stack([np.fromiter(map(len, mega[f"{p}_ids"]), dtype=np.int64) for p in prefixes], 1)
        for idx in length_groups(lengths, batch_size, np.random.default_rng([*seed, j])):
            batch = collate({k: v[idx] for k, v in mega.items()})
            yield {k: v.to(device) for k, v in batch.items()} if device.type != "cpu" else batch


class UploadedTelemetry(Telemetry):
    """Telemetry whose TensorBoard folder is copied to the remote output when the stage ends."""

    def __init__(self, *args, dest: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.dest = dest

    def close(self) -> None:
        super().close()
        if self.writer is not None:
            from lbr_ray.storage import upload_dir

            upload_dir(self.writer.log_dir, self.dest)


class WorkerRun:
    def __init__(self, config: dict, stage: str):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.cfg = config_from_dict(config["cfg"])
        self.stage, self.t0 = stage, config.get("t0")
        self.stage_dir = Path(config["stage_dir"])  # with a remote output: a local mirror, uploaded by the driver
        self.stage_uri = config.get("stage_uri")
        storage.configure(self.cfg.run.storage_endpoint)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.quiet = bool(config.get("quiet", False))
        self.marks: dict[str, float] = {}  # start-up milestones, seconds since the command started (t0)
        self.mark("worker_start")
        worker_console(self.stage_dir, self.rank, self.quiet)
        if config.get("threads"):  # else Ray's OMP_NUM_THREADS = floor(cpus_per_worker)
            torch.set_num_threads(int(config["threads"]))
        torch.manual_seed(self.cfg.run.seed)
        print(f"[lbr] {stage}: rank {self.rank} of {self.world} on node {ray.get_runtime_context().get_node_id()}, "
              f"{torch.get_num_threads()} torch threads", flush=True)

    def batches(self, prefixes: list[str], batch_size: int, pad_id: int, name: str = "train",
                length: int | None = None, length_groups: int = 0):
        """`epoch -> batches` of padded tensors (to `length` when given, e.g. packed rows), already on this
        worker's device. `length_groups` > 1: each run of that many batches is sorted by row length and cut into
        batches of similar rows, in a seeded random order (layout.length_groups), so a resumed run sees the same
        batches. Epoch 0's first batch is fetched in a background thread right away (fresh runs), so Ray Data's
        start (tokenizer actor, first blocks) overlaps the model build and DeepSpeed's init."""
        shard = ray.train.get_dataset_shard(name)
        collate = PadCollate(prefixes, pad_id, length)

        def make(epoch: int):
            shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": self.cfg.run.seed + epoch}
            if length_groups > 1:
                mega = shard.iter_batches(batch_size=batch_size * length_groups, batch_format="numpy", **shuffle)
                return grouped_batches(mega, prefixes, batch_size, collate, (self.cfg.run.seed, epoch))
            return iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                                 **shuffle))

        pending = {}
        if ray.train.get_checkpoint() is None:  # a resumed run may start in a later epoch: no early epoch 0
            first_epoch = make(0)
            pending[0] = (first_epoch, ThreadPoolExecutor(1, "lbr-prefetch").submit(next, first_epoch, None))

        def epoch_batches(epoch: int):
            if epoch in pending:
                it, head = pending.pop(epoch)
                batch = head.result()
                if batch is None:
                    return
                batches = itertools.chain([batch], it)
            else:
                batches = make(epoch)
            for batch in batches:
                if "first_batch" not in self.marks:
                    self.mark("first_batch")
                yield batch

        return epoch_batches

    def pad_id(self, init: str | None = None) -> int:
        """The padding id of the stage's tokenizer (before the model is built, to start the data stream early)."""
        from lbr_ray.model.bottleneck import load_tokenizer
        from lbr_ray.train.checkpoint import hf_dir

        return load_tokenizer(str(hf_dir(init)) if init else self.cfg.model.name, self.cfg.bottleneck.k_max).pad_token_id

    def mark(self, name: str) -> None:
        """Record a start-up milestone; the first logged metrics carry them as `startup_<name>_s`."""
        if self.t0 is not None:
            self.marks[name] = time.time() - self.t0

    def telemetry(self, max_steps: int, state: LoopState) -> Telemetry:
        tb = self.stage_dir / "tensorboard" if self.cfg.run.tensorboard else None
        from lbr_ray.config.load import compute_dtype
        from lbr_ray.model.bottleneck import DTYPES
        from lbr_ray.train.flops import device_peak_flops

        peak = device_peak_flops(None, DTYPES[compute_dtype(self.cfg)], self.cfg.scaling.peak_tflops)
        kwargs = {"bar": not self.quiet, "peak_flops": peak, "marks": self.marks}
        if self.stage_uri:  # rank 0 may sit on another node than the driver: it uploads its own event files
            return UploadedTelemetry(self.stage, max_steps, self.rank, tb, state.step, self.t0,
                                     dest=f"{self.stage_uri}/tensorboard", **kwargs)
        return Telemetry(self.stage, max_steps, self.rank, tb, state.step, self.t0, **kwargs)

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics)

    def checkpoint(self, engine, model, tokenizer, state: LoopState, metrics: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save(engine, model, tokenizer, self.cfg, self.stage, state, Path(tmp), self.rank)
            manifest.write_rank_files(Path(tmp), self.rank)  # the controller's manifest.json is written last
            ray.train.report({**(metrics or {}), "step": state.step, "checkpoint_step": state.step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def resume(self, engine) -> LoopState:
        """Continue from Ray's latest checkpoint (a --resume or an automatic restart after a lost worker), or
        from the newest complete one before it when its files were truncated, partly deleted or damaged."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return LoopState()
        fs = checkpoint.filesystem

        def local_copy(folder: str):
            return ray.train.Checkpoint(folder, filesystem=fs).as_directory()

        with manifest.newest_complete(fs, checkpoint.path, local_copy) as (chosen, local, skipped):
            if chosen is None:
                raise CheckpointError(f"no complete checkpoint next to {checkpoint.path}: {'; '.join(skipped)}; "
                                      "start a new run in another --output")
            for line in skipped if self.rank == 0 else []:
                print(f"[lbr] {self.stage}: {line}: resuming from {Path(chosen).name}", flush=True)
            state = ckpt.load(engine, local, self.rank)
        ray.train.report({"resumed_at_step": state.step, "resumed_time": time.time()})  # marks the restart
        if self.rank == 0:
            log.info("%s: resumed from %s at step %d", self.stage, chosen, state.step)
        return state
