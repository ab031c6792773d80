"""The jax.lax implementation: the specification every fast path is held against.

Pipeline: stable argsort of the expert ids (dispatch), `jax.lax.ragged_dot` for the grouped GEMMs,
then a gather back to assignment order and a weighted sum over each token's k rows (combine).

Every permutation here is a gather whose VJP is the gather by the inverse permutation. JAX's own VJP
of a gather is a scatter-add, which XLA runs with float atomics on GPU; a permutation has exactly one
source per row, so gathering instead keeps outputs and gradients bitwise reproducible.

`make_ragged_dot` states the backward of one grouped GEMM as two more grouped GEMMs (dlhs, drhs): the
per-GEMM VJP the kernels are held against, and the glue that lets a peer's ragged GEMM stand in for
`jax.lax.ragged_dot` in `grouped_expert_ffn`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _tiled_dot, _validate
from jaxmoe.options import Experts, Router, make_experts, make_router
from jaxmoe.routing import Routing, expert_probs, route


class MoEAux(NamedTuple):
    """Auxiliary router outputs of `moe`."""

    load_balancing_loss: jax.Array  # E * sum_e (share of the T*k assignments on e) * (mean prob of e)
    router_z_loss: jax.Array  # mean over tokens of logsumexp(logits)^2
    expert_counts: jax.Array  # [E] int32, assignments per expert


class MoERouting(NamedTuple):
    """What `moe` routed, with x's leading dims (the layers sow these under the same names)."""

    router_logits: jax.Array  # [..., E] float32
    routing_ids: jax.Array  # [..., k] int32
    routing_weights: jax.Array  # [..., k] float32


@jax.custom_vjp
def permute_rows(a: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """a[index], where index is a permutation and inverse its inverse."""
    return a[index]


def _permute_rows_fwd(a, index, inverse):
    return a[index], (index, inverse)


def _permute_rows_bwd(residuals, grad):
    index, inverse = residuals
    return grad[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def is_local(local_ids: jax.Array, E: int) -> jax.Array:
    """The local-expert-range rule (kernels/dispatch.py holds the same): an assignment whose id minus
    expert_first lies outside [0, E) belongs to another device (or is out of range). It gets no row,
    contributes exactly zero to y and gets a zero gradient for its routing weight here."""
    return (local_ids >= 0) & (local_ids < E)


def _expert_counts(flat_ids: jax.Array, E: int) -> jax.Array:
    """Assignments per expert; ids outside [0, E) land in a dropped overflow bin."""
    bins = jnp.where(is_local(flat_ids, E), flat_ids, E)
    return jnp.zeros(E + 1, jnp.int32).at[bins].add(1)[:E]  # integer adds: order cannot matter


def _group_rows(group_sizes, n_rows: int, g):
    """[n_rows, 1] bool: the rows of group g (groups hold consecutive rows, in order)."""
    starts = jnp.cumsum(group_sizes) - group_sizes
    rows = jnp.arange(n_rows)
    return ((rows >= starts[g]) & (rows < starts[g] + group_sizes[g]))[:, None]


def _masked_rows_dot(lhs, rhs, group_sizes, precision, out_dtype):
    """out [M, N] = lhs_g @ rhs[g] for each group's rows, the rows of other groups selected away."""

    def one_group(g, out):
        mine = _group_rows(group_sizes, lhs.shape[0], g)
        part = jnp.dot(jnp.where(mine, lhs, 0), rhs[g], precision=precision, preferred_element_type=out_dtype)
        return jnp.where(mine, part, out)

    return jax.lax.fori_loop(0, rhs.shape[0], one_group, jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype))


def ragged_dot_transposes(lhs, rhs, group_sizes, dout, *, precision=None):
    """(dlhs, drhs) of default_ragged_dot for the cotangent dout, with no forward recomputed:
    dlhs = dout_g @ rhs[g]^T and drhs[g] = lhs_g^T @ dout_g, one group at a time with the other groups'
    rows selected away, in the cotangent's dtype as autodiff of the dots would compute them.

    Written out, on every backend, rather than left to jax.linear_transpose of jax.lax.ragged_dot: on
    GPUs XLA expands both transposes (and even a forward-style ragged dot of a float32 cotangent) into
    dense [rows, groups * K] float32 operands, 16 GiB for Qwen3-30B-A3B at T=2048, which ran a test out
    of memory. The loop does the same FLOPs in the memory of one masked copy; selecting keeps a
    non-finite weight in its own group's rows. On CPU the loop runs over row blocks instead
    (jaxmoe/_tiled_dot.py), which costs the rows' work rather than the rows' times the groups'."""
    if _on_cpu():
        return _tiled_dot.rows_dot_transposes(lhs, rhs, group_sizes, dout, precision=precision)
    acc = jnp.promote_types(dout.dtype, lhs.dtype)
    dlhs = _masked_rows_dot(dout, jnp.swapaxes(rhs, 1, 2).astype(acc), group_sizes, precision, acc)
    return dlhs.astype(lhs.dtype), _masked_drhs(lhs, rhs, group_sizes, dout, precision)


def _masked_drhs(lhs, rhs, group_sizes, dout, precision):
    """drhs[g] = lhs_g^T @ dout_g, one group at a time with the other groups' rows selected away."""
    acc = jnp.promote_types(dout.dtype, lhs.dtype)

    def one_group(g, drhs):
        mine = _group_rows(group_sizes, lhs.shape[0], g)
        part = jnp.dot(jnp.where(mine, lhs, 0).astype(acc).T, jnp.where(mine, dout, 0), precision=precision,
                       preferred_element_type=acc)
        return drhs.at[g].set(part.astype(rhs.dtype))

    return jax.lax.fori_loop(0, rhs.shape[0], one_group, jnp.zeros(rhs.shape, rhs.dtype))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _all_finite(rhs):
    return jnp.isfinite(rhs).all()


def _forward(lhs, rhs, group_sizes, precision, out_dtype):
    if _on_cpu():
        return _tiled_dot.rows_dot(lhs, rhs, group_sizes, precision=precision, out_dtype=out_dtype)
    lax_dot = functools.partial(jax.lax.ragged_dot, precision=precision, preferred_element_type=out_dtype)
    masked = functools.partial(_masked_rows_dot, precision=precision, out_dtype=out_dtype)
    return jax.lax.cond(_all_finite(rhs), lax_dot, masked, lhs, rhs, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged_dot(lhs, rhs, group_sizes, precision, out_dtype):
    return _forward(lhs, rhs, group_sizes, precision, out_dtype)


def _ragged_dot_fwd(lhs, rhs, group_sizes, precision, out_dtype):
    return _forward(lhs, rhs, group_sizes, precision, out_dtype), (lhs, rhs, group_sizes)


def _ragged_dot_bwd(precision, out_dtype, residuals, dout):
    return (*ragged_dot_transposes(*residuals, dout, precision=precision), None)


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def default_ragged_dot(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
    """The reference's grouped GEMM: `jax.lax.ragged_dot` where that keeps Inf and NaN in their own rows.

    XLA's ragged_dot multiplies the rows of other groups (zeros) by each group's weights, so an Inf or
    NaN in one expert's weights (0 * Inf = NaN) reached every token, on CPUs and on an H200 alike. The
    masked form (_masked_rows_dot, one dense dot per group) selects, rather than multiplies, both the
    group's input rows and its output rows, so a non-finite value stays in the rows it touches. On GPUs
    it takes over only when a weight is not finite (a check that reads the weights once more). On CPU,
    where XLA's ragged_dot costs as much as the masked form (a dense dot per group over all rows), the
    rows go through jaxmoe/_tiled_dot.py instead: the same selection per block of rows and group, at
    about the cost of one dense dot. The VJP is written out (ragged_dot_transposes), so reverse mode keeps only the
    operands, never per-group copies.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    return _ragged_dot(lhs, rhs, jnp.asarray(group_sizes), precision, jnp.dtype(preferred_element_type or lhs.dtype))


def _row_experts(group_sizes, n_rows: int):
    """[n_rows] int32: the group of each row (groups hold consecutive rows); rows past the last group get
    len(group_sizes)."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(n_rows, dtype=group_sizes.dtype),
                            side="right").astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def expert_rows(b, group_sizes, n_rows: int):
    """[n_rows, N] float32: row r holds b[e] for the expert e whose group holds r (zero past the last group).

    A gather, so a non-finite bias stays in its own expert's rows; its VJP adds each group's rows with
    the row-selecting loop of the grouped GEMMs' transposes (a gather's own VJP is a scatter-add, which
    XLA runs with float atomics on GPU)."""
    E = b.shape[0]
    row_experts = _row_experts(group_sizes, n_rows)
    rows = b.astype(jnp.float32)[jnp.minimum(row_experts, E - 1)]
    return jnp.where((row_experts < E)[:, None], rows, 0.0)


def _expert_rows_fwd(b, group_sizes, n_rows):
    return expert_rows(b, group_sizes, n_rows), (b, group_sizes)


def _expert_rows_bwd(n_rows, residuals, d_rows):
    b, group_sizes = residuals
    ones = jnp.ones((n_rows, 1), jnp.float32)
    db = _masked_drhs(ones, jnp.zeros((b.shape[0], 1, b.shape[1]), jnp.float32), group_sizes, d_rows, None)
    return db[:, 0, :].astype(b.dtype), None


expert_rows.defvjp(_expert_rows_fwd, _expert_rows_bwd)


def _clamp_above(a, limit: float):
    """min(a, limit) whose gradient is 1 up to and at the limit (as torch.clamp's), and NaN stays NaN."""
    return jnp.where(a > limit, limit, a)


def activation(gate, up, experts: Experts):
    """h from the gate and up pre-activations (float32), as `jaxmoe.Experts` defines it."""
    if experts.activation == "swiglu":
        return jax.nn.silu(gate) * up
    limit = experts.limit
    g = _clamp_above(gate, limit)
    u = -_clamp_above(-_clamp_above(up, limit), limit)  # clip(up, -limit, limit)
    return (u + 1.0) * (g * jax.nn.sigmoid(experts.alpha * g))


def grouped_expert_ffn(x, weights, ids, w_gate, w_up, w_down, expert_first=0, b_gate=None, b_up=None, b_down=None,
                       *, experts: Experts = Experts(), ragged_dot: Callable = default_ragged_dot):
    """The expert FFN with a pluggable grouped GEMM (the benchmark swaps in peers' ragged_dot).

    The expert weights hold experts [expert_first, expert_first + E) (expert_first: an int or a traced
    int32 scalar, 0 on one device); assignments to other experts follow `is_local`. b_gate, b_up [E, f]
    and b_down [E, d] are the experts' biases (all or none); `experts` the static options (jaxmoe.Experts).
    """
    T, d = x.shape
    k = ids.shape[1]
    E = w_gate.shape[0]
    if T == 0:
        return jnp.zeros((0, d), x.dtype)
    local_ids = ids.reshape(-1).astype(jnp.int32) - jnp.asarray(expert_first, jnp.int32)
    in_range = is_local(local_ids, E)
    # Assignments that are not local sort last, past every group, and get zero weight below.
    perm = jnp.argsort(jnp.where(in_range, local_ids, E), stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))
    group_sizes = _expert_counts(local_ids, E)
    w = jnp.where(in_range, weights.reshape(-1).astype(jnp.float32), 0.0)
    n = T * k

    x_sorted = permute_rows(jnp.repeat(x, k, axis=0), perm, inverse)
    gate = ragged_dot(x_sorted, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = ragged_dot(x_sorted, w_up, group_sizes, preferred_element_type=jnp.float32)
    if experts.weight_on == "input":  # (w x) W = w (x W): the weight scales the products, before any bias
        w_sorted = permute_rows(w[:, None], perm, inverse)
        gate, up = gate * w_sorted, up * w_sorted
    if b_gate is not None:
        gate = gate + expert_rows(b_gate, group_sizes, n)
        up = up + expert_rows(b_up, group_sizes, n)
    h = activation(gate, up, experts).astype(x.dtype)
    out_sorted = ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)
    if b_down is not None:
        out_sorted = out_sorted + expert_rows(b_down, group_sizes, n)

    rows = permute_rows(out_sorted, inverse, perm)  # back to assignment order t*k + j
    rows = jnp.where(in_range[:, None], rows, 0.0)
    if experts.weight_on == "output":
        rows = rows * w[:, None]
    y = rows.reshape(T, k, d).sum(axis=1)
    return y.astype(x.dtype)


def expert_ffn(x, weights, ids, w_gate, w_up, w_down, *, b_gate=None, b_up=None, b_down=None,
               experts: Experts | None = None, implementation=None):
    """y[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]), FFN_e(v) = (silu(v @ Wg[e]) * (v @ Wu[e])) @ Wd[e]
    (with biases and `jaxmoe.Experts` options as that class says).

    Args:
      x: [T, d] float32, bfloat16 or float16.
      weights: [T, k] routing weights (any float dtype; used in float32).
      ids: [T, k] integer expert ids in [0, E).
      w_gate, w_up: [E, d, f], x's dtype.
      w_down: [E, f, d], x's dtype.
      b_gate, b_up: optional [E, f] biases of the gate and up projections, b_down [E, d] of the down
        projection, x's dtype (all three or none).
      experts: a `jaxmoe.Experts` (activation, weight on the output or the input); None: SwiGLU.
      implementation: accepted for signature parity with `jaxmoe.expert_ffn`; must be None or "xla".

    Returns:
      y: [T, d] in x's dtype. Products accumulate in float32; the activation is rounded to x's dtype
      before the down projection, as the fused kernels do.
    """
    if implementation not in (None, "xla"):
        raise ValueError(f"jaxmoe.reference.expert_ffn runs only implementation='xla', got {implementation!r}")
    _validate.check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down)
    return grouped_expert_ffn(x, weights, ids, w_gate, w_up, w_down, 0, b_gate, b_up, b_down,
                              experts=make_experts(experts))


# jax.lax.RaggedDotDimensionNumbers of the three GEMMs of a grouped GEMM and its VJP, for lhs [M, K] with
# rows grouped (group g holds group_sizes[g] consecutive rows) and rhs [G, K, N]:
RAGGED_DOT_DIMS = jax.lax.RaggedDotDimensionNumbers(  # out [M, N] = lhs @ rhs[g] per row group
    dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
RAGGED_DOT_DLHS_DIMS = jax.lax.RaggedDotDimensionNumbers(  # dlhs [M, K] = dout [M, N] @ rhs[g]^T per row group
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
RAGGED_DOT_DRHS_DIMS = jax.lax.RaggedDotDimensionNumbers(  # drhs [G, K, N] = lhs_g^T @ dout_g, rows contracted
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def make_ragged_dot(general: Callable) -> Callable:
    """A `jax.lax.ragged_dot`-style grouped GEMM whose VJP is two more grouped GEMMs of the same backend.

    Args:
      general: general(lhs, rhs, group_sizes, dims, precision, preferred_element_type) -> array, with the
        semantics of `jax.lax.ragged_dot_general`; it is called with the three dimension numbers above.

    Returns:
      ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes [G], *, precision=None, preferred_element_type=None)
      -> [M, N]. The forward passes preferred_element_type through (the pipeline asks for float32). The
      backward computes dlhs = dout @ rhs[g]^T (ragged rows) and drhs[g] = lhs_g^T @ dout_g (ragged
      contraction), both in the operands' dtype, with the cotangent first rounded to the operands' dtype:
      tokamax's Mosaic GPU kernels reject a float32 cotangent against bf16 operands.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type):
        return general(lhs, rhs, group_sizes, RAGGED_DOT_DIMS, precision, preferred_element_type)

    def ragged_dot_fwd(lhs, rhs, group_sizes, precision, preferred_element_type):
        out = general(lhs, rhs, group_sizes, RAGGED_DOT_DIMS, precision, preferred_element_type)
        return out, (lhs, rhs, group_sizes)  # the operands are both GEMMs' inputs: nothing to recompute

    def ragged_dot_bwd(precision, preferred_element_type, residuals, dout):
        lhs, rhs, group_sizes = residuals
        dout = dout.astype(lhs.dtype)
        dlhs = general(dout, rhs, group_sizes, RAGGED_DOT_DLHS_DIMS, precision, lhs.dtype)
        drhs = general(lhs, dout, group_sizes, RAGGED_DOT_DRHS_DIMS, precision, rhs.dtype)
        return dlhs, drhs, None

    ragged_dot.defvjp(ragged_dot_fwd, ragged_dot_bwd)

    def call(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
        return ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision, preferred_element_type)

    return call


class RouterStats(NamedTuple):
    """Sufficient statistics of the aux losses: sums over tokens, so the stats of a token-sharded batch
    are the sums of its shards' (jaxmoe/sharding.py psums them before `finalize_aux`)."""

    expert_counts: jax.Array  # [E] int32, assignments per expert
    prob_sums: jax.Array  # [E] float32, router probabilities summed over tokens
    z_squared_sum: jax.Array  # float32, sum over tokens of logsumexp(logits)^2
    tokens: jax.Array  # int32, T


def router_stats(logits: jax.Array, routing: Routing, E: int) -> RouterStats:
    z = jax.nn.logsumexp(logits, axis=-1)
    return RouterStats(_expert_counts(routing.ids.reshape(-1), E), routing.probs.sum(axis=0), jnp.sum(z * z),
                       jnp.int32(routing.ids.shape[0]))


def route_with_stats(logits, top_k: int | None = None, *, scoring: str = "softmax", renormalize: bool = True,
                     selection_bias=None, router: Router | None = None) -> tuple[Routing, RouterStats]:
    """`route` (the same arguments), and the RouterStats of its selection (sums over tokens, which add up
    over shards)."""
    router = make_router(router, top_k, scoring, renormalize)
    routing = route(logits, router=router, selection_bias=selection_bias)
    return routing, router_stats(logits, routing, logits.shape[-1])


def finalize_aux(stats: RouterStats, top_k: int) -> MoEAux:
    """The aux-loss formulas, from (possibly cross-device summed) RouterStats."""
    E = stats.expert_counts.shape[0]
    # max(., 1) makes T = 0 give zero losses instead of 0/0.
    tokens = jnp.maximum(stats.tokens, 1).astype(jnp.float32)
    assignment_share = stats.expert_counts.astype(jnp.float32) / (tokens * top_k)
    mean_prob = stats.prob_sums / tokens
    load_balancing = E * jnp.sum(assignment_share * mean_prob)
    return MoEAux(load_balancing, stats.z_squared_sum / tokens, stats.expert_counts)


def finalized(route_with_stats_fn: Callable) -> Callable:
    """A routing stage with the signature of `route_with_aux`, from one with that of `route_with_stats`."""

    def route_with_aux_fn(logits, top_k=None, *, scoring="softmax", renormalize=True, selection_bias=None,
                          router=None):
        router = make_router(router, top_k, scoring, renormalize)
        routing, stats = route_with_stats_fn(logits, router=router, selection_bias=selection_bias)
        return routing, finalize_aux(stats, router.top_k)

    return route_with_aux_fn


def route_with_aux(logits, top_k: int | None = None, *, scoring: str = "softmax", renormalize: bool = True,
                   selection_bias=None, router: Router | None = None) -> tuple[Routing, MoEAux]:
    """`route` (the same arguments), and the aux losses of its selection: the routing stage of
    `jaxmoe.pipeline.moe_pipeline`."""
    return finalized(route_with_stats)(logits, top_k, scoring=scoring, renormalize=renormalize,
                                       selection_bias=selection_bias, router=router)


def aux_losses(logits: jax.Array, routing: Routing, E: int) -> MoEAux:
    return finalize_aux(router_stats(logits, routing, E), routing.ids.shape[1])


def shared_experts(x2d, shared_w_gate, shared_w_up, shared_w_down, shared_output_gate=None):
    """[T, d] float32: the always-on shared experts, one dense SwiGLU of hidden width fs (rounded where the
    routed experts round: after the activation), times sigmoid(x @ shared_output_gate) when given (Qwen2-MoE)."""
    gate = jnp.dot(x2d, shared_w_gate, preferred_element_type=jnp.float32)
    up = jnp.dot(x2d, shared_w_up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x2d.dtype)
    out = jnp.dot(h, shared_w_down, preferred_element_type=jnp.float32)
    if shared_output_gate is not None:
        score = jnp.dot(x2d.astype(jnp.float32), shared_output_gate.astype(jnp.float32))
        out = out * jax.nn.sigmoid(score)[:, None]
    return out


def moe(x, router_weight, w_gate, w_up, w_down, **options):
    """The whole MoE layer in jax.lax; `jaxmoe.moe` with implementation="xla" and the same arguments."""
    if options.get("implementation") not in (None, "xla"):
        raise ValueError(f"jaxmoe.reference.moe runs only implementation='xla', got {options['implementation']!r}")
    from jaxmoe import api  # the public entry point's checks and stages; api imports this module

    return api.moe(x, router_weight, w_gate, w_up, w_down, **{**options, "implementation": "xla"})


__all__ = ["MoEAux", "RAGGED_DOT_DIMS", "RAGGED_DOT_DLHS_DIMS", "RAGGED_DOT_DRHS_DIMS", "MoERouting", "RouterStats", "Routing",
           "activation", "expert_ffn", "expert_probs", "finalized", "make_ragged_dot", "moe", "permute_rows",
           "route", "route_with_aux", "route_with_stats", "shared_experts"]
