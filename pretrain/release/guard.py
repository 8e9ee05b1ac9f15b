"""Watch a molecular-dynamics run's force uncertainty: flag or stop it past a threshold.

Example::

    from pretrain.release import MLIPCalculator, UncertaintyGuard

    atoms.calc = MLIPCalculator.from_release(DIR, fidelity="PBE")
    dyn = VelocityVerlet(atoms, 1 * units.fs)
    guard = UncertaintyGuard(atoms, threshold=0.5, dyn=dyn)      # eV/A
    dyn.attach(guard, interval=1)
    dyn.run(10000)       # raises UncertaintyExceeded at the first step past 0.5 eV/A

The guard reads ``forces_uncertainty`` the calculator computed with the step's forces
(no extra model call). ``action="flag"`` records every crossing in :attr:`events` (and
prints it) and lets the run go on.
"""

from __future__ import annotations

import numpy as np


class UncertaintyExceeded(RuntimeError):
    """An atom's force uncertainty passed the guard's threshold; the message names the
    step, the atom and the value."""


class UncertaintyGuard:
    """An ASE dynamics observer on ``atoms`` (whose calculator gives ``forces_uncertainty``).

    Args:
        atoms: the simulated atoms.
        threshold: eV/A, one standard deviation per force component.
        action: ``stop`` (raise :class:`UncertaintyExceeded`) or ``flag`` (record, go on).
        dyn: the dynamics object, for the step number (else the guard counts its calls).
    """

    def __init__(self, atoms, threshold: float, action: str = "stop", dyn=None):
        if action not in ("stop", "flag"):
            raise ValueError(f"action: got {action!r}, expected stop or flag")
        if not threshold > 0:
            raise ValueError(f"threshold: got {threshold}, expected > 0 (eV/A)")
        self.atoms, self.threshold, self.action, self.dyn = atoms, float(threshold), action, dyn
        self.calls = 0
        self.events: list[dict] = []
        self.max_seen = 0.0

    def __call__(self) -> None:
        step = self.dyn.nsteps if self.dyn is not None else self.calls
        self.calls += 1
        calc = self.atoms.calc
        sigma = calc.results.get("forces_uncertainty") if calc is not None else None
        if sigma is None or len(sigma) != len(self.atoms):
            sigma = calc.get_property("forces_uncertainty", self.atoms)  # raises if the model has none
        worst = int(np.argmax(sigma))
        value = float(sigma[worst])
        self.max_seen = max(self.max_seen, value)
        if value <= self.threshold:
            return
        event = {"step": int(step), "atom": worst, "element": self.atoms[worst].symbol, "sigma": value,
                 "atoms_over": int((np.asarray(sigma) > self.threshold).sum())}
        self.events.append(event)
        text = (f"step {step}: atom {worst} ({event['element']}) has force uncertainty {value:.3f} eV/A, "
                f"above the threshold {self.threshold:.3f} eV/A ({event['atoms_over']} atom(s) over)")
        if self.action == "stop":
            raise UncertaintyExceeded(text + "; the run left the model's data: stop, or add such structures")
        print(f"[uncertainty] {text}", flush=True)
