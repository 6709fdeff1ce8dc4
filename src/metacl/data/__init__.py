"""Datasets (``sources``) and the continual-learning task sequences built from them
(``scenarios``). Configs name both by their ``_target_`` (conf/dataset/)."""

from metacl.data.scenarios import Task
from metacl.data.sources import ImageSplit, MerTasks, SourceFacts, facts_of

__all__ = ["ImageSplit", "MerTasks", "SourceFacts", "Task", "facts_of"]
