"""LSTM / GRU / RNN hidden units: exported PyTorch nets (TorchScript and dynamo exporters; uni- and
bidirectional, stacked, batch-first, dynamic batch) and hand-built graphs for what torch never exports
(peepholes, layout=1 (coupling only: onnxruntime cannot run it), GRU without linear_before_reset, a
decoder started from an encoder's state).

Exactness is checked independently of the library's own self-check: the original with every "in"
column of a removed unit zeroed (R's recurrent columns included, which is what cuts a unit out of the
recurrence) must give the pruned model's outputs.
"""

from __future__ import annotations

import functools
import io
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import ModelProto, numpy_helper
from rules.helpers import Net, arrays, group_of, kept, kinds, params, pruned, units

import graphprune
from graphprune.reasons import BlockKind

RECURRENT = ("LSTM", "GRU", "RNN")
SEQ, BATCH, FEATURES, HIDDEN = 5, 2, 6, 8


class Case(NamedTuple):
    op: str
    bidirectional: bool = False
    layers: int = 1
    batch_first: bool = False
    upstream: bool = False  # a Linear + ReLU in front: its features are the RNN's input features
    dynamo: bool = False
    dynamic_batch: bool = False  # TorchScript then makes the zero initial state at run time (ConstantOfShape)


CASES = {
    "lstm": Case("LSTM"),
    "gru": Case("GRU"),
    "rnn": Case("RNN"),
    "lstm_bidirectional": Case("LSTM", bidirectional=True),
    "lstm_2_layers": Case("LSTM", layers=2),
    "lstm_batch_first_after_linear": Case("LSTM", batch_first=True, upstream=True),
    "gru_dynamic_batch": Case("GRU", dynamic_batch=True),
    "lstm_dynamo": Case("LSTM", dynamo=True),
    "gru_bidirectional_2_layers_dynamo": Case("GRU", bidirectional=True, layers=2, dynamo=True),
}


@functools.cache
def _exported(name: str) -> bytes:
    """The case's net exported at a fixed sequence length (RNN's dynamo export unrolls it into MatMuls,
    so only LSTM and GRU go through that exporter)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    case = CASES[name]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Sequential(nn.Linear(FEATURES, 10), nn.ReLU()) if case.upstream else nn.Identity()
            self.rnn = getattr(nn, case.op)(10 if case.upstream else FEATURES, HIDDEN, num_layers=case.layers,
                                            bidirectional=case.bidirectional, batch_first=case.batch_first)
            self.fc = nn.Linear(HIDDEN * (2 if case.bidirectional else 1), 3)

        def forward(self, x: Any) -> Any:
            return self.fc(self.rnn(self.pre(x))[0])

    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, FEATURES) if case.batch_first else torch.randn(SEQ, BATCH, FEATURES)
    dynamic = {"dynamic_axes": {"x": {1: "batch"}}, "input_names": ["x"]} if case.dynamic_batch else {}
    f = io.BytesIO()
    torch.onnx.export(Net().eval(), (x,), f, dynamo=case.dynamo, opset_version=18 if case.dynamo else 17, **dynamic)
    return f.getvalue()


def _model(case: str) -> ModelProto:
    return onnx.load_from_string(_exported(case))


def _run(model: ModelProto, feeds: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _feeds(model: ModelProto, seed: int = 7) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value or BATCH for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input if i.name not in inits}


def _zeroed(an: graphprune.Analysis, removed_root: NDArray[np.bool_]) -> ModelProto:
    """The analysed original with every consumer column ("in" role) of a removed unit set to zero."""
    model = ModelProto()
    model.CopyFrom(an.model)
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init).copy()
        for axis, labels in an.graph.tracked(init.name).items():
            gone = removed_root[an.grouping.roots[labels]]
            if an.graph.roles.get((init.name, axis)) == "in" and gone.any():
                index: list[Any] = [slice(None)] * value.ndim
                index[axis] = np.nonzero(gone)[0]
                value[tuple(index)] = 0
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def _hidden_sizes(model: ModelProto) -> list[int]:
    return [int(next(a.i for a in n.attribute if a.name == "hidden_size"))
            for n in model.graph.node if n.op_type in RECURRENT]


def _assert_equals_zeroed(original: ModelProto, res: graphprune.PruneResult) -> None:
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.validation["equivalence"]["passed"]
    feeds = _feeds(original)
    reference = _zeroed(graphprune.analyze(original), res.plan.removed_root)
    for ref, got in zip(_run(reference, feeds), _run(res.model, feeds), strict=True):
        assert ref.shape == got.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_exported_recurrent_net_loses_hidden_units_exactly(case: str) -> None:
    original = _model(case)
    before = _hidden_sizes(original)
    res = graphprune.prune(original, {"sparsity": 0.3}, compensate="none", latency_runs=0)
    after = _hidden_sizes(res.model)
    assert len(after) == len(before) == CASES[case].layers
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    inits = arrays(res.model)
    for node in (n for n in res.model.graph.node if n.op_type in RECURRENT):
        h = next(a.i for a in node.attribute if a.name == "hidden_size")
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type]
        assert inits[node.input[1]].shape[1] == inits[node.input[2]].shape[1] == gates * h
        assert inits[node.input[2]].shape[2] == h
    _assert_equals_zeroed(original, res)


def test_an_upstream_linear_shrinks_through_the_input_features() -> None:
    """W's last axis reads the Linear's features like a MatMul's K axis: that group is prunable too."""
    original = _model("lstm_batch_first_after_linear")
    an = graphprune.analyze(original)
    lstm = next(n for n in an.model.graph.node if n.op_type == "LSTM")
    g = group_of(an, lstm.input[1], 2)
    assert g.prunable and g.size == 10 and (lstm.input[1], 2, "in") in params(g)
    assert len(an.grouping.prunable) == 2
    res = graphprune.prune(original, {"sparsity": 0.3}, compensate="none", latency_runs=0)
    pruned_lstm = next(n for n in res.model.graph.node if n.op_type == "LSTM")
    assert arrays(res.model)[pruned_lstm.input[1]].shape[2] < 10


def test_a_zero_state_sized_at_run_time_shrinks_with_the_units() -> None:
    """TorchScript with a dynamic batch makes h0 with ConstantOfShape(Concat(1, batch, H)): the H entry
    is rewritten, and the pruned model still runs at any batch size."""
    original = _model("gru_dynamic_batch")
    an = graphprune.analyze(original)
    gru = next(n for n in an.model.graph.node if n.op_type == "GRU")
    assert an.graph.producer[gru.input[5]].op_type == "ConstantOfShape"
    assert units(an, gru.input[5], 2) == units(an, gru.input[2], 2) and group_of(an, gru.input[2], 2).prunable
    res = graphprune.prune(original, {"sparsity": 0.3}, compensate="none", latency_runs=0)
    x = np.random.default_rng(1).standard_normal((SEQ, 3, FEATURES)).astype(np.float32)
    ref = _run(_zeroed(an, res.plan.removed_root), {"x": x})
    np.testing.assert_allclose(_run(res.model, {"x": x})[0], ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lstm", "gru_bidirectional_2_layers_dynamo"])
def test_zero_sparsity_reproduces_outputs(case: str) -> None:
    original = _model(case)
    res = graphprune.prune(original, {"sparsity": 0.0}, latency_runs=0)
    feeds = _feeds(original)
    for ref, got in zip(_run(original, feeds), _run(res.model, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_default_config_with_compensation_keeps_a_valid_model() -> None:
    original = _model("lstm_2_layers")
    res = graphprune.prune(original, {"sparsity": 0.3}, latency_runs=0)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.validation["equivalence"]["passed"]
    assert all(o.shape == (SEQ, BATCH, 3) for o in _run(res.model, _feeds(original)))
    assert all(h < HIDDEN for h in _hidden_sizes(res.model))


# ---- hand-built graphs: what torch does not export ---------------------------------------------


def _lstm(layout: int = 0, peepholes: bool = True) -> ModelProto:
    """MatMul features -> LSTM (peepholes, constant initial state) -> Y, Y_h and Y_c read by MatMuls.
    layout=1 (batch-major X, Y and states) keeps H the last axis everywhere; onnxruntime cannot run it."""
    n = Net()
    x = n.op("MatMul", [n.input("x", [BATCH, SEQ, FEATURES] if layout else [SEQ, BATCH, FEATURES]),
                        n.w("pre", [FEATURES, 10])])
    state = [BATCH, 1, 4] if layout else [1, BATCH, 4]
    ins = [x, n.w("W", [1, 16, 10]), n.w("R", [1, 16, 4]), n.w("B", [1, 32]), "", n.w("h0", state), n.w("c0", state)]
    if peepholes:
        ins.append(n.w("P", [1, 12]))
    y, yh, yc = n.op("LSTM", ins, outputs=3, name="lstm", hidden_size=4, layout=layout)
    n.output(*(n.op("MatMul", [t, n.w(f"fc{i}", [4, 3])]) for i, t in enumerate((y, yh, yc))))
    return n.model()


@pytest.mark.parametrize("layout", [0, 1])
def test_lstm_members_cover_every_gate_bias_peephole_and_state(layout: int) -> None:
    m = _lstm(layout)
    an = graphprune.analyze(m)
    hidden = units(an, "R", 2)
    assert units(an, "W", 1) == units(an, "R", 1) == hidden * 4
    assert units(an, "B", 1) == hidden * 8 and units(an, "P", 1) == hidden * 3
    assert units(an, "h0", 2) == units(an, "c0", 2) == units(an, "lstm", 3) == units(an, "lstm_out1", 2) == hidden
    assert all(units(an, f"fc{i}", 0) == hidden for i in range(3))
    assert params(group_of(an, "R", 2)) == {
        ("W", 1, "out"), ("R", 1, "out"), ("R", 2, "in"), ("B", 1, "bias"), ("P", 1, "const"),
        ("h0", 2, "const"), ("c0", 2, "const"), ("fc0", 0, "in"), ("fc1", 0, "in"), ("fc2", 0, "in")}
    assert units(an, "W", 2) == units(an, "pre", 1)  # W's input features are the MatMul's outputs
    if layout:
        return

    res = pruned(m)
    o, p = arrays(m), arrays(res.model)
    h, f = kept(o["fc0"], p["fc0"], 0), kept(o["pre"], p["pre"], 1)
    assert len(h) == 2 and len(f) == 5 and _hidden_sizes(res.model) == [2]

    def gates(n: int) -> list[int]:
        return [g * 4 + j for g in range(n) for j in h]

    assert kept(o["W"], p["W"], 1, axis2=f) == kept(o["R"], p["R"], 1, axis2=h) == gates(4)
    assert kept(o["B"], p["B"], 1) == gates(8) and kept(o["P"], p["P"], 1) == gates(3)
    assert kept(o["h0"], p["h0"], 2) == kept(o["c0"], p["c0"], 2) == h
    _assert_equals_zeroed(m, res)


def test_lstm_macs_shrink_with_hidden_units() -> None:
    """W·x and R·h per step and sequence: 10 * (16*10 + 16*4), then 5 * (8*5 + 8*2) after 50%."""
    m = _lstm(peepholes=False)
    an = graphprune.analyze(m)
    res = pruned(m)
    steps, fc_rows = SEQ * BATCH, SEQ * BATCH + 2 * BATCH  # Y's rows, then Y_h's and Y_c's
    assert an.cost.macs() == steps * FEATURES * 10 + steps * (16 * 10 + 16 * 4) + fc_rows * 3 * 4
    assert an.cost.macs(res.plan.removed_root) == steps * FEATURES * 5 + steps * (8 * 5 + 8 * 2) + fc_rows * 3 * 2


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_reset_gate_either_way(linear_before_reset: int) -> None:
    n = Net()
    x = n.op("MatMul", [n.input("x", [SEQ, BATCH, FEATURES]), n.w("pre", [FEATURES, 10])])
    y = n.op("GRU", [x, n.w("W", [2, 12, 10]), n.w("R", [2, 12, 4]), n.w("B", [2, 24])], name="gru",
             hidden_size=4, direction="bidirectional", linear_before_reset=linear_before_reset, clip=3.0)
    y = n.op("Reshape", [n.op("Transpose", [y], perm=[0, 2, 1, 3]), n.const("shape", [0, 0, -1])])
    n.output(n.op("MatMul", [y, n.w("fc", [8, 3])]))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "fc", 0) == units(an, "R", 2) * 2  # both directions' slices of the same units
    _assert_equals_zeroed(m, pruned(m))


def test_decoder_started_from_the_encoder_state_shares_its_units() -> None:
    n = Net()
    _, enc_h = n.op("RNN", [n.input("x", [SEQ, BATCH, FEATURES]), n.w("We", [1, 4, FEATURES]),
                            n.w("Re", [1, 4, 4])], outputs=2, name="enc", hidden_size=4)
    y = n.op("RNN", [n.input("t", [SEQ, BATCH, 3]), n.w("Wd", [1, 4, 3]), n.w("Rd", [1, 4, 4]), "", "", enc_h],
             name="dec", hidden_size=4)
    n.output(n.op("MatMul", [y, n.w("fc", [4, 2])]))
    m = n.model()
    an = graphprune.analyze(m)
    assert units(an, "Rd", 2) == units(an, "Re", 2) and group_of(an, "Re", 2).prunable
    res = pruned(m)
    assert _hidden_sizes(res.model) == [2, 2]
    _assert_equals_zeroed(m, res)


# ---- what stays fixed ------------------------------------------------------------------------------


def test_non_constant_weights_block_the_input_features() -> None:
    n = Net()
    x = n.op("MatMul", [n.input("x", [SEQ, BATCH, FEATURES]), n.w("pre", [FEATURES, 8])])
    n.output(n.op("RNN", [x, n.input("W", [1, 4, 8]), n.w("R", [1, 4, 4])], hidden_size=4, name="rnn"))
    an = graphprune.analyze(n.model())
    g = group_of(an, "pre", 1)
    assert not g.prunable and kinds(g) == {BlockKind.FIXED_OPERAND}
    assert "'W' is not constant" in g.reasons[0].detail
    assert not an.graph.tracked("R") and not an.graph.tracked("rnn")


def test_an_initial_state_from_a_graph_input_fixes_the_hidden_units() -> None:
    n = Net()
    y = n.op("GRU", [n.input("x", [SEQ, BATCH, FEATURES]), n.w("W", [1, 12, FEATURES]), n.w("R", [1, 12, 4]),
                     "", "", n.input("h0", [1, BATCH, 4])], name="gru", hidden_size=4)
    n.output(n.op("MatMul", [y, n.w("fc", [4, 3])]))
    an = graphprune.analyze(n.model())
    g = group_of(an, "R", 2)
    assert not g.prunable and kinds(g) == {BlockKind.FIXED_OPERAND}
    assert units(an, "fc", 0) == units(an, "R", 2)  # coupled as usual, just fixed


def test_channels_on_the_time_axis_are_blocked_as_recurrent() -> None:
    """A MatMul's features used as the sequence axis: the recurrence mixes them over time steps."""
    n = Net()
    x = n.op("MatMul", [n.input("x", [BATCH, FEATURES, SEQ]), n.w("pre", [SEQ, 7])])  # [2, 6, 7]
    y = n.op("RNN", [n.op("Transpose", [x], perm=[2, 0, 1]), n.w("W", [1, 4, FEATURES]), n.w("R", [1, 4, 4])],
             name="rnn", hidden_size=4)
    n.output(n.op("MatMul", [y, n.w("fc", [4, 3])]))
    an = graphprune.analyze(n.model())
    g = group_of(an, "pre", 1)
    assert not g.prunable and kinds(g) == {BlockKind.RECURRENT}
    assert group_of(an, "R", 2).prunable  # the hidden units are unaffected



@pytest.mark.parametrize("shared", ["state", "shape"])
def test_a_run_time_zero_state_read_elsewhere_stays_fixed(shared: str) -> None:
    """The zeros (or their shape vector) also feed another node: rewriting the H entry would change it."""
    n = Net()
    x = n.input("x", [SEQ, "batch", FEATURES])
    batch = n.op("Unsqueeze", [n.op("Gather", [n.op("Shape", [x]), n.const("one", 1)]), n.const("zero", [0])])
    shape = n.op("Concat", [n.const("dirs", [1]), batch, n.const("h", [4])], axis=0)
    h0 = n.op("ConstantOfShape", [shape])
    y = n.op("RNN", [x, n.w("W", [1, 4, FEATURES]), n.w("R", [1, 4, 4]), "", "", h0], name="rnn", hidden_size=4)
    n.output(n.op("MatMul", [y, n.w("fc", [4, 3])]))
    n.output(n.op("Relu", [h0]) if shared == "state" else n.op("Expand", [n.w("e", [1]), shape]))
    an = graphprune.analyze(n.model())
    g = group_of(an, "R", 2)
    assert not g.prunable and BlockKind.FIXED_OPERAND in kinds(g)
    assert any(f"initial state '{h0}'" in r.detail for r in g.reasons)
