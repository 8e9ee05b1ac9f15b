"""Key names of a Batch: a flat ``dict[str, torch.Tensor]``, defined once here.

A batch holds ``G`` structures (graphs) with ``N`` atoms and ``E`` directed edges in
total. Every consumer (models, loss, trainer) indexes batches with these constants, never
with string literals, so a rename happens in one place.

Edge convention (``data_pipeline.graph.neighbor_list``): edge ``e`` joins centre atom
``i = edge_index[0, e]`` to neighbour ``j = edge_index[1, e]``; its vector is
``positions[j] - positions[i] + cell_shifts[e] @ cell[batch[i]]``. Edges are sorted by
``i`` within a structure, and structures follow each other, so ``edge_index[0]`` is
sorted over the whole batch. Shifts are integers stored as floats so that the vector
stays differentiable in ``positions`` and ``cell`` (stress through a strain of the cell).

Targets a structure lacks are zero-filled and flagged False in the matching mask; the
loss multiplies by the mask, so a batch may mix energy-only, force-only and fully
labelled structures.
"""

# --- per atom -------------------------------------------------------------------------
POSITIONS = "positions"  # float [N, 3], Angstrom
NUMBERS = "numbers"  # int64 [N], atomic numbers
BATCH = "batch"  # int64 [N], graph index of each atom (sorted)
FORCES = "forces"  # float [N, 3], eV/Angstrom, target (zeros where FORCES_MASK is False)

# --- per edge ---------------------------------------------------------------------------
EDGE_INDEX = "edge_index"  # int64 [2, E], (centre i, neighbour j), global atom indices
CELL_SHIFTS = "cell_shifts"  # float [E, 3], integer image shifts S of each edge

# --- per graph --------------------------------------------------------------------------
CELL = "cell"  # float [G, 3, 3], rows are lattice vectors (zeros for molecules)
PBC = "pbc"  # bool [G, 3], periodic directions
N_ATOMS = "n_atoms"  # int64 [G], atoms per structure
N_EDGES = "n_edges"  # int64 [G], edges per structure
FIDELITY = "fidelity"  # int64 [G], index into the manifest's ``fidelities``
DATASET = "dataset"  # int64 [G], index into the manifest's ``datasets``
CHARGE = "charge"  # int64 [G], total charge (0 when unknown)
SPIN = "spin"  # int64 [G], spin multiplicity (0 when unknown)
INDEX = "index"  # int64 [G], global record index in the shard folder (provenance)
ENERGY = "energy"  # float64 [G], total energy, eV (always float64: 1e4 eV totals)
STRESS = "stress"  # float [G, 6], Voigt (xx, yy, zz, yz, xz, xy), eV/Angstrom^3, ASE sign

# --- masks: which targets each structure carries ----------------------------------------
ENERGY_MASK = "energy_mask"  # bool [G]
FORCES_MASK = "forces_mask"  # bool [N], per atom (True for every atom of a labelled graph)
STRESS_MASK = "stress_mask"  # bool [G]

#: every key a collated batch carries, in a stable order
ALL_KEYS = (
    POSITIONS, NUMBERS, BATCH, FORCES, EDGE_INDEX, CELL_SHIFTS, CELL, PBC, N_ATOMS,
    N_EDGES, FIDELITY, DATASET, CHARGE, SPIN, INDEX, ENERGY, STRESS, ENERGY_MASK,
    FORCES_MASK, STRESS_MASK,
)

# --- extra targets (record ``extras`` a model learns: ``models/properties.py``) -----------
# per-atom extras: float [N, *shape]; per-structure: float [G, *shape]; zeros where absent
EXTRA_PREFIX = "extras."


def extra(name: str) -> str:
    """Batch key of extra ``name``'s label (and the model's prediction of it)."""
    return EXTRA_PREFIX + name


def extra_mask(name: str) -> str:
    """Batch key of the bool ``[G]`` mask: which structures carry extra ``name``."""
    return EXTRA_PREFIX + name + ".mask"
