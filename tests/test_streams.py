"""Residual streams read through RMSNorm: found on real decoder exports, rotated exactly, sliced with
the dropped energy as the only error."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

import graphprune
from graphprune.inputs import signature
from graphprune.loading import load_model
from graphprune.normalize import normalize
from graphprune.streams import find_streams, principal_basis, slice_stream, stream_grams
from graphprune.streams.centre import layernorm_as_rms
from graphprune.synthetic import batches

DECODERS = ["hf_llama-dynamo", "hf_llama-ts"]


def _load(name: str) -> onnx.ModelProto:
    try:
        return normalize(load_model(str(zoo.path(name))), copy=False)
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", DECODERS)
def test_llama_stream_rotates_exactly_and_slices_by_its_energy(name: str) -> None:
    model = _load(name)
    streams, refused = find_streams(model)
    assert not refused
    (stream,) = streams
    # 2 layers: the embedding, 2 residual Adds per layer; an RMSNorm before each block and a final one
    assert (stream.width, len(stream.writers), len(stream.norms)) == (64, 4, 5)
    assert sorted(len(n.readers) for n in stream.norms) == [1, 2, 2, 3, 3]  # lm_head; gate+up; q, k, v
    specs = signature(model, {})
    grams = stream_grams(model, streams, batches(specs, 32, None, "blobs", 0))
    basis = principal_basis(grams[0])
    assert np.allclose(basis.q.T @ basis.q, np.eye(64), atol=1e-10) and np.all(np.diff(basis.energy) <= 1e-9)
    test = next(iter(batches(specs, 2, None, "blobs", 99)))
    dense = _outputs(model, test)

    errors, params = [], []
    for keep in (64, 48, 32):
        sliced = copy.deepcopy(model)
        slice_stream(sliced, stream, basis, keep)
        onnx.checker.check_model(sliced, full_check=True)
        errors.append(_rel(_outputs(sliced, test), dense))
        params.append(sum(int(np.prod(t.dims)) for t in sliced.graph.initializer))
        dims = {t.name: list(t.dims) for t in sliced.graph.initializer}
        assert dims[stream.embedding] == [200, keep]
        assert all(dims[w][1] == keep for w, _ in stream.writers)
        assert all(dims[r][0] == keep for n in stream.norms for r in n.readers)
    assert errors[0] < 1e-5, "a full-width rotation must not change the function"
    assert errors[0] < errors[1] < errors[2] < 1.0
    assert params[0] > params[1] > params[2]
    assert basis.kept_energy(48) > 0.75 > basis.kept_energy(16)


def test_a_stream_that_is_a_graph_output_is_left_alone() -> None:
    model = _load("hf_llama-dynamo")
    (stream,), _ = find_streams(model)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(stream.tensors[2]))
    streams, refused = find_streams(model)
    assert not streams and len(refused) == 1
    assert "is a graph output, whose width must not change" in refused[0] and stream.embedding in refused[0]


@pytest.mark.parametrize("name", DECODERS)
def test_prune_with_rotated_streams_removes_the_hidden_width_too(name: str) -> None:
    path = zoo.path(name)
    kept = graphprune.prune(str(path), {"sparsity": 0.3, "latency_runs": 0})
    rotated = graphprune.prune(str(path), {"sparsity": 0.3, "streams": "rotate", "latency_runs": 0})
    def removed(r: graphprune.PruneResult) -> float:
        return 1 - r.report.params["after"] / r.report.params["before"]

    assert removed(kept) < 0.2 and removed(rotated) >= 0.3  # heads and MLP only, then the stream as well
    onnx.checker.check_model(rotated.model, full_check=True)
    assert [o.name for o in rotated.model.graph.output] == [o.name for o in onnx.load(path).graph.output]
    (entry,) = rotated.report.streams["streams"]
    assert (entry["width"], entry["kept"], entry["writers"], entry["readers"]) == (64, 45, 4, 11)
    assert 0.5 < entry["energy_kept"] < 1.0 and 0 < rotated.report.streams["output_rel_error"] < 1.0
    assert rotated.report.validation["equivalence"]["passed"]  # the groups' coupling on the sliced model
    assert "64 -> 45 wide in its principal basis" in rotated.report.summary()
    assert "Residual streams" in rotated.report.to_html() and entry["stream"] in rotated.report.to_html()


def test_rotating_a_stream_at_zero_sparsity_keeps_the_function() -> None:
    path = zoo.path("hf_llama-dynamo")
    result = graphprune.prune(str(path), {"sparsity": 0.0, "streams": "rotate", "latency_runs": 0})
    assert result.report.streams["streams"][0]["kept"] == 64
    assert result.report.streams["output_rel_error"] < 1e-5
    assert all(o["max_rel_err"] < 1e-4 for o in result.report.validation["outputs"])


# ---- LayerNorm streams (GPT-2: pre-norm, Gemm layers behind Reshapes, a position table) ---------------

GPT2 = ["hf_gpt2-dynamo", "hf_gpt2-ts"]


@pytest.mark.parametrize("name", GPT2)
def test_a_layernorm_stream_becomes_an_rmsnorm_stream_exactly(name: str) -> None:
    model = _load(name)
    assert not find_streams(model)[0]  # read through LayerNormalization: not an RMSNorm stream as it is
    centred, embeddings, refused = layernorm_as_rms(model)
    assert centred is not None and not refused and len(embeddings) == 1
    onnx.checker.check_model(centred, full_check=True)
    assert not any(n.op_type == "LayerNormalization" for n in centred.graph.node)
    specs = signature(model, {})
    test = next(iter(batches(specs, 2, None, "blobs", 99)))
    assert _rel(_outputs(centred, test), _outputs(model, test)) < 1e-5  # centring + RMS is the same function
    (stream,), refused = find_streams(centred)
    assert not refused
    # wte + the position table, 2 writers per layer (attention and MLP projections), LN 1/2 per layer + ln_f
    assert (stream.width, len(stream.tables), len(stream.writers), len(stream.norms)) == (32, 1, 4, 5)
    assert stream.widths, "the Gemms' [B*T, d] Reshapes spell the width out and must follow the slice"


@pytest.mark.parametrize("name", GPT2)
def test_prune_rotates_a_layernorm_stream(name: str) -> None:
    path = str(zoo.path(name))
    plain = graphprune.prune(path, {"sparsity": 0.3, "latency_runs": 0})
    rotated = graphprune.prune(path, {"sparsity": 0.3, "streams": "rotate", "latency_runs": 0})
    def removed(r: graphprune.PruneResult) -> float:
        return 1 - r.report.params["after"] / r.report.params["before"]

    assert removed(plain) < 0.2 and removed(rotated) >= 0.35  # 18.2% -> 40.5%
    (entry,) = rotated.report.streams["streams"]
    assert (entry["width"], entry["kept"], entry["norm"]) == (32, 23, "LayerNorm (centred to RMSNorm)")
    assert 0.9 < entry["energy_kept"] < 1.0 and 0 < rotated.report.streams["output_rel_error"] < 0.05
    (out,) = rotated.report.validation["outputs"]
    assert 0.99 < out["cosine"] < 1.0
    assert rotated.report.validation["equivalence"]["passed"]
    zero = graphprune.prune(path, {"sparsity": 0.0, "streams": "rotate", "latency_runs": 0})
    assert zero.report.streams["output_rel_error"] < 1e-5 and zero.report.validation["outputs"][0]["max_rel_err"] < 1e-4


def test_a_post_norm_stream_is_left_alone_and_says_why() -> None:
    model = _load("hf_bert_cls-dynamo")
    centred, _, refused = layernorm_as_rms(model)
    assert centred is None and len(refused) == 1 and "post-norm block" in refused[0]
