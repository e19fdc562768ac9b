"""Request metrics' per-label-set children are looked up once and keep the label budget."""

from server.metrics import Metrics


def test_series_is_cached_and_budgeted():
    m = Metrics(top_n=1)
    a = m.series("http", "t1", "x")
    assert m.series("http", "t1", "x") is a and a.labels == ("http", "t1", "t1/x")
    assert a.requests("chat", "ok") is a.requests("chat", "ok")
    assert a.requests("chat", "ok") is m.requests.labels("http", "t1", "t1/x", "chat", "ok")
    assert m.series("http", "t2", "y").labels == ("http", "other", "other")  # over the budget of 1
    assert m.series("grpc", "t1", None).labels == ("grpc", "t1", "-")
    before = a.e2e._sum.get()
    a.e2e.observe(0.5)
    assert m.e2e.labels("http", "t1", "t1/x")._sum.get() == before + 0.5
