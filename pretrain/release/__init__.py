"""The release stage: a trained run becomes a folder anyone can verify and run.

In the order a release is made and used:

- :mod:`~pretrain.release.create`: a run or checkpoint -> the release folder
  (``mlip-pretrain release create``), with :mod:`~pretrain.release.card` (the generated
  model card) and held-out metrics from ``pretrain/evaluate.py``;
- :mod:`~pretrain.release.add_uncertainty`: calibrated uncertainty for a release made
  without it (``mlip-pretrain release uncertainty``);
- :mod:`~pretrain.release.format`: the folder's files, checksums, format versions and
  their migrations;
- :mod:`~pretrain.release.loader`: the model from safetensors + JSON alone (no DeepSpeed,
  no checkpoint, no pickle), or any trained model by its path;
- :mod:`~pretrain.release.physics`: the physics suite, run by ``verify`` and by the tests;
- :mod:`~pretrain.release.verify`: ``mlip-pretrain release verify``;
- :mod:`~pretrain.release.predict`: one fidelity served: ASE ``Atoms`` in, energies,
  forces and stress out;
- :mod:`~pretrain.release.calculator`: the ASE calculator on it;
- :mod:`~pretrain.release.guard`: an MD observer that flags or stops a run whose force
  uncertainty passes a threshold;
- :mod:`~pretrain.release.export`: ``torch.export`` of a release.

Users need two names::

    from pretrain.release import MLIPCalculator, load_release
"""

from pretrain.release.calculator import MLIPCalculator
from pretrain.release.format import ReleaseError
from pretrain.release.loader import load_model, load_release
from pretrain.release.guard import UncertaintyExceeded, UncertaintyGuard
from pretrain.release.predict import CoverageError, CoverageWarning, NoUncertaintyError, Predictor

__all__ = ["MLIPCalculator", "load_release", "load_model", "ReleaseError", "Predictor",
           "CoverageError", "CoverageWarning", "NoUncertaintyError", "UncertaintyGuard",
           "UncertaintyExceeded"]
