"""Expert and data parallelism on a JAX mesh: `jaxmoe.moe(..., mesh=, expert_axis=, data_axis=)`, and
`jaxmoe.expert_ffn` with the same options for routing done by the caller (steps 2 to 4 below).

Everything goes through JAX's own sharding (a Mesh, `jax.shard_map`, XLA collectives); the per-device
work is the single-device pipeline (`pipeline.route_tokens`, which gives the routing and its
RouterStats, and the implementation's expert FFN), so the fused kernels run on every device, forward
and backward.

Layout. x, flattened to [T, d], is split over the token axes: data_axis and expert_axis together (the
expert-parallel devices split the batch too, as in GShard and DeepSpeed-MoE, so no token is routed
twice). w_gate, w_up and w_down are split on E over expert_axis (replicated over data_axis); the
router weight and the bias are replicated.

Per device (T_l local tokens, P devices on expert_axis, E_l = E / P local experts):
1. router logits and routing of the local tokens, with global expert ids;
2. a padded all_to_all over expert_axis: every device of the group receives all T_l tokens of every
   other (x, ids and routing weights), P * T_l rows;
3. the expert FFN on those rows with the local expert range [axis_index * E_l, (axis_index + 1) * E_l):
   assignments to other devices' experts give no row, zero output and zero weight gradient here
   (`reference.is_local`, and its twin in kernels/dispatch.py);
4. the reverse all_to_all returns each device's partial outputs for my tokens, [P, T_l, d], summed in
   the fixed order p = 0..P-1 in float32 and rounded once to x's dtype;
5. the aux losses: per-device RouterStats (integer counts, float sums) are psum'd over the token axes
   and only then go through `reference.finalize_aux`, the one formula, so they equal the unsharded
   losses (the float sums are tiny [E] reductions; their order is XLA's all-reduce's).

Why a padded all_to_all rather than jax.lax.ragged_all_to_all: shapes stay static (no host sync, no
count exchange before the payload), and T_l rows per destination is a true worst-case bound (a token
goes at most once to each device, whatever its k experts are), so nothing is ever dropped. The padding
is also small where expert parallelism is used: with top-k routing over P devices the expected share
of (token, device) pairs that carry work is 1 - (1 - 1/P)^k, e.g. 0.90 for k = 8 and P = 4, 0.66 for
k = 8 and P = 8. Each token is sent to each device once, with its k ids; the receiver picks its own.

Sums of outputs and gradients over devices are written out as ordered float32 adds (`_ordered_sum`),
never psum or an XLA reduce, so results are bitwise reproducible and rounded once. The gradients of
the replicated weights (router, bias, and the expert weights over data_axis) are psum'd by
shard_map's transpose, as for any replicated parameter.

shard_map runs with check_vma=False: jax-triton's kernel call and jax.pure_callback (the interpreter)
carry no varying-manual-axes types, so JAX cannot type the kernels' outputs. Without the check,
shard_map's transpose still sums the cotangent of each replicated input over the axes it is
replicated on (tests/test_sharding.py holds every gradient against one device).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxmoe import _validate, pipeline, reference


def normalize_axes(mesh, expert_axis, data_axis) -> tuple[str | None, tuple[str, ...]]:
    """(expert_axis, data_axes) after type checks; data_axis may name one axis or a sequence of them.

    With a mesh, the names must be its axes; without one they are checked where the mesh is known.
    """
    if expert_axis is not None and not isinstance(expert_axis, str):
        raise TypeError(f"expert_axis must be None or a mesh axis name (str), got {type(expert_axis).__name__}")
    if data_axis is None:
        data_axes = ()
    elif isinstance(data_axis, str):
        data_axes = (data_axis,)
    elif isinstance(data_axis, Sequence) and all(isinstance(a, str) for a in data_axis):
        data_axes = tuple(data_axis)
    else:
        raise TypeError(f"data_axis must be None, a mesh axis name or a sequence of them, got {data_axis!r}")
    if expert_axis is not None and expert_axis in data_axes:
        raise ValueError(f"expert_axis={expert_axis!r} is also in data_axis={data_axis!r}; each mesh axis "
                         f"is either expert-parallel or data-parallel")
    if len(set(data_axes)) != len(data_axes):
        raise ValueError(f"data_axis names an axis twice: {data_axis!r}")
    if mesh is not None:
        if expert_axis is None and not data_axes:
            raise ValueError("mesh= needs expert_axis and/or data_axis: the mesh axes to split experts and "
                             "tokens over")
        for name, axis in [("expert_axis", expert_axis)] + [("data_axis", a) for a in data_axes]:
            if axis is not None and axis not in mesh.axis_names:
                raise ValueError(f"{name}={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    return expert_axis, data_axes


def implied_data_axes(x):
    """(mesh, data axes) when x [..., d] comes split over Explicit mesh axes on its token dims and the
    caller named no axes: the layer then runs data-parallel over those axes, as any jnp function would
    follow x's sharding (the plain pipeline's scatters cannot: an Explicit sharding needs their output
    sharding spelt out). None when x carries no such split. The mesh is x's own (a concrete one when x
    is a placed array, else the jit context's or x's abstract one)."""
    if not isinstance(x, jax.Array):  # numpy arrays (and bad inputs, left to the checks) carry no split
        return None
    spec = getattr(jax.typeof(x), "sharding", None)
    if spec is None or spec.mesh.empty:
        return None
    explicit = _explicit_axes(spec.mesh)
    axes = []
    for entry in tuple(spec.spec)[:x.ndim - 1]:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None and axis in explicit and axis not in axes:
                axes.append(axis)
    if not axes:
        return None
    try:  # a placed array, or an eager transformation's tracer of one, knows its devices
        concrete = x.sharding
    except Exception:  # a jit tracer does not: the abstract mesh serves there
        concrete = None
    if isinstance(concrete, NamedSharding) and not concrete.mesh.abstract_mesh.empty:
        return concrete.mesh, tuple(axes)
    context = jax.sharding.get_abstract_mesh()
    return (None if not context.empty else spec.mesh), tuple(axes)


def _current_mesh(expert_axis, data_axes):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"expert_axis={expert_axis!r} and data_axis={data_axes or None!r} name mesh axes, but "
                         f"there is no mesh: pass mesh= or call under jax.set_mesh(mesh)")
    return mesh


def _explicit_axes(mesh) -> set[str]:
    return {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}


def _explicit_spec(mesh, spec: P) -> NamedSharding:
    """spec with only the mesh's Explicit axes left in it (the Auto ones are XLA's to place)."""
    explicit = _explicit_axes(mesh)

    def keep(entry):
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n in explicit)
        return names or None

    return NamedSharding(mesh, P(*(keep(e) for e in spec)))


def _explicit_reshard(a, mesh, spec: P):
    """Under Explicit mesh axes, shard_map needs its inputs already laid out as in_specs say; Auto axes
    it reshards itself (and jax.sharding.reshard takes Explicit axes only)."""
    if a is None or not _explicit_axes(mesh):
        return a
    return jax.sharding.reshard(a, _explicit_spec(mesh, spec))


def sharded_moe(x, params: pipeline.MoEParams, router, experts, *, routing_fn: Callable, expert_ffn_fn: Callable,
                mesh, expert_axis, data_axis, with_routing: bool = False):
    """`pipeline.moe_pipeline` over a mesh: see the module docstring. Returns (y [..., d], MoEAux), and
    with with_routing a MoERouting, split over the token axes as y is."""
    pipeline.check(x, params, router)
    mesh, expert_axis, token_axes, P_e = _plan(x, params.w_gate, mesh, expert_axis, data_axis)
    lead = x.shape[:-1]
    T = math.prod(lead)
    if T == 0:  # nothing to distribute
        return pipeline.moe_pipeline(x, params, router, experts, routing_fn=reference.finalized(routing_fn),
                                     expert_ffn_fn=expert_ffn_fn, with_routing=with_routing)

    # The routed part runs per device; the shared experts (dense, per token) run on x as it is sharded.
    routed = params._replace(shared_w_gate=None, shared_w_up=None, shared_w_down=None, shared_output_gate=None)

    def local(x_l, routed):
        logits, routing, stats = pipeline.route_tokens(x_l, routed, router, routing_fn)
        ffn_args = (x_l, routing.weights, routing.ids, routed.w_gate, routed.w_up, routed.w_down)
        if expert_axis is None:
            y = expert_ffn_fn(*ffn_args, 0, *routed.expert_biases, experts=experts)
        else:
            y = _expert_parallel_ffn(*ffn_args, routed.expert_biases, expert_axis=expert_axis, devices=P_e,
                                     expert_ffn_fn=functools.partial(expert_ffn_fn, experts=experts))
        stats = jax.lax.psum(stats, token_axes)
        if with_routing:
            return y, reference.finalize_aux(stats, router.top_k), reference.MoERouting(logits, routing.ids,
                                                                                        routing.weights)
        return y, reference.finalize_aux(stats, router.top_k)

    tokens = P(token_axes, None)
    by_expert = P(expert_axis)  # P(None) when only data-parallel: replicated
    param_specs = routed._replace(
        router_weight=P(), w_gate=by_expert, w_up=by_expert, w_down=by_expert,
        **{name: None if getattr(routed, name) is None else spec
           for name, spec in (("router_bias", P()), ("selection_bias", P()), ("b_gate", by_expert),
                              ("b_up", by_expert), ("b_down", by_expert))})
    in_specs = (tokens, param_specs)
    out_specs = (tokens, reference.MoEAux(P(), P(), P()))
    if with_routing:
        out_specs += (reference.MoERouting(tokens, tokens, tokens),)
    x2d = _flatten_tokens(x, mesh, tokens)
    args = (_explicit_reshard(x2d, mesh, tokens),
            type(routed)(*(_explicit_reshard(a, mesh, spec) for a, spec in zip(routed, param_specs))))
    y, aux, *routing = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                     check_vma=False)(*args)
    y = pipeline.add_shared(y, x2d, params)
    if len(lead) > 1:
        y = _unflatten_tokens(y, x, mesh, token_axes)
        routing = [reference.MoERouting(*(_unflatten_tokens(a, x, mesh, token_axes) for a in r)) for r in routing]
    return y, aux, *routing


def _plan(x, w_gate, mesh, expert_axis, data_axis):
    """(mesh, expert_axis, token_axes, P_e): the mesh (mesh= or jax.set_mesh's) and the axes, after
    checking that E divides over expert_axis and x's T tokens over the token axes."""
    expert_axis, data_axes = normalize_axes(mesh, expert_axis, data_axis)
    if mesh is None:
        mesh = _current_mesh(expert_axis, data_axes)
        normalize_axes(mesh, expert_axis, data_axis)
    token_axes = (*data_axes, *([expert_axis] if expert_axis else []))
    shards = math.prod(mesh.shape[a] for a in token_axes)
    P_e = mesh.shape[expert_axis] if expert_axis else 1
    E = w_gate.shape[0]
    if E % P_e:
        raise ValueError(f"expert_axis={expert_axis!r} has size {P_e}, which does not divide the E={E} experts "
                         f"(w_gate [E, d, f] = {w_gate.shape}): each device must hold E / {P_e} of them")
    T = math.prod(x.shape[:-1])
    if T % shards:
        sizes = " and ".join(f"{name}={a!r} (size {mesh.shape[a]})"
                             for name, a in [("data_axis", a) for a in data_axes] + [("expert_axis", expert_axis)]
                             if a)
        raise ValueError(f"T={T} tokens (x {x.shape} flattened to [T, d]) do not split evenly over the {shards} "
                         f"devices of {sizes}")
    return mesh, expert_axis, token_axes, P_e


def sharded_expert_ffn(x, weights, ids, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *, experts,
                       expert_ffn_fn: Callable, mesh, expert_axis, data_axis):
    """`expert_ffn` over a mesh, for routing done by the caller: x [T, d], weights and ids [T, k] split
    over the token axes, the expert weights over expert_axis; steps 2 to 4 of the module docstring."""
    _validate.check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down)
    mesh, expert_axis, token_axes, P_e = _plan(x, w_gate, mesh, expert_axis, data_axis)
    expert_ffn_fn = functools.partial(expert_ffn_fn, experts=experts)
    biases = (b_gate, b_up, b_down)
    if x.shape[0] == 0:  # nothing to distribute
        return expert_ffn_fn(x, weights, ids, w_gate, w_up, w_down, 0, *biases)

    def local(x_l, weights_l, ids_l, w_gate, w_up, w_down, biases):
        if expert_axis is None:
            return expert_ffn_fn(x_l, weights_l, ids_l, w_gate, w_up, w_down, 0, *biases)
        return _expert_parallel_ffn(x_l, weights_l, ids_l, w_gate, w_up, w_down, biases, expert_axis=expert_axis,
                                    devices=P_e, expert_ffn_fn=expert_ffn_fn)

    tokens, by_expert = P(token_axes, None), P(expert_axis)
    bias_specs = tuple(None if b is None else by_expert for b in biases)
    in_specs = (tokens, tokens, tokens, by_expert, by_expert, by_expert, bias_specs)
    args = [_explicit_reshard(a, mesh, spec) for a, spec in zip((x, weights, ids, w_gate, w_up, w_down), in_specs)]
    args.append(tuple(_explicit_reshard(b, mesh, spec) for b, spec in zip(biases, bias_specs)))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tokens, check_vma=False)(*args)


def _flatten_tokens(x, mesh, tokens: P):
    """x [..., d] -> [T, d]. Under Explicit axes a reshape that merges a sharded dim (x split over S of
    [B, S, d], say) has no sharding of its own: it is named, the token split shard_map takes next."""
    T, d = math.prod(x.shape[:-1]), x.shape[-1]
    if not _explicit_axes(mesh):
        return x.reshape(T, d)
    return jnp.reshape(x, (T, d), out_sharding=_explicit_spec(mesh, tokens))


def _unflatten_tokens(y, x, mesh, token_axes: tuple[str, ...]):
    """y [T, n], split over the token axes -> [*lead, n] (lead = x's leading dims).

    Under Auto axes XLA picks the layout. Under Explicit axes the reshape must name one, and splitting a
    sharded dim into dims that do not each divide by its shards has no natural one (T = 64 over 8
    devices as [4, 16]): y takes x's layout when x is split on the mesh, else the token axes spread, in
    order, over the leading dims each divides, and what is left stays replicated."""
    lead, d = x.shape[:-1], y.shape[-1]
    if not _explicit_axes(mesh):
        return jnp.reshape(y, (*lead, d))
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or sharding.mesh.axis_names != mesh.axis_names or not any(sharding.spec):
        explicit = [a for a in token_axes if a in _explicit_axes(mesh)]
        sharding = NamedSharding(mesh, P(*_spread(lead, explicit, mesh), None))
    elif d != x.shape[-1]:  # the routing's [..., E] and [..., k] take x's layout of the leading dims only
        sharding = NamedSharding(sharding.mesh, P(*(tuple(sharding.spec) + (None,) * x.ndim)[:len(lead)], None))
    return jnp.reshape(y, (*lead, d), out_sharding=sharding)


def _spread(dims, axes: Sequence[str], mesh) -> list[tuple[str, ...] | None]:
    """A spec entry per dim: the axes, in order, each dim takes while it still divides by their sizes."""
    left, entries = list(axes), []
    for size in dims:
        taken = []
        while left and size % mesh.shape[left[0]] == 0:
            size //= mesh.shape[left[0]]
            taken.append(left.pop(0))
        entries.append(tuple(taken) or None)
    return entries


def _expert_parallel_ffn(x, weights, ids, w_gate, w_up, w_down, biases, *, expert_axis: str, devices: int,
                         expert_ffn_fn: Callable):
    """Inside shard_map: this device's tokens through the experts of every device of expert_axis."""
    T_l, d = x.shape
    k = ids.shape[1]

    def exchange(a):
        # [devices * T_l, ...]: block p goes to device p, and block p of the result came from device p.
        return jax.lax.all_to_all(a, expert_axis, 0, 0, tiled=True)

    # Every device gets every local token once, at its own index: no sort, and T_l rows per destination
    # bound any routing.
    recv_x = exchange(_replicate(x, devices).reshape(devices * T_l, d))
    recv_weights = exchange(_replicate(weights, devices).reshape(devices * T_l, k))
    recv_ids = exchange(jnp.broadcast_to(ids, (devices, T_l, k)).reshape(devices * T_l, k))
    expert_first = jax.lax.axis_index(expert_axis).astype(jnp.int32) * w_gate.shape[0]
    rows = expert_ffn_fn(recv_x, recv_weights, recv_ids, w_gate, w_up, w_down, expert_first, *biases)
    partials = exchange(rows).reshape(devices, T_l, d)  # partials[p]: device p's experts' share of my tokens
    return _ordered_sum(partials).astype(x.dtype)


def _ordered_sum(parts: jax.Array) -> jax.Array:
    """sum over axis 0 in float32, added in the order p = 0, 1, ...: the same bits every run."""
    total = parts[0].astype(jnp.float32)
    for p in range(1, parts.shape[0]):
        total = total + parts[p].astype(jnp.float32)
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _replicate(a: jax.Array, n: int) -> jax.Array:
    """a broadcast to [n, *a.shape]. Its VJP sums the n cotangents with `_ordered_sum` (autodiff's
    own transpose of a broadcast is an XLA reduce, whose order is the backend's choice)."""
    return jnp.broadcast_to(a, (n, *a.shape))


def _replicate_fwd(a, n):
    return _replicate(a, n), None


def _replicate_bwd(n, _, grad):
    return (_ordered_sum(grad).astype(grad.dtype),)


_replicate.defvjp(_replicate_fwd, _replicate_bwd)
