"""Hydra's view of metacl's population launcher (conf/hydra/launcher/population.yaml).

Hydra accepts launcher classes from the `hydra_plugins` package only; the work is in
metacl.population.launch.
"""

from __future__ import annotations

from hydra.plugins.launcher import Launcher


class PopulationLauncher(Launcher):
    def __init__(self, max_members: int = 64, processes="auto") -> None:
        self.max_members = max_members
        self.processes = processes
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx):
        from metacl.cli import take_ctrl_c
        from metacl.population.launch import launch

        take_ctrl_c()  # the members' stop handler takes over from train.py's early one
        return launch(self, job_overrides, initial_job_idx)
