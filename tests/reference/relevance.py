"""An explicit per-operator relevance reference: LRP written message by message over the recorded operators.

It uses the recorded tape (which ATen operators ran on which values) and autograd's dense local Jacobians
(:func:`reference.dense.local_blocks`), never the engine's rules, overlays or tape rewrites. For every record, last
to first, with ``R_j`` the relevance of output element ``j`` and ``z_j`` its value:

    R_i += f * sum_j z_ij / s(z_j) * R_j,     z_ij = x_i * J~_ji

* ``s(z) = z + eps * sign(z)`` (``sign(0) = 1``) for matrix products (mm, bmm, addmm), ``s(z) = z`` otherwise
  (a term with ``z_j = 0`` contributes 0);
* ``J~`` is autograd's Jacobian of the operator w.r.t. argument ``x``, except for ``native_layer_norm``, where it is
  autograd's Jacobian of ``w * (x - mean(x)) * rstd + b`` with ``rstd`` a constant (sigma detached);
* ``f = 1/2`` for each operand of a product of two input-dependent tensors under attn_lrp/cp_lrp (uniform rule);
* an operand that comes (through views/casts) from ``rsqrt`` sends nothing (the normaliser is constant), and under
  cp_lrp neither does one that comes from ``_softmax`` (attention weights constant);
* element-wise activations (gelu, silu, relu, tanh, ...) and activation modules (GPT-2's NewGELUActivation, taken
  as one function of its input): ``R_x = R_y`` (identity rule).

The root starts with ``R = root``. Everything is float64 and dense: use it on tiny models only.
"""

from __future__ import annotations

import torch
import transformers

from reference.dense import local_blocks
from inseq_semiring.graph.recorder import record

_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm"}
_FIRST_FACTOR = {"mm": 0, "bmm": 0, "addmm": 1, "baddbmm": 1}
_ACTIVATIONS = {"gelu", "silu", "relu", "tanh", "sigmoid"}
_VIEWS = {"view", "_unsafe_view", "expand", "_to_copy", "clone", "alias", "unsqueeze", "transpose", "reshape"}
_ACTIVATION_MODULES = (transformers.activations.NewGELUActivation,)


def _name(rec) -> str:
    return rec.op._schema.name.split("::")[-1]


def reference_relevance(fn, inputs, method: str, *, epsilon: float, model=None) -> list[torch.Tensor]:
    tape = record(fn, tuple(inputs), model=model)
    producer = {t: rec for rec in tape.records for t in rec.output_ids if t is not None}

    def origin(tid):
        while tid in producer and _name(producer[tid]) in _VIEWS:
            tid = next(t for t in producer[tid].leaf_ids if t is not None)
        return _name(producer[tid]) if tid in producer else None

    # activation modules: the records inside become one identity message from the module's input to its output
    groups: dict[str, list] = {}
    for rec in tape.records:
        if model is not None and rec.module_path and isinstance(model.get_submodule(rec.module_path),
                                                                  _ACTIVATION_MODULES):
            groups.setdefault(rec.module_path, []).append(rec)
    inside, module_of_output = set(), {}
    for path, recs in groups.items():
        made = {t for r in recs for t in r.output_ids if t is not None}
        (xid,) = {t for r in recs for t in r.leaf_ids if t is not None and t not in made}
        module_of_output[recs[-1].output_ids[0]] = xid
        inside.update(r.index for r in recs)

    R = {tape.root_id: tape.root.detach().clone()}

    def give(tid, value):
        R[tid] = value if tid not in R else R[tid] + value

    for rec in reversed(tape.records):
        outs = [s for s, t in enumerate(rec.output_ids) if t is not None and t in R]
        if not outs:
            continue
        if rec.output_ids[0] in module_of_output:
            give(module_of_output[rec.output_ids[0]], R.pop(rec.output_ids[0]))
            continue
        assert rec.index not in inside, f"record {rec.index} inside an activation module is reached from outside"
        name = _name(rec)
        nodes = [i for i, t in enumerate(rec.leaf_ids) if t is not None]
        for slot in outs:
            _messages(rec, slot, name, nodes, R.pop(rec.output_ids[slot]).reshape(-1), method, epsilon, origin, give)
    return [R.get(t, torch.zeros_like(x)) for t, x in zip(tape.input_ids, inputs)]


def _messages(rec, slot, name, nodes, Rj, method, epsilon, origin, give):
    """Send output ``slot``'s relevance ``Rj`` (flat) to the record's arguments."""
    z = rec.outputs[slot].reshape(-1).to(torch.float64)
    if name in _ACTIVATIONS:
        give(rec.leaf_ids[0], Rj.reshape(rec.leaves[0].shape))
        return
    factor, kept = 1.0, list(nodes)
    two = name in _PRODUCTS and len([i for i in nodes if i in (_FIRST_FACTOR[name], _FIRST_FACTOR[name] + 1)]) == 2
    two = two or (name == "mul" and len(nodes) == 2)
    if two:
        kept = [i for i in nodes if origin(rec.leaf_ids[i]) != "rsqrt"]
        if method == "cp_lrp":
            kept = [i for i in kept if origin(rec.leaf_ids[i]) != "_softmax"]
        if len(kept) == 2 and method in ("attn_lrp", "cp_lrp"):
            factor = 0.5
    if name in _PRODUCTS:
        sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
        denom = z + epsilon * sign
    else:
        denom = z
    ratio = torch.where(denom != 0, Rj / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(Rj))
    if name == "native_layer_norm":
        x, w, b = rec.leaves[0], rec.args[2], rec.args[3]
        rstd = rec.outputs[2]

        def detached(v):
            return w * (v - v.mean(-1, keepdim=True)) * rstd + b

        jac = torch.autograd.functional.jacobian(detached, x).reshape(z.numel(), x.numel())
        give(rec.leaf_ids[0], (x.reshape(-1) * (jac.T @ ratio)).reshape(x.shape))
        return
    live = {rec.output_ids[slot]}
    for block in local_blocks(rec, live):
        if block.leaf not in kept:
            continue
        x = rec.leaves[block.leaf].reshape(-1).to(torch.float64)
        give(block.src, factor * (x * (block.weight.T @ ratio)).reshape(rec.leaves[block.leaf].shape))
