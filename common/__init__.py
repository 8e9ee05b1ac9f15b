"""The ground floor every stage stands on; no stage of its own.

- :mod:`common.config`: typed configs from YAML with dotted overrides (the one loader);
- :mod:`common.atomic`: atomic, durable file writes;
- :mod:`common.progress`: progress bars and periodic lines with rate and ETA;
- :mod:`common.errors`: :class:`~common.errors.UserError`, the base of every user error
  (one line, exit status 2);
- :mod:`common.fidelities`: the fidelity table, the one place a fidelity name becomes a
  head index.

Nothing here imports a stage (``data_pipeline``, ``models``, ``pretrain``, ``launch``).
"""
