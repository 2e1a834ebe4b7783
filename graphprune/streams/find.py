"""Residual streams that RMSNorm reads, found on a normalized graph (every weight its own initializer).

A stream is the hidden state of a pre-norm decoder: it starts at an embedding Gather, every block adds
a linear map's output to it (the writers: MatMul or Gemm, maybe behind a Reshape of the leading axes;
constant position tables count too), and it is only ever read through an RMSNorm whose scaled
output feeds linear maps (the readers). With `layernorm=True` the norms looked for are LayerNorms
instead (centre.py rewrites those streams into this form). Channels of such a stream cannot be removed one by one (the
norm mixes them), but any orthogonal change of basis commutes with it; `rotate.py` uses that.
Anything else touching the stream (a graph output, a Shape, a LayerNorm, a non-linear reader) makes
the stream stay as it is, with the reason reported.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto

from graphprune.onnxutil import attr, node_name
from graphprune.tensors import to_array


@dataclass
class Norm:
    """`normalized = stream / sqrt(mean(stream^2) + eps)`, then `* scale`, read by linear maps."""

    eps: str  # the scalar initializer added to the mean square
    normalized: str  # stream * rsqrt(...), before the scale
    scale: str  # the [d] initializer multiplied in
    readers: list[str]  # [d, m] initializers of the MatMuls that read the scaled output


@dataclass
class Stream:
    width: int
    embedding: str  # the [vocab, d] table of the Gather the stream starts at
    tensors: list[str] = field(default_factory=list)  # the stream after the embedding and after each Add
    writers: list[tuple[str, str | None]] = field(default_factory=list)  # ([m, d] weight, [d] bias or None)
    tables: list[str] = field(default_factory=list)  # constants [..., d] added to it (position embeddings)
    norms: list[Norm] = field(default_factory=list)
    # with layernorm=True: the LNs reading it, each with the MatMul / Gemm nodes that read its output
    layernorms: list[tuple[NodeProto, list[NodeProto]]] = field(default_factory=list)
    widths: list[tuple[str, int]] = field(default_factory=list)  # (shape constant, flat index) saying d
    rank: int = 3  # of the stream tensor ([batch, sequence, d])

    @property
    def name(self) -> str:
        return self.tensors[0]


class NotAStream(Exception):
    """Why a candidate stream cannot be rotated: a user-facing sentence naming the node."""


class _Graph:
    def __init__(self, model: ModelProto) -> None:
        self.inits: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        self.producer: dict[str, NodeProto] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
            for o in n.output:
                self.producer[o] = n
        self.outputs = {o.name for o in model.graph.output}
        infos = [v for v in [*model.graph.input, *model.graph.value_info] if v.type.tensor_type.HasField("shape")]
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in infos}
        self.reshapes: list[NodeProto] = []  # Reshapes of a stream's leading axes, as they are accepted
        self.last_dims = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in infos
                          if v.type.tensor_type.shape.dim}  # 0 where unknown

    def const(self, name: str) -> np.ndarray | None:
        return to_array(self.inits[name]) if name in self.inits else None

    def only(self, tensor: str, op: str) -> NodeProto:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != op or tensor in self.outputs:
            found = ", ".join(f"{u.op_type} '{node_name(u)}'" for u in users) or "nothing"
            raise NotAStream(f"'{tensor}' should feed one {op}, feeds {found}")
        return users[0]

    def through_cast(self, tensor: str, dtype: int) -> str:
        """`tensor`, or the output of the one Cast to its own type that reads it (exporters add such
        no-op casts around norms, to float32 and back)."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == "Cast" and attr(users[0], "to") == dtype:
            return users[0].output[0]
        return tensor

    def other(self, node: NodeProto, tensor: str) -> str:
        rest = [i for i in node.input if i != tensor]
        if len(rest) != 1:
            raise NotAStream(f"{node.op_type} '{node_name(node)}' reads '{tensor}' twice")
        return rest[0]


def find_streams(model: ModelProto, layernorm: bool = False) -> tuple[list[Stream], list[str]]:
    """The rotatable streams, and a reason for every embedding-started stream that is not; with
    `layernorm`, the streams read through LayerNormalization instead (`centre.py` makes them RMSNorm
    streams)."""
    g = _Graph(model)
    streams, refused = [], []
    for node in model.graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        if table not in g.inits or attr(node, "axis", 0) != 0 or len(g.inits[table].dims) != 2:
            continue
        try:
            if node.input[1] not in g.ranks:
                raise NotAStream(f"the rank of the ids '{node.input[1]}' is unknown")
            streams.append(_follow(g, table, node.output[0], g.ranks[node.input[1]] + 1, layernorm))
        except NotAStream as exc:
            refused.append(f"stream from embedding '{table}': {exc}")
    return streams, refused


def _follow(g: _Graph, table: str, start: str, rank: int, layernorm: bool) -> Stream:
    stream = Stream(width=int(g.inits[table].dims[1]), embedding=table, rank=rank)
    first_reshape = len(g.reshapes)
    dtype = g.inits[table].data_type
    pending = [start]
    while pending:
        tensor = pending.pop()
        stream.tensors.append(tensor)
        if tensor in g.outputs:
            raise NotAStream(f"'{tensor}' is a graph output, whose width must not change")
        norms = 0
        for user in g.consumers.get(tensor, []):
            if user.op_type == "Add":
                added = g.other(user, tensor)
                if added in g.inits and g.inits[added].dims and g.inits[added].dims[-1] == stream.width:
                    stream.tables.append(added)
                else:
                    stream.writers.append(_writer(g, added, stream.width))
                pending.append(user.output[0])
            elif user.op_type == "LayerNormalization" and layernorm:
                stream.layernorms.append(_layernorm(g, user, stream.width, rank))
            elif user.op_type == "Cast" and attr(user, "to") == dtype:
                pending.append(user.output[0])  # the same values: the stream goes on under another name
            elif user.op_type == "Pow" and not layernorm:
                stream.norms.append(_norm(g, tensor, user, stream.width, dtype, rank))
                norms += 1
            elif user.op_type == "Shape":
                _leading_dims_only(g, user, rank)
            elif user.op_type != "Mul":  # the norm's stream * rsqrt: checked by _norm
                raise NotAStream(f"'{tensor}' is read by {user.op_type} '{node_name(user)}', which is not a "
                                 "residual Add or an RMSNorm")
        muls = sum(u.op_type == "Mul" for u in g.consumers.get(tensor, []))
        if muls != norms:
            raise NotAStream(f"'{tensor}' is multiplied by something other than its RMSNorm factor")
    if not (stream.layernorms if layernorm else stream.norms):
        raise NotAStream(f"no {'LayerNorm' if layernorm else 'RMSNorm'} reads it")
    entries = [_width_entry(g, r, stream.width) for r in g.reshapes[first_reshape:]]
    stream.widths = sorted({e for e in entries if e is not None})
    return stream


def _writer(g: _Graph, tensor: str, width: int) -> tuple[str, str | None]:
    """The [m, d] weight (and [d] bias) of the linear map whose output is added to the stream."""
    node, bias = g.producer.get(tensor), None
    if len(g.consumers.get(tensor, [])) != 1 or tensor in g.outputs:
        raise NotAStream(f"'{tensor}', added to the stream, is also read elsewhere")
    if node is not None and node.op_type == "Reshape" and _leading_only(g, node, width):
        node = g.producer.get(node.input[0])  # [B*T, d] back to [B, T, d]
    if node is not None and node.op_type == "Add":
        consts = [i for i in node.input if i in g.inits and g.inits[i].dims == [width]]
        if len(consts) != 1:
            raise NotAStream(f"the Add '{node_name(node)}' before the stream has no [{width}] bias")
        bias, node = consts[0], g.producer.get(g.other(node, consts[0]))
    if node is not None and _plain_gemm(g, node):
        if len(node.input) > 2 and node.input[2]:
            if bias is not None or node.input[2] not in g.inits or g.inits[node.input[2]].dims != [width]:
                raise NotAStream(f"Gemm '{node_name(node)}' writing the stream has no [{width}] bias")
            bias = node.input[2]
    elif node is None or node.op_type != "MatMul" or node.input[1] not in g.inits:
        what = f"{node.op_type} '{node_name(node)}'" if node is not None else "a graph input"
        raise NotAStream(f"'{tensor}' added to the stream comes from {what}, not a linear map with constant weights")
    weight = g.inits[node.input[1]]
    if len(weight.dims) != 2 or weight.dims[1] != width or len(g.consumers[node.output[0]]) != 1:
        raise NotAStream(f"MatMul '{node_name(node)}' writing the stream is not a [m, {width}] map used once")
    return node.input[1], bias


def _plain_gemm(g: _Graph, node: NodeProto) -> bool:
    """A Gemm that is x·W (+ C): W constant and not transposed, no scaling, x not transposed."""
    return (node.op_type == "Gemm" and node.input[1] in g.inits and not attr(node, "transA", 0)
            and not attr(node, "transB", 0) and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0)


def _leading_only(g: _Graph, reshape: NodeProto, width: int) -> bool:
    """A Reshape that keeps the last axis `width` wide (only batch and sequence merge or split): its
    shape ends in `width`, or both sides are known to (rows of `width` then map to rows, row-major)."""
    shape = g.const(reshape.input[1])
    if (shape is not None and shape.size > 0 and int(shape.reshape(-1)[-1]) == width) or \
            g.last_dims.get(reshape.input[0]) == width == g.last_dims.get(reshape.output[0]):
        g.reshapes.append(reshape)
        return True
    return False


def _width_entry(g: _Graph, reshape: NodeProto, width: int) -> tuple[str, int] | None:
    """Where a Reshape's shape says the stream's width (a constant and the flat index of the entry),
    None if it infers it (-1); a width read at run time cannot follow the slice."""
    shape = reshape.input[1]
    producer = g.producer.get(shape)
    if shape not in g.inits and producer is not None and producer.op_type == "Concat" and producer.input:
        shape = producer.input[-1]  # [batch, sequence] read at run time, then a constant width
    value = g.const(shape)
    if value is not None and value.size:
        last = int(value.reshape(-1)[-1])
        if last == -1:
            return None
        if last == width:
            return shape, value.size - 1
    raise NotAStream(f"Reshape '{node_name(reshape)}' takes the stream's width from a run-time shape")


def _linear_readers(g: _Graph, tensor: str, width: int, rank: int) -> list[NodeProto]:
    """The MatMul / plain Gemm nodes with a constant [d, m] weight that read `tensor`, directly or
    through Reshapes of its leading axes; anything else reading it is refused."""
    if tensor in g.outputs:
        raise NotAStream(f"the normalized stream '{tensor}' is a graph output")
    readers = []
    for user in g.consumers.get(tensor, []):
        if user.op_type == "Shape":
            _leading_dims_only(g, user, rank)
            continue
        if user.op_type == "Reshape" and user.input[0] == tensor and _leading_only(g, user, width):
            readers.extend(_linear_readers(g, user.output[0], width, rank))
            continue
        if user.op_type == "Add":
            raise NotAStream(f"the normalized stream '{tensor}' is added to by Add '{node_name(user)}': a post-norm "
                             "block (the norm's output is the next stream), which no rotation commutes with")
        weight = user.input[1] if user.op_type in ("MatMul", "Gemm") and user.input[0] == tensor else ""
        if weight not in g.inits or len(g.inits[weight].dims) != 2 or g.inits[weight].dims[0] != width \
                or (user.op_type == "Gemm" and not _plain_gemm(g, user)):
            raise NotAStream(f"the normalized stream '{tensor}' is read by {user.op_type} '{node_name(user)}', "
                             f"not by a MatMul with a constant [{width}, m] weight")
        readers.append(user)
    return readers


def _layernorm(g: _Graph, node: NodeProto, width: int, rank: int) -> tuple[NodeProto, list[NodeProto]]:
    """A LayerNormalization over the last axis with constant [d] scale and bias, and the linear maps
    that read it."""
    params = [i for i in node.input[1:3] if i]
    if int(attr(node, "axis", -1)) % rank != rank - 1 or any(node.output[1:]) or len(params) != 2 \
            or any(p not in g.inits or list(g.inits[p].dims) != [width] for p in params):
        raise NotAStream(f"LayerNormalization '{node_name(node)}' is not over the last axis with constant "
                         f"[{width}] scale and bias")
    return node, _linear_readers(g, node.output[0], width, rank)


def _leading_dims_only(g: _Graph, shape: NodeProto, rank: int) -> None:
    """A Shape of the stream is harmless when only its batch and sequence entries are used."""
    for user in g.consumers.get(shape.output[0], []):
        index = g.const(user.input[1]) if user.op_type == "Gather" else None
        if index is None or index.size != 1 or not 0 <= int(index.reshape(-1)[0]) % rank < rank - 1:
            raise NotAStream(f"the run-time shape of the stream ('{shape.output[0]}') is read by {user.op_type} "
                             f"'{node_name(user)}', which may use its width")
    if shape.output[0] in g.outputs or any(a.name in ("start", "end") for a in shape.attribute):
        raise NotAStream(f"Shape '{node_name(shape)}' of the stream is used as a whole")


def _norm(g: _Graph, stream: str, pow_node: NodeProto, width: int, dtype: int, rank: int) -> Norm:
    """Pow(x, 2) → ReduceMean(last) → Add(eps) → Sqrt → Reciprocal or Div(1, ·) → Mul(x, ·) → [Cast] →
    Mul(scale) → MatMuls."""
    exponent = g.const(pow_node.input[1])
    if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
        raise NotAStream(f"Pow '{node_name(pow_node)}' is not a square")
    mean = g.only(pow_node.output[0], "ReduceMean")
    axes = g.const(mean.input[1]) if len(mean.input) > 1 else np.array(attr(mean, "axes", []))
    if axes is None or list(np.ravel(axes)) != [-1] or attr(mean, "keepdims", 1) != 1:
        raise NotAStream(f"ReduceMean '{node_name(mean)}' does not average the last axis alone")
    add = g.only(mean.output[0], "Add")
    eps = g.other(add, mean.output[0])
    value = g.const(eps)
    if value is None or value.size != 1:
        raise NotAStream(f"Add '{node_name(add)}' does not add a constant epsilon")
    sqrt = g.only(add.output[0], "Sqrt")
    users = g.consumers.get(sqrt.output[0], [])
    recip = users[0] if len(users) == 1 else sqrt
    one = g.const(recip.input[0]) if recip.op_type == "Div" and recip.input[1] == sqrt.output[0] else None
    if recip.op_type != "Reciprocal" and not (one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1):
        raise NotAStream(f"the RMSNorm at Sqrt '{node_name(sqrt)}' is not followed by a reciprocal")
    mul = g.only(recip.output[0], "Mul")
    if g.other(mul, recip.output[0]) != stream:
        raise NotAStream(f"Mul '{node_name(mul)}' scales another tensor by the stream's RMS")
    cast = g.through_cast(mul.output[0], dtype)
    scaled = g.only(cast, "Mul")
    scale = g.other(scaled, cast)
    if scale not in g.inits or list(g.inits[scale].dims) != [width]:
        raise NotAStream(f"Mul '{node_name(scaled)}' after the RMSNorm is not a [{width}] scale")
    readers = [r.input[1] for r in _linear_readers(g, scaled.output[0], width, rank)]
    return Norm(eps=eps, normalized=mul.output[0], scale=scale, readers=readers)
