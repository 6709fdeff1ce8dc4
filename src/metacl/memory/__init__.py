from metacl.memory.reservoir import ReservoirBuffer

__all__ = ["ReservoirBuffer"]
