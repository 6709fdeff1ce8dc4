from metacl.memory.class_balanced import ClassBalancedMemory
from metacl.memory.herding import herding_selection
from metacl.memory.reservoir import ReservoirBuffer
from metacl.memory.ring import RingBuffer

__all__ = ["ClassBalancedMemory", "ReservoirBuffer", "RingBuffer", "herding_selection"]
