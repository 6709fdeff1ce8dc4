from metacl.memory.reservoir import ReservoirBuffer
from metacl.memory.ring import RingBuffer

__all__ = ["ReservoirBuffer", "RingBuffer"]
