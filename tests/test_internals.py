"""The fast paths of the engine against their slow, obvious definitions."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import runtime, validate
from graphprune.elements import ElementPool
from graphprune.importance import position_norms


def _reference_union_find(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in pairs:
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return [find(x) for x in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_vectorised_union_matches_pairwise_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    pool = ElementPool()
    pool.new(n, "producer", "t")
    pairs: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(1, 10))):
        m = int(rng.integers(1, n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        pool.union(a, b)
        pairs += list(zip(a.tolist(), b.tolist(), strict=True))
    # both keep the smallest element of a class as its root, so equal roots = equal partitions
    assert pool.roots().tolist() == _reference_union_find(n, pairs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_position_norms_match_float64_definition(dtype: type, p: int) -> None:
    w = np.random.default_rng(0).standard_normal((48, 32, 3, 3)).astype(dtype)
    for axis in range(w.ndim):
        exact = (np.abs(np.moveaxis(w.astype(np.float64), axis, 0)).reshape(w.shape[axis], -1) ** p).sum(axis=1)
        got = position_norms(w, axis, p)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, exact, rtol=1e-5)


def _model(ir_version: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")  # 8 KiB: in memory
    w16 = numpy_helper.from_array(rng.standard_normal((32, 80)).astype(np.float16), "w16")  # in memory
    small = numpy_helper.from_array(np.arange(32, dtype=np.float32), "b")  # stays in the skeleton
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["y16", "w16"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2, 80])], [w, w16, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


@pytest.mark.parametrize("ir_version", [8, 11])
def test_session_with_in_memory_weights_equals_plain_session(ir_version: int) -> None:
    model = _model(ir_version)
    before = model.SerializeToString()
    x = {"x": np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)}
    plain = model if ir_version <= runtime.RUNTIME_IR_VERSION else _model(runtime.RUNTIME_IR_VERSION)
    expected = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert runtime._skeleton(model)[2] == ["w", "w16"]  # these two travel as in-memory initializers
    sess = runtime.session(model)
    np.testing.assert_array_equal(runtime.run(sess, x)["z"], expected)
    probe = runtime.probe_session(model, ["h"])
    assert set(runtime.run(probe, x)) == {"z", "h"}
    assert model.SerializeToString() == before  # the caller's model is never modified


def test_blas_threads_are_the_cores_other_processes_leave_free() -> None:
    """OBS math uses the cores other processes leave free (OpenBLAS workers spin against busy ones);
    this process's own work does not count against it."""
    import multiprocessing
    import threading

    n = runtime.cpus()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass

    spin = threading.Thread(target=busy, daemon=True)
    spin.start()  # a busy thread of this process: still all cores free for it
    try:
        assert runtime.idle_cpus(0.3) >= n - 1  # (tolerating one core's worth of other tests' load)
    finally:
        stop.set()
        spin.join()
    if n < 2:
        return
    hogs = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(n)]
    for h in hogs:
        h.start()
    try:
        time.sleep(0.5)
        assert runtime.idle_cpus(0.3) == 1  # every core busy elsewhere: one thread
    finally:
        for h in hogs:
            h.kill()


def _spin() -> None:
    while True:
        pass


@pytest.mark.parametrize("kron_columns", [1024, 0])
def test_obs_prunes_are_the_same_bits_on_any_number_of_idle_cores(monkeypatch: pytest.MonkeyPatch,
                                                                    kron_columns: int) -> None:
    """BLAS threads follow the idle cores, but only where the result does not depend on them (the Gram
    products, layers side by side on single-threaded BLAS): multi-threaded dgemm/inverses gave other bits,
    so the same prune differed with the machine's load."""
    import graphprune
    from graphprune.demo import demo_model

    outputs = []
    for idle in (1, 2, 3):
        monkeypatch.setattr(runtime, "idle_cpus", lambda window_s=0.1, n=idle: n)
        res = graphprune.prune(demo_model(), sparsity=0.4, latency_runs=0, validate=False, kron_columns=kron_columns)
        assert res.report.compensation["applied"]
        outputs.append(res.model.SerializeToString())
    assert outputs[0] == outputs[1] == outputs[2]


def test_prune_holds_one_onnxruntime_session_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each session holds (and pre-packs) a whole model's weights, so statistics, the compensation
    self-check and validation open them one after another: peak memory then grows by one model, not
    three (validation used to hold the original and the pruned model together, the self-check three)."""
    import gc
    import weakref

    import graphprune
    from graphprune.demo import demo_model

    live: set[int] = set()
    most = opened = 0
    make = runtime.session

    def counted(*args: object, **kwargs: object) -> ort.InferenceSession:
        nonlocal most, opened
        gc.collect()
        sess = make(*args, **kwargs)  # type: ignore[arg-type]
        opened += 1
        live.add(id(sess))
        weakref.finalize(sess, live.discard, id(sess))
        most = max(most, len(live))
        return sess

    monkeypatch.setattr(runtime, "session", counted)
    # timing interleaves the two models, with both sessions held, below a size (test_validation_honest.py)
    monkeypatch.setattr(validate, "INTERLEAVE_MAX_BYTES", 0)
    graphprune.prune(demo_model(), sparsity=0.4, latency_runs=2)
    assert opened >= 5 and most == 1, (opened, most)


def test_check_catches_bad_weight_bytes_and_bad_graphs() -> None:
    """The checker sees the weightless view, so the byte counts of large weights are checked apart."""
    from graphprune.errors import ValidationFailedError
    from graphprune.validate import check

    w = numpy_helper.from_array(np.ones((256, 64), dtype=np.float32), "w")  # beyond the view's data limit
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    check(model)
    truncated = onnx.ModelProto()
    truncated.CopyFrom(model)
    truncated.graph.initializer[0].raw_data = truncated.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ValidationFailedError, match="'w' holds 65532 bytes, its shape"):
        check(truncated)
    wrong_shape = onnx.ModelProto()
    wrong_shape.CopyFrom(model)
    del wrong_shape.graph.initializer[0].dims[:]
    wrong_shape.graph.initializer[0].dims.extend([64, 256])  # same bytes, a shape the MatMul cannot take
    with pytest.raises(ValidationFailedError, match=r"onnx\.checker"):
        check(wrong_shape)
