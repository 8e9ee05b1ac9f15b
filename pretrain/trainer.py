"""The training loop: steps, EMA, evaluation, checkpoints, tracking (one class, every rank).

A step takes ``engine.grad_accum`` micro-batches from this rank's stream, sums their
labelled-atom counts over ranks (one small all-reduce), and runs forward/backward on each
with the loss normalised by that global count (``pretrain.loss``, ``pretrain.engine``).
A non-finite loss on any rank, or a non-finite global gradient norm (a finite loss can
still overflow in backward), skips the whole step on every rank (weights, optimizer
moments, EMA and schedule untouched: the learning rate follows the count of steps taken,
``step - skipped``) and is counted; ``max_nonfinite`` in a row stops the run with
:class:`TrainingError`. Every collective call happens on every rank in the same
order; only rank 0 logs, prints and tracks. A signal or the time limit on any rank stops
every rank at the same step boundary with a checkpoint (``pretrain.preemption``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.config import to_dict
from common.errors import UserError
from common.fidelities import FidelityTable
from common.progress import Progress
from data_pipeline import keys as K
from data_pipeline.stream import LoaderConfig, build_loader, open_data
from models.build import build_model
from models.layers.embedding import InputRangeError
from pretrain import init_from
from pretrain.checkpoint import Checkpointer, CheckpointError, barrier
from pretrain.config import TrainConfig
from pretrain.ema import EMA
from pretrain.engine import LOG_FILE, Engine, device_for
from pretrain.flops import run_flops
from pretrain.loss import PARTS, Loss, error_metrics
from pretrain.targets import batch_extras, resolve_targets
from pretrain.preemption import Preempted, StopFlag, clear_marker, estimate_save_seconds, write_marker
from pretrain.tracking import Tracker, system_metrics
from pretrain.weights import MODEL_JSON, TrainedModel, checkpoint_record, model_record


class TrainingError(UserError, RuntimeError):
    """The run cannot go on; the message says where and what to check."""


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _epochs(stream):
    """This rank's micro-batches, epoch after epoch (the stream starts each new epoch)."""
    if stream.sampler.steps_per_epoch == 0:
        raise TrainingError("the training data yields no batches for this rank")
    while True:
        yield from stream


class Trainer:
    """One rank of a training run of ``cfg`` (the process group is already joined).

    ``init``: the trained model ``cfg.init_from`` names (loaded by the caller,
    ``pretrain.release.loader.load_model``), whose weights start a new run; a resumed run
    starts from its own checkpoint instead."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, local_rank: int = 0,
                 resume: bool = False, progress: bool = True, time_limit: float | None = None,
                 init: TrainedModel | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.stop, self.stopping = StopFlag(time_limit), False  # from here on a signal is a flag
        self.out = Path(cfg.out)
        self.progress = progress and rank == 0
        self.device = device_for(local_rank)
        dataset = open_data(cfg.data)  # with data.replay: the new data and the replayed, as one
        self.manifest = dataset.manifest
        self.checkpoints = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep, rank, world_size)
        self.table, start, record = self._fidelity_table(resume, init, dataset)
        self.fidelities = self.table.names
        # extra targets checked against the data's extras, their fidelities fixed (model.json keeps them)
        cfg.model.targets = resolve_targets(cfg.model.targets, self.manifest, cfg.data.folder, self.fidelities)
        extras = batch_extras(cfg.model.targets)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        potential = build_model(cfg.model, self.table)
        if start is not None:
            init_from.load_weights(potential, start, cfg.init_from)
        self.parameters = sum(p.numel() for p in potential.parameters())
        self.stop.save_estimate = estimate_save_seconds(self.parameters, world_size, cfg.engine.zero_stage,
                                                        cfg.ema_decay > 0)
        # measured once, on rank 0, before DeepSpeed partitions the weights; kept in model.json
        self.flops = record.get("flops") or (run_flops(cfg, potential.to(self.device), self.fidelities)
                                             if rank == 0 else None)
        self.loss = Loss(cfg.loss, self.fidelities, cfg.model.targets)
        self.engine = Engine(cfg.engine, potential, dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                                         eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay),
                             self.loss.needs_forces, self.loss.needs_stress, world_size, self.device,
                             log=self.out / LOG_FILE)
        self.ema = EMA(self.engine.ema_tensors, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if rank == 0:  # edge counts (a max_edges budget) are computed once, then cached
            self.stream = build_loader(cfg.data, rank, world_size, self.progress, self.fidelities, extras)
        barrier()
        if rank != 0:
            self.stream = build_loader(cfg.data, rank, world_size, False, self.fidelities, extras)
        # built once: every pass over one is one evaluation, in order
        self.eval_stream = self._eval_stream(cfg.eval.folder, extras)
        self.replay_stream = self._eval_stream(cfg.eval.replay_folder, extras)
        self.tracker = Tracker(cfg.tracking, self.out, rank)
        self.step, self.skipped, self.nonfinite_run, self.run_id = 0, 0, 0, None
        self.forgetting: dict = {}  # {"before": metrics, "after": metrics} on eval.replay_folder
        if resume:
            self._resume()

    def _eval_stream(self, folder: str | None, extras: dict):
        """In-order batches of a held-out ``folder`` (None: none)."""
        if not folder:
            return None
        cfg = self.cfg
        eval_cfg = LoaderConfig(folder=folder, cutoff=cfg.model.cutoff, float_dtype=cfg.data.float_dtype,
                                stream=cfg.data.stream)
        eval_cfg.sampler.max_atoms, eval_cfg.sampler.shuffle = cfg.eval.max_atoms, False
        return build_loader(eval_cfg, self.rank, self.world, False, self.fidelities, extras)

    def _fidelity_table(self, resume: bool, init: TrainedModel | None,
                        dataset) -> tuple[FidelityTable, init_from.Start | None, dict]:
        """The model's fidelity table: the checkpoint's when resuming (fixed when the run
        started), else the training data's, extended by ``init``'s (``pretrain/init_from.py``).
        Returns ``(table, the init_from start or None, the checkpoint's model record or {})``."""
        data = FidelityTable.from_manifest(self.manifest)
        tag = self.checkpoints.latest() if resume else None
        record = checkpoint_record(self.checkpoints.folder / tag) if tag is not None else {}
        if record:
            return FidelityTable.from_json(record["fidelities"], str(self.checkpoints.folder / tag)), None, record
        if init is None:
            return data, None, {}
        start = init_from.plan(init, data, dataset, self.cfg.model)
        if self.rank == 0:
            for line in start.lines():
                print(f"[train] {line}", flush=True)
        return start.table, start, {}

    # --- state ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "nonfinite_run": self.nonfinite_run,
                "stream": self.stream.state_dict(), "run_id": self.run_id,
                "world_size": self.world, "forgetting": self.forgetting}

    def save(self) -> Path:
        tensors = dict(self.ema.state_dict()) if self.ema else {}
        tensors["rng.cpu"] = torch.get_rng_state()
        record = model_record(self.cfg.model, self.table, self.manifest, self.cfg.engine.forces, self.flops)
        if self.cfg.data.replay.folder:
            record["replay"] = {"fraction": self.cfg.data.replay.fraction, "parts": self.manifest.get("parts")}
        if self.forgetting:
            record["forgetting"] = self.forgetting
        return self.checkpoints.save(self.engine, self.step, self._state(), tensors, self.cfg,
                                     {MODEL_JSON: record})

    def _resume(self) -> None:
        tag = self.checkpoints.latest()
        if tag is None:
            if self.rank == 0:
                print(f"[train] --resume: no checkpoint in {self.checkpoints.folder}; starting at step 0")
            return
        state, tensors = self.checkpoints.load(self.engine, tag)
        self.step, self.skipped = state["step"], state["skipped"]
        self.nonfinite_run, self.run_id = state["nonfinite_run"], state["run_id"]
        self.forgetting = state.get("forgetting") or {}
        self.stream.load_state_dict(state["stream"])
        _load_ema(self.ema, tensors, self.checkpoints.folder / tag)
        torch.set_rng_state(tensors["rng.cpu"])
        if self.rank == 0:
            _truncate_log(self.out / "metrics.jsonl", self.step)
            print(f"[train] resumed from {self.checkpoints.folder / tag} at step {self.step}", flush=True)

    # --- the loop ----------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or pause at step ``stop_at`` with a checkpoint: for
        wall-time-limited jobs, continued by ``--resume``); returns the last logged metrics."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            clear_marker(self.out)  # an earlier job's: this one's crash must not read as a preemption
        self.run_id = self.tracker.start(to_dict(cfg), self._params(), run_id=self.run_id) or self.run_id
        self._t0 = time.perf_counter()
        self._t_loop, self._last_iteration = None, 0.0
        if self.rank == 0:
            print(f"[train] {cfg.model.family} model, {self.parameters:,} parameters, "
                  f"{self.world} rank(s), steps {self.step} -> {end} of {cfg.steps}", flush=True)
        if self.replay_stream is not None and "before" not in self.forgetting:
            self.forgetting["before"] = self.evaluate(self.replay_stream, "replay_before")
            self._log(self.forgetting["before"])
        batches = _epochs(self.stream)
        window = _Window(self.loss)
        last: dict = {}
        status = "FAILED"
        try:
            with Progress(cfg.steps, "train", unit="steps", enabled=self.progress) as bar:
                bar.update(self.step)
                while self.step < end:
                    t0, wait0 = time.perf_counter(), self.stream.stats()["wait_s"]
                    # whole iterations (step, logging, evaluation, save) for the time limit
                    self._last_iteration = t0 - self._t_loop if self._t_loop is not None else 0.0
                    self._t_loop = t0
                    done = self.train_step([next(batches) for _ in range(cfg.engine.grad_accum)])
                    window.add(*done, time.perf_counter() - t0, self.stream.stats()["wait_s"] - wait0)
                    bar.update(1, **window.short())
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        metrics = window.metrics(self.loss, self.fidelities, self.stream)
                        norm = self.engine.grad_norm()  # of the last step, before clipping
                        if norm is not None:
                            metrics["train/grad_norm"] = norm
                        last = self._log(metrics)
                        window = _Window(self.loss)
                    if self.stopping:  # every rank agreed in train_step; no evaluation now
                        status = "KILLED"  # resumable, like a pause
                        raise self._preempted()
                    if cfg.eval.folder and cfg.eval.every and self.step % cfg.eval.every == 0:
                        last.update(self._log(self.evaluate()))
                    if self.step == cfg.steps and self.replay_stream is not None:  # before the last save:
                        self.forgetting["after"] = self.evaluate(self.replay_stream, "replay_after")
                        last.update(self._log(self.forgetting["after"]))  # its model.json keeps it
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self._timed_save()
            if end == cfg.steps and cfg.eval.folder and not (cfg.eval.every and end % cfg.eval.every == 0):
                last.update(self._log(self.evaluate()))
            if not (cfg.checkpoint.every and end % cfg.checkpoint.every == 0):
                self.save()
            status = "FINISHED" if end == cfg.steps else "KILLED"  # KILLED: paused, resumable
            return last
        finally:
            self.stop.close()
            self.tracker.end(status)
            for stream in (self.stream, self.eval_stream, self.replay_stream):
                if stream is not None:
                    stream.close()

    def train_step(self, micro: list[dict]) -> tuple:
        """One optimizer step over this rank's ``micro`` batches; returns what the log sums."""
        counts = _sum(sum(self.loss.counts(b) for b in micro).to(self.device))
        lr = learning_rate(self.cfg, self.step - self.skipped)  # skipped steps do not advance it
        self.engine.set_lr(lr)
        self.engine.train(True)
        terms = torch.zeros(len(self.loss.parts), dtype=torch.float64, device=self.device)
        errors = torch.zeros(len(self.fidelities), self.loss.columns, dtype=torch.float64, device=self.device)
        bad = torch.zeros(1, device=self.device)  # one host sync per step, at the boundary
        for k, batch in enumerate(micro):
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            out = self._forward(batch)
            loss, parts = self.loss(out, batch, counts)
            bad += ~torch.isfinite(loss)
            self.engine.backward(loss)
            terms += parts
            errors += self.loss.errors(out, batch)
            # at the boundary every rank must agree on skipping (only there does it matter)
            finite = k < len(micro) - 1 or self._agree(bad)
            self.engine.step(skip=not finite)
        what = "loss" if not finite else "gradient norm"
        finite = finite and self.engine.stepped  # the norm is global: every rank agrees
        if finite:
            self.nonfinite_run = 0
            if self.ema is not None:
                self.ema.update()
        else:
            self.skipped += 1
            self.nonfinite_run += 1
            if self.rank == 0:
                print(f"[train] step {self.step}: non-finite {what}, step skipped "
                      f"({self.nonfinite_run} in a row, {self.skipped} in all)", flush=True)
            if self.nonfinite_run >= self.cfg.max_nonfinite:
                records = sorted(int(i) for b in micro for i in b[K.INDEX])
                raise TrainingError(
                    f"{self.nonfinite_run} non-finite steps in a row (last at step {self.step}: {what}; this "
                    f"rank's records {records[:20]}); the last complete checkpoint is kept. Lower "
                    "optim.lr, check those records, or raise max_nonfinite")
        self.step += 1
        return terms if finite else None, errors, sum(len(b[K.NUMBERS]) for b in micro), lr

    def _agree(self, bad: torch.Tensor) -> bool:
        """The step boundary's one collective: the non-finite losses of every rank (all
        ranks skip if any) and whether any rank wants to stop (a signal, the time limit)."""
        started = getattr(self, "_t_loop", None) or time.perf_counter()
        wanted = self.stop.wanted(max(getattr(self, "_last_iteration", 0.0), time.perf_counter() - started))
        flags = _sum(torch.cat([bad, bad.new_tensor([wanted])])).tolist()  # one host sync
        self.stopping = flags[1] > 0
        return flags[0] == 0

    def _timed_save(self) -> Path:
        t0 = time.perf_counter()
        path = self.save()
        self.stop.saved(time.perf_counter() - t0)
        return path

    def _preempted(self) -> Preempted:
        """Checkpoint this step and say why the run stops."""
        path = self.save()
        reason = self.stop.reason or "another rank was signalled"
        if self.rank == 0:
            write_marker(self.out, self.step, reason, path)
            print(f"[train] preempted at step {self.step} ({reason}): checkpoint {path}", flush=True)
        return Preempted(self.step, reason, path)

    def _forward(self, batch: dict) -> dict:
        """The engine's forward; inputs the model cannot represent stop the run, naming them."""
        try:
            return self.engine.forward(batch)
        except InputRangeError as err:
            records = sorted(int(i) for i in batch[K.INDEX])
            raise TrainingError(f"{err}; records {records[:20]} of the batch (global indices "
                                "in the shard folder)") from None

    @torch.no_grad()
    def evaluate(self, stream=None, prefix: str = "val") -> dict[str, float]:
        """Per-fidelity MAE on ``eval.folder`` (or ``stream``'s data) with the EMA weights when
        configured, all ranks; metrics named ``<prefix>/<fidelity>/...``."""
        stream = self.eval_stream if stream is None else stream
        total = torch.zeros(len(self.fidelities), self.loss.columns, dtype=torch.float64, device=self.device)
        use_ema = self.ema is not None and self.cfg.eval.ema
        self.engine.train(False)
        try:
            swapped = self.engine.using_weights(self.ema.shadow) if use_ema else contextlib.nullcontext()
            with swapped, torch.enable_grad():
                for batch in stream:
                    batch = {key: v.to(self.device) for key, v in batch.items()}
                    total += self.loss.errors(self._forward(batch), batch)
        finally:
            self.engine.train(True)
        return error_metrics(_sum(total), self.fidelities, prefix, self.loss.parts[len(PARTS):])

    # --- logging -------------------------------------------------------------------------------
    def _params(self) -> dict:
        return {"parameters": self.parameters, "world_size": self.world,
                "data.content_hash": self.manifest["content_hash"],
                "data.fidelities": ",".join(self.fidelities)}

    def _log(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics = dict(metrics, **system_metrics(self.device))
        if self.rank == 0:
            self.tracker.log_metrics(metrics, self.step)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "time": round(time.time(), 3),
                                    "elapsed_s": round(time.perf_counter() - self._t0, 3),
                                    "world_size": self.world, **metrics}) + "\n")
        return metrics


class _Window:
    """Train figures summed over the steps between two log lines (reduced when logged)."""

    def __init__(self, loss: Loss):
        self.terms = torch.zeros(len(loss.parts), dtype=torch.float64)
        self.errors = torch.zeros(loss.num_fidelities, loss.columns, dtype=torch.float64)
        self.good = self.atoms = 0
        self.seconds = self.waited = self.lr = 0.0

    def add(self, terms, errors, atoms, lr, seconds, waited) -> None:
        if terms is not None:
            self.good += 1
            self.terms += terms.cpu()
        self.errors += errors.cpu()
        self.atoms += atoms
        self.seconds += seconds
        self.waited += waited
        self.lr = lr

    def short(self) -> dict[str, str]:
        return {"rank0 atoms/s": f"{self.atoms / max(self.seconds, 1e-9):.0f}",
                "wait": f"{100 * self.waited / max(self.seconds, 1e-9):.0f}%"}

    def metrics(self, loss: Loss, fidelities: list[str], stream) -> dict[str, float]:
        packed = _sum(torch.cat([self.terms, self.errors.flatten(),
                                 torch.tensor([float(self.atoms), self.seconds, self.waited])]))
        n = len(loss.parts)
        terms, errors = packed[:n] / max(self.good, 1), packed[n:-3].view(self.errors.shape)
        atoms, seconds, waited = packed[-3:].tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        out = {"train/loss": float((terms * loss.weights).sum()), "lr": self.lr,
               "train/atoms_per_s": atoms / max(seconds / world, 1e-9),
               "train/data_wait_fraction": waited / max(seconds, 1e-9)}
        out.update({f"train/loss_{name}": float(v) for name, v in zip(loss.parts, terms)})
        out.update(error_metrics(errors, fidelities, "train", loss.parts[len(PARTS):]))
        for name, n in stream.sampler.atoms_seen.items():
            out[f"data/atoms_seen/{name}"] = float(n)
        return out


def _load_ema(ema: EMA | None, tensors: dict, path: Path) -> None:
    """Restore the EMA saved in checkpoint ``path``; a checkpoint whose EMA does not fit
    this run's (none saved, none wanted, another model) is a :class:`CheckpointError`."""
    saved = "ema.updates" in tensors
    if ema is None and saved:
        raise CheckpointError(f"{path}: the checkpoint has an EMA of the weights but this run has "
                              "ema_decay: 0; resume with the ema_decay it was saved with "
                              f"({path / 'config.yaml'}), or start a new run with init_from")
    if ema is not None:
        try:
            ema.load_state_dict(tensors)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (written by the run that died after its last save)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))
