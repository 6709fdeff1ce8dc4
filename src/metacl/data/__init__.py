"""Datasets (``sources``) and the continual-learning task sequences built from them
(``scenarios``)."""

from metacl.data.scenarios import SCENARIOS, Task, build_scenario
from metacl.data.sources import SOURCES, ImageSplit, MerTasks, load_source

__all__ = [
    "SCENARIOS",
    "SOURCES",
    "ImageSplit",
    "MerTasks",
    "Task",
    "build_scenario",
    "load_source",
]
