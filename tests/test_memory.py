import torch

from metacl.memory import ReservoirBuffer


def _fill(buffer, n, batch=10, task=0):
    for start in range(0, n, batch):
        ids = torch.arange(start, min(start + batch, n))
        buffer.add(ids.float().view(-1, 1).expand(-1, 3).clone(), ids, torch.tensor(task))


def test_reservoir_fills_in_order_then_keeps_capacity():
    buffer = ReservoirBuffer(25, (3,))
    _fill(buffer, 20)
    assert len(buffer) == 20
    x, y, _t = buffer.all()
    assert torch.equal(y, torch.arange(20)) and torch.equal(x[:, 0], torch.arange(20.0))
    _fill(buffer, 500)
    assert len(buffer) == 25 and int(buffer.age) == 520
    assert len(set(buffer.all()[1].tolist())) == 25  # no duplicates


def test_reservoir_keeps_each_sample_with_equal_probability():
    torch.manual_seed(0)
    counts = torch.zeros(200)
    for _ in range(300):
        buffer = ReservoirBuffer(20, (3,))
        _fill(buffer, 200)
        counts[buffer.all()[1]] += 1
    # each of the 200 samples should survive with probability 20/200 = 0.1 (30 of 300 trials)
    early, late = counts[:100].mean(), counts[100:].mean()
    assert 25 < early < 35 and 25 < late < 35


def test_reservoir_sample_is_distinct_and_bounded():
    buffer = ReservoirBuffer(50, (3,))
    assert buffer.sample(10)[0].shape == (0, 3)
    _fill(buffer, 5)
    _x, y, _t = buffer.sample(10)
    assert len(y) == 5 and sorted(y.tolist()) == list(range(5))
    _fill(buffer, 100)
    assert len(set(buffer.sample(10)[1].tolist())) == 10


def test_reservoir_state_dict_round_trip_keeps_contents_and_age():
    buffer = ReservoirBuffer(10, (3,))
    _fill(buffer, 37, task=4)
    restored = ReservoirBuffer(10, (3,))
    restored.load_state_dict(buffer.state_dict())
    assert len(restored) == 10 and int(restored.age) == 37
    for a, b in zip(buffer.all(), restored.all()):
        assert torch.equal(a, b)
    assert set(restored.all()[2].tolist()) == {4}
    _fill(restored, 3)  # keeps counting from the restored age
    assert int(restored.age) == 40
