"""Optuna studies over ``cirlab.training.train`` and summaries of any sweep (``cirlab-sweep``).

Current Optuna drives ``train`` directly (hydra-optuna-sweeper 1.3 pins ``optuna<3.0``), with
persistent storage, so an interrupted study is resumed by running the same command again.

Modules: :mod:`~cirlab.sweeps.spec` (the ``optuna:`` node, checked), :mod:`~cirlab.sweeps.storage`
(storage URLs and the sweep folder's ``study.json``), :mod:`~cirlab.sweeps.driver` (creating,
resuming and running a study), :mod:`~cirlab.sweeps.pruning` (the Lightning callback that reports
to the running trial), :mod:`~cirlab.sweeps.summary` (tables, Pareto front, ``pareto.png``) and
:mod:`~cirlab.sweeps.hydra_callback` (the summary at the end of a ``cirlab-train -m`` multirun).
"""
