"""Per-row activation quantisation: an int8 graph whose vectors do not depend on batch mates.

onnxruntime's ``quantize_dynamic`` quantises each MatMul's activations with one scale and zero
point for the whole tensor (``DynamicQuantizeLinear``), computed over every row of every text in
the batch; so a text's vector moves with what it was batched with (cosine down to about 0.96
against itself alone on the export's reference texts). ``per_row_activations`` rewrites such a
graph so that every row (one token of one text) gets its own scale and zero point:

    scale = (max(max(x), 0) - min(min(x), 0)) / 255,  zp = round(-min(min(x), 0) / scale)

taken over the row's last axis, then quantised with one ``QuantizeLinear`` over the rows of a
2-D view (per-axis, axis 0). ``MatMulInteger`` only takes a per-tensor zero point for its first
input, so it runs with zero point 0 and the rows' zero points are taken out afterwards, in
int32 like the product itself: ``(q - zp) @ (w - w_zp) = q @ (w - w_zp) - zp * colsum(w -
w_zp)``, with the column sums precomputed from the quantised weights. The weights stay as
``quantize_dynamic`` left them.

A row's quantisation then reads only that row: a text's vector is the same alone or in any
batch (and closer to fp32: on the reference texts, mean cosine 0.998 against 0.992), at
0.79-0.87x the per-tensor graph's speed on one thread (``bench/raw_onnx.py``, two runs): the
per-row statistics and the correction are extra passes over the activations.
Needs ``onnx`` (the ``export`` and ``dev`` extras).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the variant name (``ORCH_EMBED_VARIANT``) and file stem of the rewritten graph
ROWS_VARIANT = "int8-rows"

_ZERO_U8, _ZERO, _TOP, _EPS, _FLAT, _LAST = (
    "rowq_zero_u8", "rowq_zero", "rowq_255", "rowq_eps", "rowq_flat", "rowq_last")


def per_row_activations(model: Any) -> Any:
    """Rewrite an ``onnx.ModelProto`` from ``quantize_dynamic`` in place; return it.

    Raises:
        ValueError: the graph does not have the shape ``quantize_dynamic`` gives (a quantised
            activation or its zero point feeding something other than a ``MatMulInteger`` with
            constant weights), or its opset is before 13; the model is then left as it was.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    plan = _plan(graph, consumers, weights, opset)  # checked before anything is changed
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in (
        (_ZERO_U8, np.array(0, np.uint8)), (_ZERO, np.array(0.0, np.float32)),
        (_TOP, np.array(255.0, np.float32)), (_EPS, np.array(1e-8, np.float32)),
        (_FLAT, np.array([-1], np.int64))))
    if opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), _LAST))

    def reduce(op: str, x: str, out: str) -> Any:  # axes became an input in opset 18
        if opset >= 18:
            return helper.make_node(op, [x, _LAST], [out], keepdims=1)
        return helper.make_node(op, [x], [out], axes=[-1], keepdims=1)

    nodes: list[Any] = []
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.output[0] in plan.offsets:
            zero_point, colsum = plan.offsets[node.output[0]]
            name = node.output[0]
            node.input[2] = _ZERO_U8
            node.output[0] = f"{name}_uncorrected"
            nodes += [node,  # the rows' zero points out, in int32 as the product itself
                      helper.make_node("Mul", [zero_point, colsum], [f"{name}_offset"]),
                      helper.make_node("Sub", [f"{name}_uncorrected", f"{name}_offset"], [name])]
            continue
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (q, scale, _zp) = node.input[0], node.output
        p = _prefix(node)
        zero_point = f"{p}_zp"
        nodes += [
            reduce("ReduceMin", x, f"{p}_rmin"),
            reduce("ReduceMax", x, f"{p}_rmax"),
            helper.make_node("Min", [f"{p}_rmin", _ZERO], [f"{p}_min"]),
            helper.make_node("Max", [f"{p}_rmax", _ZERO], [f"{p}_max"]),
            helper.make_node("Sub", [f"{p}_max", f"{p}_min"], [f"{p}_range"]),
            helper.make_node("Div", [f"{p}_range", _TOP], [f"{p}_step"]),
            helper.make_node("Max", [f"{p}_step", _EPS], [scale]),
            helper.make_node("Div", [f"{p}_min", scale], [f"{p}_low"]),
            helper.make_node("Neg", [f"{p}_low"], [f"{p}_nlow"]),
            helper.make_node("Round", [f"{p}_nlow"], [f"{p}_zr"]),
            helper.make_node("Clip", [f"{p}_zr", _ZERO, _TOP], [zero_point]),
            helper.make_node("Cast", [zero_point], [f"{p}_zu8"], to=TensorProto.UINT8),
            helper.make_node("Cast", [zero_point], [f"{zero_point}_i32"], to=TensorProto.INT32),
            # One QuantizeLinear over the rows: a 2-D view whose axis 0 is the rows.
            helper.make_node("Shape", [x], [f"{p}_shape"]),
            helper.make_node("Flatten", [x], [f"{p}_x2"], axis=-1),
            helper.make_node("Reshape", [scale, _FLAT], [f"{p}_s1"]),
            helper.make_node("Reshape", [f"{p}_zu8", _FLAT], [f"{p}_z1"]),
            helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_s1", f"{p}_z1"], [f"{p}_q2"],
                             axis=0),
            helper.make_node("Reshape", [f"{p}_q2", f"{p}_shape"], [q]),
        ]
    graph.initializer.extend(numpy_helper.from_array(value, name)
                             for name, value in plan.colsums.items())
    out = nodes
    del graph.node[:]
    graph.node.extend(out)
    stale = [v for v in graph.value_info if v.name.endswith(("_scale", "_zero_point"))]
    for info in stale:  # shapes inferred for the per-tensor scales no longer hold
        graph.value_info.remove(info)
    return model


def _prefix(quantize: Any) -> str:
    """The names of what replaces a DynamicQuantizeLinear node start with this."""
    return f"{quantize.name or quantize.output[0]}_rows"


@dataclass
class _Plan:
    #: MatMulInteger output -> (its activation rows' int32 zero points, weight column sums)
    offsets: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: column sums of ``w - w_zp`` (int32) by initializer name
    colsums: dict[str, np.ndarray] = field(default_factory=dict)


def _plan(graph: Any, consumers: dict[str, list[Any]], weights: dict[str, Any], opset: int
          ) -> _Plan:
    """Check that the graph is one ``quantize_dynamic`` makes; what the rewrite will add.

    Raises:
        ValueError: it is not (see ``per_row_activations``).
    """
    from onnx import numpy_helper

    if opset < 13:
        raise ValueError(f"opset {opset}: per-row QuantizeLinear needs opset 13 or later")
    plan = _Plan()
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        q, _scale, zp = node.output
        for user in consumers.get(zp, []):
            if user.op_type != "MatMulInteger" or list(user.input[2:3]) != [zp]:
                raise ValueError(f"{zp} feeds {user.op_type} {user.name!r} other than as a "
                                 "MatMulInteger's zero point: not a quantize_dynamic graph")
        for matmul in consumers.get(q, []):
            if (matmul.op_type != "MatMulInteger" or matmul.input[0] != q
                    or matmul.input[1] not in weights):
                raise ValueError(f"{q} feeds {matmul.op_type} {matmul.name!r}, not a "
                                 "MatMulInteger with constant weights: not a quantize_dynamic "
                                 "graph")
            w = numpy_helper.to_array(weights[matmul.input[1]]).astype(np.int64)
            w_zp = numpy_helper.to_array(weights[matmul.input[3]]).astype(np.int64) \
                if len(matmul.input) > 3 and matmul.input[3] else 0
            colsum = f"{matmul.output[0]}_rows_colsum"
            plan.colsums[colsum] = (w - w_zp).sum(axis=0).astype(np.int32)
            zero_point = f"{_prefix(node)}_zp_i32"
            plan.offsets[matmul.output[0]] = (zero_point, colsum)
    return plan
