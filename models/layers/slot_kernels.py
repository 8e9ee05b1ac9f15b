"""Fused CPU kernels for :class:`~models.layers.conv.EdgeConv`: the contraction without
its padded ``[slots, 2 l1 + 1, paths, C]`` product tensors.

EdgeConv's neighbour sums are one sparse form in four operands,

    Phi(O, H, Y, W) = sum_{n, s in edges(n), e, c} coef_e O[n, col_e, c] H[j(s), m1_e, c] Y[s, m2_e] W[s, p_e, c]

with ``H [N, KH, C]`` node features (components), ``Y [E, M]`` edge harmonics,
``W [E, paths, C]`` edge weights, ``O [N, cols, C]`` the sums (rows in path order, as
``EdgeConv`` builds them), and one entry ``e`` per nonzero Clebsch-Gordan coefficient
(``sqrt(2 l3 + 1) C^{l1 l2 l3} / avg_neighbors``). The forward is ``dPhi/dO``; the gradient
of any of the four derivatives is another of them (``Phi`` is linear in each operand), so
:func:`contract` is differentiable to any order (forces, and a force loss's double
backward) from four kernels (``slot_conv.cpp``, C++ and OpenMP, compiled at first use
into a per-machine cache). Per slot they form a ``C``-long product at a time; the torch
path writes ``(2 l1 + 1) x paths`` of them per slot and channel, reads them back in a
``bmm`` and, in the backward, again in two multiplies and two sums (BENCHMARKS.md, "Models").

The kernels read edges in a compact layout (:func:`layout`): sorted by receiver, back to
back, so a batch that mixes molecules with bulk pays for its edges, not for its largest
neighbour count times its atoms as the padded slots do. Large graphs are processed in
blocks of receivers: ``Y``, ``W`` and ``O`` are block rows, ``H`` and its gradient whole, so the MACE layer can recompute a block's
radial weights in the backward instead of keeping ``[slots, paths x C]`` per layer
(``models/mace.py``): a force call's memory then grows by a few KiB per atom.

Used on CPU, in float32 and float64, outside ``torch.export``; elsewhere (GPU, bf16
autocast, export, no C++ compiler) EdgeConv's torch ops compute the same function.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("slot_conv.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
OPERANDS = ("O", "H", "Y", "W")
_KERNEL = {"O": "forward", "W": "grad_w", "Y": "grad_y", "H": "grad_h"}


def _cache_dir() -> Path:
    root = os.environ.get("MLIP_PRETRAIN_CACHE") or Path.home() / ".cache" / "mlip-pretrain"
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native runs only on its kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source, compiler flags and CPU kind, in
    ``$MLIP_PRETRAIN_CACHE/kernels``, default ``~/.cache/mlip-pretrain/kernels``; about 3 s),
    or None where they cannot be built (no C++ compiler: the torch path runs, with one
    warning). ``MLIP_PRETRAIN_KERNELS=torch`` turns them off."""
    if os.environ.get("MLIP_PRETRAIN_KERNELS", "").lower() == "torch":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("models: no C++ compiler found (set CXX): EdgeConv runs its torch ops, "
                      "slower on CPU and with more memory per atom", stacklevel=2)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"slot_conv-{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: the temporary folder
            path = Path(tempfile.gettempdir()) / "mlip-pretrain-kernels" / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
        # a unique name, then an atomic rename: ranks building at once never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            error = proc.stderr[-2000:] if proc.returncode != 0 else None
        except OSError as e:  # CXX names no program
            error = str(e)
        if error is not None:
            os.unlink(tmp)
            warnings.warn(f"models: building {SOURCE.name} with {compiler} failed, the MACE layers run "
                          f"their torch ops (slower on CPU, more memory per atom):\n{error}", stacklevel=2)
            return None
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    for name in [f"slot_{k}" for k in _KERNEL.values()] + ["product_forward", "product_grad",
                                                           "product_grad_entries"]:
        for suffix in ("f32", "f64"):
            getattr(lib, f"{name}_{suffix}").restype = None
    return lib


def available() -> bool:
    """Whether the fused kernels can run here."""
    return sys.platform != "win32" and library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """The fused kernels apply: CPU tensors of one dtype (float32 or float64), no autocast
    (its bf16 matmuls are the torch path's), no ``torch.export`` or ``torch.compile`` trace."""
    t = tensors[0]
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and all(x.dtype == t.dtype and x.device.type == "cpu" for x in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting()
            and available())


class Table(NamedTuple):
    """Nonzero coupling entries grouped by ``(path, m1)`` (``slot_conv.cpp``), and the sizes
    of the operands: ``kh`` rows of ``H``, ``m`` columns of ``Y``, ``paths``, ``cols`` rows of ``O``."""

    gp: torch.Tensor
    gm1: torch.Tensor
    gstart: torch.Tensor
    em2: torch.Tensor
    ecol: torch.Tensor
    coef: torch.Tensor  # float64; cast per call
    kh: int
    m: int
    paths: int
    cols: int


def table(paths: list[tuple[int, int, int]], lmax_in: int, lmax_sh: int,
          couplings: list[torch.Tensor]) -> Table:
    """The nonzero coupling entries per path: ``O`` rows in path order (each path's
    ``2 l3 + 1``), ``H`` rows and ``Y`` columns by global component. ``couplings[l1]`` is
    EdgeConv's ``[M, 2 l1 + 1, its paths, their columns]`` buffer, so both paths compute with
    the same constants (float32 numbers, as saved in a release)."""
    groups, entries, col = [], [], 0
    for l1, cg in enumerate(couplings):
        group = [(p, l3) for p, (a, _, l3) in enumerate(paths) if a == l1]
        gcol = 0
        for a, (p, l3) in enumerate(group):
            for i in range(2 * l1 + 1):
                block = cg[:, i, a, gcol:gcol + 2 * l3 + 1]  # [M, 2 l3 + 1]
                nz = [(k, col + m, float(block[k, m])) for k, m in block.nonzero().tolist()]
                if nz:
                    groups.append((p, l1 * l1 + i, len(entries)))
                    entries += nz
            gcol += 2 * l3 + 1
            col += 2 * l3 + 1
    long = functools.partial(torch.tensor, dtype=torch.long)
    return Table(long([g[0] for g in groups]), long([g[1] for g in groups]),
                 long([g[2] for g in groups] + [len(entries)]), long([e[0] for e in entries]),
                 long([e[1] for e in entries]), torch.tensor([e[2] for e in entries], dtype=torch.float64),
                 (lmax_in + 1) ** 2, (lmax_sh + 1) ** 2, len(paths), col)


class Plan(NamedTuple):
    """One block of receivers ``[first, last)`` of the compact layout: their edges are rows
    ``lo`` to ``hi`` of ``Y`` and ``W``, back to back by receiver (no padding)."""

    first: int
    last: int
    lo: int
    hi: int
    start: torch.Tensor
    """``long [last - first + 1]``: receiver ``n``'s rows are ``start[n]:start[n + 1]`` (from ``lo``)."""
    sender: torch.Tensor
    """``long [hi - lo]``: each row's sending atom (global)."""
    recv: torch.Tensor
    """``long [hi - lo]``: each row's receiver (in the block)."""
    order: torch.Tensor
    """``long [hi - lo]``: the block's rows sorted by sender."""
    ptr: torch.Tensor
    """``long [N + 1]``: sender ``j``'s rows are ``order[ptr[j]:ptr[j + 1]]``."""
    nodes: int


@torch.no_grad()
def layout(i: torch.Tensor, j: torch.Tensor, n_nodes: int, block_rows: int):
    """Edges ``j -> i`` in the compact layout of the fused kernels: sorted by receiver (stable),
    in blocks of whole receivers of at most ``block_rows`` edges (one receiver at least).
    Returns ``(order, counts, plans)``: the edge in each row, edges per receiver, the blocks."""
    counts = torch.zeros(n_nodes, dtype=torch.long).index_add_(0, i, torch.ones_like(i))
    order = torch.argsort(i, stable=True)
    sender = j[order]
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(counts, 0)
    plans, first = [], 0
    while first < n_nodes or not plans:
        # the most receivers whose rows fit in block_rows, at least one
        last = int(torch.searchsorted(rowptr, rowptr[first] + block_rows, right=True)) - 1
        last = min(n_nodes, max(last, first + 1))
        lo, hi = int(rowptr[first]), int(rowptr[last]) if n_nodes else 0
        s = sender[lo:hi].contiguous()
        recv = torch.arange(last - first).repeat_interleave(counts[first:last])
        ptr = torch.zeros(n_nodes + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(torch.bincount(s, minlength=n_nodes), 0)
        plans.append(Plan(first, last, lo, hi, (rowptr[first:last + 1] - lo).contiguous(), s, recv,
                          torch.argsort(s, stable=True), ptr, n_nodes))
        first = last
    return order, counts, plans


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _run(target: str, p: Plan, t: Table, ops: dict[str, torch.Tensor]) -> torch.Tensor:
    """One kernel: the operand ``target`` from the other three (one dtype)."""
    o, h, y, w = (ops[k].contiguous() if k in ops else None for k in OPERANDS)
    ref = next(iter(ops.values()))
    dtype, nc, rows, c = ref.dtype, p.last - p.first, p.hi - p.lo, (h if h is not None else w).shape[-1]
    shape = {"O": (nc, t.cols, c), "H": (p.nodes, t.kh, c), "Y": (rows, t.m), "W": (rows, t.paths, c)}[target]
    out = (torch.zeros if target == "H" else torch.empty)(shape, dtype=dtype)  # H: accumulated
    o, h, y, w = (out if k == target else v for k, v in zip(OPERANDS, (o, h, y, w)))
    i64, coef = ctypes.c_int64, t.coef.to(dtype)
    tab = [i64(t.gp.numel()), _ptr(t.gp), _ptr(t.gm1), _ptr(t.gstart), _ptr(t.em2), _ptr(t.ecol), _ptr(coef)]
    fn = getattr(library(), f"slot_{_KERNEL[target]}_{'f32' if dtype == torch.float32 else 'f64'}")
    head = [i64(nc), _ptr(p.start), _ptr(p.sender)]
    args = {"O": [*head, _ptr(y), i64(t.m), _ptr(w), i64(t.paths), _ptr(h), i64(t.kh), _ptr(o), i64(t.cols)],
            "W": [*head, _ptr(y), i64(t.m), _ptr(h), i64(t.kh), _ptr(o), i64(t.cols), _ptr(w), i64(t.paths)],
            "Y": [*head, _ptr(w), i64(t.paths), _ptr(h), i64(t.kh), _ptr(o), i64(t.cols), _ptr(y), i64(t.m)],
            "H": [i64(p.nodes), _ptr(p.recv), _ptr(p.order), _ptr(p.ptr), _ptr(y), i64(t.m), _ptr(w),
                  i64(t.paths), _ptr(o), i64(t.cols), _ptr(h), i64(t.kh)]}[target]
    fn(*args, i64(c), *tab, ctypes.c_int(torch.get_num_threads()))
    return out


class _Contract(torch.autograd.Function):
    """``target`` operand of ``Phi`` from the other three; its gradients are ``_Contract``s."""

    @staticmethod
    def forward(ctx, target: str, p: Plan, t: Table, *given: torch.Tensor) -> torch.Tensor:
        ctx.target, ctx.plan, ctx.table = target, p, t
        ctx.save_for_backward(*given)
        return _run(target, p, t, dict(zip(_others(target), given)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        given = dict(zip(_others(ctx.target), ctx.saved_tensors))
        grads = []
        for name, needed in zip(_others(ctx.target), ctx.needs_input_grad[3:]):
            # d<grad, dPhi/dtarget>/dname = dPhi/dname with the target operand set to grad
            ops = {k: v for k, v in given.items() if k != name} | {ctx.target: grad}
            grads.append(contract(name, ctx.plan, ctx.table, ops) if needed else None)
        return (None, None, None, *grads)


def _others(target: str, operands: tuple[str, ...] = OPERANDS) -> tuple[str, ...]:
    return tuple(k for k in operands if k != target)


def contract(target: str, p: Plan, t: Table, ops: dict[str, torch.Tensor]) -> torch.Tensor:
    """The operand ``target`` (``O``, ``H``, ``Y`` or ``W``) of block ``p`` from the other
    three in ``ops``; differentiable in each, to any order."""
    return _Contract.apply(target, p, t, *(ops[k] for k in _others(target)))


# Channel-wise products (models/mace.py ChannelProduct): per atom and channel,
#   Psi(O, X, Y, W) = sum_{n, e, c} coef_e O[n, k3_e, c] X[n, k1_e, c] Y[n, k2_e, c] W[q_e, c]
# with O [N, K3, C], X [N, K1, C], Y [N, K2, C] (components) and the path weights W [paths, C];
# the same scheme as Phi: one kernel per operand, each other's gradient.
PRODUCT_OPERANDS = ("O", "X", "Y", "W")


class ProductTable(NamedTuple):
    """Nonzero ``coef_e`` grouped by ``(k1, k2)``; entry ``e``: ``O`` row ``ek3``, path ``eq``."""

    gk1: torch.Tensor
    gk2: torch.Tensor
    gstart: torch.Tensor
    ek3: torch.Tensor
    eq: torch.Tensor
    coef: torch.Tensor  # float64
    k1: int
    k2: int
    k3: int
    paths: int


def product_table(cg: torch.Tensor) -> ProductTable:
    """From ChannelProduct's dense coupling ``cg [paths, K1, K2, K3]`` (its buffer's numbers)."""
    k1, k2, k3 = cg.shape[1:]
    q, a, b, m = (x.tolist() for x in cg.nonzero(as_tuple=True))
    values = cg[cg != 0]
    entries = sorted(zip(a, b, m, q, values.tolist()))  # by (k1, k2): the kernels' groups
    groups = {}
    for e, (x, y, *_) in enumerate(entries):
        groups.setdefault((x, y), e)
    long = functools.partial(torch.tensor, dtype=torch.long)
    return ProductTable(long([g[0] for g in groups]), long([g[1] for g in groups]),
                        long([*groups.values(), len(entries)]), long([e[2] for e in entries]),
                        long([e[3] for e in entries]), torch.tensor([e[4] for e in entries], dtype=torch.float64),
                        k1, k2, k3, cg.shape[0])


def _run_product(target: str, t: ProductTable, ops: dict[str, torch.Tensor]) -> torch.Tensor:
    o, x, y, w = (ops[k].contiguous() if k in ops else None for k in PRODUCT_OPERANDS)
    ref = next(iter(ops.values()))
    dtype, n = ref.dtype, (o if o is not None else x).shape[0]
    c = ref.shape[-1]
    coef = t.coef.to(dtype)
    i64 = ctypes.c_int64
    tab = [i64(t.gk1.numel()), _ptr(t.gk1), _ptr(t.gk2), _ptr(t.gstart), _ptr(t.ek3),
           ctypes.c_int(torch.get_num_threads())]
    suffix = "f32" if dtype == torch.float32 else "f64"
    lib = library()
    if target == "W":
        ge = torch.empty(len(t.coef), c, dtype=dtype)
        getattr(lib, f"product_grad_entries_{suffix}")(
            i64(n), _ptr(o), i64(t.k3), _ptr(x), i64(t.k1), _ptr(y), i64(t.k2), _ptr(ge), i64(len(t.coef)),
            i64(c), *tab)
        return torch.zeros(t.paths, c, dtype=dtype).index_add_(0, t.eq, ge * coef[:, None])
    cw = (coef[:, None] * w[t.eq]).contiguous()  # [entries, C]
    if target == "O":
        out = torch.empty(n, t.k3, c, dtype=dtype)
        getattr(lib, f"product_forward_{suffix}")(
            i64(n), _ptr(x), i64(t.k1), _ptr(y), i64(t.k2), _ptr(cw), _ptr(out), i64(t.k3), i64(c), *tab)
        return out
    first = target == "X"
    other, k_other, k_out = (y, t.k2, t.k1) if first else (x, t.k1, t.k2)
    out = torch.empty(n, k_out, c, dtype=dtype)
    getattr(lib, f"product_grad_{suffix}")(
        i64(n), _ptr(o), i64(t.k3), _ptr(other), i64(k_other), _ptr(out), i64(k_out), ctypes.c_int(first),
        _ptr(cw), i64(c), *tab)
    return out


class _Product(torch.autograd.Function):
    """``target`` operand of ``Psi`` from the other three; its gradients are ``_Product``s."""

    @staticmethod
    def forward(ctx, target: str, t: ProductTable, *given: torch.Tensor) -> torch.Tensor:
        ctx.target, ctx.table = target, t
        ctx.save_for_backward(*given)
        return _run_product(target, t, dict(zip(_others(target, PRODUCT_OPERANDS), given)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        names = _others(ctx.target, PRODUCT_OPERANDS)
        given = dict(zip(names, ctx.saved_tensors))
        grads = []
        for name, needed in zip(names, ctx.needs_input_grad[2:]):
            ops = {k: v for k, v in given.items() if k != name} | {ctx.target: grad}
            grads.append(product(name, ctx.table, ops) if needed else None)
        return (None, None, *grads)


def product(target: str, t: ProductTable, ops: dict[str, torch.Tensor]) -> torch.Tensor:
    """The operand ``target`` (``O``, ``X``, ``Y`` or ``W``) of ``Psi`` from the other three."""
    return _Product.apply(target, t, *(ops[k] for k in _others(target, PRODUCT_OPERANDS)))
