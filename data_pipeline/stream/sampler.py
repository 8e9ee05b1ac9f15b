"""Multi-fidelity, atom-budget, rank-aware batch sampler with exact mid-epoch resume.

The plan of an epoch is a pure function of (seed, epoch, data, config), computed by every
rank from shard metadata alone (atom counts and group ids; no record is decoded), so ranks
agree on it without communicating:

1. **Mix.** Each dataset x fidelity group ``g`` gets a quota of ``samples_per_epoch * p_g``
   structures (largest-remainder rounding), ``p_g`` proportional to ``size_g ** (1/T)``
   (``T = 1`` natural proportions, large ``T`` uniform over groups) or to explicit
   weights. A group's quota is filled from fresh permutations of its members (a small
   group is cycled, a large one subsampled), then all picks are shuffled together.
2. **Pack.** The shuffled list is cut, in order, into batches whose atom count (and edge
   count, when per-record edge counts and ``max_edges`` are given) stays within budget.
   A structure larger than the budget gets a batch of its own or raises, by config.

With ``subset_fraction < 1`` only a seeded, nested subset of each group is ever drawn
(:func:`subset_mask`): the data-size axis of a scaling study, without copying shards.
3. **Deal.** Global batch ``k`` goes to rank ``k % world_size`` at step ``k // world_size``.
   When the batch count is not a multiple of the world size, the last multi-structure
   batches are split in two until it is, so every rank runs the same number of steps and
   every picked structure is seen exactly once.

**Parts** (replay, :mod:`~data_pipeline.stream.union`): when the records come from several
shard folders with a share each, every epoch's structures are first split between the
parts by their shares (largest remainder: part ``k`` gets ``round(total * share_k)``
picks), then each part's among its groups as above (part 0 by the config's weights or
temperature, the others by the temperature rule). An epoch then holds
``len(part 0) / share_0`` structures unless ``samples_per_epoch`` says otherwise: one pass
over the new data, on average, with the replayed share on top.

The state is (seed, epoch, offset, step): ``state_dict()`` after ``k`` consumed steps and
``load_state_dict()`` on a fresh sampler give exactly the batches the uninterrupted run
would have seen next.

**Another world size** (elastic resume): the records of the epoch's mixed order that the
saved plan had dealt (its first ``step * W`` global batches) are done; the rest of the
order, from that ``offset``, is packed and dealt again for the new world size ``W'``. So
the interrupted epoch still visits each of its picks exactly once, and the next epochs
are planned for ``W'`` as usual. The remainder's batches differ from the ones ``W`` would
have cut (packing starts at the offset, and the tail split depends on ``W'``).

``atoms_seen`` counts atoms per fidelity consumed by *all* ranks,
derived from the plan, so no all-reduce is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Iterator, Literal

import numpy as np

from common.config import ConfigError
from common.errors import UserError
from data_pipeline.stream.packing import pack, split_to_multiple


@dataclasses.dataclass
class SamplerConfig:
    """How batches are mixed, packed and dealt to ranks."""

    max_atoms: int = 512
    """Atom budget of one batch (one rank, one micro-step)."""
    max_edges: int | None = None
    """Edge budget of one batch; needs per-record edge counts for the cutoff in use."""
    temperature: float = 1.0
    """Group weights proportional to size**(1/T): 1 natural, large T uniform over groups."""
    weights: dict[str, float] | None = None
    """Explicit group weights instead of the temperature; keys are ``dataset/fidelity``,
    a dataset name or a fidelity name, and every group must be matched by exactly one."""
    size_by: Literal["structures", "atoms"] = "structures"
    """What a group's size counts for the temperature rule."""
    samples_per_epoch: int | None = None
    """Structures drawn per epoch over all ranks; null: the number of records."""
    shuffle: bool = True
    """False: every record exactly once in index order, no mixing (evaluation)."""
    oversize: Literal["own_batch", "error"] = "own_batch"
    """A structure above a budget: a batch of its own, or an error at start-up."""
    seed: int = 0
    """Seed of the epoch plans; epoch e uses (seed, e)."""
    subset_fraction: float = 1.0
    """Train on this fraction of each dataset x fidelity group (scaling studies: data
    size without copying shards); the subset is fixed by ``subset_seed`` alone."""
    subset_seed: int = 0
    """Seed of the subset; a smaller fraction with the same seed is a subset of a larger one."""

    def validate(self) -> None:
        """Reject budgets and rates that cannot work."""
        if self.max_atoms < 1:
            raise ConfigError(f"max_atoms: got {self.max_atoms}, expected a positive integer")
        if self.max_edges is not None and self.max_edges < 1:
            raise ConfigError(f"max_edges: got {self.max_edges}, expected a positive integer or null")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: got {self.temperature}, expected > 0")
        if not 0 < self.subset_fraction <= 1:
            raise ConfigError(f"subset_fraction: got {self.subset_fraction}, expected within (0, 1]")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch: got {self.samples_per_epoch}, expected >= 1 or null")
        for key, w in (self.weights or {}).items():
            if not (w >= 0 and np.isfinite(w)):
                raise ConfigError(f"weights.{key}: got {w}, expected a finite weight >= 0")


class SamplerError(UserError, ValueError):
    """The data cannot be sampled as configured (oversize structure, bad weights, resume)."""


def group_weights(cfg: SamplerConfig, groups: list[tuple[str, str]], sizes: np.ndarray) -> np.ndarray:
    """Normalised probability of each ``(dataset, fidelity)`` group."""
    if cfg.weights is None:
        raw = np.where(sizes > 0, sizes.astype(np.float64) ** (1.0 / cfg.temperature), 0.0)
    else:
        raw = np.zeros(len(groups))
        for g, (dataset, fidelity) in enumerate(groups):
            name = f"{dataset}/{fidelity}"
            hits = [k for k in cfg.weights if k in (name, dataset, fidelity)]
            if len(hits) != 1:
                how = "no key matches" if not hits else f"keys {hits} all match"
                raise SamplerError(f"sampler.weights: {how} group {name!r}; give one weight per "
                                   f"group, keyed by dataset/fidelity, dataset or fidelity")
            raw[g] = cfg.weights[hits[0]] if sizes[g] > 0 else 0.0
    if raw.sum() <= 0:
        raise SamplerError("sampler: every group has weight 0 or no records")
    return raw / raw.sum()


def subset_mask(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``bool [n_records]``: the seeded ``fraction`` of each group's records (at least one).

    Each group's members are ranked by one permutation drawn from ``(seed, group id)``
    and the first ``ceil(fraction * size)`` are kept, so subsets are nested in the
    fraction and do not depend on the other groups' sizes."""
    groups = np.asarray(groups, np.int64)
    keep = np.zeros(len(groups), dtype=bool)
    if fraction >= 1:
        keep[:] = True
        return keep
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        rank = np.random.default_rng([seed, int(g)]).permutation(len(members))
        keep[members[rank < max(1, int(np.ceil(fraction * len(members))))]] = True
    return keep


def _quotas(total: int, p: np.ndarray) -> np.ndarray:
    """Integer quotas summing to ``total``, proportional to ``p`` (largest remainder)."""
    exact = total * p
    q = np.floor(exact).astype(np.int64)
    rest = total - int(q.sum())
    if rest:
        q[np.argsort(-(exact - q), kind="stable")[:rest]] += 1
    return q


class AtomBudgetSampler:
    """Yields this rank's batches (arrays of global record indices) for the current epoch.

    Args:
        n_atoms: ``int [n_records]`` atom count of every record.
        groups: ``int [n_records]`` group id of every record, indexing ``group_keys``.
        group_keys: ``(dataset, fidelity)`` of each group.
        cfg: the sampler config.
        rank, world_size: this process's place among the data-parallel ranks.
        n_edges: ``int [n_records]`` edge counts; required when ``cfg.max_edges`` is set.
        parts, shares: ``int [n_records]`` part (shard folder) of every record and each
            part's share of an epoch's structures (summing to 1); None: one part.

    Iterating yields batches from the saved position to the end of the epoch, advancing
    the position as each batch is handed out, then moves to the next epoch.
    """

    def __init__(self, n_atoms: np.ndarray, groups: np.ndarray, group_keys: list[tuple[str, str]],
                 cfg: SamplerConfig, rank: int = 0, world_size: int = 1,
                 n_edges: np.ndarray | None = None, parts: np.ndarray | None = None,
                 shares: list[float] | None = None):
        if not 0 <= rank < world_size:
            raise SamplerError(f"sampler: rank {rank} outside world size {world_size}")
        if cfg.max_edges is not None and n_edges is None:
            raise SamplerError("sampler.max_edges is set but no per-record edge counts were given")
        self.n_atoms = np.asarray(n_atoms, np.int64)
        self.groups = np.asarray(groups, np.int64)
        self.group_keys = [(str(d), str(f)) for d, f in group_keys]
        self.group_names = [f"{d}/{f}" for d, f in self.group_keys]
        self.n_edges = None if n_edges is None else np.asarray(n_edges, np.int64)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.epoch, self.step = 0, 0
        self.offset = 0  # picks of this epoch's order done before the current plan (elastic resume)
        self.fidelity_names = sorted({f for _, f in self.group_keys})
        self._fid_of_group = np.array([self.fidelity_names.index(f) for _, f in self.group_keys],
                                      dtype=np.int64)
        self.atoms_seen = {f: 0 for f in self.fidelity_names}
        self.padded_batches = 0
        self.active = subset_mask(self.groups, cfg.subset_fraction, cfg.subset_seed)
        self._members = [np.flatnonzero((self.groups == g) & self.active) for g in range(len(self.group_keys))]
        sizes = np.array([len(m) if cfg.size_by == "structures" else int(self.n_atoms[m].sum())
                          for m in self._members], dtype=np.int64)
        self.shares = None if shares is None else [float(x) for x in shares]
        self._part_of_group = np.zeros(len(self.group_keys), np.int64)
        if self.shares is None:
            self.probabilities = group_weights(cfg, self.group_keys, sizes)
        else:
            self._part_of_group = self._group_parts(parts)
            self.probabilities = self._part_probabilities(sizes)
        self._check_oversize()
        self._plan_key = None
        self._order = self._bounds = None

    def _group_parts(self, parts) -> np.ndarray:
        """Each group's part (a group never spans two parts)."""
        if parts is None or len(parts) != len(self.groups):
            raise SamplerError("sampler: shares need the part of every record")
        parts = np.asarray(parts, np.int64)
        of_group = np.zeros(len(self.group_keys), np.int64)
        for g in range(len(self.group_keys)):
            found = np.unique(parts[self.groups == g])
            if len(found) > 1:
                raise SamplerError(f"sampler: group {self.group_names[g]!r} has records in parts "
                                   f"{found.tolist()}; give each part its own groups")
            of_group[g] = found[0] if len(found) else 0
        if len(self.shares) <= int(parts.max(initial=0)) or abs(sum(self.shares) - 1) > 1e-9 or \
                min(self.shares) < 0:
            raise SamplerError(f"sampler: part shares {self.shares} must be >= 0, one per part, summing to 1")
        return of_group

    def _part_probabilities(self, sizes: np.ndarray) -> np.ndarray:
        """Group probabilities: each part's share, split among its groups (part 0 by the
        config's rule, the others by the temperature rule)."""
        p = np.zeros(len(self.group_keys))
        plain = dataclasses.replace(self.cfg, weights=None)
        for k, share in enumerate(self.shares):
            mine = np.flatnonzero(self._part_of_group == k)
            if share == 0 or not len(mine) or sizes[mine].sum() == 0:
                continue
            rule = self.cfg if k == 0 else plain
            p[mine] = share * group_weights(rule, [self.group_keys[g] for g in mine], sizes[mine])
        return p / p.sum()

    @classmethod
    def from_dataset(cls, dataset, cfg: SamplerConfig, rank: int = 0, world_size: int = 1,
                     n_edges: np.ndarray | None = None, shares: list[float] | None = None) -> "AtomBudgetSampler":
        """Sampler over a :class:`~data_pipeline.stream.dataset.ShardedDataset` (metadata only),
        or a :class:`~data_pipeline.stream.union.DatasetUnion` with each part's ``shares``."""
        fids, sets = dataset.manifest["fidelities"], dataset.manifest["datasets"]
        key = dataset.dataset_ids * len(fids) + dataset.fidelity_ids
        parts = dataset.part_ids if shares is not None else None
        if parts is not None:
            key = key + parts * len(fids) * len(sets)
        present, groups = np.unique(key, return_inverse=True)
        cell = len(fids) * len(sets)
        keys = [(sets[(k % cell) // len(fids)], fids[k % len(fids)]) for k in present]
        return cls(dataset.n_atoms, groups, keys, cfg, rank, world_size, n_edges, parts, shares)

    def _check_oversize(self) -> None:
        over = (self.n_atoms > self.cfg.max_atoms) & self.active
        if self.n_edges is not None and self.cfg.max_edges is not None:
            over |= self.n_edges > self.cfg.max_edges
        if over.any() and self.cfg.oversize == "error":
            i = int(np.flatnonzero(over)[0])
            edges = "" if self.n_edges is None else f", {self.n_edges[i]} edges"
            raise SamplerError(
                f"sampler: {int(over.sum())} record(s) exceed the batch budget (max_atoms="
                f"{self.cfg.max_atoms}, max_edges={self.cfg.max_edges}), first record {i} with "
                f"{self.n_atoms[i]} atoms{edges}; raise the budget, drop them with "
                f"validation.max_atoms at build time, or set sampler.oversize=own_batch")

    # --- the plan ---------------------------------------------------------------------
    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) of the current epoch from ``offset``: batch k is
        ``order[bounds[k]:bounds[k+1]]``."""
        if self._plan_key != (self.epoch, self.offset):
            order = self._epoch_order(self.epoch)[self.offset:]
            self._order, self._bounds = order, self._pack(order, self.world_size)
            self._plan_key = (self.epoch, self.offset)
        return self._order, self._bounds

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Every pick of ``epoch``, in the order they are packed."""
        if not self.cfg.shuffle:
            return np.flatnonzero(self.active).astype(np.int64)
        return self._mixed_order(np.random.default_rng([self.cfg.seed, epoch]))

    def _pack(self, order: np.ndarray, world: int) -> np.ndarray:
        edges = None if self.n_edges is None else self.n_edges[order]
        bounds = pack(self.n_atoms[order], self.cfg.max_atoms, edges, self.cfg.max_edges)
        return split_to_multiple(bounds, world)

    def _group_quotas(self) -> np.ndarray:
        """Structures each group gives an epoch (parts first, then groups within a part)."""
        if self.shares is None:
            return _quotas(self.cfg.samples_per_epoch or int(self.active.sum()), self.probabilities)
        first = self.active & np.isin(self.groups, np.flatnonzero(self._part_of_group == 0))
        total = self.cfg.samples_per_epoch or int(np.ceil(first.sum() / self.shares[0] - 1e-9))
        quotas = np.zeros(len(self.group_keys), np.int64)
        for k, n in enumerate(_quotas(total, np.asarray(self.shares))):
            mine = np.flatnonzero(self._part_of_group == k)
            p = self.probabilities[mine]
            if n and p.sum() > 0:
                quotas[mine] = _quotas(int(n), p / p.sum())
        return quotas

    def _mixed_order(self, rng: np.random.Generator) -> np.ndarray:
        picks = []
        for members, quota in zip(self._members, self._group_quotas()):
            if quota == 0:
                continue
            laps = -(-int(quota) // len(members))
            picks.append(np.concatenate([rng.permutation(members) for _ in range(laps)])[:quota])
        order = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        rng.shuffle(order)
        return order

    @property
    def distinct_atoms(self) -> dict[str, int]:
        """Atoms per fidelity of the records this sampler can draw (the subset): D of a
        scaling study."""
        per_fid = np.bincount(self._fid_of_group[self.groups[self.active]],
                              weights=self.n_atoms[self.active], minlength=len(self.fidelity_names))
        return {name: int(per_fid[f]) for f, name in enumerate(self.fidelity_names)}

    @property
    def steps_per_epoch(self) -> int:
        """Batches each rank gets this epoch (the same on every rank)."""
        _, bounds = self._plan()
        return -(-(len(bounds) - 1) // self.world_size)

    def global_batch(self, k: int) -> np.ndarray:
        """Record indices of global batch ``k`` of this epoch (a padded slot repeats batch
        ``k - n``: only when every batch is a single structure and they do not divide)."""
        order, bounds = self._plan()
        n = len(bounds) - 1
        k = k % n if n else 0
        return order[bounds[k]:bounds[k + 1]]

    def batch(self, step: int, rank: int | None = None) -> np.ndarray:
        """Record indices of ``rank``'s batch (default: this rank) at ``step`` of this epoch."""
        return self.global_batch(step * self.world_size + (self.rank if rank is None else rank))

    # --- iteration and state ----------------------------------------------------------
    def __iter__(self) -> Iterator[np.ndarray]:
        while self.step < self.steps_per_epoch:
            indices = self.batch(self.step)
            self.advance()
            yield indices
        self.set_epoch(self.epoch + 1)

    def advance(self) -> None:
        """Mark the current step consumed (by every rank) and count its atoms per fidelity.

        The step's global batches ``k0 .. k1 - 1`` are one slice of the epoch's order
        (plus, for padded slots, a slice from its start), so this is one bincount over
        the step's records: no loop over the ranks.
        """
        order, bounds = self._plan()
        n = len(bounds) - 1
        k0, k1 = self.step * self.world_size, (self.step + 1) * self.world_size
        idx = order[bounds[min(k0, n)]:bounds[min(k1, n)]]
        padded = max(0, k1 - max(k0, n))
        if padded and n:  # padded slot k repeats batch k % n: whole laps, then a prefix
            laps, rest = divmod(padded, n)
            start = max(k0, n) % n
            extra = [order[bounds[start]:bounds[min(start + rest, n)]]]
            if start + rest > n:
                extra.append(order[:bounds[start + rest - n]])
            idx = np.concatenate([idx, *([order[:bounds[n]]] * laps), *extra])
        self.padded_batches += padded
        per_fid = np.bincount(self._fid_of_group[self.groups[idx]], weights=self.n_atoms[idx],
                              minlength=len(self.fidelity_names))
        for f, name in enumerate(self.fidelity_names):
            self.atoms_seen[name] += int(per_fid[f])
        self.step += 1

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step."""
        self.epoch, self.step, self.offset = int(epoch), 0, 0

    def fingerprint(self) -> str:
        """Hash of what the plans depend on: records, groups and the config (computed once:
        they are fixed at construction, and hashing 1e8 records takes about a second)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        cfg = dataclasses.asdict(self.cfg)
        if cfg["subset_fraction"] >= 1:  # the whole data: the hash of states saved before subsets existed
            del cfg["subset_fraction"], cfg["subset_seed"]
        what = [cfg, self.group_keys]
        if self.shares is not None:  # replay: the parts and their shares shape every plan
            what += [self.shares, self._part_of_group.tolist()]
        h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for arr in (self.n_atoms, self.groups, self.n_edges):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: position, counters and a fingerprint."""
        return {"epoch": self.epoch, "step": self.step, "offset": self.offset,
                "world_size": self.world_size,
                "atoms_seen": dict(self.atoms_seen), "padded_batches": self.padded_batches,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses other data or another config. Saved at another
        world size, the rest of the epoch is re-planned for this one (module docstring)."""
        if state["fingerprint"] != self.fingerprint():
            raise SamplerError("sampler state was saved for other data or another sampler config "
                               "(fingerprint mismatch); resume with the same shards and config")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.offset = int(state.get("offset", 0))
        saved_world = int(state["world_size"])
        if saved_world != self.world_size:
            order = self._epoch_order(self.epoch)
            bounds = self._pack(order[self.offset:], saved_world)
            self.offset += int(bounds[min(self.step * saved_world, len(bounds) - 1)])
            self.step = 0
            if self.offset >= len(order):  # the saved plan had dealt the whole epoch
                self.set_epoch(self.epoch + 1)
        self.atoms_seen = {f: int(state["atoms_seen"].get(f, 0)) for f in self.fidelity_names}
        self.padded_batches = int(state["padded_batches"])
